"""grpc-timeout enforcement: one timer task per gateway, a heap of deadlines."""

from __future__ import annotations

import heapq
import itertools
from typing import Any

import structlog
import trio

from h2.errors import ErrorCodes

from ._flags import GrpcStatus

_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_grpc_timeout(value: bytes) -> float | None:
    """Seconds of a ``grpc-timeout`` value (``100m``, ``5S``...), None if malformed."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _UNITS.get(value[-1:])
    return None if unit is None else int(value[:-1]) * unit


class Deadlines:
    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Any]] = []
        self.counter = itertools.count()
        self.changed = trio.Event()

    def add(self, at: float, half: Any) -> None:
        first = not self.heap or at < self.heap[0][0]
        heapq.heappush(self.heap, (at, next(self.counter), half))
        if first:
            self.changed.set()

    async def run(self) -> None:
        while True:
            if not self.heap:
                self.changed = trio.Event()
                await self.changed.wait()
                continue
            at = self.heap[0][0]
            self.changed = trio.Event()
            with trio.move_on_at(at):
                await self.changed.wait()
            now = trio.current_time()
            while self.heap and self.heap[0][0] <= now:
                _, _, half = heapq.heappop(self.heap)
                try:
                    expire(half)
                except Exception:  # noqa: BLE001 - one odd stream must not stop the timer
                    structlog.get_logger("isthmus.gateway").error("deadline.expire_failed",
                                                                   exc_info=True)


def expire(half: Any) -> None:
    """The downstream request ran past its grpc-timeout: cancel upstream, answer DEADLINE_EXCEEDED."""
    from ._relay import _Sink

    if half.closed or (half.x is not None and half.x.done):
        return
    x = half.x
    peer = half.peer
    half.peer = _Sink(half) if hasattr(half, "sid") else None
    if peer is not None:
        peer.abort(ErrorCodes.CANCEL, "DT")
    if x is not None:
        x.response_flags = "DT"
    if not half.headers_sent:
        if hasattr(half, "q"):
            half.q.clear()
        half.respond_grpc(GrpcStatus.DEADLINE_EXCEEDED, "deadline exceeded")
    else:
        half.write_trailers([(b"grpc-status", b"%d" % GrpcStatus.DEADLINE_EXCEEDED),
                             (b"grpc-message", b"deadline exceeded")])

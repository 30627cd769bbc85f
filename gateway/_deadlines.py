"""grpc-timeout enforcement: one timer task per gateway, a heap of deadlines.

What expiry does is the request context's decision
(:meth:`gateway._context.RequestContext.expire`); this is only the clock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import structlog
import trio


class Deadlines:
    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Callable[[], None]]] = []
        self.counter = itertools.count()
        self.changed = trio.Event()

    def add(self, at: float, expire: Callable[[], None]) -> None:
        """Call ``expire()`` at ``at`` (trio clock)."""
        first = not self.heap or at < self.heap[0][0]
        heapq.heappush(self.heap, (at, next(self.counter), expire))
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
                _, _, expire = heapq.heappop(self.heap)
                try:
                    expire()
                except Exception:  # noqa: BLE001 - one odd stream must not stop the timer
                    structlog.get_logger("isthmus.gateway").error("deadline.expire_failed",
                                                                   exc_info=True)


__all__ = ["Deadlines"]

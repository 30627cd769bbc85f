"""HTTP/2 abuse containment and overload shedding for both listeners.

Theory of operation
-------------------
The per-connection HTTP/2 frame rules (rapid reset, control-frame floods, header-block
sizes, the request-headers deadline) are sans-IO: :class:`gateway._frames.FrameGuard`.
This module is the trio side of abuse containment.

:class:`Shield` is the per-process part: per source-IP and per peer-identity connection
counts, and a :class:`MemoryWatch` that samples the RSS and makes the gateway shed new
connections and streams above a ceiling.  :class:`HeadersDeadlineStream` gives HTTP/1.1
connections a request-headers deadline without touching the h11 code.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import trio
from h2.connection import H2Connection
from h2.errors import ErrorCodes

from ._flags import flag
from ._half import Half, Headers
from ._io import StreamWrapper

log = structlog.get_logger("isthmus.gateway")

INF = float("inf")
# A listener's per-request entry point: (downstream half, request headers, end of stream).
RequestHandler = Callable[[Half, Headers, bool], None]
# Violations that earn the client's IP a cooldown (slow or non-reading clients may be
# merely slow: they don't).
PENALIZED = frozenset({"rapid_reset", "control_frame_flood", "window_update_flood",
                       "header_block_too_large"})


# ---------------------------------------------------------------- HTTP/1.1 headers deadline

class HeadersDeadlineStream(StreamWrapper):
    """Wraps an HTTP/1.1 downstream: each request's headers must arrive within ``timeout``.

    The first request's clock starts at once; later ones' at their first byte (the idle
    timeout governs the wait before it).  ``wrap_on_request`` learns when headers are
    complete; the next read after that request's response is done re-arms the clock.
    """

    def __init__(self, stream: trio.abc.Stream, timeout: float,
                 on_timeout: Callable[[], None]) -> None:
        self.stream = stream
        self.timeout = timeout
        self.on_timeout = on_timeout
        self.armed = True
        self.started: float | None = trio.current_time()
        self.half: Half | None = None

    def wrap_on_request(self, on_request: RequestHandler) -> RequestHandler:
        def wrapped(half: Half, headers: Headers, end: bool) -> None:
            self.armed = False
            self.half = half
            on_request(half, headers, end)
        return wrapped

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self.armed:
            half = self.half
            if half is None or not half.closed:  # its response is still being written
                return await self.stream.receive_some(max_bytes)
            self.armed, self.started, self.half = True, None, None
        if self.started is None:
            data = await self.stream.receive_some(max_bytes)
            self.started = trio.current_time()
            return data
        with trio.move_on_at(self.started + self.timeout):
            return await self.stream.receive_some(max_bytes)
        self.on_timeout()
        raise trio.BrokenResourceError("request headers timeout")



# ---------------------------------------------------------------- process-wide limits

def cgroup_memory_limit() -> int:
    """The container's memory limit in bytes (cgroup v2 or v1), 0 if none."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return 0


def current_rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class MemoryWatch:
    """Samples the RSS a few times a second; ``overloaded`` while above the ceiling."""

    def __init__(self, ceiling: int | None, interval: float = 0.25,
                 sample: Callable[[], int] = current_rss) -> None:
        if ceiling is None:
            limit = cgroup_memory_limit()
            ceiling = int(limit * 0.9) if limit else 0
        self.ceiling = ceiling
        self.interval = interval
        self.sample = sample
        self.rss = 0
        self.overloaded = False

    def check(self) -> bool:
        if not self.ceiling:
            self.overloaded = False
            return False
        self.rss = self.sample()
        was, self.overloaded = self.overloaded, self.rss > self.ceiling
        if self.overloaded != was:
            (log.warning if self.overloaded else log.info)(
                "overload.memory" if self.overloaded else "overload.memory_cleared",
                rss=self.rss, ceiling=self.ceiling)
        return self.overloaded

    async def run(self) -> None:
        while True:
            self.check()
            await trio.sleep(self.interval)


class Shield:
    """Per-process admission: source-IP and peer-identity caps, memory shedding.

    ``reject(limit)`` counts a refusal in ``isthmus_overload_rejections_total`` and logs
    it, at most once a second per limit (a flood must not turn into a log flood).
    """

    def __init__(self, limits: Any, overload_counter: Any,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.counter = overload_counter
        self.clock = clock
        self.per_ip: dict[str, int] = {}
        self.per_peer: dict[str, int] = {}
        self.banned: dict[str, float] = {}  # ip -> end of its abuse cooldown
        self.memory = MemoryWatch(limits.max_memory_bytes)
        self._logged: dict[str, tuple[float, int]] = {}

    def reject(self, limit: str, **fields: Any) -> None:
        self.counter.labels(limit).inc()
        now = self.clock()
        last, suppressed = self._logged.get(limit, (-INF, 0))
        if now - last >= 1.0:
            log.warning("overload.rejected", limit=limit, suppressed=suppressed, **fields)
            self._logged[limit] = (now, 0)
        else:
            self._logged[limit] = (last, suppressed + 1)

    @staticmethod
    def _take(counts: dict[str, int], key: str, cap: int) -> bool:
        n = counts.get(key, 0)
        if n >= cap:
            return False
        counts[key] = n + 1
        return True

    @staticmethod
    def _give(counts: dict[str, int], key: str) -> None:
        n = counts.get(key, 0) - 1
        if n > 0:
            counts[key] = n
        else:
            counts.pop(key, None)

    def accept(self, ip: str) -> bool:
        """A new TCP connection from ``ip`` (before TLS): take a slot or refuse."""
        if self.memory.overloaded:
            self.reject("memory", remote=ip)
            return False
        if self.banned and ip in self.banned:
            if self.banned[ip] > self.clock():
                self.reject("abuse_cooldown", remote=ip)
                return False
            del self.banned[ip]
        if ip and not self._take(self.per_ip, ip, self.limits.max_connections_per_ip):
            self.reject("connections_per_ip", remote=ip)
            return False
        return True

    def penalize(self, ip: str, reason: str) -> None:
        """``ip`` was closed for abuse: refuse its new connections for a while.

        Closing an abusive connection bounds what one connection costs; without a cooldown
        a client that reconnects at once would still keep the gateway busy.
        """
        cooldown = self.limits.abuse_cooldown
        if not ip or not cooldown or reason not in PENALIZED:
            return
        now = self.clock()
        if len(self.banned) > 10_000:
            self.banned = {k: t for k, t in self.banned.items() if t > now}
        self.banned[ip] = now + cooldown

    def release(self, ip: str) -> None:
        if ip:
            self._give(self.per_ip, ip)

    def admit_peer(self, peer: str) -> bool:
        if self._take(self.per_peer, peer, self.limits.max_inbound_connections_per_peer):
            return True
        self.reject("connections_per_peer", peer=peer)
        return False

    def release_peer(self, peer: str) -> None:
        self._give(self.per_peer, peer)

    def shed_streams(self, on_request: RequestHandler) -> RequestHandler:
        """Wrap a listener's request handler: 503 / gRPC UNAVAILABLE while over memory."""
        memory = self.memory

        def handler(half: Half, headers: Headers, end: bool) -> None:
            if not memory.overloaded:
                on_request(half, headers, end)
                return
            self.reject("memory")
            grpc = any(k == b"content-type" and v.startswith(b"application/grpc")
                       for k, v in headers)
            f = flag("OM")
            if grpc:
                half.respond_grpc(f.grpc, f.text)
            else:
                half.respond(f.http, [(b"content-type", b"text/plain")], f.text.encode() + b"\n")
        return handler


async def refuse_connection(stream: trio.abc.Stream, http2: bool, message: str) -> None:
    """Tell a connection we won't serve it (GOAWAY or 503), then close it."""
    if http2:
        from h2.config import H2Configuration

        conn = H2Connection(H2Configuration(client_side=False))
        conn.initiate_connection()
        conn.close_connection(ErrorCodes.NO_ERROR, additional_data=message.encode())
        data = conn.data_to_send()
    else:
        body = message.encode() + b"\n"
        data = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    with trio.move_on_after(1):
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


__all__ = ["HeadersDeadlineStream", "MemoryWatch", "PENALIZED", "RequestHandler", "Shield",
           "cgroup_memory_limit", "current_rss", "refuse_connection"]

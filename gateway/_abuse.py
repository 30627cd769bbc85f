"""HTTP/2 abuse containment and overload shedding for both listeners.

Theory of operation
-------------------
:class:`FrameGuard` is sans-IO.  :meth:`FrameGuard.install` wraps two methods of one
server-side ``h2`` connection *instance*: ``_receive_frame`` (called once per complete
frame, including frames h2 answers on its own and never reports as events) and
``receive_data`` (to look at the header block h2 is still assembling).  It counts what the
client sends and, over a limit, raises :class:`AbuseDetected` — an h2
``DenialOfServiceError`` — from inside ``receive_data``; h2 then queues
``GOAWAY(ENHANCE_YOUR_CALM)`` itself and the relay fails every stream of the connection,
exactly as for any other protocol error.  The rules:

* rapid reset (CVE-2023-44487), Envoy's rule: once ``premature_reset_total_stream_count``
  streams were opened, close the connection when at least half of them were reset by the
  client within ``premature_reset_min_stream_lifetime`` of opening (streams we refused
  for exceeding MAX_CONCURRENT_STREAMS count as such resets);
* control-frame floods: SETTINGS, PING, PRIORITY, GOAWAY, unknown frame types and empty
  DATA frames share a per-second budget; WINDOW_UPDATE has its own, larger one;
* MAX_CONCURRENT_STREAMS: h2 would answer an extra stream with a connection error; we let
  h2 accept it (so HPACK state stays in step) and reset just that stream with
  REFUSED_STREAM;
* header blocks: a HEADERS+CONTINUATION block larger than ``max_header_list_size`` is
  refused before h2 finishes buffering it (h2's own caps — 64 CONTINUATION frames, the
  decoded header list size, the HPACK table size — end in GOAWAY via ProtocolError too);
* slowloris: :attr:`FrameGuard.deadline` is when the connection must have completed its
  first request headers, or the header block in progress; the trio shell closes the
  connection when it passes.

:class:`Shield` is the per-process part: per source-IP and per peer-identity connection
counts, and a :class:`MemoryWatch` that samples the RSS and makes the gateway shed new
connections and streams above a ceiling.  :class:`HeadersDeadlineStream` gives HTTP/1.1
connections a request-headers deadline without touching the h11 code.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h2.exceptions
import structlog
import trio
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import RequestReceived
from h2.settings import SettingCodes

from ._flags import flag
from ._half import Half, Headers
from ._io import StreamWrapper

log = structlog.get_logger("isthmus.gateway")

INF = float("inf")
_DATA, _HEADERS, _PRIORITY, _RST, _SETTINGS, _PUSH, _PING, _GOAWAY, _WINDOW, _CONT = range(10)
# h2 itself need never refuse a stream: we do, one stream at a time.
_H2_STREAM_CAP = 2**31 - 1
# Violations that earn the client's IP a cooldown (slow or non-reading clients may be
# merely slow: they don't).
# A listener's per-request entry point: (downstream half, request headers, end of stream).
RequestHandler = Callable[[Half, Headers, bool], None]
PENALIZED = frozenset({"rapid_reset", "control_frame_flood", "window_update_flood",
                       "header_block_too_large"})
# Open-stream timestamps kept for the rapid-reset rule before old ones are pruned.
_OPEN_TIMES_PRUNE = 4096


class AbuseDetected(h2.exceptions.DenialOfServiceError):
    """A client broke an abuse limit; h2 answers with GOAWAY(ENHANCE_YOUR_CALM)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class FrameGuard:
    """Per-connection abuse counters for one server-side h2 connection (sans-IO)."""

    def __init__(self, limits: Any, clock: Callable[[], float],
                 on_refused: Callable[[], None] | None = None) -> None:
        self.limits = limits
        self.clock = clock
        self.on_refused = on_refused
        self.headers_timeout = float(limits.request_headers_timeout)
        self.max_streams = int(limits.max_concurrent_streams)
        self.reset_total = int(limits.premature_reset_total_stream_count)
        self.reset_lifetime = float(limits.premature_reset_min_stream_lifetime)
        self.control_cap = int(limits.max_control_frames_per_second)
        self.window_cap = int(limits.max_window_updates_per_second)
        self.block_cap = int(limits.max_header_list_size)
        self.opened = 0
        self.premature = 0
        self.refused = 0
        self.control = 0
        self.windows = 0
        self.window_start = clock()
        self.open_times: dict[int, float] = {}
        self.last_sid = 0
        self.conn_start = self.window_start
        self.got_headers = False
        self.block_start: float | None = None
        self.deadline = self.conn_start + self.headers_timeout
        self.violation: AbuseDetected | None = None
        self.conn: H2Connection | None = None
        self.batch_resets: set[int] | None = None  # RST_STREAMs of the read in progress
        # Off for peer gateways (inbound): their resets are many workloads' resets relayed
        # over one shared connection, and the peer's outbound listener already applies this
        # rule to each workload connection. Closing the shared connection would let one
        # abusive workload in a cluster cut off every other caller in it.
        self.close_on_rapid_reset = True

    # -- wiring ---------------------------------------------------------------------------
    def install(self, conn: H2Connection) -> None:
        """Wrap ``conn`` (after ``initiate_connection``: the peer was told our real limit)."""
        self.conn = conn
        conn.local_settings._settings[SettingCodes.MAX_CONCURRENT_STREAMS] = (
            collections.deque([_H2_STREAM_CAP]))
        inner_frame = conn._receive_frame
        inner_data = conn.receive_data

        def receive_frame(frame: Any) -> list[Any]:
            return self._frame(frame, inner_frame)

        def receive_data(data: Any) -> list[Any]:
            self.batch_resets = None
            events = inner_data(data)
            self._after_data(conn)
            if self.batch_resets:
                # Opened and reset in the same read: never start work for such a stream
                # (no upstream stream, so the reset is not relayed to a peer gateway,
                # whose own rapid-reset rule would otherwise punish our shared connection).
                gone = self.batch_resets
                events = [e for e in events
                          if not (type(e) is RequestReceived and e.stream_id in gone)]
            return events

        conn._receive_frame = receive_frame  # type: ignore[method-assign]
        conn.receive_data = receive_data  # type: ignore[method-assign]

    def _fail(self, reason: str, detail: str) -> AbuseDetected:
        self.violation = AbuseDetected(reason, detail)
        return self.violation

    # -- per frame ------------------------------------------------------------------------
    def _frame(self, frame: Any, inner: Callable[[Any], list[Any]]) -> list[Any]:
        t = frame.type
        if t == _HEADERS:
            sid = frame.stream_id
            if sid > self.last_sid and sid & 1:
                return self._new_stream(frame, sid, inner)
            return inner(frame)
        if t == _DATA:
            if not frame.data and "END_STREAM" not in frame.flags:
                self._count_control("empty DATA frame")
            return inner(frame)
        if t == _RST:
            if self.batch_resets is None:
                self.batch_resets = set()
            self.batch_resets.add(frame.stream_id)
            t0 = self.open_times.pop(frame.stream_id, None)
            if t0 is not None and self.clock() - t0 < self.reset_lifetime:
                self.premature += 1
                self._check_resets()
            return inner(frame)
        if t == _WINDOW:
            now = self.clock()
            if now - self.window_start >= 1.0:
                self.window_start, self.control, self.windows = now, 0, 0
            self.windows += 1
            if self.windows > self.window_cap:
                raise self._fail("window_update_flood",
                                 f"more than {self.window_cap} WINDOW_UPDATE frames in a second")
            return inner(frame)
        # SETTINGS, PING, PRIORITY, GOAWAY, PUSH_PROMISE and unknown types.
        self._count_control(type(frame).__name__)
        return inner(frame)

    def _count_control(self, what: str) -> None:
        now = self.clock()
        if now - self.window_start >= 1.0:
            self.window_start, self.control, self.windows = now, 0, 0
        self.control += 1
        if self.control > self.control_cap:
            raise self._fail("control_frame_flood",
                             f"more than {self.control_cap} control frames in a second "
                             f"(last: {what})")

    def _new_stream(self, frame: Any, sid: int, inner: Callable[[Any], list[Any]]) -> list[Any]:
        self.last_sid = sid
        self.opened += 1
        now = self.clock()
        if not self.got_headers:
            self.got_headers = True
            self._update_deadline()
        times = self.open_times
        times[sid] = now
        if len(times) > _OPEN_TIMES_PRUNE:
            # Only recent streams can still be reset prematurely; drop the oldest ones.
            horizon = now - self.reset_lifetime
            for old in list(times):
                if times[old] >= horizon or len(times) <= _OPEN_TIMES_PRUNE // 2:
                    break
                del times[old]
        events = inner(frame)
        conn = self.conn
        if conn is not None and conn.open_inbound_streams > self.max_streams:
            # Over the advertised MAX_CONCURRENT_STREAMS: refuse this stream only.
            conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            events = [e for e in events if getattr(e, "stream_id", None) != sid]
            self.refused += 1
            self.premature += 1
            times.pop(sid, None)
            if self.on_refused is not None:
                self.on_refused()
            self._check_resets()
        return events

    def _check_resets(self) -> None:
        if not self.close_on_rapid_reset:
            return
        if self.opened >= self.reset_total and self.premature * 2 >= self.opened:
            raise self._fail("rapid_reset",
                             f"{self.premature} of {self.opened} streams reset or refused "
                             f"within {self.reset_lifetime:g}s of opening")

    # -- per read ---------------------------------------------------------------------------
    def _after_data(self, conn: H2Connection) -> None:
        buf = conn.incoming_buffer
        pending = buf._headers_buffer
        partial = buf._data
        in_block = bool(pending) or (len(partial) >= 9 and partial[3] in (_HEADERS, _CONT))
        if in_block:
            if self.block_start is None:
                self.block_start = self.clock()
                self._update_deadline()
            size = sum(len(f.data) for f in pending)
            if size > self.block_cap:
                exc = self._fail("header_block_too_large",
                                 f"header block of {size} bytes exceeds max_header_list_size "
                                 f"{self.block_cap}")
                conn._terminate_connection(ErrorCodes.ENHANCE_YOUR_CALM)
                raise exc
        elif self.block_start is not None:
            self.block_start = None
            self._update_deadline()

    def _update_deadline(self) -> None:
        if self.block_start is not None:
            self.deadline = self.block_start + self.headers_timeout
        elif not self.got_headers:
            self.deadline = self.conn_start + self.headers_timeout
        else:
            self.deadline = INF

    def headers_timed_out(self) -> AbuseDetected:
        what = "its first request headers" if not self.got_headers else "a header block"
        return self._fail("headers_timeout",
                          f"no complete {what} within {self.headers_timeout:g}s")


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
        self.half: Any = None

    def wrap_on_request(self, on_request: Callable[..., None]) -> Callable[..., None]:
        def wrapped(half: Any, headers: Any, end: bool) -> None:
            self.armed = False
            self.half = half
            on_request(half, headers, end)
        return wrapped

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self.armed:
            half = self.half
            if half is None or not half.complete.is_set():
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


__all__ = ["AbuseDetected", "FrameGuard", "HeadersDeadlineStream", "MemoryWatch", "Shield",
           "cgroup_memory_limit", "current_rss", "refuse_connection"]

"""The thin trio shell around the sans-IO relay: byte pumps and opaque-TCP halves.

``pump_h2`` is the only place an HTTP/2 connection touches a socket: one read, all its
events through the relay, and a writer task that sends whatever the relay queued (for
this connection or — because streams are relayed across connections — for any other).
A dedicated writer per connection means a slow socket never stalls the reader, so
WINDOW_UPDATEs and resets keep flowing while data waits for the peer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import h2.errors
import structlog
import trio

from ._frames import FrameGuard
from ._half import Half, Headers
from ._relay import H2Endpoint

log = structlog.get_logger("isthmus.gateway")

MAX_READ = 256 * 1024
DOWNSTREAM_READ = 16 * 1024
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class StreamWrapper(trio.abc.HalfCloseableStream):
    """Delegates everything to ``self.stream``; subclasses override what they change."""

    stream: trio.abc.Stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self.stream.aclose()


class PrefixedStream(StreamWrapper):
    """A stream that first replays bytes already read (protocol sniffing)."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix, b""
            return data
        return await self.stream.receive_some(max_bytes)


async def pump_h2(stream: trio.abc.Stream, ep: H2Endpoint, idle_timeout: float,
                  first: bytes = b"", guard: FrameGuard | None = None,
                  on_abuse: Callable[[str, str], None] | None = None) -> None:
    """Run one HTTP/2 connection until it closes; fail its streams when it does.

    ``guard`` (a :class:`gateway._frames.FrameGuard`, downstream connections only) adds
    the request-headers deadline; ``on_abuse(reason, detail)`` hears why a connection was
    closed for abuse (guard violations, output ceiling ``ep.out_limit``).
    """
    wake_ev = trio.Event()
    overflowed = False

    def wake() -> None:
        wake_ev.set()

    ep.wake = wake
    # Whatever was queued before the pump ran (preface, streams attached while dialling).
    ep.dirty = True
    wake_ev.set()

    done_reading = False

    async def writer() -> None:
        nonlocal wake_ev
        try:
            while True:
                await wake_ev.wait()
                wake_ev = trio.Event()
                data = ep.take_output()
                if data:
                    await stream.send_all(data)
                if done_reading and not ep.dirty:
                    return  # last frames (GOAWAY) are out
        except _BROKEN:
            ep.closed = True
            nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            if ep.out_limit:
                def overflow() -> None:
                    # The peer does not read: no GOAWAY would get through, just close.
                    nonlocal overflowed
                    ep.on_overflow = None
                    ep.closed = overflowed = True
                    nursery.cancel_scope.cancel()

                ep.on_overflow = overflow
            nursery.start_soon(writer)
            if first:
                ep.receive(first)
            receive = stream.receive_some
            idle = idle_timeout if idle_timeout else math.inf
            last = trio.current_time()
            gd = guard.deadline if guard is not None else math.inf
            # All frames of one read are handled without yielding: small reads from
            # downstream clients bound how long one client's burst (a flood) holds the
            # loop; pooled upstream connections keep large reads for bulk throughput.
            size = MAX_READ if guard is None else DOWNSTREAM_READ
            try:
                while not ep.closed:
                    # One cancel scope per idle period, not per read: a scope costs more
                    # than a small request's parsing.  It fires at most once per period.
                    period = last + idle
                    with trio.CancelScope(deadline=min(period, gd)) as scope:
                        while not ep.closed:
                            data = await receive(size)
                            if not data:
                                ep.closed = True
                                break
                            ep.receive(data)
                            last = trio.current_time()
                            if guard is not None and guard.deadline != gd:
                                gd = guard.deadline
                                scope.deadline = min(period, gd)
                    if scope.cancelled_caught and guard is not None and trio.current_time() >= gd:
                        guard.headers_timed_out()
                        ep.conn.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                        ep.mark()
                        break
                    if scope.cancelled_caught:
                        if ep.halves or trio.current_time() - last < idle:
                            last = trio.current_time() if ep.halves else last
                            continue
                        ep.conn.close_connection()
                        ep.mark()
                        break
            except _BROKEN:
                ep.closed = True
            # Let the writer send what is queued (GOAWAY, last frames), for at most a second.
            done_reading = True
            wake()
            nursery.cancel_scope.deadline = trio.current_time() + 1
    except _BROKEN:
        pass
    finally:
        ep.on_overflow = None
        if on_abuse is not None:
            if guard is not None and guard.violation is not None:
                on_abuse(guard.violation.reason, guard.violation.detail)
            elif overflowed:
                on_abuse("outbound_buffer", f"more than {ep.out_limit} bytes queued for a "
                         "peer that does not read")
            elif ep.error:
                # The core's own limits (HPACK bombs, CONTINUATION backlog, frame sizes:
                # under their reason where the core names one) and plain protocol
                # violations.
                on_abuse(ep.abuse or "protocol_error", ep.error)
        ep.terminate()
        ep.wake = _closed_wake
        if overflowed:
            await trio.aclose_forcefully(stream)
        with trio.CancelScope(shield=True):
            with trio.move_on_after(1):
                try:
                    await stream.aclose()
                except _BROKEN:
                    pass


def _closed_wake() -> None:
    return None


class TcpHalf(Half):
    """An opaque TCP (or TLS) byte stream as one half of a relayed exchange.

    Bytes read from the socket are handed to the peer with their length as credit; the
    reader stops once ``buffer`` bytes are in flight and resumes as the peer acks.  Bytes
    written by the peer are sent by a writer task, which acks them after the socket took them.
    """

    __slots__ = ("stream", "buffer", "in_flight", "out", "out_end", "open_ok", "failed",
                 "_wake_writer", "_wake_reader")

    answers = False  # bytes only: a failure closes the socket

    def __init__(self, stream: trio.abc.Stream, buffer: int) -> None:
        super().__init__()
        self.stream = stream
        self.buffer = buffer
        self.in_flight = 0
        self.out: list[tuple[bytes, int]] = []
        self.out_end = False
        self.open_ok = trio.Event()  # peer answered 2xx (or we are the upstream)
        self.failed = False
        self._wake_writer = trio.Event()
        self._wake_reader = trio.Event()

    # -- Half ---------------------------------------------------------------------------
    def write_headers(self, headers: Headers, end: bool) -> None:
        status = b""
        for k, v in headers:
            if k == b":status":
                status = v
        ctx = self.ctx
        if ctx is not None and status:
            ctx.record.response_code = int(status)
        if status and not status.startswith(b"2"):
            self.failed = True
            if ctx is not None:
                ctx.flag("UF" if status.startswith(b"5") else "NR")
            self._close()
            return
        self.open_ok.set()
        if end:
            self.write_end()

    def send_data(self, data: bytes, credit: int) -> None:
        self.out.append((data, credit))
        self._wake_writer.set()

    def write_trailers(self, trailers: Headers) -> None:
        self.write_end()

    def write_end(self) -> None:
        self.out_end = True
        self._wake_writer.set()

    def reset(self, code: int) -> None:
        self._close()

    def ack(self, credit: int) -> None:
        self.in_flight -= credit
        self._wake_reader.set()

    def _close(self) -> None:
        self.closed = True
        self.open_ok.set()
        self._wake_writer.set()
        self._wake_reader.set()

    # -- tasks ------------------------------------------------------------------------
    async def run(self) -> None:
        """Pump both directions until both ends closed or either failed."""
        try:
            async with trio.open_nursery() as n:
                n.start_soon(self._writer, n.cancel_scope)
                await self.open_ok.wait()
                if not self.closed:
                    await self._reader()
                # Reader done: wait for the writer to finish the other direction.
        finally:
            self.closed = True
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await self.stream.aclose()
                except _BROKEN:
                    pass

    async def _reader(self) -> None:
        peer = self.peer
        assert peer is not None
        ctx = self.ctx
        try:
            while not self.closed:
                while self.in_flight >= self.buffer and not self.closed:
                    self._wake_reader = trio.Event()
                    await self._wake_reader.wait()
                if self.closed:
                    return
                data = await self.stream.receive_some(min(MAX_READ, self.buffer))
                if not data:
                    peer.write_end()
                    return
                self.in_flight += len(data)
                if ctx is not None:
                    ctx.record.bytes_received += len(data)
                peer.write_data(data, len(data))
        except _BROKEN:
            self._fail()

    async def _writer(self, scope: trio.CancelScope) -> None:
        ctx = self.ctx
        try:
            while True:
                while not self.out and not self.out_end and not self.closed:
                    self._wake_writer = trio.Event()
                    await self._wake_writer.wait()
                if self.out:
                    batch, self.out = self.out, []
                    await self.stream.send_all(b"".join(d for d, _ in batch))
                    n = sum(len(d) for d, _ in batch)
                    if ctx is not None:
                        ctx.record.bytes_sent += n
                    self.give_back(sum(c for _, c in batch))
                    continue
                if self.closed:
                    scope.cancel()
                    return
                if self.out_end:
                    try:
                        await self.stream.send_eof()  # type: ignore[attr-defined]
                    except (AttributeError, NotImplementedError):
                        pass  # TLS without half-close: the close at the end does it
                    return
        except _BROKEN:
            self._fail()
            scope.cancel()

    def _fail(self) -> None:
        if self.closed:
            return
        self._close()
        if self.peer is not None:
            self.peer.abort(h2.errors.ErrorCodes.CANCEL, "UC", "connection reset")


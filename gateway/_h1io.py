"""HTTP/1.1 sockets (trio shell around :mod:`gateway._h1`).

* :class:`H1Connection` serves one workload connection on the outbound listener: a
  reader that parses requests (one at a time, bodies paced by upstream acks) and a
  writer task that sends what the request's :class:`~gateway._h1.H1Half` queued;
* :func:`run_h1_upstream` runs one request to a local HTTP/1.1 service over a fresh or
  kept-alive connection from :class:`H1Pool`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio
from h2.errors import ErrorCodes

from ._h1 import H1Half, H1Upstream, request_headers, response_headers
from ._half import Half, Headers
from ._sanitize import Refused

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class H1Connection:
    """Drives one HTTP/1.1 connection; ``on_request(half, headers, end)`` routes requests."""

    def __init__(self, stream: trio.abc.Stream, scheme: bytes, buffer: int,
                 on_request: Callable[[H1Half, Headers, bool], None],
                 idle_timeout: float) -> None:
        self.stream = stream
        self.scheme = scheme
        self.buffer = buffer
        self.on_request = on_request
        self.idle = idle_timeout
        self.h11 = h11.Connection(h11.SERVER)
        self.out: list[bytes] = []
        self.acks: list[tuple[int, Half]] = []
        self.in_flight = 0
        self.broken = False
        self._writer_ev = trio.Event()
        self._reader_ev = trio.Event()
        self._done = trio.Event()  # the current request's response is complete
        self.half: H1Half | None = None
        self._idle = trio.Event()  # set while the writer has nothing left to send

    # -- H1Server -------------------------------------------------------------------------
    def send(self, event: Any, credit: int = 0, ack_to: Half | None = None) -> None:
        try:
            data = self.h11.send(event)
        except h11.LocalProtocolError:
            self.broken = True
            data = None
        if data:
            self.out.append(data)
        if credit and ack_to is not None:
            self.acks.append((credit, ack_to))
        self._writer_ev.set()

    def wake(self) -> None:
        self._writer_ev.set()

    def wake_reader(self) -> None:
        self._reader_ev.set()

    def response_done(self) -> None:
        self._done.set()

    # -- tasks ----------------------------------------------------------------------------
    def _client_gone(self) -> None:
        if self.half is not None and self.half.peer is not None:
            self.half.peer.abort(ErrorCodes.CANCEL, "DC", "client went away")

    async def _writer(self) -> None:
        try:
            await self._write_loop()
        except _BROKEN:
            self.broken = True
            self._client_gone()

    async def _write_loop(self) -> None:
        while True:
            while not self.out and not self.broken:
                self._idle.set()
                self._writer_ev = trio.Event()
                await self._writer_ev.wait()
            if self.out:
                if self._idle.is_set():  # idle -> busy; waiters hold the event until idle again
                    self._idle = trio.Event()
                data, self.out = b"".join(self.out), []
                acks, self.acks = self.acks, []
                await self.stream.send_all(data)
                for credit, peer in acks:
                    peer.ack(credit)
            elif self.broken:
                self._idle.set()
                return

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as n:
                n.start_soon(self._writer)
                try:
                    await self._serve()
                except _BROKEN:
                    self._client_gone()
                n.cancel_scope.cancel()
        except _BROKEN:
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await self.stream.aclose()
                except _BROKEN:
                    pass

    async def _next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.move_on_after(self.idle):
                data = await self.stream.receive_some(64 * 1024)
                self.h11.receive_data(data)
                continue
            return h11.ConnectionClosed()

    async def _bad_request(self, status: int = 400) -> None:
        """Answer ``status`` and close, if no response has begun (else just close)."""
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self.send(h11.Response(status_code=status, headers=[(b"content-length", b"0"),
                                                                (b"connection", b"close")]))
            self.send(h11.EndOfMessage())
            await self._flush()

    async def _serve(self) -> None:
        while True:
            try:
                event = await self._next_event()
            except h11.RemoteProtocolError:
                await self._bad_request()
                return
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if not isinstance(event, h11.Request):
                return
            try:
                headers, end = request_headers(event, self.scheme)
            except Refused:
                await self._bad_request()
                return
            self._done = trio.Event()
            half = self.half = H1Half(self)
            self.in_flight = 0
            self.on_request(half, headers, end)
            # Request body, paced by the upstream's acks.
            while True:
                while self.in_flight >= self.buffer and not half.closed:
                    self._reader_ev = trio.Event()
                    await self._reader_ev.wait()
                try:
                    ev = await self._next_event()
                except h11.RemoteProtocolError:
                    # A broken body (bad chunk, short read): fail this exchange, upstream too.
                    if half.peer is not None:
                        half.peer.abort(ErrorCodes.PROTOCOL_ERROR, "DPE", "malformed request body")
                    if not half.headers_sent:
                        half.closed = True
                        if half.ctx is not None:
                            half.ctx.record.response_code = 400
                            half.ctx.flag("DPE")
                            half.ctx.finish()
                        await self._bad_request()
                    return
                if isinstance(ev, h11.Data):
                    self.in_flight += len(ev.data)
                    if half.ctx is not None:
                        half.ctx.record.bytes_received += len(ev.data)
                    if half.peer is not None:
                        half.peer.write_data(ev.data, len(ev.data))
                    else:
                        self.in_flight -= len(ev.data)
                elif isinstance(ev, h11.EndOfMessage):
                    if not end and half.peer is not None:
                        half.peer.write_end()
                    break
                else:
                    self._client_gone()
                    return
            await self._done.wait()
            if half.ctx is not None:
                half.ctx.finish()
            await self._flush()
            if self.broken or self.h11.our_state is not h11.DONE:
                return
            try:
                self.h11.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _flush(self) -> None:
        """Wait until the writer has sent everything queued so far."""
        while self.out or not self._idle.is_set():
            if self.broken:
                return
            self._writer_ev.set()
            await self._idle.wait()


# ---------------------------------------------------------------- upstream (to services)


class H1Pool:
    """Idle keep-alive HTTP/1.1 connections per local target.

    Reused only while younger than ``max_idle`` seconds (below common server keep-alive
    timeouts), so a reused connection is very unlikely to have been closed under us.
    """

    def __init__(self, max_idle: float = 4.0, per_target: int = 64) -> None:
        self.idle: dict[Any, list[tuple[float, trio.abc.Stream, h11.Connection]]] = {}
        self.max_idle = max_idle
        self.per_target = per_target

    def get(self, key: Any) -> tuple[trio.abc.Stream, h11.Connection] | None:
        conns = self.idle.get(key)
        now = trio.current_time()
        while conns:
            t, stream, conn = conns.pop()
            if now - t < self.max_idle:
                return stream, conn
        return None

    def put(self, key: Any, stream: trio.abc.Stream, conn: h11.Connection) -> bool:
        conns = self.idle.setdefault(key, [])
        if len(conns) >= self.per_target:
            return False
        conns.append((trio.current_time(), stream, conn))
        return True


async def run_h1_upstream(up: H1Upstream, key: Any, pool: H1Pool,
                          connect: Callable[[], Awaitable[trio.abc.Stream]]) -> None:
    """Send ``up``'s request and relay the response, on a pooled or new connection."""
    output, credit = trio.Event(), trio.Event()
    up.on_output, up.on_credit = output.set, credit.set
    reused = pool.get(key)
    try:
        if reused is not None:
            stream, conn = reused
        else:
            stream, conn = await connect(), h11.Connection(h11.CLIENT)
    except Exception as exc:  # noqa: BLE001 - any connect failure is a 503 downstream
        up.closed = True
        if up.peer is not None:
            up.peer.abort(ErrorCodes.CANCEL, "UF", f"upstream connect failed: {exc}")
        return

    async def send(scope: trio.CancelScope) -> None:
        nonlocal output
        try:
            while True:
                while not up.queue and not up.closed:
                    output = trio.Event()
                    up.on_output = output.set
                    await output.wait()
                if up.closed:
                    scope.cancel()
                    return
                batch = up.take_queue()
                data = b"".join(conn.send(ev) or b"" for ev, _ in batch)
                await stream.send_all(data)
                up.give_back(sum(c for _, c in batch))
                if any(isinstance(ev, h11.EndOfMessage) for ev, _ in batch):
                    up.request_done = True
                    return
        except (*_BROKEN, h11.LocalProtocolError):
            up.closed = True
            scope.cancel()

    async def receive() -> bool:
        """Relay the response; True if the connection may be kept alive."""
        nonlocal credit
        peer = up.peer
        assert peer is not None  # linked before the exchange runs
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                while up.in_flight >= up.buffer and not up.closed:
                    credit = trio.Event()
                    up.on_credit = credit.set
                    await credit.wait()
                if up.closed:
                    return False
                data = await stream.receive_some(64 * 1024)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    raise trio.BrokenResourceError("upstream closed the connection")
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                up.headers_sent = True
                peer.write_headers(response_headers(event), False)
            elif isinstance(event, h11.Data):
                up.in_flight += len(event.data)
                peer.write_data(bytes(event.data), len(event.data))
            elif isinstance(event, h11.EndOfMessage):
                up.closed = True
                peer.write_end()
                # The request may still be sending (server answered early): then don't reuse.
                return up.request_done
            elif isinstance(event, h11.ConnectionClosed):
                raise trio.BrokenResourceError("upstream closed the connection")
            else:
                return False

    keep = pooled = False
    try:
        try:
            async with trio.open_nursery() as n:
                n.start_soon(send, n.cancel_scope)
                keep = await receive()
                n.cancel_scope.cancel()
        except* (*_BROKEN, h11.ProtocolError) as group:
            # The service closed or broke the exchange (before answering, or mid-body).
            exc = group.exceptions[0]
            if not up.closed and up.peer is not None:
                up.peer.abort(ErrorCodes.CANCEL, "UC" if up.headers_sent else "UF",
                              f"upstream failed: {exc}")
            up.closed = True
        if keep and conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            pooled = pool.put(key, stream, conn)
    finally:
        # Always, whatever escaped above: a socket not closed here sits in CLOSE-WAIT.
        if not pooled:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)


__all__ = ["H1Connection", "H1Pool", "run_h1_upstream"]

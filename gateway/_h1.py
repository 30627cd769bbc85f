"""HTTP/1.1 downstream connections (local workloads on the outbound listener).

h11 parses; each request becomes h2-style headers and is relayed like an HTTP/2 stream:
:class:`H1Half` is the downstream half (it implements the relay's half methods), the
upstream half is a stream on a pooled gateway-to-gateway HTTP/2 connection.  Request
bodies are read only while fewer than ``buffer`` bytes are unacknowledged upstream;
response bytes are acked to the upstream once the socket took them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h11
import trio

from ._normalize import split_target
from ._relay import _FLAG_STATUS, Headers
from ._sanitize import BodyFraming, Refused

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                  b"upgrade", b"te", b"host"})


class H1Half:
    """Downstream half for one HTTP/1.1 request at a time."""

    def __init__(self, conn: "H1Connection", x: Any) -> None:
        self.c = conn
        self.x = x
        self.peer: Any = None
        self.headers_sent = False
        self.closed = False
        self.complete = trio.Event()  # response fully written (or failed)
        self.framing: BodyFraming | None = None

    def write_headers(self, headers: Headers, end: bool) -> None:
        if self.closed:
            return
        status = 0
        out = []
        for k, v in headers:
            if k == b":status":
                status = int(v)
            elif k[:1] != b":" and k not in _HOP:
                out.append((k, v))
        if self.x is not None:
            self.x.on_response_headers(headers, end)
        if status < 200:
            if status != 101:
                self.c.send(h11.InformationalResponse(status_code=status, headers=out))
            return
        self.headers_sent = True
        self.framing = BodyFraming(headers, self.x.method if self.x is not None else "")
        self.c.send(h11.Response(status_code=status, headers=out))
        if end:
            self.write_end()

    def write_data(self, data: bytes, credit: int) -> None:
        if self.closed or (self.framing is not None and self.framing.no_body):
            # HEAD, 204, 304: no body, whatever the upstream sends.
            if self.peer is not None:
                self.peer.ack(credit)
            return
        if self.x is not None:
            self.x.bytes_sent += len(data)
        self.c.send(h11.Data(data=data), credit, self.peer)

    def write_trailers(self, trailers: Headers) -> None:
        if self.x is not None:
            self.x.on_trailers(trailers)
        self.write_end()

    def write_end(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.c.send(h11.EndOfMessage())
        self.complete.set()

    def abort(self, code: int, flags: str = "UR", message: str = "") -> None:
        if self.closed:
            return
        if self.x is not None and not self.x.response_flags:
            self.x.response_flags = flags
        if not self.headers_sent:
            self.respond_error(flags, message or "upstream reset")
        else:
            self.closed = True
            self.c.broken = True
            self.complete.set()
            self.c.wake()

    def ack(self, credit: int) -> None:
        self.c.in_flight -= credit
        self.c.wake_reader()

    def respond(self, status: int, headers: Headers = (), body: bytes = b"",  # type: ignore[assignment]
                end_headers_only: bool = False) -> None:
        hs: Headers = [(b":status", str(status).encode()), *headers,
                       (b"content-length", str(len(body)).encode())]
        self.peer = None
        self.write_headers(hs, not body)
        if body:
            self.write_data(body, 0)
            self.write_end()

    def respond_error(self, flags: str, message: str) -> None:
        self.respond(_FLAG_STATUS.get(flags, 503), [(b"content-type", b"text/plain")],
                     message.encode() + b"\n")

    def respond_grpc(self, status: int, message: str) -> None:
        self.respond_error("UF", message)


class H1Connection:
    """Drives one HTTP/1.1 connection; ``on_request(half, headers, end)`` routes requests."""

    def __init__(self, stream: trio.abc.Stream, scheme: bytes, buffer: int,
                 on_request: Callable[[H1Half, Headers, bool], None],
                 new_exchange: Callable[[], Any], idle_timeout: float) -> None:
        self.stream = stream
        self.scheme = scheme
        self.buffer = buffer
        self.on_request = on_request
        self.new_exchange = new_exchange
        self.idle = idle_timeout
        self.h11 = h11.Connection(h11.SERVER)
        self.out: list[bytes] = []
        self.acks: list[tuple[int, Any]] = []
        self.in_flight = 0
        self.broken = False
        self._writer_ev = trio.Event()
        self._reader_ev = trio.Event()
        self.half: H1Half | None = None
        self._idle = trio.Event()  # set while the writer has nothing left to send

    def send(self, event: Any, credit: int = 0, ack_to: Any = None) -> None:
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

    async def _writer(self) -> None:
        try:
            await self._write_loop()
        except _BROKEN:
            self.broken = True
            if self.half is not None and self.half.peer is not None:
                self.half.peer.abort(8, "DC", "client went away")

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
                    if self.half is not None and self.half.peer is not None:
                        self.half.peer.abort(8, "DC", "client went away")
                n.cancel_scope.cancel()
        except _BROKEN:
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await self.stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
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
            te = cl = False
            for k, _ in event.headers:
                te = te or k == b"transfer-encoding"
                cl = cl or k == b"content-length"
            if te and cl:
                # Both framings (RFC 9112 §6.1): a smuggling attempt or a broken client.
                await self._bad_request()
                return
            try:
                authority, target = split_target(event.target)
            except Refused:
                await self._bad_request()
                return
            half = self.half = H1Half(self, self.new_exchange())
            headers: Headers = [(b":method", event.method), (b":scheme", self.scheme)]
            host = b""
            rest: Headers = []
            chunked = False
            length = None
            for k, v in event.headers:
                if k == b"host":
                    host = v
                elif k == b"transfer-encoding":
                    chunked = True
                elif k == b"content-length":
                    length = int(v)
                    rest.append((k, v))
                elif k == b"te":
                    if v.lower() == b"trailers":
                        rest.append((k, v))
                elif k not in _HOP:
                    rest.append((k, v))
            if event.method == b"CONNECT":
                headers = [(b":method", b"CONNECT"), (b":authority", event.target)]
            else:
                # Absolute-form (a proxy request): its authority wins over Host (RFC 9112 §3.2.2).
                headers.append((b":authority", authority or host))
                headers.append((b":path", target))
            headers.extend(rest)
            end = not chunked and not length
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
                        half.peer.abort(8, "DPE", "malformed request body")
                    if not half.headers_sent:
                        half.closed = True
                        if half.x is not None:
                            half.x.response_code, half.x.response_flags = 400, "DPE"
                            half.x.finish()
                        await self._bad_request()
                    return
                if isinstance(ev, h11.Data):
                    self.in_flight += len(ev.data)
                    if half.x is not None:
                        half.x.bytes_received += len(ev.data)
                    if half.peer is not None:
                        half.peer.write_data(ev.data, len(ev.data))
                    else:
                        self.in_flight -= len(ev.data)
                elif isinstance(ev, h11.EndOfMessage):
                    if not end and half.peer is not None:
                        half.peer.write_end()
                    break
                else:
                    if half.peer is not None:
                        half.peer.abort(8, "DC", "client went away")
                    return
            await half.complete.wait()
            if half.x is not None:
                half.x.finish()
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

_RESP_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                       b"upgrade", b"te", b"trailer"})


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


class H1Upstream:
    """Upstream half speaking HTTP/1.1 to a local service (``protocol: HTTP`` ports).

    The request (h2-style headers from the peer gateway) is queued until the connection
    is up; request body bytes are acked to the peer once written; the response body is
    read only while fewer than ``buffer`` bytes wait unacknowledged downstream.
    """

    def __init__(self, buffer: int) -> None:
        self.peer: Any = None
        self.x = None
        self.buffer = buffer
        self.queue: list[tuple[Any, int]] = []
        self.closed = False
        self.headers_sent = False
        self.in_flight = 0
        self._wq = trio.Event()
        self._wr = trio.Event()
        self.request_done = False

    # -- Half protocol (written by the downstream peer) ---------------------------------
    def write_headers(self, headers: Headers, end: bool) -> None:
        method = path = authority = b""
        out: Headers = []
        chunked = not end
        for k, v in headers:
            if k[:1] == b":":
                if k == b":method":
                    method = v
                elif k == b":path":
                    path = v
                elif k == b":authority":
                    authority = v
            elif k not in _HOP:
                if k == b"content-length":
                    chunked = False
                out.append((k, v))
        out.insert(0, (b"host", authority))
        if chunked:
            out.append((b"transfer-encoding", b"chunked"))
        self._push(h11.Request(method=method, target=path or b"/", headers=out), 0)
        if end:
            self._push(h11.EndOfMessage(), 0)

    def write_data(self, data: bytes, credit: int) -> None:
        if self.closed:
            if self.peer is not None:
                self.peer.ack(credit)
            return
        self._push(h11.Data(data=data), credit)

    def write_trailers(self, trailers: Headers) -> None:
        self._push(h11.EndOfMessage(), 0)  # HTTP/1.1 request trailers: dropped

    def write_end(self) -> None:
        self._push(h11.EndOfMessage(), 0)

    def abort(self, code: int, flags: str = "UR", message: str = "") -> None:
        self.closed = True
        self._wq.set()
        self._wr.set()

    def ack(self, credit: int) -> None:
        self.in_flight -= credit
        self._wr.set()

    def _push(self, event: Any, credit: int) -> None:
        if not self.closed:
            self.queue.append((event, credit))
            self._wq.set()

    # -- the exchange ---------------------------------------------------------------------
    async def run(self, key: Any, pool: H1Pool, connect: Any) -> None:
        reused = pool.get(key)
        try:
            if reused is not None:
                stream, conn = reused
            else:
                stream, conn = await connect(), h11.Connection(h11.CLIENT)
        except Exception as exc:  # noqa: BLE001 - any connect failure is a 503 downstream
            self.closed = True
            if self.peer is not None:
                self.peer.abort(8, "UF", f"upstream connect failed: {exc}")
            return
        keep = pooled = False
        try:
            try:
                async with trio.open_nursery() as n:
                    n.start_soon(self._send, stream, conn, n.cancel_scope)
                    keep = await self._receive(stream, conn)
                    n.cancel_scope.cancel()
            except* (*_BROKEN, h11.ProtocolError) as group:
                # The service closed or broke the exchange (before answering, or mid-body).
                exc = group.exceptions[0]
                if not self.closed and self.peer is not None:
                    self.peer.abort(8, "UC" if self.headers_sent else "UF",
                                    f"upstream failed: {exc}")
                self.closed = True
            if keep and conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
                pooled = pool.put(key, stream, conn)
        finally:
            # Always, whatever escaped above: a socket not closed here sits in CLOSE-WAIT.
            if not pooled:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)

    async def _send(self, stream: trio.abc.Stream, conn: h11.Connection,
                    scope: trio.CancelScope) -> None:
        try:
            while True:
                while not self.queue and not self.closed:
                    self._wq = trio.Event()
                    await self._wq.wait()
                if self.closed:
                    scope.cancel()
                    return
                batch, self.queue = self.queue, []
                data = b"".join(conn.send(ev) or b"" for ev, _ in batch)
                await stream.send_all(data)
                credit = sum(c for _, c in batch)
                if credit and self.peer is not None:
                    self.peer.ack(credit)
                if any(isinstance(ev, h11.EndOfMessage) for ev, _ in batch):
                    self.request_done = True
                    return
        except (*_BROKEN, h11.LocalProtocolError):
            self.closed = True
            scope.cancel()

    async def _receive(self, stream: trio.abc.Stream, conn: h11.Connection) -> bool:
        """Relay the response; True if the connection may be kept alive."""
        peer = self.peer
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                while self.in_flight >= self.buffer and not self.closed:
                    self._wr = trio.Event()
                    await self._wr.wait()
                if self.closed:
                    return False
                data = await stream.receive_some(64 * 1024)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    raise trio.BrokenResourceError("upstream closed the connection")
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                hs: Headers = [(b":status", str(event.status_code).encode())]
                hs.extend((k, v) for k, v in event.headers if k not in _RESP_HOP)
                self.headers_sent = True
                peer.write_headers(hs, False)
            elif isinstance(event, h11.Data):
                self.in_flight += len(event.data)
                peer.write_data(bytes(event.data), len(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self.closed = True
                peer.write_end()
                # The request may still be sending (server answered early): then don't reuse.
                return self.request_done
            elif isinstance(event, h11.ConnectionClosed):
                raise trio.BrokenResourceError("upstream closed the connection")
            else:
                return False

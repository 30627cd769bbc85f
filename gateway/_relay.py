"""Sans-IO relay of HTTP/2 streams between connections.

Theory of operation
-------------------
An :class:`H2Endpoint` wraps one HTTP/2 connection (either side, either core: the
:class:`gateway._h2.H2Conn` surface, made by :class:`gateway._h2.ConnectionFactory`).  The shell feeds it
bytes (:meth:`H2Endpoint.receive`) and, when told to through the ``wake`` callback, writes
``conn.data_to_send()`` to the socket.  Nothing here awaits or touches a socket.

Each stream of an endpoint is an :class:`H2Half`, one of the two halves of a relayed
exchange (:mod:`gateway._half`): its peer is a stream on another connection, an opaque
TCP socket, an HTTP/1.1 connection — any :class:`~gateway._half.Half`.  Every event
a stream receives from its remote is written into the peer half: headers, data,
trailers, end of stream, reset.

Flow control is end to end.  A half that receives DATA does *not* acknowledge it to its
sender; it hands the bytes and their flow-controlled length (``credit``) to the peer half,
which queues them and writes them as the peer's send window allows.  Only once written
does the peer call ``ack(credit)`` back, which returns the window to the original sender.
So a slow reader on one side closes the window on the other, and the queue of any half is
bounded by the window its sender was granted.

The upstream half may exist before its connection does (the pool is still connecting):
it queues headers and data until :meth:`H2Half.attach` gives it an endpoint.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h2.events as ev
import h2.exceptions
import structlog
from h2.errors import ErrorCodes
from hpack.exceptions import OversizedHeaderListError

from ._half import Half, Headers, Sink
from ._sanitize import BodyFraming, request_trailers

if TYPE_CHECKING:
    from ._h2 import H2Conn

log = structlog.get_logger("isthmus.gateway")

_HEADERS, _DATA, _TRAILERS, _END = 0, 1, 2, 3


def _noop() -> None:
    return None


class H2Endpoint:
    """One HTTP/2 connection and the relayed halves on it."""

    __slots__ = ("conn", "halves", "blocked", "wake", "dirty", "closed", "on_request",
                 "info", "on_idle", "draining", "out_limit", "on_overflow", "error",
                 "abuse")

    def __init__(self, conn: H2Conn, *,
                 on_request: Callable[[Half, Headers, bool], None] | None = None,
                 info: Any = None) -> None:
        self.conn = conn
        self.halves: dict[int, H2Half] = {}
        self.blocked: set[H2Half] = set()
        self.wake: Callable[[], None] = _noop
        self.dirty = False
        self.closed = False
        self.draining = False  # no new upstream streams (pool is replacing it)
        self.on_request = on_request
        self.info = info  # shell-owned: peer identity, pool key, ...
        self.on_idle: Callable[[H2Endpoint], None] | None = None
        # Output ceiling (abuse containment): called once the core's unsent bytes exceed
        # ``out_limit`` while the writer is still busy, i.e. the peer does not read.
        self.out_limit = 0
        self.on_overflow: Callable[[], None] | None = None
        self.error = ""  # the protocol error that ended the connection, if one did
        # The abuse reason of that error when the core (or the frame guard) named one
        # (a DenialOfServiceError with a ``reason``: header_block_too_large, ...).
        self.abuse = ""

    # -- shell entry points ---------------------------------------------------------
    def receive(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued a GOAWAY; tell every stream and let the shell flush and close.
            self.error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, h2.exceptions.DenialOfServiceError):
                self.abuse = str(getattr(exc, "reason", ""))
                if not self.abuse and isinstance(exc.__cause__, OversizedHeaderListError):
                    # h2's own limit on the decoded list: the same reason as the block cap
                    # and as nghttp2's decoded-list limit (so the same cooldown).
                    self.abuse = "header_block_too_large"
            self.mark()
            self.terminate(ErrorCodes.PROTOCOL_ERROR)
            return
        handlers = _DISPATCH
        # Consecutive DATA events of one stream (a read often holds dozens of small frames)
        # are forwarded as one chunk: fewer, larger frames onward and one window update.
        pend: ev.DataReceived | None = None
        chunks: list[bytes] = []
        credit = 0
        for event in events:
            if type(event) is ev.DataReceived:
                if pend is not None and event.stream_id == pend.stream_id:
                    chunks.append(event.data)
                    credit += event.flow_controlled_length
                    continue
                if pend is not None:
                    self._safe_data(pend.stream_id, chunks, credit)
                pend, chunks, credit = event, [event.data], event.flow_controlled_length
                continue
            if pend is not None:
                self._safe_data(pend.stream_id, chunks, credit)
                pend = None
            handler = handlers.get(type(event))
            if handler is not None:
                try:
                    handler(self, event)
                except Exception as exc:  # noqa: BLE001 - one stream's fault stays in it
                    self._stream_failed(getattr(event, "stream_id", 0), exc)
        if pend is not None:
            self._safe_data(pend.stream_id, chunks, credit)
        self.mark()

    def _safe_data(self, sid: int, chunks: list[bytes], credit: int) -> None:
        try:
            self._data_merged(sid, chunks, credit)
        except Exception as exc:  # noqa: BLE001 - as in receive
            self._stream_failed(sid, exc)

    def _stream_failed(self, sid: int, exc: Exception) -> None:
        """Handling one stream's event raised: that stream is reset, the connection lives."""
        if not sid:
            raise exc  # a connection-level event: the shell closes the connection
        log.error("stream.crashed", stream_id=sid, error=repr(exc), exc_info=exc)
        half = self.halves.get(sid)
        if half is not None:
            half.fail("UR", "internal error", ErrorCodes.INTERNAL_ERROR, answer=False)
            return
        try:
            self.conn.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
        except h2.exceptions.ProtocolError:
            pass
        self.mark()

    def terminate(self, code: int = ErrorCodes.CANCEL, flags: str = "UC") -> None:
        """The connection is gone (closed, failed, GOAWAY): fail every stream on it."""
        self.closed = True
        halves = list(self.halves.values())
        self.halves.clear()
        self.blocked.clear()
        for h in halves:
            h.remote_reset(code, flags)

    def mark(self) -> None:
        if not self.dirty:
            self.dirty = True
            self.wake()
        elif self.on_overflow is not None and self.conn.bytes_to_send > self.out_limit:
            self.on_overflow()

    def take_output(self) -> bytes:
        self.dirty = False
        return self.conn.data_to_send()

    def buffered_bytes(self) -> int:
        """Bytes held for this connection: the core's output buffer and its streams' queues."""
        return self.conn.bytes_to_send + sum(h.queued_bytes() for h in self.halves.values())

    @property
    def active_streams(self) -> int:
        return len(self.halves)

    def has_capacity(self, limit: int) -> bool:
        if self.closed or self.draining:
            return False
        remote_max = self.conn.remote_settings.max_concurrent_streams
        return len(self.halves) < min(limit, remote_max)

    def _forget(self, half: H2Half) -> None:
        self.halves.pop(half.sid, None)
        self.blocked.discard(half)
        if not self.halves and self.on_idle is not None:
            self.on_idle(self)

    # -- events -------------------------------------------------------------------------
    def _request(self, e: ev.RequestReceived) -> None:
        half = H2Half(self, e.stream_id)
        self.halves[e.stream_id] = half
        if e.stream_ended:
            # h2 follows with StreamEnded; the end already rides on the headers.
            half.recv_ended = half.ended_forwarded = True
        if self.on_request is None:
            half.respond(404)
        else:
            self.on_request(half, e.headers, bool(e.stream_ended))

    def _response(self, e: ev.ResponseReceived) -> None:
        half = self.halves.get(e.stream_id)
        if half is None:
            return
        if e.stream_ended:
            half.recv_ended = half.ended_forwarded = True
        if half.peer is not None:
            half.peer.write_headers(e.headers, bool(e.stream_ended))
        if e.stream_ended:
            half._maybe_done()

    def _informational(self, e: ev.InformationalResponseReceived) -> None:
        half = self.halves.get(e.stream_id)
        if half is not None and half.peer is not None:
            half.peer.write_headers(e.headers, False)

    def _trailers(self, e: ev.TrailersReceived) -> None:
        half = self.halves.get(e.stream_id)
        if half is None:
            return
        half.recv_ended = half.ended_forwarded = True
        if half.peer is not None:
            # Request trailers never carry identity (nor fields HTTP/2 forbids onward).
            half.peer.write_trailers(request_trailers(e.headers) if half.is_down else e.headers)
        half._maybe_done()

    def _data_merged(self, sid: int, chunks: list[bytes], credit: int) -> None:
        half = self.halves.get(sid)
        if half is None or half.peer is None:
            # Nobody to hand it to (stream already failed): give the window back now.
            if credit:
                self.conn.acknowledge_received_data(credit, sid)
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        ctx = half.ctx
        if ctx is not None:
            ctx.record.bytes_received += len(data)
        half.peer.write_data(data, credit)

    def _ended(self, e: ev.StreamEnded) -> None:
        half = self.halves.get(e.stream_id)
        if half is None:
            return
        if half.ended_forwarded:
            return
        half.recv_ended = True
        half.ended_forwarded = True
        if half.peer is not None:
            half.peer.write_end()
        half._maybe_done()

    def _reset(self, e: ev.StreamReset) -> None:
        half = self.halves.get(e.stream_id)
        if half is not None:
            half.remote_reset(e.error_code, "UR" if not half.is_down else "DC")

    def _window(self, e: ev.WindowUpdated) -> None:
        if not self.blocked:
            return
        if e.stream_id == 0:
            for h in list(self.blocked):
                h.flush()
        else:
            h = self.halves.get(e.stream_id)
            if h is not None and h in self.blocked:
                h.flush()

    def _settings(self, e: ev.RemoteSettingsChanged) -> None:
        for h in list(self.blocked):
            h.flush()

    def _goaway(self, e: ev.ConnectionTerminated) -> None:
        self.terminate(ErrorCodes.REFUSED_STREAM if e.error_code == 0 else e.error_code, "UC")


_DISPATCH: dict[type, Callable[[H2Endpoint, Any], None]] = {
    ev.RequestReceived: H2Endpoint._request,
    ev.ResponseReceived: H2Endpoint._response,
    ev.InformationalResponseReceived: H2Endpoint._informational,
    ev.TrailersReceived: H2Endpoint._trailers,
    ev.StreamEnded: H2Endpoint._ended,
    ev.StreamReset: H2Endpoint._reset,
    ev.WindowUpdated: H2Endpoint._window,
    ev.RemoteSettingsChanged: H2Endpoint._settings,
    ev.ConnectionTerminated: H2Endpoint._goaway,
}


class H2Half(Half):
    """A stream on an :class:`H2Endpoint` (or, before :meth:`attach`, one waiting for it)."""

    __slots__ = ("ep", "sid", "q", "recv_ended", "ended_forwarded", "sent_end", "is_down",
                 "on_fail", "framing")

    def __init__(self, ep: H2Endpoint | None, sid: int = 0, *, down: bool = True) -> None:
        super().__init__()
        self.ep = ep
        self.sid = sid
        self.q: deque[list[Any]] = deque()
        self.recv_ended = False
        self.ended_forwarded = False
        self.sent_end = False
        self.is_down = down
        # Upstream halves: called when the connection fails before our headers went out,
        # so the shell may retry elsewhere; returns True if it took over.
        self.on_fail: Callable[[H2Half, str], bool] | None = None
        # The body our headers allow (none after HEAD/204/304; content-length): see _sanitize.
        self.framing: BodyFraming | None = None

    def __repr__(self) -> str:
        return f"<H2Half sid={self.sid} down={self.is_down} closed={self.closed}>"

    # -- attach (upstream halves) --------------------------------------------------
    def attach(self, ep: H2Endpoint) -> None:
        self.ep = ep
        if self.closed:
            return
        self.sid = ep.conn.get_next_available_stream_id()
        ep.halves[self.sid] = self
        self.flush()

    def queued_bytes(self) -> int:
        """Bytes waiting in this half for the send window."""
        return sum(len(item[1]) for item in self.q if item[0] == _DATA)

    # -- written by the peer ---------------------------------------------------------
    def write_headers(self, headers: Headers, end: bool) -> None:
        if self.closed:
            return
        ctx = self.ctx
        if ctx is not None:
            if ctx.response_mutate is not None and not _informational(headers):
                headers = ctx.response_mutate(headers)  # an ext_authz allow's response headers
            ctx.record.on_response_headers(headers, end)
        if not _informational(headers):
            fr = self.framing = BodyFraming(headers, ctx.method if ctx is not None else "")
            if end and not fr.end_ok():
                self._malformed()
                return
        self.q.append([_HEADERS, headers, end])
        if self.ep is not None:
            self.flush()

    def send_data(self, data: bytes, credit: int) -> None:
        fr = self.framing
        ok = True if fr is None else fr.data(len(data))
        if ok is None:  # a body where none is allowed (HEAD, 204, 304): drop it
            self.give_back(credit)
            return
        if ok is False:
            self._malformed()
            return
        ctx = self.ctx
        if ctx is not None:
            ctx.record.bytes_sent += len(data)
        self.q.append([_DATA, data, credit])
        if self.ep is not None:
            self.flush()

    def write_trailers(self, trailers: Headers) -> None:
        if self.closed:
            return
        if self.framing is not None and not self.framing.end_ok():
            self._malformed()
            return
        ctx = self.ctx
        if ctx is not None:
            ctx.record.on_trailers(trailers)
        self.q.append([_TRAILERS, trailers])
        if self.ep is not None:
            self.flush()

    def write_end(self) -> None:
        if self.closed:
            return
        if self.framing is not None and not self.framing.end_ok():
            self._malformed()
            return
        self.q.append([_END])
        if self.ep is not None:
            self.flush()

    def ack(self, credit: int) -> None:
        ep = self.ep
        if ep is None or ep.closed or not credit:
            return
        ep.conn.acknowledge_received_data(credit, self.sid)
        ep.mark()

    def discard_output(self) -> None:
        self.q.clear()

    def _malformed(self) -> None:
        """The body does not fit the headers we sent (content-length): an h2 receiver would
        fail the whole connection on it, so fail this stream instead."""
        self.fail("UPE" if self.is_down else "DPE", "body length does not match content-length",
                  ErrorCodes.PROTOCOL_ERROR)

    def fail(self, flags: str, message: str, code: int = ErrorCodes.INTERNAL_ERROR, *,
             answer: bool = True) -> None:
        """This stream failed here (a malformed body, a bug): a downstream half answers with
        the error ``flags`` stands for if nothing was sent yet (``answer``), else resets;
        the peer half is aborted either way."""
        if self.closed:
            return
        peer = self.peer
        self.framing = None
        ctx = self.ctx
        if ctx is not None and answer:
            self._release_queue()
            ctx.peer_failed(self, code, flags, message)
        else:
            if ctx is not None:
                ctx.flag(flags)
            self.reset(code)
        if peer is not None and not isinstance(peer, Sink):
            peer.abort(code, flags, message)

    # -- local answers ----------------------------------------------------------------
    def respond(self, status: int, headers: Headers | tuple[tuple[bytes, bytes], ...] = (),
                body: bytes = b"") -> None:
        """Answer this downstream request locally (errors, 404s)."""
        hs: Headers = [(b":status", str(status).encode())]
        hs.extend(headers)
        if body:
            hs.append((b"content-length", str(len(body)).encode()))
        self.write_headers(hs, not body)
        if body:
            self.write_data(body, 0)
            self.write_end()
        # Request bytes still coming are not wanted: acknowledge and drop them.
        self.swallow()

    def respond_grpc(self, status: int, message: str) -> None:
        """A gRPC trailers-only response."""
        self.write_headers([(b":status", b"200"), (b"content-type", b"application/grpc"),
                            (b"grpc-status", b"%d" % status),
                            (b"grpc-message", _grpc_message(message))], True)
        self.swallow()

    # -- internals ------------------------------------------------------------------------
    def flush(self) -> None:
        ep = self.ep
        if ep is None or self.closed:
            return
        conn = ep.conn
        q = self.q
        sid = self.sid
        try:
            while q:
                item = q[0]
                kind = item[0]
                if kind == _DATA:
                    data = item[1]
                    win = conn.local_flow_control_window(sid)
                    if win <= 0:
                        ep.blocked.add(self)
                        ep.mark()
                        return
                    n = len(data)
                    fmax = conn.max_outbound_frame_size
                    if n <= win and n <= fmax:
                        q.popleft()
                        end = bool(q) and q[0][0] == _END
                        if end:
                            q.popleft()
                        conn.send_data(sid, data, end_stream=end)
                        if end:
                            self.sent_end = True
                        credit = item[2]
                    else:
                        n = min(n, win, fmax)
                        # memoryview: slicing a large chunk frame by frame must not copy it.
                        view = data if type(data) is memoryview else memoryview(data)
                        conn.send_data(sid, view[:n])
                        item[1] = view[n:]
                        credit = min(n, item[2])
                        item[2] -= credit
                    if credit and self.peer is not None:
                        self.peer.ack(credit)
                elif kind == _HEADERS:
                    q.popleft()
                    end = item[2]
                    conn.send_headers(sid, item[1], end_stream=end)
                    self.headers_sent = True
                    if end:
                        self.sent_end = True
                elif kind == _TRAILERS:
                    q.popleft()
                    q.clear()
                    conn.send_headers(sid, item[1], end_stream=True)
                    self.sent_end = True
                else:
                    q.popleft()
                    q.clear()
                    conn.end_stream(sid)
                    self.sent_end = True
        except h2.exceptions.ProtocolError:
            # The stream died under us (reset crossing in flight): treat as a reset.
            self.remote_reset(ErrorCodes.CANCEL, "UR")
            return
        ep.blocked.discard(self)
        ep.mark()
        if self.sent_end:
            self._maybe_done()

    def _maybe_done(self) -> None:
        if self.recv_ended and self.sent_end and not self.closed:
            self.closed = True
            if self.ep is not None:
                self.ep._forget(self)
            if self.ctx is not None:
                self.ctx.finish()

    def reset(self, code: int) -> None:
        self.closed = True
        self._release_queue()
        ep = self.ep
        if ep is not None and not ep.closed and self.sid:
            try:
                ep.conn.reset_stream(self.sid, code)
            except h2.exceptions.ProtocolError:
                pass
            ep.mark()
        if ep is not None:
            ep._forget(self)
        if self.ctx is not None:
            self.ctx.finish()

    def _release_queue(self) -> None:
        # Queued data will never be written: give its window back to the sender.
        credit = sum(item[2] for item in self.q if item[0] == _DATA)
        self.q.clear()
        self.give_back(credit)

    def remote_reset(self, code: int, flags: str = "UR") -> None:
        """Our remote reset the stream (or the connection died)."""
        if self.closed:
            return
        if not self.is_down and not self.headers_sent and self.on_fail is not None:
            # Never reached the upstream: the shell may retry on another connection.
            if self.on_fail(self, flags):
                return
        self.closed = True
        self._release_queue()
        if self.ep is not None:
            self.ep._forget(self)
        ctx = self.ctx
        if ctx is not None:
            ctx.flag(flags)
            ctx.finish()
        peer = self.peer
        if peer is not None:
            peer.abort(int(code) if int(code) else ErrorCodes.CANCEL, flags,
                       "upstream connection failed" if flags == "UC" else "upstream reset")


def _informational(headers: Headers) -> bool:
    for k, v in headers:
        if k == b":status":
            return v[:1] == b"1"
    return False


def new_upstream() -> H2Half:
    """An upstream half, to be attached to a pooled connection once one has room."""
    return H2Half(None, down=False)


def _grpc_message(message: str) -> bytes:
    # grpc-message is percent-encoded UTF-8 (gRPC over HTTP/2 spec).
    out = bytearray()
    for b in message.encode():
        out += bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b
    return bytes(out)

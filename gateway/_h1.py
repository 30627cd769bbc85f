"""HTTP/1.1 halves and translation to and from h2-style headers (sans-IO).

h11 parses and serialises; this module turns its events into the relay's h2-style
header lists and back:

* :class:`H1Half` is the downstream half of one request on a workload's HTTP/1.1
  connection (outbound listener); the request arrives through
  :func:`request_headers`, the response is written into h11 events handed to the
  connection (:class:`H1Server`, implemented by :class:`gateway._h1io.H1Connection`);
* :class:`H1Upstream` is the upstream half toward a local ``protocol: HTTP`` service
  (inbound listener): the relayed request becomes an h11 request queued for the shell
  (:func:`gateway._h1io.run_h1_upstream`), whose response comes back through
  :func:`response_headers`.

Flow control as everywhere: request bodies are read only while fewer than ``buffer``
bytes are unacknowledged upstream; response bytes are acked once the socket took them.
Nothing here awaits: the shell is told what changed through callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import h11

from ._flags import flag
from ._half import Half, Headers
from ._normalize import split_target
from ._sanitize import BodyFraming, Refused

_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                  b"upgrade", b"te", b"host"})
_RESP_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                       b"upgrade", b"te", b"trailer"})


def _noop() -> None:
    return None


class H1Server(Protocol):
    """What an :class:`H1Half` needs of the HTTP/1.1 connection it answers on."""

    in_flight: int  # request body bytes handed upstream and not yet acknowledged
    broken: bool

    def send(self, event: Any, credit: int = 0, ack_to: Half | None = None) -> None:
        """Queue an h11 event for the socket; ack ``credit`` to ``ack_to`` once written."""

    def wake(self) -> None:
        """Something to write (or the connection broke)."""

    def wake_reader(self) -> None:
        """Request body credit came back."""

    def response_done(self) -> None:
        """The response is complete (or failed): the next request may be read."""


def request_headers(event: h11.Request, scheme: bytes) -> tuple[Headers, bool]:
    """An HTTP/1.1 request head as h2-style headers, and whether it has no body.

    Raises :class:`~gateway._sanitize.Refused` (answer 400) for a request with both
    content-length and transfer-encoding or a target that is not a valid request-target."""
    headers: Headers = [(b":method", event.method), (b":scheme", scheme)]
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
        authority, target = split_target(event.target)
        # Absolute-form (a proxy request): its authority wins over Host (RFC 9112 §3.2.2).
        headers.append((b":authority", authority or host))
        headers.append((b":path", target))
    headers.extend(rest)
    if chunked and length is not None:
        # Both framings (RFC 9112 §6.1): a smuggling attempt or a broken client.
        raise Refused("request has both content-length and transfer-encoding")
    return headers, not chunked and not length


def response_headers(event: h11.Response) -> Headers:
    """An HTTP/1.1 response head as h2-style headers."""
    hs: Headers = [(b":status", str(event.status_code).encode())]
    hs.extend((k, v) for k, v in event.headers if k not in _RESP_HOP)
    return hs


class H1Half(Half):
    """Downstream half for one HTTP/1.1 request at a time."""

    __slots__ = ("c", "framing")

    def __init__(self, conn: H1Server) -> None:
        super().__init__()
        self.c = conn
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
        ctx = self.ctx
        if ctx is not None:
            ctx.record.on_response_headers(headers, end)
        if status < 200:
            if status != 101:
                self.c.send(h11.InformationalResponse(status_code=status, headers=out))
            return
        self.headers_sent = True
        self.framing = BodyFraming(headers, ctx.method if ctx is not None else "")
        self.c.send(h11.Response(status_code=status, headers=out))
        if end:
            self.write_end()

    def send_data(self, data: bytes, credit: int) -> None:
        if self.framing is not None and self.framing.no_body:
            # HEAD, 204, 304: no body, whatever the upstream sends.
            self.give_back(credit)
            return
        ctx = self.ctx
        if ctx is not None:
            ctx.record.bytes_sent += len(data)
        self.c.send(h11.Data(data=data), credit, self.peer)

    def write_trailers(self, trailers: Headers) -> None:
        ctx = self.ctx
        if ctx is not None:
            ctx.record.on_trailers(trailers)
        self.write_end()

    def write_end(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.c.send(h11.EndOfMessage())
        self.c.response_done()

    def reset(self, code: int) -> None:
        # Mid-response: HTTP/1.1 can only break the connection.
        self.closed = True
        self.c.broken = True
        self.c.response_done()
        self.c.wake()

    def ack(self, credit: int) -> None:
        self.c.in_flight -= credit
        self.c.wake_reader()

    def respond(self, status: int, headers: Headers | tuple[tuple[bytes, bytes], ...] = (),
                body: bytes = b"") -> None:
        hs: Headers = [(b":status", str(status).encode()), *headers,
                       (b"content-length", str(len(body)).encode())]
        self.peer = None
        self.write_headers(hs, not body)
        if body:
            self.write_data(body, 0)
            self.write_end()
        self.swallow()

    def respond_grpc(self, status: int, message: str) -> None:
        # gRPC needs HTTP/2 trailers: over HTTP/1.1 the caller gets a plain 503.
        f = flag("UF")
        self.respond(f.http, [(b"content-type", b"text/plain")], message.encode() + b"\n")


class H1Upstream(Half):
    """Upstream half speaking HTTP/1.1 to a local service (``protocol: HTTP`` ports).

    The request (h2-style headers from the peer gateway) is queued as h11 events until
    the connection is up; request body bytes are acked to the peer once written; the
    response body is read only while fewer than ``buffer`` bytes wait unacknowledged
    downstream.  The shell sets ``on_output`` (events queued, or closed) and
    ``on_credit`` (response credit came back, or closed).
    """

    __slots__ = ("buffer", "queue", "in_flight", "request_done", "on_output", "on_credit")

    def __init__(self, buffer: int) -> None:
        super().__init__()
        self.buffer = buffer
        self.queue: list[tuple[Any, int]] = []
        self.in_flight = 0
        self.request_done = False
        self.on_output: Callable[[], None] = _noop
        self.on_credit: Callable[[], None] = _noop

    # -- Half (written by the downstream peer) ------------------------------------------
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

    def send_data(self, data: bytes, credit: int) -> None:
        self._push(h11.Data(data=data), credit)

    def write_trailers(self, trailers: Headers) -> None:
        self._push(h11.EndOfMessage(), 0)  # HTTP/1.1 request trailers: dropped

    def write_end(self) -> None:
        self._push(h11.EndOfMessage(), 0)

    def reset(self, code: int) -> None:
        self.closed = True
        self.on_output()
        self.on_credit()

    def ack(self, credit: int) -> None:
        self.in_flight -= credit
        self.on_credit()

    def _push(self, event: Any, credit: int) -> None:
        if not self.closed:
            self.queue.append((event, credit))
            self.on_output()

    def take_queue(self) -> list[tuple[Any, int]]:
        batch, self.queue = self.queue, []
        return batch


__all__ = ["H1Half", "H1Server", "H1Upstream", "request_headers", "response_headers"]

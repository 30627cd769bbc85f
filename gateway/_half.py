"""Stream halves: the two sides of every relayed exchange (sans-IO).

A proxied request is two *halves* linked to each other (:func:`link`): the downstream
half (where the request arrived: an HTTP/2 stream, an HTTP/1.1 connection, a raw TCP
socket) and the upstream half (where it goes: a stream on a pooled HTTP/2 connection,
an HTTP/1.1 connection to a service, a TCP socket).  Every event a half receives from
its remote is written into its peer: headers, data, trailers, end of stream, failure.

Flow control is end to end: ``write_data(data, credit)`` hands bytes over together with
the flow-controlled length they cost their sender; the receiving half calls
``peer.ack(credit)`` only once it has written them onward, which returns the window to
the original sender.  A half that can no longer write (it is closed) gives the credit
back at once, so a failed stream never holds a window.

A downstream half carries the context of its request (:class:`Context`, implemented by
:class:`gateway._context.RequestContext`):
when the other side fails, the context decides whether this half answers with an error
(nothing sent yet) or is reset.  Upstream halves have no context and are reset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Headers = list[tuple[bytes, bytes]]


class Record(Protocol):
    """What halves report to a request's telemetry (:class:`gateway._telemetry.Exchange`)."""

    bytes_sent: int
    bytes_received: int
    response_code: int

    def on_response_headers(self, headers: Headers, end: bool) -> None: ...
    def on_trailers(self, trailers: Headers) -> None: ...


class Context(Protocol):
    """What a downstream half needs of its request's context
    (:class:`gateway._context.RequestContext`)."""

    @property
    def record(self) -> Record: ...

    method: str  # the request's method (a response to HEAD has no body)
    # Changes to the response headers on their way to the caller (an ext_authz allow's), if any.
    response_mutate: Callable[[Headers], Headers] | None

    def peer_failed(self, half: Half, code: int, flags: str, message: str) -> None:
        """The other side failed: answer on ``half`` or reset it."""

    def flag(self, flags: str) -> None:
        """Record why the exchange ended (the first cause wins)."""

    def finish(self) -> None:
        """The exchange is over (recorded once)."""


class Half:
    """One side of a relayed exchange; its peer calls the ``write_*`` methods to send
    toward this half's remote, and :meth:`ack` to return credit it was handed."""

    __slots__ = ("peer", "closed", "headers_sent", "ctx")

    # Whether this half can answer its remote itself (HTTP does; a raw byte stream cannot).
    answers = True

    def __init__(self) -> None:
        self.peer: Half | None = None
        self.closed = False
        self.headers_sent = False  # response (downstream) or request (upstream) headers are out
        self.ctx: Context | None = None  # downstream halves only

    # -- written by the peer ------------------------------------------------------------
    def write_headers(self, headers: Headers, end: bool) -> None:
        raise NotImplementedError

    def write_data(self, data: bytes, credit: int) -> None:
        if self.closed:
            self.give_back(credit)  # never written: the sender gets its window back now
            return
        self.send_data(data, credit)

    def write_trailers(self, trailers: Headers) -> None:
        raise NotImplementedError

    def write_end(self) -> None:
        raise NotImplementedError

    def ack(self, credit: int) -> None:
        """The peer wrote ``credit`` worth of what this half handed it."""
        raise NotImplementedError

    def abort(self, code: int, flags: str = "UR", message: str = "") -> None:
        """The peer failed (``flags``: why, as an Envoy response flag; ``code``: an HTTP/2
        error code for a reset)."""
        if self.closed:
            return
        ctx = self.ctx
        if ctx is not None:
            ctx.peer_failed(self, code, flags, message)
        else:
            self.reset(code)

    # -- implemented by each kind of half -------------------------------------------------
    def send_data(self, data: bytes, credit: int) -> None:
        """Write ``data`` toward the remote (this half is open)."""
        raise NotImplementedError

    def reset(self, code: int) -> None:
        """End this half abruptly (RST_STREAM, a broken connection, a closed socket)."""
        raise NotImplementedError

    def respond(self, status: int, headers: Headers | tuple[tuple[bytes, bytes], ...] = (),
                body: bytes = b"") -> None:
        """Answer the remote locally (downstream HTTP halves)."""
        raise NotImplementedError

    def respond_grpc(self, status: int, message: str) -> None:
        """Answer the remote with a gRPC trailers-only response (downstream HTTP halves)."""
        raise NotImplementedError

    def discard_output(self) -> None:
        """Drop what waits to be written toward the remote (a local answer replaces it)."""

    # -- shared ---------------------------------------------------------------------------
    def give_back(self, credit: int) -> None:
        peer = self.peer
        if credit and peer is not None:
            peer.ack(credit)

    def swallow(self) -> Half | None:
        """Detach the peer and return it; what the remote still sends is acked and dropped."""
        peer = self.peer
        self.peer = Sink(self)
        return peer


class Sink(Half):
    """Peer of a locally answered half: acknowledges and drops the rest of the request."""

    __slots__ = ("half",)

    def __init__(self, half: Half) -> None:
        super().__init__()
        self.half = half
        self.peer = half

    def write_headers(self, headers: Headers, end: bool) -> None:
        pass

    def write_data(self, data: bytes, credit: int) -> None:
        self.half.ack(credit)

    def write_trailers(self, trailers: Headers) -> None:
        pass

    def write_end(self) -> None:
        pass

    def abort(self, code: int, flags: str = "UR", message: str = "") -> None:
        pass

    def ack(self, credit: int) -> None:
        pass


def link(a: Half, b: Half) -> None:
    a.peer = b
    b.peer = a


__all__ = ["Context", "Half", "Headers", "Record", "Sink", "link"]

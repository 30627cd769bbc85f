"""The request context: what one downstream request is, and the decisions that are its own.

A :class:`RequestContext` is made when a request's headers arrive (:meth:`parse`) and
rides on its downstream half.  It decides:

* the *format* of every local answer: a gRPC request gets a trailers-only response with
  a ``grpc-status``, anything else a plain-text HTTP status (:meth:`refuse`);
* *respond or reset* when the other side of the exchange fails: while no response header
  went out the caller gets an error response, after that only a reset
  (:meth:`peer_failed`);
* the grpc-timeout *deadline*, and what expiry does (:meth:`expire`).

Its :class:`~gateway._telemetry.Exchange` (``record``) only records what was decided:
flags, status, bytes, timings.  The clock is injected (``now`` arguments), so the
context, like the relay, runs without an event loop.
"""

from __future__ import annotations

from h2.errors import ErrorCodes

from ._decision import Decision
from ._flags import GrpcStatus, flag
from ._half import Half, Headers
from ._telemetry import Exchange

TRACEPARENT = b"traceparent"
_TEXT = (b"content-type", b"text/plain")
_DEADLINE_TEXT = "deadline exceeded"
_GRPC_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_grpc_timeout(value: bytes) -> float | None:
    """Seconds of a ``grpc-timeout`` value (``100m``, ``5S``...), None if malformed."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _GRPC_TIMEOUT_UNITS.get(value[-1:])
    return None if unit is None else int(value[:-1]) * unit


class RequestContext:
    """One downstream request: its parsed head and its own decisions."""

    __slots__ = ("record", "method", "path", "authority", "grpc", "traceparent", "timeout",
                 "deadline", "finished")

    def __init__(self, record: Exchange) -> None:
        self.record = record
        self.method = self.path = self.authority = ""
        self.grpc = False
        self.traceparent: bytes | None = None
        self.timeout: float | None = None  # grpc-timeout, seconds
        self.deadline = 0.0
        self.finished = False

    @classmethod
    def parse(cls, headers: Headers, record: Exchange) -> RequestContext:
        """Read the request head once: routing, authorization and telemetry use the result."""
        ctx = cls(record)
        authority = host = None
        timeout = None
        for k, v in headers:
            if k[0] == 58:  # ':'
                if k == b":authority":
                    authority = v
                elif k == b":method":
                    ctx.method = v.decode("latin-1")
                elif k == b":path":
                    ctx.path = v.decode("latin-1")
            elif k == b"content-type":
                ctx.grpc = v.startswith(b"application/grpc")
            elif k == TRACEPARENT:
                ctx.traceparent = v
            elif k == b"host":
                host = v
            elif k == b"grpc-timeout":
                if timeout is None:
                    timeout = v
            elif k == b"x-forwarded-for":
                record.x_forwarded_for = v.decode("latin-1")
            elif k == b"user-agent":
                record.user_agent = v.decode("latin-1")
            elif k == b"x-request-id":
                record.request_id = v.decode("latin-1")
        authority = authority or host
        if authority:
            ctx.authority = authority.decode("latin-1")
        if ctx.grpc and timeout is not None:
            ctx.timeout = parse_grpc_timeout(timeout)
        record.method, record.path, record.grpc = ctx.method, ctx.path, ctx.grpc
        return ctx

    @property
    def connect(self) -> bool:
        return self.method == "CONNECT"

    # -- answers ----------------------------------------------------------------------------
    def refuse(self, half: Half, d: Decision) -> None:
        """Answer the request locally with the refusal ``d``."""
        self.record.response_flags = d.flags
        f = flag(d.flags)
        text = d.message or d.reason or f.text
        if self.grpc:
            half.respond_grpc(d.grpc_status or f.grpc, text)
        else:
            half.respond(d.status or f.http, [_TEXT, *d.headers], text.encode() + b"\n")

    def fail(self, half: Half, flags: str, message: str = "") -> None:
        """Answer the request with the error ``flags`` stands for."""
        self.record.response_flags = flags
        f = flag(flags)
        text = message or f.text
        if self.grpc:
            half.respond_grpc(f.grpc, text)
        else:
            half.respond(f.http, [_TEXT], text.encode() + b"\n")

    def peer_failed(self, half: Half, code: int, flags: str, message: str) -> None:
        """The other side of the exchange failed: answer with an error while no response
        header went out (and the half can answer), else reset."""
        if half.answers and not half.headers_sent:
            half.discard_output()
            self.fail(half, flags, message)
            return
        self.flag(flags)
        half.reset(code)

    def flag(self, flags: str) -> None:
        """Record why the exchange ended, unless an earlier cause was recorded."""
        if not self.record.response_flags:
            self.record.response_flags = flags

    def decided(self, d: Decision) -> None:
        """Record an authorization decision (the access log shows AUDIT matches and why a
        request was refused)."""
        r = self.record
        r.audit_policy = d.audit_policy or ""
        if not d.allow:
            r.response_code_details = d.details

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.record.finish()

    # -- deadline ---------------------------------------------------------------------------
    def start_deadline(self, now: float) -> float | None:
        """Arm the grpc-timeout the request carried; the time it expires, if any."""
        if self.timeout is None:
            return None
        self.deadline = now + self.timeout
        return self.deadline

    def expire(self, half: Half) -> None:
        """The request ran past its grpc-timeout: cancel upstream, answer DEADLINE_EXCEEDED."""
        if half.closed or self.finished:
            return
        peer = half.swallow()
        if peer is not None:
            peer.abort(ErrorCodes.CANCEL, "DT")
        self.record.response_flags = "DT"
        if not half.headers_sent:
            half.discard_output()
            half.respond_grpc(GrpcStatus.DEADLINE_EXCEEDED, _DEADLINE_TEXT)
        else:
            half.write_trailers([(b"grpc-status", b"%d" % GrpcStatus.DEADLINE_EXCEEDED),
                                 (b"grpc-message", _DEADLINE_TEXT.encode())])


__all__ = ["RequestContext", "TRACEPARENT", "parse_grpc_timeout"]

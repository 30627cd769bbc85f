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

from collections.abc import Callable

from h2.errors import ErrorCodes

from ._deadlines import Timer
from ._decision import Decision
from ._flags import GrpcStatus, ended, flag
from ._half import Half, Headers
from ._propagation import B3, B3_MULTI, TRACEPARENT, begin, incoming
from ._resilience import DEADLINE_HEADER, parse_deadline, parse_grpc_timeout
from ._telemetry import Exchange

_TEXT = (b"content-type", b"text/plain")
_DEADLINE_TEXT = "deadline exceeded"
DEADLINE_GRACE = 0.05  # seconds past an x-isthmus-deadline before this hop gives up


class RequestContext:
    """One downstream request: its parsed head and its own decisions."""

    __slots__ = ("record", "method", "path", "authority", "grpc", "traceparent", "timeout",
                 "deadline", "finished", "response_mutate", "timers")

    def __init__(self, record: Exchange) -> None:
        self.record = record
        self.method = self.path = self.authority = ""
        self.grpc = False
        self.traceparent: bytes | None = None
        self.timeout: float | None = None  # grpc-timeout, seconds
        self.deadline = 0.0
        self.finished = False
        self.response_mutate: Callable[[Headers], Headers] | None = None  # set by an ext_authz allow
        self.timers: list[Timer] | None = None  # cancelled when the request finishes

    @classmethod
    def parse(cls, headers: Headers, record: Exchange, sample_bound: int | None = None,
              deadline_header: bool = True) -> RequestContext:
        """Read the request head once: routing, authorization and telemetry use the result.

        ``deadline_header``: honour ``x-isthmus-deadline`` (a peer gateway's, at the
        inbound); the outbound passes False, a workload's is neither trusted nor forwarded.

        The request's hop of its trace (``record.trace``) is begun here: its trace
        context read, a span id chosen and the sampling decided (``sample_bound``: the
        ratio sampler's, None while no spans are exported; see gateway/_propagation.py).
        """
        ctx = cls(record)
        authority = host = None
        timeout = deadline = None
        b3 = None
        b3_multi: dict[bytes, bytes] | None = None
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
            elif k == DEADLINE_HEADER:
                deadline = v
            elif k == B3:
                b3 = v
            elif k in B3_MULTI:
                if b3_multi is None:
                    b3_multi = {}
                b3_multi.setdefault(k, v)
        authority = authority or host
        if authority:
            ctx.authority = authority.decode("latin-1")
        if ctx.grpc and timeout is not None:
            ctx.timeout = parse_grpc_timeout(timeout)
        if deadline is not None and deadline_header:
            # The time an outbound gateway left this request (gateway/_resilience.py).
            # A little later than the caller's: the caller's gateway answers the timeout
            # itself (504 UT); this one only bounds the work left here.
            left = parse_deadline(deadline)
            if left is not None:
                left += DEADLINE_GRACE
            if left is not None and (ctx.timeout is None or left < ctx.timeout):
                ctx.timeout = left
        record.method, record.path, record.grpc = ctx.method, ctx.path, ctx.grpc
        hop = record.trace = begin(*incoming(ctx.traceparent, b3, b3_multi), bound=sample_bound)
        record.trace_id = hop.trace_hex
        return ctx

    @property
    def connect(self) -> bool:
        return self.method == "CONNECT"

    # -- answers ----------------------------------------------------------------------------
    def refuse(self, half: Half, d: Decision) -> None:
        """Answer the request locally with the refusal ``d``."""
        self.record.add_flag(d.flags)
        f = flag(d.flags)
        text = d.message or d.reason or f.text
        if self.grpc:
            half.respond_grpc(d.grpc_status or f.grpc, text)
        elif d.body is not None:  # the body and headers are the decider's own (ext_authz)
            half.respond(d.status or f.http, list(d.headers), d.body)
        else:
            half.respond(d.status or f.http, [_TEXT, *d.headers], text.encode() + b"\n")

    def fail(self, half: Half, flags: str, message: str = "") -> None:
        """Answer the request with the error ``flags`` stands for."""
        self.record.add_flag(flags)
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
        """Record why the exchange ended, unless an earlier cause was recorded (a note
        such as ``DI`` is no cause: the flag is added after it)."""
        if not ended(self.record.response_flags):
            self.record.add_flag(flags)

    def decided(self, d: Decision) -> None:
        """Record an authorization decision (the access log shows AUDIT matches and why a
        request was refused)."""
        r = self.record
        r.audit_policy = d.audit_policy or ""
        r.authz = "allow" if d.allow else "deny"
        r.policy = d.policy or ""
        if not d.allow:
            r.response_code_details = d.details
        elif d.log_flags:
            self.flag(d.log_flags)

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            if self.timers is not None:
                for t in self.timers:
                    t.cancel()
                self.timers = None
            self.record.finish()

    def arm(self, timer: Timer) -> None:
        """Cancel ``timer`` when the request finishes: its callback holds the request."""
        if self.finished:
            timer.cancel()
        elif self.timers is None:
            self.timers = [timer]
        else:
            self.timers.append(timer)

    # -- deadline ---------------------------------------------------------------------------
    def start_deadline(self, now: float) -> float | None:
        """Arm the grpc-timeout the request carried; the time it expires, if any."""
        if self.timeout is None:
            return None
        self.deadline = now + self.timeout
        return self.deadline

    def expire(self, half: Half, flags: str = "DT") -> None:
        """The request ran past its grpc-timeout (``flags`` DT), or its route's timeout
        (UT): cancel upstream, answer DEADLINE_EXCEEDED."""
        if half.closed or self.finished:
            return
        peer = half.swallow()
        if peer is not None:
            peer.abort(ErrorCodes.CANCEL, flags)
        self.record.add_flag(flags)
        if not half.headers_sent:
            half.discard_output()
            if self.grpc:
                half.respond_grpc(GrpcStatus.DEADLINE_EXCEEDED, _DEADLINE_TEXT)
            else:  # an HTTP request past its x-isthmus-deadline
                self.fail(half, flags)
        elif not self.grpc:
            half.reset(ErrorCodes.CANCEL)
        else:
            half.write_trailers([(b"grpc-status", b"%d" % GrpcStatus.DEADLINE_EXCEEDED),
                                 (b"grpc-message", _DEADLINE_TEXT.encode())])


__all__ = ["RequestContext"]

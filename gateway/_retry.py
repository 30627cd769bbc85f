"""One outbound request under a rule's timeout, retries and fault, and its service's
circuit breaker and outlier detection (sans-IO: the clock and the timer are injected).

Theory of operation
-------------------
Without resilience settings a request's downstream half is linked straight to one
upstream half (:mod:`gateway._half`).  With them, an :class:`Attempts` sits between the
two: every try is a fresh upstream half whose peer is the :class:`Attempts` itself, and
the downstream half's peer is a :class:`_Front` while a request body (or trailers) is to
come, else the current try's half (nothing flows that way but credit and the caller's
reset; the request's context tells the :class:`Attempts` when the exchange ends).  Events
keep flowing as they do between two linked halves (credit included: a try acknowledges
request bytes to the downstream sender as it writes them), with three differences:

* the request body is also kept, up to :data:`~gateway._resilience.RETRY_BUFFER_LIMIT`
  (Envoy's 64 KiB), so that a new try can replay it (with no credit: the first try's
  writes returned it); past the limit the request is no longer retriable;
* a try's final response headers (or its failure: reset, connect failure, per-try
  timeout) are judged first (:class:`~gateway._resilience.RetryState`): a retriable one is
  not forwarded, the try is cancelled and, after the backoff, a new try goes to a
  destination not tried yet when one is healthy (Envoy's previous-hosts predicate, via
  the route selection with the tried destinations marked out); anything else *commits*
  the try: its headers go downstream and nothing is retried after that (the try's half is
  then relinked to the downstream half, unless a gRPC status is still to come in the
  trailers, so the rest of the response flows as it does unguarded);
* the request's deadline (the lower of the rule's ``timeout`` and ``grpc-timeout``) and
  each per-try timeout are timers: the first answers 504 ``UT`` (gRPC DEADLINE_EXCEEDED)
  before a commit and resets after it; the second only ends its try.

What a request needs is made when it needs it: the service's and rule's settings are
looked up once per plan (:class:`~gateway._guards.GuardSpec`), the retry state, the
destinations tried and the retries' route selection only on a first failure.

Each try's outcome goes to outlier detection; the breaker's request slot is held from
the start until the response ends (or the exchange ends), its pending slot while a try
waits for a pooled connection (:class:`_TryHalf`), its retry slot while a retry runs.
Fault injection comes first: an abort answers at once with flag ``FI`` (never retried,
never routed), a delay holds the first try (flag ``DI``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes

from federation.names import local_host
from federation.traffic import Request

from ._context import RequestContext
from ._deadlines import Timer
from ._decision import Decision
from ._flags import has_flag
from ._half import Half, Headers, link
from ._mirror import Copy, Mirrors
from ._proxy import destination
from ._relay import H2Endpoint, H2Half
from ._resilience import (
    DEADLINE_HEADER,
    GRPC_TIMEOUT,
    INF,
    RETRY_BUFFER_LIMIT,
    CircuitBreaker,
    Failure,
    RetryState,
    Skip,
    encode_deadline,
    encode_grpc_timeout,
    request_timeout,
)

if TYPE_CHECKING:
    from federation.traffic import Health, RouteSet

    from ._guards import Guards, GuardSpec
    from ._routes import Destination, OutboundRoute, PeerCluster, RouteTable

_TEXT = (b"content-type", b"text/plain")


Choose = Callable[[set[tuple[str, str]]], "Destination | None"]


def chooser(route: OutboundRoute, table: RouteTable, traffic: RouteSet | None, method: str, path: str,
            headers: Headers, health: Health, x: Any) -> Choose:
    """Where a retry goes: the selection with the destinations tried so far marked out;
    when that leaves nothing, any healthy destination again.  Made on the first retry
    (a :func:`functools.partial` of this rides along until then): most requests have none."""
    req = Request(method, path, raw=headers)

    def choose(tried: set[tuple[str, str]]) -> Destination | None:
        if not route.federated or traffic is None:
            return route.pin

        def untried(t: Any) -> Any:
            if (t.cluster, t.destination_service) in tried:
                return _TRIED
            return health(t)
        for h in (untried, health):
            d = destination(route, table, traffic, req, h, x)
            if not isinstance(d, Decision):
                return d
        return None
    return choose


class _Out:  # a stand-in federation.traffic.Out for "tried already" (never shown)
    code = "tried"


_TRIED = _Out()


class Env:
    """What an :class:`Attempts` needs of the gateway (the handlers make one)."""

    __slots__ = ("clock", "add_deadline", "open_peer", "fill_upstream", "guards", "mirrors")

    def __init__(self, clock: Callable[[], float], add_deadline: Callable[[float, Callable[[], None]], Timer],
                 open_peer: Callable[[PeerCluster, H2Half, int | None], None],
                 fill_upstream: Callable[[Any, Destination], None], guards: Guards, mirrors: Mirrors) -> None:
        self.mirrors = mirrors
        self.clock = clock
        self.add_deadline = add_deadline
        self.open_peer = open_peer
        self.fill_upstream = fill_upstream
        self.guards = guards


def fail(ctx: RequestContext, half: Half, flags: str, status: int | None = None, grpc_status: int | None = None,
         message: str = "") -> None:
    """Answer locally with ``flags`` (and a status other than the flag's own, for faults)."""
    if status is None and grpc_status is None:
        ctx.fail(half, flags, message)
        return
    ctx.record.add_flag(flags)
    text = message or "fault filter abort"
    if ctx.grpc:
        half.respond_grpc(grpc_status if grpc_status is not None else 14, text)
    else:
        half.respond(status or 503, [_TEXT], text.encode() + b"\n")


def start(env: Env, ctx: RequestContext, down: Half, headers: Headers, end: bool, dest: Destination,
          spec: GuardSpec, make_choose: Callable[[], Choose],
          peers: Mapping[str, PeerCluster] | None = None) -> None:
    """Run the request ``headers`` (already rewritten for ``dest``) under the guards;
    ``make_choose`` makes the retries' :func:`chooser` (called on the first retry only)."""
    g = env.guards
    rule, skey, breaker = spec.rule, spec.skey, spec.breaker
    fault = rule.fault if rule is not None else None
    delay = 0.0
    if fault is not None:
        fd = fault.decide(g.rng, ctx.grpc)
        if fd is not None:
            delay = fd.delay
            if delay:
                ctx.record.add_flag("DI")
                g.count(g.faults, "delay")
            if fd.aborts:
                g.count(g.faults, "abort")
                if not delay:
                    fail(ctx, down, "FI", fd.http_status, fd.grpc_status)
                    return
    if breaker is not None and not breaker.try_request():
        g.count(g.overflows, f"{skey[1]}.{skey[0]}")
        fail(ctx, down, "UO", message="upstream overflow: the service's max_requests is reached")
        return
    a = Attempts(env, ctx, down, headers, end, spec, make_choose)
    m = rule.mirror if rule is not None else None
    if m is not None and peers is not None and (m[2] >= 1.0 or g.rng.random() < m[2]):
        peer = peers.get(m[0])
        if peer is None:
            g.count(g.mirrored, "dropped")
        else:
            a.mirror = env.mirrors.start(a.base_headers(), peer, f"{local_host(m[1], skey[0])}:{dest.port}", end,
                                         g.plan.connection_cap((skey[0], m[1])))
    if delay:
        abort = fd if fd is not None and fd.aborts else None
        ctx.arm(env.add_deadline(env.clock() + delay, lambda: a.after_delay(dest, abort)))
    else:
        a.begin(dest)


class Attempts:
    """One request's tries (see the module docstring).

    Made per guarded request, so it does only what the request needs up front: the
    downstream half is linked to a :class:`_Front` only when a request body (or trailers)
    is still to come, else straight to the try's upstream half (nothing would flow
    through the front; the request's context tells this object when the caller goes
    away, as it is :meth:`~gateway._context.RequestContext.arm`\\ ed); the retry state,
    the destinations tried and the retries' chooser are made on the first failure."""

    __slots__ = ("env", "ctx", "down", "front", "headers", "rule", "skey", "breaker", "make_choose", "choose",
                 "at", "timeout_flag", "policy", "retry", "budget", "items", "size", "retriable", "req_end",
                 "req_trailers", "cur", "dest", "committed", "done", "n", "holding", "grpc_pending", "tried", "mirror",
                 "cap", "outlier", "timer")

    def __init__(self, env: Env, ctx: RequestContext, down: Half, headers: Headers, end: bool,
                 spec: GuardSpec, make_choose: Callable[[], Choose]) -> None:
        now = env.clock()
        self.env, self.ctx, self.down = env, ctx, down
        # As the outbound rewrote them for the first destination; the deadline headers
        # this gateway sends in place of the caller's are added per try.
        self.headers = headers
        rule = self.rule = spec.rule
        self.skey = spec.skey
        breaker = self.breaker = spec.breaker
        self.make_choose = make_choose
        self.choose: Choose | None = None
        rt = rule.timeout if rule is not None else None
        timeout = request_timeout(rt, ctx.timeout)
        self.at = INF if timeout is None else now + timeout  # the request's deadline
        self.timeout_flag = "UT" if rt is not None and timeout == rt else "DT"
        policy = self.policy = rule.retry if rule is not None else None
        self.retry: RetryState | None = None  # made on the first failed try
        budget = self.budget = spec.budget
        if budget is not None:
            budget.deposit(now)  # every request counts toward the retries it allows
        self.items: list[list[Any]] = []  # request body: [data, credit not yet handed to a try]
        self.size = 0
        self.retriable = policy is not None
        self.req_end = end
        self.req_trailers: Headers | None = None
        self.cur: _TryHalf | None = None  # the current try's upstream half
        self.dest: Destination | None = None  # where it goes
        self.committed = self.done = False
        self.n = 0
        self.holding = breaker is not None  # the request slot
        self.grpc_pending = False  # a gRPC answer whose status comes in the trailers
        self.tried: set[tuple[str, str]] | None = None
        self.mirror: Copy | None = None
        self.cap = spec.cap  # the service's max_connections_per_peer
        self.outlier = spec.outlier  # whether outlier detection watches the service
        if end and type(down) is H2Half:
            self.front: _Front | None = None  # begin() links down to each try's half
        else:
            self.front = _Front(self)
            link(down, self.front)
        ctx.arm(self)  # the request's end (its caller gone, too) is this object's end
        self.timer = env.add_deadline(self.at, self._expired) if self.at != INF else None

    def cancel(self) -> None:
        """The request finished (its context's :meth:`~gateway._context.RequestContext.finish`)."""
        self._finish()
        if self.timer is not None:
            self.timer.cancel()

    def base_headers(self) -> Headers:
        """The request's headers (a copy) without a gRPC caller's ``grpc-timeout``: each
        try carries the time left instead.  (A workload's ``x-isthmus-deadline`` never
        gets this far: the outbound drops it, gateway/_sanitize.py.)"""
        if self.ctx.grpc:
            return [(k, v) for k, v in self.headers if k != GRPC_TIMEOUT]
        return self.headers.copy()

    # -- tries ---------------------------------------------------------------------------
    def after_delay(self, dest: Destination, abort: Any) -> None:
        if self.done or self.down.closed:
            self._finish()
            return
        if abort is not None:
            self._finish()
            fail(self.ctx, self.down, "FI", abort.http_status, abort.grpc_status)
            return
        self.begin(dest)

    def _try_headers(self, dest: Destination, now: float) -> Headers:
        """The headers of a try to ``dest`` starting at ``now``."""
        grpc = self.ctx.grpc
        if self.n == 1:
            hs = self.base_headers()
        else:
            auth = dest.authority.encode()
            hs = [(k, auth) if k == b":authority" else (k, v) for k, v in self.headers
                  if not grpc or k != GRPC_TIMEOUT]
        at = self.at
        if at != INF:
            left = at - now
            hs.append((DEADLINE_HEADER, encode_deadline(left)))
            if grpc:
                hs.append((GRPC_TIMEOUT, encode_grpc_timeout(left)))
        return hs

    def begin(self, dest: Destination) -> None:
        if self.done:
            return
        env = self.env
        now = env.clock()
        self.n += 1
        x = self.ctx.record
        x.attempts = self.n
        env.fill_upstream(x, dest)
        hs = self._try_headers(dest, now)
        up = _TryHalf()
        up.peer = self  # what the try's destination answers comes here first
        if self.front is None:
            self.down.peer = up  # the caller's resets and credit go straight to the try
        self.cur, self.dest = up, dest
        body = bool(self.items) or self.req_trailers is not None or not self.req_end
        up.write_headers(hs, not body)
        if self.items:
            for item in self.items:
                up.write_data(item[0], item[1])
                item[1] = 0
            if not self.retriable:
                self.items.clear()
        if self.req_trailers is not None:
            up.write_trailers(self.req_trailers)
        elif self.req_end and body:
            up.write_end()
        env.open_peer(dest.peer, up, self.cap)
        if self.cur is not up or self.done:
            return  # failed at once (the pool's fast fail), already handled
        b = self.breaker
        if up.ep is None and not up.closed and b is not None:
            if not b.try_pending():
                self.env.guards.count(self.env.guards.overflows, f"{self.skey[1]}.{self.skey[0]}")
                self.cur = None
                up.reset(ErrorCodes.CANCEL)
                self._fail("UO", ErrorCodes.REFUSED_STREAM, "upstream overflow: the service's max_pending is reached")
                return
            up.pending = b
        policy = self.policy
        if policy is not None and policy.per_try_timeout is not None:
            at = min(now + policy.per_try_timeout, self.at)
            if at < self.at:
                self.ctx.arm(env.add_deadline(at, lambda: self._try_expired(up)))

    def _judge(self, failure: Failure | None = None, status: int = 0, grpc_status: int | None = None) -> bool:
        """Tell outlier detection the current try's outcome; True when the try is retried
        (it was cancelled)."""
        d = self.dest
        assert d is not None
        g = self.env.guards
        g.record(d.peer.name, self.skey, status=status, grpc_status=grpc_status, failure=failure)
        policy = self.policy
        if policy is None or self.committed:
            return False
        rs = self.retry
        if rs is None:
            if failure is None and status < 400 and not grpc_status:
                return False  # the common case: a first try's answer no condition retries
            rs = self.retry = RetryState(policy, self.budget, self.breaker, g.rng, None)
        now = self.env.clock()
        dest = (d.peer.name, d.destination_service)
        dec = rs.decide(now, dest, failure=failure, status=status,
                        grpc_status=grpc_status, body_retriable=self.retriable, deadline=self.at)
        if dec.retry:
            if self.tried is None:
                self.tried = set()
            self.tried.add(dest)
            g.count(g.retries, dec.reason or "")
            up = self.cur
            self.cur = None
            if up is not None and not up.closed:
                up.reset(ErrorCodes.CANCEL)
            self.ctx.arm(self.env.add_deadline(now + dec.backoff, self._next))
            return True
        if dec.skipped is not None:
            g.count(g.skipped, dec.skipped.value)
            if dec.skipped is Skip.ATTEMPTS:
                self.ctx.record.add_flag("URX")
        return False

    def _next(self) -> None:
        if self.done:
            return
        if self.down.closed:
            self._finish()
            return
        if self.retry is not None:
            self.retry.try_done()
        if self.choose is None:
            self.choose = self.make_choose()
        dest = self.choose(self.tried or set())
        if dest is None:
            self._fail("UH", ErrorCodes.REFUSED_STREAM, "no healthy upstream to retry on")
            return
        self.begin(dest)

    # -- timers --------------------------------------------------------------------------
    def _expired(self) -> None:
        if self.done or self.down.closed:
            return
        up = self.cur
        self.cur = None
        if up is not None and not up.closed:
            up.reset(ErrorCodes.CANCEL)
        flag = self.timeout_flag
        if self.committed and self.ctx.grpc:
            self._finish()
            self.ctx.expire(self.down, flag)
            return
        self._fail(flag, ErrorCodes.CANCEL, "upstream request timeout")

    def _try_expired(self, up: _TryHalf) -> None:
        if self.done or self.cur is not up or self.committed:
            return
        if self._judge(Failure.TIMEOUT):
            return
        self.cur = None
        up.reset(ErrorCodes.CANCEL)
        self._fail("UT", ErrorCodes.CANCEL, "upstream request timeout")

    # -- endings -------------------------------------------------------------------------
    def _fail(self, flags: str, code: int, message: str) -> None:
        """Give up: the caller gets the error (or a reset after a commit)."""
        self._finish()
        self.down.abort(code, "URX" if has_flag(self.ctx.record.response_flags, "URX") else flags, message)

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.items.clear()
        if self.holding:
            self.holding = False
            self.breaker.release_request()  # type: ignore[union-attr]
        if self.retry is not None:
            self.retry.try_done()

    # -- request direction (from _Front) ---------------------------------------------------
    def req_data(self, data: bytes, credit: int) -> None:
        if self.mirror is not None:
            self.mirror.data(data)
        up = self.cur
        if up is None:
            if self.done:
                self.down.ack(credit)
                return
            self.items.append([data, credit])  # held between tries: bounded by the sender's window
            self.size += len(data)
            return
        if self.retriable and not self.committed:
            self.size += len(data)
            if self.size > RETRY_BUFFER_LIMIT:
                self.retriable = False
                self.items.clear()
            else:
                self.items.append([data, 0])
        up.write_data(data, credit)

    def req_trailers_in(self, trailers: Headers) -> None:
        self.req_trailers = trailers
        if self.mirror is not None:
            self.mirror.trailers(trailers)
        if self.cur is not None:
            self.cur.write_trailers(trailers)

    def req_end_in(self) -> None:
        self.req_end = True
        if self.mirror is not None:
            self.mirror.end()
        if self.cur is not None:
            self.cur.write_end()

    def req_abort(self, code: int) -> None:
        """The caller went away (or its deadline passed): end the try."""
        up = self.cur
        self.cur = None
        self._finish()
        if up is not None and not up.closed:
            up.reset(code or ErrorCodes.CANCEL)
        if self.mirror is not None and not self.req_end and self.req_trailers is None:
            self.mirror.drop()  # its body would stay incomplete

    def resp_ack(self, credit: int) -> None:
        up = self.cur
        if up is not None:
            up.ack(credit)

    # -- response direction: the current try's upstream half is linked to this object -----
    # (a try that is cancelled is reset first, and a reset half calls its peer no more)
    def write_headers(self, headers: Headers, end: bool) -> None:
        up = self.cur
        if up is None or self.done:
            return
        status = 0
        gs = None
        for k, v in headers:
            if k == b":status":
                status = int(v)
            elif k == b"grpc-status" and v.isdigit():
                gs = int(v)
        if status < 200:
            self.down.write_headers(headers, False)
            return
        if self.ctx.grpc and gs is None and not end and status == 200:
            self.grpc_pending = True  # judged (for outlier detection) at the trailers
            self.committed = True
        elif self.retry is None and status < 400 and not gs:
            # The common case, as _judge would find it: no retry_on condition matches a
            # first failure-free answer; only outlier detection may want to hear of it.
            if self.outlier:
                self.env.guards.record(self.dest.peer.name, self.skey, status=status,  # type: ignore[union-attr]
                                       grpc_status=gs)
        elif self._judge(status=status, grpc_status=gs):
            return
        self.committed = True
        self.items.clear()
        if self.retry is not None:
            self.retry.try_done()
        if end:
            self._finish()
        elif not self.grpc_pending:
            # Committed, and nothing more to judge: the rest of the response goes straight
            # to the caller (the request's end, with the context's finish, releases the
            # breaker's slot; the deadline timer still answers through this object).
            up.peer = self.down
        self.down.write_headers(headers, end)

    def write_data(self, data: bytes, credit: int) -> None:
        if self.committed:
            self.down.write_data(data, credit)
        elif credit and self.cur is not None and not self.cur.closed:
            self.cur.ack(credit)

    def write_trailers(self, trailers: Headers) -> None:
        up = self.cur
        if up is None:
            return
        if self.grpc_pending:
            self.grpc_pending = False
            gs = next((int(v) for k, v in trailers if k == b"grpc-status" and v.isdigit()), None)
            assert self.dest is not None
            self.env.guards.record(self.dest.peer.name, self.skey, status=200, grpc_status=gs)
        self._finish()
        self.down.write_trailers(trailers)

    def write_end(self) -> None:
        if self.cur is None:
            return
        self._finish()
        self.down.write_end()

    def ack(self, credit: int) -> None:
        if credit:  # request bytes the try wrote (or gave back): the caller's window
            self.down.ack(credit)

    def reset(self, code: int) -> None:
        self.abort(code, "UR", "upstream reset")

    def abort(self, code: int, flags: str = "UR", message: str = "") -> None:
        """The current try failed (reset, connection lost or refused)."""
        up = self.cur
        if up is None or self.done:
            return
        if self.committed:
            self._finish()
            self.down.abort(code, flags, message)
            return
        if flags == "UF" or flags == "UO":
            failure = Failure.CONNECT
        elif code == ErrorCodes.REFUSED_STREAM:
            failure = Failure.REFUSED_STREAM
        elif not up.headers_sent:
            failure = Failure.BEFORE_REQUEST
        else:
            failure = Failure.RESET
        if self._judge(failure):
            return
        self.cur = None
        self._fail(flags, code, message)


class _Front(Half):
    """The downstream half's peer: what the caller sends goes to the current try."""

    __slots__ = ("a",)

    def __init__(self, a: Attempts) -> None:
        super().__init__()
        self.a = a

    def write_headers(self, headers: Headers, end: bool) -> None:
        pass  # the request head was taken already

    def write_data(self, data: bytes, credit: int) -> None:
        self.a.req_data(data, credit)

    def write_trailers(self, trailers: Headers) -> None:
        self.a.req_trailers_in(trailers)

    def write_end(self) -> None:
        self.a.req_end_in()

    def ack(self, credit: int) -> None:
        self.a.resp_ack(credit)

    def abort(self, code: int, flags: str = "UR", message: str = "") -> None:
        self.a.req_abort(code)

    def reset(self, code: int) -> None:
        self.a.req_abort(code)


class _TryHalf(H2Half):
    """A try's upstream stream; holds the breaker's pending slot until it has a connection."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        super().__init__(None, down=False)
        self.pending: CircuitBreaker | None = None

    def attach(self, ep: H2Endpoint) -> None:
        self._unpend()
        super().attach(ep)

    def reset(self, code: int) -> None:
        self._unpend()
        super().reset(code)

    def remote_reset(self, code: int, flags: str = "UR") -> None:
        self._unpend()
        super().remote_reset(code, flags)

    def _unpend(self) -> None:
        b = self.pending
        if b is not None:
            self.pending = None
            b.release_pending()


__all__ = ["Attempts", "Env", "chooser", "start"]

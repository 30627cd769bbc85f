"""One outbound request under a rule's timeout, retries and fault, and its service's
circuit breaker and outlier detection (sans-IO: the clock and the timer are injected).

Theory of operation
-------------------
Without resilience settings a request's downstream half is linked straight to one
upstream half (:mod:`gateway._half`).  With them, an :class:`Attempts` sits between the
two: the downstream half's peer is its :class:`_Front`, and every try is a fresh upstream
half whose peer is a :class:`_Try`.  Events keep flowing as they do between two linked
halves (credit included: a try acknowledges request bytes to the downstream sender as it
writes them), with three differences:

* the request body is also kept, up to :data:`~gateway._resilience.RETRY_BUFFER_LIMIT`
  (Envoy's 64 KiB), so that a new try can replay it (with no credit: the first try's
  writes returned it); past the limit the request is no longer retriable;
* a try's final response headers (or its failure: reset, connect failure, per-try
  timeout) are judged first (:class:`~gateway._resilience.RetryState`): a retriable one is
  not forwarded, the try is cancelled and, after the backoff, a new try goes to a
  destination not tried yet when one is healthy (Envoy's previous-hosts predicate, via
  the route selection with the tried destinations marked out); anything else *commits*
  the try: its headers go downstream and nothing is retried after that;
* the request's deadline (the lower of the rule's ``timeout`` and ``grpc-timeout``) and
  each per-try timeout are timers: the first answers 504 ``UT`` (gRPC DEADLINE_EXCEEDED)
  before a commit and resets after it; the second only ends its try.

Each try's outcome goes to outlier detection; the breaker's request slot is held from
the start until the response ends (or the exchange fails), its pending slot while a try
waits for a pooled connection (:class:`_TryHalf`), its retry slot while a retry runs.
Fault injection comes first: an abort answers at once with flag ``FI`` (never retried,
never routed), a delay holds the first try (flag ``DI``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes

from ._context import RequestContext
from ._deadlines import Timer
from ._decision import Decision
from ._flags import has_flag
from federation.names import local_host

from ._half import Half, Headers, link
from ._mirror import Copy, Mirrors
from ._proxy import destination
from ._relay import H2Endpoint, H2Half
from ._resilience import (
    DEADLINE_HEADER,
    GRPC_TIMEOUT,
    RETRY_BUFFER_LIMIT,
    CircuitBreaker,
    Deadline,
    Failure,
    RetryState,
    Skip,
    request_timeout,
)

if TYPE_CHECKING:
    from federation.traffic import Health, Request, RouteSet

    from ._guards import Guards, RulePlan, ServiceKey
    from ._routes import Destination, OutboundRoute, PeerCluster, RouteTable

_TEXT = (b"content-type", b"text/plain")


def chooser(route: OutboundRoute, table: RouteTable, traffic: RouteSet | None, req: Request, health: Health,
            x: Any) -> Callable[[set[tuple[str, str]]], Destination | None]:
    """Where a retry goes: the selection with the destinations tried so far marked out;
    when that leaves nothing, any healthy destination again."""
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
          rule: RulePlan | None, skey: ServiceKey,
          choose: Callable[[set[tuple[str, str]]], Destination | None],
          peers: Mapping[str, PeerCluster] | None = None) -> None:
    """Run the request ``headers`` (already rewritten for ``dest``) under the guards."""
    g = env.guards
    breaker = g.breaker(skey)
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
    a = Attempts(env, ctx, down, headers, end, rule, skey, breaker, choose)
    m = rule.mirror if rule is not None else None
    if m is not None and peers is not None and (m[2] >= 1.0 or g.rng.random() < m[2]):
        peer = peers.get(m[0])
        if peer is None:
            g.count(g.mirrored, "dropped")
        else:
            a.mirror = env.mirrors.start(a.headers, peer, f"{local_host(m[1], skey[0])}:{dest.port}", end,
                                         g.plan.connection_cap((skey[0], m[1])))
    if delay:
        abort = fd if fd is not None and fd.aborts else None
        ctx.arm(env.add_deadline(env.clock() + delay, lambda: a.after_delay(dest, abort)))
    else:
        a.begin(dest)


class Attempts:
    """One request's tries (see the module docstring)."""

    __slots__ = ("env", "ctx", "down", "front", "headers", "rule", "skey", "breaker", "choose", "deadline",
                 "timeout_flag", "retry", "items", "size", "retriable", "req_end", "req_trailers", "cur",
                 "committed", "done", "n", "holding", "grpc_pending", "tried", "mirror", "cap")

    def __init__(self, env: Env, ctx: RequestContext, down: Half, headers: Headers, end: bool,
                 rule: RulePlan | None, skey: ServiceKey, breaker: CircuitBreaker | None,
                 choose: Callable[[set[tuple[str, str]]], Destination | None]) -> None:
        now = env.clock()
        self.env, self.ctx, self.down = env, ctx, down
        self.headers = [(k, v) for k, v in headers if k != GRPC_TIMEOUT and k != DEADLINE_HEADER]
        self.rule, self.skey, self.breaker, self.choose = rule, skey, breaker, choose
        rt = rule.timeout if rule is not None else None
        timeout = request_timeout(rt, ctx.timeout)
        self.deadline = Deadline(now, timeout)
        self.timeout_flag = "UT" if rt is not None and timeout == rt else "DT"
        g = env.guards
        retry = rule.retry if rule is not None else None
        self.retry = RetryState(retry, g.budget(_rule_key(ctx)), breaker, g.rng, now) if retry is not None else None
        self.items: list[list[Any]] = []  # request body: [data, credit not yet handed to a try]
        self.size = 0
        self.retriable = self.retry is not None
        self.req_end = end
        self.req_trailers: Headers | None = None
        self.cur: _Try | None = None
        self.committed = self.done = False
        self.n = 0
        self.holding = breaker is not None  # the request slot
        self.grpc_pending = False  # a gRPC answer whose status comes in the trailers
        self.tried: set[tuple[str, str]] = set()
        self.mirror: Copy | None = None
        self.cap = g.plan.connection_cap(skey)  # the service's max_connections_per_peer
        self.front = _Front(self)
        link(down, self.front)
        if self.deadline.at != float("inf"):
            ctx.arm(env.add_deadline(self.deadline.at, self._expired))

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

    def begin(self, dest: Destination) -> None:
        if self.done:
            return
        env = self.env
        now = env.clock()
        self.n += 1
        x = self.ctx.record
        x.attempts = self.n
        env.fill_upstream(x, dest)
        self.tried.add((dest.peer.name, dest.destination_service))
        auth = dest.authority.encode()
        hs = [(k, auth) if k == b":authority" else (k, v) for k, v in self.headers]
        hs.extend(self.deadline.upstream_headers(now, self.ctx.grpc))
        up = _TryHalf(self)
        t = _Try(self, up, dest)
        link(t, up)
        self.cur = t
        body = bool(self.items) or self.req_trailers is not None or not self.req_end
        up.write_headers(hs, not body)
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
        if self.cur is not t or self.done:
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
        pt = self.retry.policy.per_try_timeout if self.retry is not None else None
        if pt is not None:
            at = self.deadline.try_deadline(now, pt)
            if at < self.deadline.at:
                self.ctx.arm(env.add_deadline(at, lambda: self._try_expired(t)))

    def _judge(self, t: _Try, failure: Failure | None = None, status: int = 0,
               grpc_status: int | None = None) -> bool:
        """Tell outlier detection; True when the try is retried (it was cancelled)."""
        d = t.dest
        self.env.guards.record(d.peer.name, self.skey, status=status, grpc_status=grpc_status, failure=failure)
        rs = self.retry
        if rs is None or self.committed:
            return False
        now = self.env.clock()
        dec = rs.decide(now, (d.peer.name, d.destination_service), failure=failure, status=status,
                        grpc_status=grpc_status, body_retriable=self.retriable, deadline=self.deadline.at)
        g = self.env.guards
        if dec.retry:
            g.count(g.retries, dec.reason or "")
            self.cur = None
            if not t.up.closed:
                t.up.reset(ErrorCodes.CANCEL)
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
        dest = self.choose(self.tried)
        if dest is None:
            self._fail("UH", ErrorCodes.REFUSED_STREAM, "no healthy upstream to retry on")
            return
        self.begin(dest)

    # -- timers --------------------------------------------------------------------------
    def _expired(self) -> None:
        if self.done or self.down.closed:
            return
        t = self.cur
        self.cur = None
        if t is not None and not t.up.closed:
            t.up.reset(ErrorCodes.CANCEL)
        flag = self.timeout_flag
        if self.committed and self.ctx.grpc:
            self._finish()
            self.ctx.expire(self.down, flag)
            return
        self._fail(flag, ErrorCodes.CANCEL, "upstream request timeout")

    def _try_expired(self, t: _Try) -> None:
        if self.done or self.cur is not t or self.committed:
            return
        if self._judge(t, Failure.TIMEOUT):
            return
        self.cur = None
        t.up.reset(ErrorCodes.CANCEL)
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
        t = self.cur
        if t is None:
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
        t.up.write_data(data, credit)

    def req_trailers_in(self, trailers: Headers) -> None:
        self.req_trailers = trailers
        if self.mirror is not None:
            self.mirror.trailers(trailers)
        if self.cur is not None:
            self.cur.up.write_trailers(trailers)

    def req_end_in(self) -> None:
        self.req_end = True
        if self.mirror is not None:
            self.mirror.end()
        if self.cur is not None:
            self.cur.up.write_end()

    def req_abort(self, code: int) -> None:
        """The caller went away (or its deadline passed): end the try."""
        t = self.cur
        self.cur = None
        self._finish()
        if t is not None and not t.up.closed:
            t.up.reset(code or ErrorCodes.CANCEL)
        if self.mirror is not None and not self.req_end and self.req_trailers is None:
            self.mirror.drop()  # its body would stay incomplete

    def resp_ack(self, credit: int) -> None:
        t = self.cur
        if t is not None:
            t.up.ack(credit)

    # -- response direction (from _Try) ----------------------------------------------------
    def resp_headers(self, t: _Try, headers: Headers, end: bool) -> None:
        if t is not self.cur or self.done:
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
        elif self._judge(t, status=status, grpc_status=gs):
            return
        self.committed = True
        self.items.clear()
        if self.retry is not None:
            self.retry.try_done()
        self.down.write_headers(headers, end)
        if end:
            self._finish()

    def resp_data(self, t: _Try, data: bytes, credit: int) -> None:
        if t is self.cur and self.committed:
            self.down.write_data(data, credit)
        elif credit and not t.up.closed:
            t.up.ack(credit)

    def resp_trailers(self, t: _Try, trailers: Headers) -> None:
        if t is not self.cur:
            return
        if self.grpc_pending:
            self.grpc_pending = False
            gs = next((int(v) for k, v in trailers if k == b"grpc-status" and v.isdigit()), None)
            self.env.guards.record(t.dest.peer.name, self.skey, status=200, grpc_status=gs)
        self._finish()
        self.down.write_trailers(trailers)

    def resp_end(self, t: _Try) -> None:
        if t is not self.cur:
            return
        self._finish()
        self.down.write_end()

    def resp_abort(self, t: _Try, code: int, flags: str, message: str) -> None:
        if t is not self.cur or self.done:
            return
        if self.committed:
            self._finish()
            self.down.abort(code, flags, message)
            return
        if flags == "UF" or flags == "UO":
            failure = Failure.CONNECT
        elif code == ErrorCodes.REFUSED_STREAM:
            failure = Failure.REFUSED_STREAM
        elif not t.up.headers_sent:
            failure = Failure.BEFORE_REQUEST
        else:
            failure = Failure.RESET
        if self._judge(t, failure):
            return
        self.cur = None
        self._fail(flags, code, message)


def _rule_key(ctx: RequestContext) -> tuple[str, int]:
    x = ctx.record
    return (x.route_name, x.route_rule if x.route_rule is not None else -1)


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


class _Try(Half):
    """One try's upstream half's peer: what the destination answers goes to the judge."""

    __slots__ = ("a", "up", "dest")

    def __init__(self, a: Attempts, up: _TryHalf, dest: Destination) -> None:
        super().__init__()
        self.a, self.up, self.dest = a, up, dest

    def write_headers(self, headers: Headers, end: bool) -> None:
        self.a.resp_headers(self, headers, end)

    def write_data(self, data: bytes, credit: int) -> None:
        self.a.resp_data(self, data, credit)

    def write_trailers(self, trailers: Headers) -> None:
        self.a.resp_trailers(self, trailers)

    def write_end(self) -> None:
        self.a.resp_end(self)

    def ack(self, credit: int) -> None:
        if credit:  # request bytes this try wrote (or gave back): the caller's window
            self.a.down.ack(credit)

    def abort(self, code: int, flags: str = "UR", message: str = "") -> None:
        self.a.resp_abort(self, code, flags, message)

    def reset(self, code: int) -> None:
        self.a.resp_abort(self, code, "UR", "upstream reset")


class _TryHalf(H2Half):
    """A try's upstream stream; holds the breaker's pending slot until it has a connection."""

    __slots__ = ("pending",)

    def __init__(self, a: Attempts) -> None:
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

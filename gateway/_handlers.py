"""The request handlers: one request's wiring, from its headers to its upstream half.

Called synchronously by the relay (``on_request``) when a request's headers arrive:

* :meth:`Handlers.inbound_request` (a peer gateway's request on the inbound listener):
  the peer must still be a joined cluster; routing, identity and authorization are
  :func:`gateway._proxy.inbound`; a decision waiting on a JWKS fetch parks the request
  (:class:`gateway._authz.Parked`) and resumes it from a worker thread; then the request
  goes to the local service over pooled HTTP/2, HTTP/1.1 or a CONNECT tunnel;
* :meth:`Handlers.outbound_request` (a workload's request on the outbound listener):
  :func:`gateway._proxy.outbound` routes it and chooses its destination (a pin's
  cluster, or the TrafficRoute's selection over the upstreams' live health), the request
  rides a pooled connection to that peer's gateway;
* :meth:`Handlers.tcp_route` and :meth:`Handlers.tcp_open` for the opaque TCP ports (a
  TrafficRoute's destinations and failover apply per connection; its matches do not).

Each request reads the :class:`~gateway._state.ConfigState` once.  Nothing here imports
an event loop: the clock, the spawner of background work, the worker-thread runner and
the deadline timer are injected (as hypercorn's protocol classes take theirs), and
connections are opened through :class:`Upstreams` (:class:`gateway._dialer.Dialer`).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

import trust
from federation.traffic import Out, Request, Target

from ._authz import Parked
from ._config import Limits
from ._context import RequestContext
from ._deadlines import Timer
from ._guards import Guards, Slot, service_key
from ._decision import Decision, refuse
from ._h1 import H1Half, H1Upstream
from ._half import Half, Headers, link
from ._normalize import PathOptions
from ._proxy import Forward, destination, inbound, outbound, settle, strip, traceparent
from ._relay import H2Half, new_upstream
from ._mirror import Mirrors
from ._retry import Env, chooser, start
from ._routes import Destination, LocalTarget, OutboundRoute, PeerCluster
from ._sanitize import Refused, check_size
from ._state import ConfigState
from ._telemetry import Exchange, Recorder

log = structlog.get_logger("isthmus.gateway")


@functools.lru_cache(maxsize=1024)
def _gateway_principal(trust_domain: str) -> str:
    """A peer gateway's SPIFFE ID as text (made once per trust domain, not per request:
    parsing and validating it cost ~15 us)."""
    return str(trust.gateway_id(trust_domain))

class Upstreams(Protocol):
    """How the handlers reach upstreams (implemented by :class:`gateway._dialer.Dialer`)."""

    def health(self, target: Target) -> Out | None: ...
    def peer_key(self, pc: PeerCluster) -> tuple[str, str, str, str]: ...
    def open_peer(self, pc: PeerCluster, up: H2Half, cap: int | None = None) -> None: ...
    def open_service(self, target: LocalTarget, up: H2Half) -> None: ...
    async def h1_upstream(self, h1: H1Upstream, target: LocalTarget) -> None: ...
    async def connect_local(self, half: Half, target: LocalTarget,
                            ctx: RequestContext) -> None: ...


class Handlers:
    """Per-request wiring for both listeners and the TCP ports."""

    def __init__(self, *, cluster: str, identity: str, limits: Limits, recorder: Recorder,
                 state: Callable[[], ConfigState], upstreams: Upstreams,
                 clock: Callable[[], float],
                 spawn: Callable[..., None],
                 in_thread: Callable[[Callable[[], Decision]], Awaitable[Decision]],
                 add_deadline: Callable[[float, Callable[[], None]], Timer],
                 paths: PathOptions | None = None, guards: Guards | None = None) -> None:
        self.cluster = cluster
        self.identity = identity
        self.limits = limits
        self.recorder = recorder
        self.state = state
        self.upstreams = upstreams
        self.clock = clock
        self.spawn = spawn
        self.in_thread = in_thread
        self.add_deadline = add_deadline
        self.paths = paths or PathOptions()  # the inbound's path normalization
        # Timeouts, retries, faults, breakers, outlier detection (gateway/_retry.py).
        self.guards = guards
        self.env = None if guards is None else Env(
            clock, add_deadline, upstreams.open_peer, self._fill_upstream, guards,
            Mirrors(upstreams.open_peer, lambda outcome: guards.count(guards.mirrored, outcome)))

    # -- inbound --------------------------------------------------------------------------
    def inbound_request(self, sid: trust.SpiffeId, half: Half, headers: Headers,
                        end: bool, *, addresses: tuple[tuple[str, int], tuple[str, int]] = (("", 0), ("", 0))
                        ) -> None:
        """``addresses``: the connection's (peer, local) socket addresses, for ext_authz."""
        ctx = RequestContext.parse(headers, Exchange("destination", "HTTP/2", self.recorder),
                                   self.recorder.sample_bound)
        half.ctx = ctx
        x = ctx.record
        x.destination_principal = self.identity
        state = self.state()
        peer = state.routes.peer(sid.trust_domain)
        if peer is None:  # revoked or removed since the connection was made
            x.peer_principal = str(sid)
            ctx.refuse(half, refuse("RBAC", "peer cluster not joined", 403))
            return
        d = inbound(headers, state.routes, peer, str(sid), state.policy, ctx, self.paths,
                    self.limits.max_header_list_size, self.identity, addresses)
        if isinstance(d, Decision):
            ctx.refuse(half, d)
            return
        if d.decision.pending is not None or d.decision.check is not None:
            # Decision waits on a JWKS fetch (decided in a thread) or an external
            # authorizer (awaited in this request's task): park the request meanwhile.
            parked = Parked()
            link(half, parked)
            self.spawn(self._resume_inbound, half, ctx, parked, d, end)
            return
        self._forward_inbound(half, ctx, d, end)

    async def _resume_inbound(self, half: Half, ctx: RequestContext, parked: Parked, d: Forward,
                              end: bool) -> None:
        decision = d.decision
        try:
            for _ in range(3):  # a JWKS fetch, then an external authorizer, at most
                if decision.pending is not None:
                    decision = await self.in_thread(decision.pending)
                elif decision.check is not None:
                    decision = await decision.check(None if end else parked)
                else:
                    break
            if decision.pending is not None or decision.check is not None:
                raise RuntimeError("authorization did not settle")
        except Exception as exc:  # noqa: BLE001 - fail closed, never crash the gateway
            log.error("authz.pending_failed", error=repr(exc), exc_info=True)
            decision = refuse("RBAC", "RBAC: access denied (authorization failed)", 403)
        if parked.aborted or half.closed:
            return  # the caller went away meanwhile
        denied = settle(decision, ctx, ctx.record.peer_principal)
        if denied is not None:
            parked.release()
            ctx.refuse(half, denied)
            return
        if decision.strip_headers:
            d.headers = strip(d.headers, decision.strip_headers)
        if decision.mutate is not None:  # an external authorizer's changes (never identity headers)
            d.headers = decision.mutate(d.headers)
            try:
                check_size(d.headers, self.limits.max_header_list_size)
            except Refused as exc:
                parked.release()
                ctx.refuse(half, refuse("UAEX", f"the authorizer's header changes: {exc}", 431))
                return
        ctx.response_mutate = decision.respond_mutate
        self._forward_inbound(half, ctx, d, end)
        if half.peer is not parked and half.peer is not None:
            parked.replay(half.peer)

    def _forward_inbound(self, half: Half, ctx: RequestContext, d: Forward, end: bool) -> None:
        target: LocalTarget = d.route
        x = ctx.record
        x.upstream_cluster = f"inbound|{target.port}||{target.destination_service}"
        x.upstream_host = f"{target.host}:{target.target_port}"
        self._deadline(half, ctx)
        if d.connect:
            x.tcp = True
            self.spawn(self.upstreams.connect_local, half, target, ctx)
            return
        if target.protocol == "HTTP":
            # Plain "HTTP" services may speak HTTP/1.1 only: re-originate with h11.
            h1 = H1Upstream(self.limits.tcp_buffer)
            link(half, h1)
            h1.write_headers(d.headers, end)
            self.spawn(self.upstreams.h1_upstream, h1, target)
            return
        up = new_upstream()
        link(half, up)
        up.write_headers(d.headers, end)
        self.upstreams.open_service(target, up)

    # -- outbound -------------------------------------------------------------------------
    def outbound_request(self, caller: str, protocol: str, half: Half, headers: Headers,
                         end: bool) -> None:
        ctx = RequestContext.parse(headers, Exchange("source", protocol, self.recorder),
                                   self.recorder.sample_bound, deadline_header=False)
        half.ctx = ctx
        x = ctx.record
        x.source_principal = caller
        x.source_cluster = self.cluster
        state = self.state()
        g = self.guards
        health = self.upstreams.health if g is None else g.health
        if g is not None:
            g.sync(state.guards)
        d = outbound(headers, state.routes, caller, ctx, self.limits.max_header_list_size,
                     state.traffic, health)
        if isinstance(d, Decision) and d.flags == "UH" and g is not None and g.outlier.dests:
            # Every destination ejected: use them all (Envoy's panic mode).
            d = outbound(headers, state.routes, caller, ctx, self.limits.max_header_list_size,
                         state.traffic, self.upstreams.health)
            if not isinstance(d, Decision) and d.dest is not None:
                g.panic(service_key(d.dest.destination_service))
                x.response_code_details = "outlier_panic"
        if isinstance(d, Decision):
            ctx.refuse(half, d)
            return
        if d.connect and isinstance(half, H1Half):
            ctx.refuse(half, refuse("NR", "CONNECT needs HTTP/2", 405))
            return
        dest = d.dest
        assert dest is not None
        if g is not None and not d.connect and self._guarded(state, ctx, half, d, end, health):
            return
        self._fill_upstream(x, dest)
        cap = None
        if d.connect:
            ok, cap = self._hold_slot(ctx, dest)
            if not ok:
                ctx.fail(half, "UO", "upstream overflow: the service's max_requests is reached")
                return
        self._deadline(half, ctx)
        if d.connect:
            x.tcp = True
            self.recorder.tcp_opened(x)
        up = new_upstream()
        link(half, up)
        up.write_headers(d.headers, end)
        self.upstreams.open_peer(dest.peer, up, cap)

    def _guarded(self, state: ConfigState, ctx: RequestContext, half: Half, d: Forward, end: bool,
                 health: Callable[[Target], Out | None]) -> bool:
        """Run the request under its rule's and service's guards, if it has any."""
        g, dest = self.guards, d.dest
        assert g is not None and self.env is not None and dest is not None
        spec = g.spec(dest.route, dest.rule, dest.destination_service)
        if spec is None:
            return False
        start(self.env, ctx, half, d.headers, end, dest, spec,
              functools.partial(chooser, d.route, state.routes, state.traffic, ctx.method, ctx.path, d.headers,
                                health, ctx.record), state.routes.peers_by_name)
        return True

    def _hold_slot(self, ctx: RequestContext, dest: Destination) -> tuple[bool, int | None]:
        """A CONNECT tunnel or an opaque TCP connection to a service under a TrafficPolicy
        holds one of its breaker's request slots while it lasts (an HTTP/2 CONNECT is a
        request to Envoy's breakers too) and keeps to its ``max_connections_per_peer``:
        (False when the breaker is full, the service's connection cap)."""
        g = self.guards
        if g is None:
            return True, None
        g.sync(self.state().guards)
        spec = g.spec(dest.route, dest.rule, dest.destination_service)
        if spec is None:
            return True, None
        b = spec.breaker
        if b is not None:
            if not b.try_request():
                g.count(g.overflows, f"{spec.skey[1]}.{spec.skey[0]}")
                return False, spec.cap
            ctx.arm(Slot(b))
        return True, spec.cap

    # -- opaque TCP ports -----------------------------------------------------------------
    def tcp_route(self, target: str) -> tuple[RequestContext, OutboundRoute | None,
                                              Destination | None]:
        """The context, route and destination of a new connection to a TCP port (chosen
        per connection); no destination: refused."""
        ctx = RequestContext(Exchange("source", "TCP", self.recorder))
        x = ctx.record
        x.tcp = True
        x.source_cluster = self.cluster
        x.authority = target
        state = self.state()
        route = state.routes.outbound_route(target)
        dest = None
        if route is not None:
            x.destination_service = route.destination_service
            d = destination(route, state.routes, state.traffic, Request("", "", tcp=True),
                            self.upstreams.health, x)
            if isinstance(d, Decision):
                x.add_flag(d.flags)
            else:
                dest = d
        else:
            x.add_flag("NR")
        if dest is None:
            log.info("tcp.no_route", target=target, flags=x.response_flags)
        return ctx, route, dest

    def tcp_open(self, ctx: RequestContext, route: OutboundRoute, dest: Destination,
                 down: Half) -> H2Half | None:
        """Tunnel ``down`` (the accepted socket) to ``dest`` as an HTTP/2 CONNECT stream;
        None when the service's circuit breaker is full (flag ``UO``: close the socket)."""
        x = ctx.record
        x.to_service(route)
        self._fill_upstream(x, dest)
        ok, cap = self._hold_slot(ctx, dest)
        if not ok:
            x.add_flag("UO")
            log.info("tcp.overflow", target=x.authority, service=dest.destination_service,
                     detail="the service's max_requests is reached")
            return None
        down.ctx = ctx
        up = new_upstream()
        link(down, up)
        self.recorder.tcp_opened(x)
        tp, x.trace_id = traceparent(None)
        up.write_headers([(b":method", b"CONNECT"), (b":authority", dest.authority.encode()),
                          (b"traceparent", tp)], False)
        self.upstreams.open_peer(dest.peer, up, cap)
        return up

    # -- shared ---------------------------------------------------------------------------
    def _fill_upstream(self, x: Exchange, dest: Destination) -> None:
        pc = dest.peer
        x.destination_cluster = pc.name
        x.destination_service = dest.destination_service
        # The service the route chose (cart-v2 for cart), for the destination_service_* labels.
        x.destination_name, x.destination_namespace = dest.destination_service.split(".", 2)[:2]
        x.destination_principal = _gateway_principal(pc.trust_domain)
        x.upstream_cluster = f"outbound|{dest.port}||{dest.destination_service}|{pc.name}"
        x.upstream_host = self.upstreams.peer_key(pc)[3]

    def _deadline(self, half: Half, ctx: RequestContext) -> None:
        at = ctx.start_deadline(self.clock())
        if at is not None:
            ctx.arm(self.add_deadline(at, functools.partial(ctx.expire, half)))


__all__ = ["Handlers", "Upstreams"]

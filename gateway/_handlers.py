"""The request handlers: one request's wiring, from its headers to its upstream half.

Called synchronously by the relay (``on_request``) when a request's headers arrive:

* :meth:`Handlers.inbound_request` (a peer gateway's request on the inbound listener):
  the peer must still be a joined cluster; routing, identity and authorization are
  :func:`gateway._proxy.inbound`; a decision waiting on a JWKS fetch parks the request
  (:class:`gateway._authz.Parked`) and resumes it from a worker thread; then the request
  goes to the local service over pooled HTTP/2, HTTP/1.1 or a CONNECT tunnel;
* :meth:`Handlers.outbound_request` (a workload's request on the outbound listener):
  :func:`gateway._proxy.outbound` routes it, a peer cluster is chosen, the request rides
  a pooled connection to that peer's gateway;
* :meth:`Handlers.tcp_route` and :meth:`Handlers.tcp_open` for the opaque TCP ports.

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

from ._authz import Parked
from ._config import Limits
from ._context import RequestContext
from ._decision import Decision, refuse
from ._h1 import H1Half, H1Upstream
from ._half import Half, Headers, link
from ._normalize import PathOptions
from ._proxy import Forward, inbound, outbound, settle, strip, traceparent
from ._relay import H2Half, new_upstream
from ._routes import LocalTarget, OutboundRoute, PeerCluster
from ._state import ConfigState
from ._telemetry import Exchange, Recorder

log = structlog.get_logger("isthmus.gateway")

class Upstreams(Protocol):
    """How the handlers reach upstreams (implemented by :class:`gateway._dialer.Dialer`)."""

    def pick(self, route: OutboundRoute) -> PeerCluster | None: ...
    def peer_key(self, pc: PeerCluster) -> tuple[str, str, str, str]: ...
    def open_peer(self, pc: PeerCluster, up: H2Half) -> None: ...
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
                 add_deadline: Callable[[float, Callable[[], None]], None],
                 paths: PathOptions | None = None) -> None:
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

    # -- inbound --------------------------------------------------------------------------
    def inbound_request(self, sid: trust.SpiffeId, half: Half, headers: Headers,
                        end: bool) -> None:
        ctx = RequestContext.parse(headers, Exchange("destination", "HTTP/2", self.recorder))
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
                    self.limits.max_header_list_size, self.identity)
        if isinstance(d, Decision):
            ctx.refuse(half, d)
            return
        if d.decision.pending is not None:
            # Decision waits on a JWKS fetch: park the request, decide in a thread.
            parked = Parked()
            link(half, parked)
            self.spawn(self._resume_inbound, half, ctx, parked, d, end)
            return
        self._forward_inbound(half, ctx, d, end)

    async def _resume_inbound(self, half: Half, ctx: RequestContext, parked: Parked, d: Forward,
                              end: bool) -> None:
        pending = d.decision.pending
        assert pending is not None
        try:
            decision = await self.in_thread(pending)
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
        ctx = RequestContext.parse(headers, Exchange("source", protocol, self.recorder))
        half.ctx = ctx
        x = ctx.record
        x.source_principal = caller
        x.source_cluster = self.cluster
        d = outbound(headers, self.state().routes, caller, ctx, self.limits.max_header_list_size)
        if isinstance(d, Decision):
            ctx.refuse(half, d)
            return
        if d.connect and isinstance(half, H1Half):
            ctx.refuse(half, refuse("NR", "CONNECT needs HTTP/2", 405))
            return
        route: OutboundRoute = d.route
        pc = self.upstreams.pick(route)
        if pc is None:
            ctx.refuse(half, refuse("UH", f"no healthy cluster serves {x.authority}", 503))
            return
        self._fill_upstream(x, route, pc)
        self._deadline(half, ctx)
        if d.connect:
            x.tcp = True
            self.recorder.tcp_opened(x)
        up = new_upstream()
        link(half, up)
        up.write_headers(d.headers, end)
        self.upstreams.open_peer(pc, up)

    # -- opaque TCP ports -----------------------------------------------------------------
    def tcp_route(self, target: str) -> tuple[RequestContext, OutboundRoute | None,
                                              PeerCluster | None]:
        """The context, route and peer of a new connection to a TCP port; no peer: refused."""
        ctx = RequestContext(Exchange("source", "TCP", self.recorder))
        x = ctx.record
        x.tcp = True
        x.source_cluster = self.cluster
        x.authority = target
        route = self.state().routes.outbound_route(target)
        pc = self.upstreams.pick(route) if route is not None else None
        if route is None or pc is None:
            x.response_flags = "NR" if route is None else "UH"
            log.info("tcp.no_route", target=target)
        return ctx, route, pc

    def tcp_open(self, ctx: RequestContext, route: OutboundRoute, pc: PeerCluster,
                 down: Half) -> H2Half:
        """Tunnel ``down`` (the accepted socket) to ``pc`` as an HTTP/2 CONNECT stream."""
        x = ctx.record
        x.destination_service = route.destination_service
        self._fill_upstream(x, route, pc)
        down.ctx = ctx
        up = new_upstream()
        link(down, up)
        self.recorder.tcp_opened(x)
        tp, x.trace_id = traceparent(None)
        up.write_headers([(b":method", b"CONNECT"), (b":authority", route.authority.encode()),
                          (b"traceparent", tp)], False)
        self.upstreams.open_peer(pc, up)
        return up

    # -- shared ---------------------------------------------------------------------------
    def _fill_upstream(self, x: Exchange, route: OutboundRoute, pc: PeerCluster) -> None:
        x.destination_cluster = pc.name
        x.destination_principal = str(trust.gateway_id(pc.trust_domain))
        x.upstream_cluster = f"outbound|{route.port}||{route.destination_service}|{pc.name}"
        x.upstream_host = self.upstreams.peer_key(pc)[3]

    def _deadline(self, half: Half, ctx: RequestContext) -> None:
        at = ctx.start_deadline(self.clock())
        if at is not None:
            self.add_deadline(at, functools.partial(ctx.expire, half))


__all__ = ["Handlers", "Upstreams"]

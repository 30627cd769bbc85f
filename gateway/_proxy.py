"""Per-request decisions of both listeners, as pure functions of headers and tables.

Outbound (local workload -> peer gateway): route the ``:authority``/Host of an imported
name (see :mod:`gateway._routes` for the scheme), choose its destination (a pin's cluster,
or for a federated name :mod:`federation.traffic`'s selection: :func:`destination`),
strip anything a workload must not set (``isthmus-source-identity``), assert the caller's
verified SPIFFE ID, continue or start a W3C trace.

Inbound (peer gateway -> local service): the service must be exported to the peer's
cluster; the caller identity the peer asserts must lie in the peer's own trust domain (a
gateway of ``east`` cannot speak for ``west``); then the
:data:`~gateway._decision.Authorizer` hook decides (the gateway's is
:class:`gateway._authz.PolicyState`: federation AuthorizationPolicy and JWT).

Both answer a :class:`Forward` (rewritten headers and the route) or a refusing
:class:`~gateway._decision.Decision`; they fill the request's telemetry record as they go.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import structlog
from federation.traffic import Health, Request, RouteSet, all_healthy
from trust import InvalidSpiffeId, SpiffeId

from ._context import RequestContext
from ._decision import ALLOW, Authorizer, Decision, RequestAttrs, refuse
from ._flags import flag
from ._mirror import SHADOW, unshadow
from ._half import Headers
from ._normalize import DEFAULT as DEFAULT_PATHS
from ._normalize import PathOptions, normalize_target
from ._propagation import TRACE_HEADERS, Hop, begin, parse_traceparent
from ._routes import Destination, OutboundRoute, PeerCluster, RouteTable
from ._telemetry import Exchange
from ._sanitize import (
    XFCC,
    Refused,
    check_request,
    check_size,
    outbound_request,
    source_identity,
)

log = structlog.get_logger("isthmus.gateway")
# Peer gateways assert the same few caller identities over and over: parse each once (an
# invalid one raises each time; lru_cache keeps only results).  SpiffeId is immutable.
_parse_id = functools.lru_cache(maxsize=1024)(SpiffeId.parse)

SOURCE_IDENTITY = b"isthmus-source-identity"
DEFAULT_HEADER_LIMIT = 60 * 1024  # Limits.max_header_list_size's default


@dataclass(slots=True)
class Forward:
    """A request that goes on: the headers to send and where (``route``: an
    :class:`OutboundRoute` at the outbound, a :class:`LocalTarget` at the inbound)."""

    headers: Headers
    route: Any
    connect: bool = False
    decision: Decision = ALLOW  # inbound: the allowing (or still pending) decision
    dest: Destination | None = None  # outbound: where it goes


def traceparent(incoming: bytes | None) -> tuple[bytes, str]:
    """(header value for the next hop, trace id): continue ``incoming`` if valid."""
    hop = begin(parse_traceparent(incoming) if incoming is not None else None)
    return hop.traceparent(), hop.trace_hex


def _hop(ctx: RequestContext) -> Hop:
    """The request's hop of its trace (begun when its headers were parsed)."""
    x = ctx.record
    if x.trace is None:  # a context made without parse (tests)
        x.trace = begin(parse_traceparent(ctx.traceparent) if ctx.traceparent else None)
    x.trace_id = x.trace.trace_hex
    return x.trace


def destination(route: OutboundRoute, table: RouteTable, traffic: RouteSet | None, req: Request,
                health: Health, x: Exchange) -> Destination | Decision:
    """Where a request (or connection) to ``route`` goes: a pin's cluster, or the
    destination the federated name's TrafficRoute (or even spread) selects; a refusal
    when no rule matches (404 ``NR``) or nothing is healthy (503 ``UH``)."""
    if not route.federated or traffic is None:
        return route.pin
    sel = traffic.select(route.namespace, route.service, route.port, req, health)
    if sel is None:  # the route table and the routes come from one snapshot: not expected
        return refuse("NR", f"no imported service is named {x.authority!r}")
    x.route_name = sel.route
    x.route_rule = sel.rule
    t = sel.target
    if t is None:
        if sel.tier == "no-rule":
            return refuse("NR", f"no rule of route {sel.route!r} matches this request", 404)
        return refuse("UH", f"no healthy cluster serves {x.authority}", 503)
    peer = table.peers_by_name.get(t.cluster)
    if peer is None:
        return refuse("UH", f"no healthy cluster serves {x.authority}", 503)
    return Destination(peer, t.authority, t.destination_service, t.port, sel.route, sel.rule)


def outbound(headers: Headers, table: RouteTable, caller: str, ctx: RequestContext,
             header_limit: int = DEFAULT_HEADER_LIMIT, traffic: RouteSet | None = None,
             health: Health = all_healthy) -> Forward | Decision:
    x = ctx.record
    auth = ctx.authority
    if not auth:
        return refuse("NR", "request has no :authority or Host header", 400)
    x.authority = auth
    # Identity headers in any letter case, hop-by-hop fields: never from a workload.
    out = outbound_request(headers)
    try:
        # HTTP/1.1 may carry hop-by-hop fields (dropped above); in HTTP/2 they make the
        # request malformed (RFC 9113 §8.2.2), whichever HTTP/2 core parsed it.
        check_request(headers if x.protocol == "HTTP/2" else out)
    except Refused as exc:
        return _refused(exc)
    route = table.outbound_route(auth)
    if route is None:
        return refuse("NR", f"no imported service is named {auth!r}")
    x.to_service(route)
    if ctx.connect and route.protocol != "TCP":
        return _connect_refused(auth, route.protocol)
    dest = destination(route, table, traffic, Request(ctx.method, ctx.path, raw=headers, tcp=ctx.connect),
                       health, x)
    if isinstance(dest, Decision):
        return dest
    x.destination_service = dest.destination_service
    trace = _hop(ctx).headers()
    new_auth = dest.authority.encode()
    out = [(k, new_auth) if k == b":authority" else (k, v) for k, v in out if k not in TRACE_HEADERS]
    if not any(k == b":authority" for k, _ in out):
        out.insert(1, (b":authority", new_auth))
    if caller:
        out.append((SOURCE_IDENTITY, caller.encode()))
    out.extend(trace)
    try:
        check_size(out, header_limit)  # counted as the peer will: what we added included
    except Refused as exc:
        return _refused(exc)
    return Forward(out, route, ctx.connect, dest=dest)


def _refused(exc: Refused) -> Decision:
    # Envoy's flag for a downstream protocol error (gRPC INTERNAL: see _flags).
    return refuse("DPE", str(exc), exc.status)


def _connect_refused(authority: str, protocol: str) -> Decision:
    return refuse("NR", f"CONNECT is allowed to TCP ports only: {authority} is exported as "
                  f"{protocol}; send HTTP requests to it instead", 405)


def inbound(headers: Headers, table: RouteTable, peer: PeerCluster, peer_principal: str,
            authorize: Authorizer, ctx: RequestContext, paths: PathOptions = DEFAULT_PATHS,
            header_limit: int = DEFAULT_HEADER_LIMIT, local_id: str = "",
            addresses: tuple[tuple[str, int], tuple[str, int]] = (("", 0), ("", 0))) -> Forward | Decision:
    x = ctx.record
    x.source_cluster = peer.name
    x.peer_principal = peer_principal
    x.destination_cluster = table.local_cluster
    auth = ctx.authority
    if not auth:
        return refuse("NR", "request has no :authority", 400)
    x.authority = auth
    connect = ctx.connect
    try:
        # The connection from a peer gateway skips h2's header validation: this is it.
        check_request(headers)
        asserted = source_identity(headers)
        if not connect:
            # Normalized before authorization, and forwarded as normalized (see _normalize).
            path = normalize_target(next(v for k, v in headers if k == b":path"),
                                    ctx.method.encode("latin-1"), paths)
            ctx.path = x.path = path.decode("latin-1")
            headers = [(k, path) if k == b":path" else (k, v) for k, v in headers]
    except Refused as exc:
        if exc.status == 403:
            log.warning("inbound.identity_refused", peer=peer_principal, error=str(exc))
            return refuse("RBAC", str(exc), 403)
        return _refused(exc)
    target = table.inbound_target(auth)
    if target is None and SHADOW in auth:  # a mirror's copy names the service itself
        target = table.inbound_target(unshadow(auth))
    if target is None or not target.visible_to(peer.name):
        # Same answer whether the service does not exist or is not exported to the peer.
        return refuse("NR", f"no service {auth!r} is exported to cluster {peer.name!r}")
    x.to_service(target)
    if connect and target.protocol != "TCP":
        return _connect_refused(auth, target.protocol)
    source = asserted.decode("latin-1") if asserted else ""
    if source:
        try:
            sid = _parse_id(source)
        except InvalidSpiffeId:
            log.warning("inbound.bad_source_identity", peer=peer_principal, asserted=source)
            return refuse("RBAC", "isthmus-source-identity is not a valid SPIFFE ID", 403)
        if sid.trust_domain != peer.trust_domain:
            log.warning("inbound.impersonation_refused", peer=peer_principal,
                        peer_cluster=peer.name, asserted=source)
            return refuse("RBAC", f"gateway of cluster {peer.name!r} may not assert "
                          f"identities of trust domain {sid.trust_domain!r}", 403)
        x.source_principal = source
    decision = authorize(RequestAttrs(peer.name, peer_principal, source, target.namespace,
                                      target.service, target.port, ctx.method, ctx.path,
                                      tuple(headers), *addresses))
    if decision.pending is None and decision.check is None:
        denied = settle(decision, ctx, peer_principal)
        if denied is not None:
            return denied
    trace = _hop(ctx).headers()
    out: Headers = [(k, v) for k, v in headers if k not in TRACE_HEADERS and k != XFCC]
    out = strip(out, decision.strip_headers)
    if source and local_id and not connect:
        # Envoy's SANITIZE_SET: the service learns the verified caller, never a forwarded one.
        out.append((XFCC, f"By={local_id};URI={source}".encode()))
    out.extend(trace)
    try:
        check_size(out, header_limit)
    except Refused as exc:
        return _refused(exc)
    return Forward(out, target, connect, decision)


def strip(headers: Headers, names: frozenset[bytes]) -> Headers:
    """``headers`` without the ones named (lowercase) in ``names``."""
    if not names:
        return headers
    return [(k, v) for k, v in headers if (k.lower() if isinstance(k, bytes) else k.lower().encode()) not in names]


def settle(decision: Decision, ctx: RequestContext, peer_principal: str) -> Decision | None:
    """Record a final authorization decision on the request; the decision if it refuses."""
    ctx.decided(decision)
    if decision.allow:
        return None
    log.info("inbound.denied", peer=peer_principal, source=ctx.record.source_principal,
             service=ctx.record.destination_service,
             status=decision.status or flag(decision.flags).http,
             policy=decision.policy, reason=decision.reason)
    return decision


__all__ = ["Forward", "SOURCE_IDENTITY", "destination", "inbound", "outbound", "settle", "strip",
           "traceparent"]

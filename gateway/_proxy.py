"""Per-request decisions of both listeners, as pure functions of headers and tables.

Outbound (local workload -> peer gateway): route the ``:authority``/Host of an imported
name (see :mod:`gateway._routes` for the scheme), strip anything a workload must not set
(``isthmus-source-identity``), assert the caller's verified SPIFFE ID, continue or start a
W3C trace.

Inbound (peer gateway -> local service): the service must be exported to the peer's
cluster; the caller identity the peer asserts must lie in the peer's own trust domain (a
gateway of ``east`` cannot speak for ``west``); then the
:data:`~gateway._decision.Authorizer` hook decides (the gateway's is
:class:`gateway._authz.PolicyState`: federation AuthorizationPolicy and JWT).

Both answer a :class:`Forward` (rewritten headers and the route) or a refusing
:class:`~gateway._decision.Decision`; they fill the request's telemetry record as they go.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import structlog
from hpack import NeverIndexedHeaderTuple

from trust import InvalidSpiffeId, SpiffeId

from ._context import TRACEPARENT, RequestContext
from ._decision import ALLOW, Authorizer, Decision, RequestAttrs, refuse
from ._flags import flag
from ._half import Headers
from ._routes import PeerCluster, RouteTable

log = structlog.get_logger("isthmus.gateway")

SOURCE_IDENTITY = b"isthmus-source-identity"
# Never forwarded from a workload: only gateways may assert these.
_STRIPPED_OUTBOUND = frozenset({SOURCE_IDENTITY, b"host", b"connection", b"keep-alive",
                                b"proxy-connection", b"transfer-encoding", b"upgrade"})
_HEX = frozenset(b"0123456789abcdef")


@dataclass(slots=True)
class Forward:
    """A request that goes on: the headers to send and where (``route``: an
    :class:`OutboundRoute` at the outbound, a :class:`LocalTarget` at the inbound)."""

    headers: Headers
    route: Any
    connect: bool = False
    decision: Decision = ALLOW  # inbound: the allowing (or still pending) decision


def traceparent(incoming: bytes | None) -> tuple[bytes, str]:
    """(header value for the next hop, trace id): continue ``incoming`` if valid."""
    # Trace and span ids need uniqueness, not secrecy: no syscall per request.
    span = f"{random.getrandbits(64):016x}"
    if incoming is not None and len(incoming) == 55:
        parts = incoming.split(b"-")
        if (len(parts) == 4 and parts[0] == b"00" and len(parts[1]) == 32
                and len(parts[2]) == 16 and len(parts[3]) == 2
                and _HEX.issuperset(parts[1]) and _HEX.issuperset(parts[3])
                and parts[1] != b"0" * 32):
            trace = parts[1].decode()
            return f"00-{trace}-{span}-{parts[3].decode()}".encode(), trace
    trace = f"{random.getrandbits(128):032x}"
    return f"00-{trace}-{span}-01".encode(), trace


def outbound(headers: Headers, table: RouteTable, caller: str,
             ctx: RequestContext) -> Forward | Decision:
    x = ctx.record
    auth = ctx.authority
    if not auth:
        return refuse("NR", "request has no :authority or Host header", 400)
    x.authority = auth
    route = table.outbound_route(auth)
    if route is None:
        return refuse("NR", f"no imported service is named {auth!r}")
    x.destination_service = route.destination_service
    tpv, x.trace_id = traceparent(ctx.traceparent)
    new_auth = route.authority.encode()
    out: Headers = []
    for k, v in headers:
        if k == b":authority":
            out.append((k, new_auth))
        elif k in _STRIPPED_OUTBOUND or k == TRACEPARENT or k.startswith(b"isthmus-"):
            continue
        else:
            out.append((k, v))
    if not any(k == b":authority" for k, _ in out):
        out.insert(1, (b":authority", new_auth))
    if caller:
        out.append((SOURCE_IDENTITY, caller.encode()))
    # Unique per request: never indexed, so it doesn't churn the HPACK dynamic tables.
    out.append(NeverIndexedHeaderTuple(TRACEPARENT, tpv))
    return Forward(out, route, ctx.connect)


def inbound(headers: Headers, table: RouteTable, peer: PeerCluster, peer_principal: str,
            authorize: Authorizer, ctx: RequestContext) -> Forward | Decision:
    x = ctx.record
    x.source_cluster = peer.name
    x.peer_principal = peer_principal
    x.destination_cluster = table.local_cluster
    auth = ctx.authority
    if not auth:
        return refuse("NR", "request has no :authority", 400)
    x.authority = auth
    target = table.inbound_target(auth)
    if target is None or not target.visible_to(peer.name):
        # Same answer whether the service does not exist or is not exported to the peer.
        return refuse("NR", f"no service {auth!r} is exported to cluster {peer.name!r}")
    x.destination_service = target.destination_service
    source = ""
    for k, v in headers:
        if k == SOURCE_IDENTITY:
            source = v.decode("latin-1")
    if source:
        try:
            sid = SpiffeId.parse(source)
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
                                      tuple(headers)))
    if decision.pending is None:
        denied = settle(decision, ctx, peer_principal)
        if denied is not None:
            return denied
    tpv, x.trace_id = traceparent(ctx.traceparent)
    out: Headers = [(k, v) for k, v in headers if k != TRACEPARENT]
    out = strip(out, decision.strip_headers)
    out.append(NeverIndexedHeaderTuple(TRACEPARENT, tpv))
    return Forward(out, target, ctx.connect, decision)


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


__all__ = ["Forward", "SOURCE_IDENTITY", "inbound", "outbound", "settle", "strip", "traceparent"]

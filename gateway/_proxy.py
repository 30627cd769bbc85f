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
from ._normalize import DEFAULT as DEFAULT_PATHS
from ._normalize import PathOptions, normalize_target
from ._routes import PeerCluster, RouteTable
from ._sanitize import (
    XFCC,
    Refused,
    check_request,
    check_size,
    outbound_request,
    source_identity,
)

log = structlog.get_logger("isthmus.gateway")

SOURCE_IDENTITY = b"isthmus-source-identity"
DEFAULT_HEADER_LIMIT = 60 * 1024  # Limits.max_header_list_size's default
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


def outbound(headers: Headers, table: RouteTable, caller: str, ctx: RequestContext,
             header_limit: int = DEFAULT_HEADER_LIMIT) -> Forward | Decision:
    x = ctx.record
    auth = ctx.authority
    if not auth:
        return refuse("NR", "request has no :authority or Host header", 400)
    x.authority = auth
    # Identity headers in any letter case, hop-by-hop fields: never from a workload.
    out = outbound_request(headers)
    try:
        check_request(out)
    except Refused as exc:
        return _refused(exc)
    route = table.outbound_route(auth)
    if route is None:
        return refuse("NR", f"no imported service is named {auth!r}")
    x.destination_service = route.destination_service
    if ctx.connect and route.protocol != "TCP":
        return _connect_refused(auth, route.protocol)
    tpv, x.trace_id = traceparent(ctx.traceparent)
    new_auth = route.authority.encode()
    out = [(k, new_auth) if k == b":authority" else (k, v) for k, v in out if k != TRACEPARENT]
    if not any(k == b":authority" for k, _ in out):
        out.insert(1, (b":authority", new_auth))
    if caller:
        out.append((SOURCE_IDENTITY, caller.encode()))
    # Unique per request: never indexed, so it doesn't churn the HPACK dynamic tables.
    out.append(NeverIndexedHeaderTuple(TRACEPARENT, tpv))
    try:
        check_size(out, header_limit)  # counted as the peer will: what we added included
    except Refused as exc:
        return _refused(exc)
    return Forward(out, route, ctx.connect)


def _refused(exc: Refused) -> Decision:
    # Envoy's flag for a downstream protocol error (gRPC INTERNAL: see _flags).
    return refuse("DPE", str(exc), exc.status)


def _connect_refused(authority: str, protocol: str) -> Decision:
    return refuse("NR", f"CONNECT is allowed to TCP ports only: {authority} is exported as "
                  f"{protocol}; send HTTP requests to it instead", 405)


def inbound(headers: Headers, table: RouteTable, peer: PeerCluster, peer_principal: str,
            authorize: Authorizer, ctx: RequestContext, paths: PathOptions = DEFAULT_PATHS,
            header_limit: int = DEFAULT_HEADER_LIMIT, local_id: str = "") -> Forward | Decision:
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
    if target is None or not target.visible_to(peer.name):
        # Same answer whether the service does not exist or is not exported to the peer.
        return refuse("NR", f"no service {auth!r} is exported to cluster {peer.name!r}")
    x.destination_service = target.destination_service
    if connect and target.protocol != "TCP":
        return _connect_refused(auth, target.protocol)
    source = asserted.decode("latin-1") if asserted else ""
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
    out: Headers = [(k, v) for k, v in headers if k != TRACEPARENT and k != XFCC]
    out = strip(out, decision.strip_headers)
    if source and local_id and not connect:
        # Envoy's SANITIZE_SET: the service learns the verified caller, never a forwarded one.
        out.append((XFCC, f"By={local_id};URI={source}".encode()))
    out.append(NeverIndexedHeaderTuple(TRACEPARENT, tpv))
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


__all__ = ["Forward", "SOURCE_IDENTITY", "inbound", "outbound", "settle", "strip", "traceparent"]

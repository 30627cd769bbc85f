"""Per-request decisions of both listeners, as pure functions of headers and tables.

Outbound (local workload -> peer gateway): route the ``:authority``/Host of an imported
name (see :mod:`gateway._routes` for the scheme), strip anything a workload must not set
(``isthmus-source-identity``), assert the caller's verified SPIFFE ID, continue or start a
W3C trace.

Inbound (peer gateway -> local service): the service must be exported to the peer's
cluster; the caller identity the peer asserts must lie in the peer's own trust domain (a
gateway of ``east`` cannot speak for ``west``); then the :data:`Authorizer` hook decides
(the gateway's is :class:`gateway._authz.PolicyState`: federation AuthorizationPolicy and JWT).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from hpack import NeverIndexedHeaderTuple

from trust import InvalidSpiffeId, SpiffeId

from ._normalize import DEFAULT as DEFAULT_PATHS, PathOptions, normalize_target
from ._relay import Headers
from ._routes import LocalTarget, OutboundRoute, PeerCluster, RouteTable
from ._sanitize import (
    XFCC,
    Refused,
    check_request,
    check_size,
    outbound_request,
    source_identity,
)
from ._telemetry import Exchange

log = structlog.get_logger("isthmus.gateway")

SOURCE_IDENTITY = b"isthmus-source-identity"
TRACEPARENT = b"traceparent"
DEFAULT_HEADER_LIMIT = 60 * 1024  # Limits.max_header_list_size's default
_HEX = frozenset(b"0123456789abcdef")


@dataclass(frozen=True, slots=True)
class RequestAttrs:
    """What the authorization hook sees of an inbound request."""

    peer_cluster: str
    peer_principal: str
    source_principal: str  # asserted caller identity ("" if none)
    namespace: str
    service: str
    port: int
    method: str
    path: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    """An authorization answer.  ``reason`` goes to the log; ``message`` (else ``reason``)
    is the body the caller sees.  ``pending``: not decided yet - the gateway parks the
    request and runs ``pending()`` in a worker thread for the final decision (a JWKS fetch)."""

    allow: bool
    reason: str = ""
    status: int = 403
    flags: str = "RBAC"
    grpc_status: int = 7  # PERMISSION_DENIED
    message: str = ""
    policy: str | None = None
    audit_policy: str | None = None
    details: str = ""  # Envoy-style response_code_details for the access log
    headers: tuple[tuple[bytes, bytes], ...] = ()
    pending: Callable[[], Decision] | None = None
    # Request headers to remove before forwarding (a validated JWT not to be forwarded).
    strip_headers: frozenset[bytes] = frozenset()


ALLOW = Decision(True)
Authorizer = Callable[[RequestAttrs], Decision]


def allow_all(attrs: RequestAttrs) -> Decision:
    return ALLOW


@dataclass(slots=True)
class Forward:
    headers: Headers
    route: Any  # OutboundRoute (outbound) or LocalTarget (inbound)
    connect: bool = False
    pending: Callable[[], Decision] | None = None  # see Decision.pending


@dataclass(slots=True)
class Reject:
    flags: str  # Envoy response flag: NR no route, RBAC denied
    message: str
    status: int = 0
    extra: dict[str, str] = field(default_factory=dict)
    grpc_status: int = 0  # 0: derived from flags
    headers: tuple[tuple[bytes, bytes], ...] = ()


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


def _scan(headers: Headers, x: Exchange) -> tuple[bytes | None, bytes | None, bytes | None]:
    """Fill the exchange from request headers; return (authority, traceparent, host)."""
    authority = tp = host = None
    for k, v in headers:
        if k[0] == 58:  # ':'
            if k == b":authority":
                authority = v
            elif k == b":method":
                x.method = v.decode("latin-1")
            elif k == b":path":
                x.path = v.decode("latin-1")
        elif k == b"content-type":
            x.grpc = v.startswith(b"application/grpc")
        elif k == TRACEPARENT:
            tp = v
        elif k == b"host":
            host = v
        elif k == b"x-forwarded-for":
            x.x_forwarded_for = v.decode("latin-1")
        elif k == b"user-agent":
            x.user_agent = v.decode("latin-1")
        elif k == b"x-request-id":
            x.request_id = v.decode("latin-1")
    return authority or host, tp, host


def outbound(headers: Headers, table: RouteTable, caller: str, x: Exchange,
             header_limit: int = DEFAULT_HEADER_LIMIT) -> Forward | Reject:
    authority, tp, _ = _scan(headers, x)
    if not authority:
        return Reject("NR", "request has no :authority or Host header", 400)
    x.authority = auth = authority.decode("latin-1")
    # Identity headers in any letter case, hop-by-hop fields: never from a workload.
    out = outbound_request(headers)
    try:
        check_request(out)
    except Refused as exc:
        return _refused(exc)
    route = table.outbound_route(auth)
    if route is None:
        return Reject("NR", f"no imported service is named {auth!r}")
    x.destination_service = route.destination_service
    if x.method == "CONNECT" and route.protocol != "TCP":
        return _connect_refused(auth, route.protocol)
    tpv, x.trace_id = traceparent(tp)
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
    return Forward(out, route, x.method == "CONNECT")


def _refused(exc: Refused) -> Reject:
    # Envoy's flag for a downstream protocol error; gRPC INTERNAL, as Envoy maps 400/431.
    return Reject("DPE", str(exc), exc.status, grpc_status=13)


def _connect_refused(authority: str, protocol: str) -> Reject:
    return Reject("NR", f"CONNECT is allowed to TCP ports only: {authority} is exported as "
                  f"{protocol}; send HTTP requests to it instead", 405)


def inbound(headers: Headers, table: RouteTable, peer: PeerCluster, peer_principal: str,
            authorize: Authorizer, x: Exchange, paths: PathOptions = DEFAULT_PATHS,
            header_limit: int = DEFAULT_HEADER_LIMIT, local_id: str = "") -> Forward | Reject:
    authority, tp, _ = _scan(headers, x)
    x.source_cluster = peer.name
    x.peer_principal = peer_principal
    x.destination_cluster = table.local_cluster
    if not authority:
        return Reject("NR", "request has no :authority", 400)
    x.authority = auth = authority.decode("latin-1")
    connect = x.method == "CONNECT"
    try:
        # The connection from a peer gateway skips h2's header validation: this is it.
        check_request(headers)
        asserted = source_identity(headers)
        if not connect:
            # Normalized before authorization, and forwarded as normalized (see _normalize).
            path = normalize_target(next(v for k, v in headers if k == b":path"),
                                    x.method.encode("latin-1"), paths)
            x.path = path.decode("latin-1")
            headers = [(k, path) if k == b":path" else (k, v) for k, v in headers]
    except Refused as exc:
        if exc.status == 403:
            log.warning("inbound.identity_refused", peer=peer_principal, error=str(exc))
            return Reject("RBAC", str(exc), 403)
        return _refused(exc)
    target = table.inbound_target(auth)
    if target is None or not target.visible_to(peer.name):
        # Same answer whether the service does not exist or is not exported to the peer.
        return Reject("NR", f"no service {auth!r} is exported to cluster {peer.name!r}")
    x.destination_service = target.destination_service
    if connect and target.protocol != "TCP":
        return _connect_refused(auth, target.protocol)
    source = asserted.decode("latin-1") if asserted else ""
    if source:
        try:
            sid = SpiffeId.parse(source)
        except InvalidSpiffeId:
            log.warning("inbound.bad_source_identity", peer=peer_principal, asserted=source)
            return Reject("RBAC", "isthmus-source-identity is not a valid SPIFFE ID", 403)
        if sid.trust_domain != peer.trust_domain:
            log.warning("inbound.impersonation_refused", peer=peer_principal,
                        peer_cluster=peer.name, asserted=source)
            return Reject("RBAC", f"gateway of cluster {peer.name!r} may not assert "
                          f"identities of trust domain {sid.trust_domain!r}", 403)
        x.source_principal = source
    decision = authorize(RequestAttrs(peer.name, peer_principal, source, target.namespace,
                                      target.service, target.port, x.method, x.path,
                                      tuple(headers)))
    if decision.pending is None:
        denied = refusal(decision, x, peer_principal)
        if denied is not None:
            return denied
    tpv, x.trace_id = traceparent(tp)
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
    return Forward(out, target, connect, decision.pending)


def strip(headers: Headers, names: frozenset[bytes]) -> Headers:
    """``headers`` without the ones named (lowercase) in ``names``."""
    if not names:
        return headers
    return [(k, v) for k, v in headers if (k.lower() if isinstance(k, bytes) else k.lower().encode()) not in names]


def refusal(decision: Decision, x: Exchange, peer_principal: str) -> Reject | None:
    """Record a final decision on the exchange; the :class:`Reject` if it refuses."""
    x.audit_policy = decision.audit_policy or ""
    if decision.allow:
        return None
    x.response_code_details = decision.details
    log.info("inbound.denied", peer=peer_principal, source=x.source_principal,
             service=x.destination_service, status=decision.status,
             policy=decision.policy, reason=decision.reason)
    return Reject(decision.flags, decision.message or decision.reason or "denied by policy",
                  decision.status, grpc_status=decision.grpc_status, headers=decision.headers)


__all__ = ["ALLOW", "Authorizer", "Decision", "Forward", "LocalTarget", "OutboundRoute",
           "Reject", "RequestAttrs", "allow_all", "inbound", "outbound", "refusal", "strip",
           "traceparent"]

"""The one answer type for a request: :class:`Decision` (allow, refuse, or not yet decided).

Everything that may refuse a request answers with a :class:`Decision`: routing (no
route, no healthy cluster), the identity checks of the inbound listener, federation
AuthorizationPolicy and JWT (:class:`gateway._authz.PolicyState`), and the optional
``authorize`` hook of :class:`gateway.Gateway`, which sees the :class:`RequestAttrs` of
each inbound request.  A refusal's flag picks the HTTP status, gRPC status and text from
:data:`gateway._flags.FLAGS` unless the decision sets its own; the request's
:class:`~gateway._context.RequestContext` turns it into the answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any


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
    # Socket addresses (host, port) of the connection as the inbound sees it: the peer
    # gateway's end and this gateway's own; ("", 0) when unknown.
    source_address: tuple[str, int] = ("", 0)
    destination_address: tuple[str, int] = ("", 0)


@dataclass(frozen=True, slots=True)
class Decision:
    """An answer for one request.  ``reason`` goes to the log; ``message`` (else
    ``reason``, else the flag's text) is the body the caller sees.  ``status`` and
    ``grpc_status`` of 0 mean "the flag's" (:data:`gateway._flags.FLAGS`).  ``pending``:
    not decided yet - the gateway parks the request and runs ``pending()`` in a worker
    thread for the final decision (a JWKS fetch); ``check``: the same, awaited."""

    allow: bool
    reason: str = ""
    status: int = 0
    flags: str = "RBAC"
    grpc_status: int = 0
    message: str = ""
    policy: str | None = None
    audit_policy: str | None = None
    details: str = ""  # Envoy-style response_code_details for the access log
    headers: tuple[tuple[bytes, bytes], ...] = ()
    pending: Callable[[], Decision] | None = None
    # Request headers to remove before forwarding (a validated JWT not to be forwarded).
    strip_headers: frozenset[bytes] = frozenset()
    # Not decided yet: an external authorizer is asked (CUSTOM, gateway/_extauthz.py); the
    # gateway parks the request and awaits ``check(parked)`` in its task for the final
    # decision (``parked`` holds the body, None when the request has none).
    check: Callable[[Any], Awaitable[Decision]] | None = None
    # A refusal's own body (an ext_authz denied_response): sent as is, with ``headers``.
    body: bytes | None = None
    # Request header changes before forwarding (an ext_authz ok_response).
    mutate: Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]] | None = None
    # Response header changes on the way back to the caller (ext_authz response_headers_to_add).
    respond_mutate: Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]] | None = None
    # A flag for the access log of an *allowed* request (UAEX: let through by fail_open).
    log_flags: str = ""


ALLOW = Decision(True)
Authorizer = Callable[[RequestAttrs], Decision]


def allow_all(attrs: RequestAttrs) -> Decision:
    return ALLOW


def refuse(flags: str, message: str = "", status: int = 0) -> Decision:
    """A refusal made by the gateway itself (routing, identity, protocol checks)."""
    return Decision(False, message, status=status, flags=flags, message=message)


__all__ = ["ALLOW", "Authorizer", "Decision", "RequestAttrs", "allow_all", "refuse"]

"""Federation-wide authorization and JWT authentication at the inbound gateway.

Theory of operation
-------------------
Every applied snapshot yields one :class:`PolicyState`: the snapshot's policies compiled
into a :class:`federation.policy.PolicySet` plus lazily built per-service
:class:`federation.jwt.JwtValidator` objects.  The gateway swaps it in together with the
route table (both are fields of one :class:`gateway._state.ConfigState`, so no request
ever sees routes of one revision and policies of another), and each request
reads it once: a request keeps the policy set it started with, whatever is applied while
it runs.

A :class:`PolicyState` *is* the gateway's :data:`~gateway._decision.Authorizer`: called with
the :class:`~gateway._decision.RequestAttrs` of one request it answers a
:class:`~gateway._decision.Decision`, in this order:

1. JWT (HTTP only; CONNECT tunnels carry no token): with a RequestAuthentication selecting
   the service, a request carrying a token must carry a *valid* one, else 401
   (``response_flags="UAEX"``, gRPC ``UNAUTHENTICATED``).  A request without a token passes
   here; an AuthorizationPolicy asking for ``request_principals`` is what refuses it.
2. AuthorizationPolicy (Istio order, :meth:`PolicySet.evaluate`): AUDIT marks, DENY
   beats ALLOW, default deny once an ALLOW selects.  Denials answer 403
   (``response_flags="RBAC"``, gRPC ``PERMISSION_DENIED`` in a trailers-only response)
   with a body that names the deciding policy and nothing else.
3. The extra hook given to :class:`gateway.Gateway` (``authorize=``), if any.

CUSTOM policies that match (Istio order: before DENY and ALLOW) turn the answer of 2-3
into a pending one: its ``check`` asks the external authorizers
(:class:`gateway._extauthz.CustomCheck`) and then answers 2-3's decision, or their deny.

JWKS fetched from ``jwks_uri`` live in one :class:`~federation.jwt.JwksStore` per gateway,
shared by every revision.  Fetching is blocking IO and never runs on the trio loop:
:meth:`Authz.refresh` runs in a worker thread, from the gateway's refresher task (right
after a snapshot that names a new ``jwks_uri``, then periodically); and when a token needs a key set we do not
have yet (first use, or an unknown ``kid`` after the issuer rotated its keys) the decision
is *pending*: the gateway parks the request (:class:`Parked` buffers what the caller
sends, bounded by HTTP/2 flow control), runs :meth:`PolicyState.after_refresh` in a
worker thread, and then forwards or refuses it.  The JWKS rate limits and the
``max_stale`` bound of :class:`~federation.jwt.JwksSource` apply.

A policy this gateway cannot evaluate (it slipped past validation, or comes from a newer
federation) must not weaken enforcement: it is enforced as DENY-all over what it selects
(over everything, if its selector is unusable); an AUDIT policy is dropped.  Each one is
logged (``authz.policy_failed_closed``) and counted in ``isthmus_policy_errors``.

Source attributes: ``source.principal`` is the caller identity the peer gateway asserts
(``isthmus-source-identity``, already checked to lie in the peer's trust domain); with no
asserted identity (a plain-text workload) there is no principal, as in Istio, so
``principals`` rules, even ``["*"]``, do not match.  ``source.cluster`` is the peer
gateway's cluster (from its verified certificate), never derived from the asserted ID.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from federation.jwt import JwksStore, JwtFailure, JwtResult, JwtValidator
from federation.models import AuthorizationPolicy, RequestAuthentication, Rule, Selector, Snapshot
from federation.policy import PolicyError, PolicySet, RequestAttributes, validate_policy

from ._decision import ALLOW, Authorizer, Decision, RequestAttrs, allow_all
from ._extauthz import Asker, CustomCheck, NoClients
from ._flags import GrpcStatus
from ._half import Half, Headers

log = structlog.get_logger("isthmus.gateway")

JWT_FLAG = "UAEX"  # Envoy's flag for a request refused by an authentication check
RBAC_FLAG = "RBAC"
_WWW_AUTHENTICATE = ((b"www-authenticate", b'Bearer realm="isthmus", error="invalid_token"'),)
# How often the background task looks for key sets due a refresh (cheap: no IO unless due).
REFRESH_CHECK_INTERVAL = 5.0


def _noop() -> None:
    return None


# ---------------------------------------------------------------- denials (what callers see)


# Envoy's jwt_authn wording per failure kind: says what kind of failure, never which
# issuers or keys we accept (the detailed reason goes to the log only).
_JWT_PUBLIC = {
    JwtFailure.JWKS_FETCH: "Jwks remote fetch is failed",
    JwtFailure.EXPIRED: "Jwt is expired",
    JwtFailure.NOT_YET_VALID: "Jwt not yet valid",
    JwtFailure.AUDIENCE: "Audiences in Jwt are not allowed",
    JwtFailure.ISSUER: "Jwt issuer is not configured",
    JwtFailure.MALFORMED: "Jwt is not in the form of Header.Payload.Signature",
    JwtFailure.VERIFICATION: "Jwt verification fails",
}


def jwt_denied(result: JwtResult) -> Decision:
    # By the failure's kind, never by its text (which quotes the token's iss, kid, alg).
    public = _JWT_PUBLIC.get(result.failure, "Jwt verification fails")  # type: ignore[arg-type]
    return Decision(
        False, result.reason, status=401, flags=JWT_FLAG, grpc_status=GrpcStatus.UNAUTHENTICATED,
        message=public, headers=_WWW_AUTHENTICATE,
        details=f"jwt_authn_access_denied{{{public.replace(' ', '_')}}}",
    )


def rbac_denied(policy: str | None, reason: str, audit_policy: str | None) -> Decision:
    if policy is not None:
        message = f"RBAC: access denied by policy {policy!r}"
        details = f"rbac_access_denied_matched_policy[{policy}]"
    else:
        message = "RBAC: access denied (no ALLOW policy matched)"
        details = "rbac_access_denied_matched_policy[none]"
    return Decision(False, reason, flags=RBAC_FLAG, message=message, policy=policy,
                    audit_policy=audit_policy, details=details)


# ---------------------------------------------------------------- fail closed


def _deny_all(policy: AuthorizationPolicy | RequestAuthentication, selector_ok: bool) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        name=policy.name, action="DENY", rules=(Rule(),),
        selector=policy.selector if selector_ok else Selector(),
    )


def _selector_ok(sel: Selector) -> bool:
    return all(v and (v == "*" or "*" not in v) for v in (sel.namespace, sel.service))


def enforceable(policies: tuple[Any, ...]) -> tuple[list[Any], list[str]]:
    """The policies to enforce and the names of those replaced by DENY-all (or dropped)."""
    out: list[Any] = []
    failed: list[str] = []
    for p in policies:
        try:
            validate_policy(p)
        except PolicyError as exc:
            failed.append(p.name)
            log.error("authz.policy_failed_closed", policy=p.name, kind=p.kind, error=str(exc))
            if isinstance(p, AuthorizationPolicy) and p.action == "AUDIT":
                continue
            out.append(_deny_all(p, _selector_ok(p.selector)))
            continue
        out.append(p)
    return out, failed


# ---------------------------------------------------------------- the per-revision state


def policies_digest(policies: Sequence[Any]) -> str:
    """A digest of the policies (and ExtensionProviders) in force (the same set gives the same digest in every
    gateway).  Hashed policy by policy: one json.dumps of them all is a single C call that
    holds the GIL for milliseconds, a stall of the event loop while a config builds."""
    h = hashlib.sha256()
    for p in policies:
        h.update(p.model_dump_json(by_alias=True).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


class PolicyState:
    """The policies of one applied snapshot, as the gateway's authorizer."""

    def __init__(self, snapshot: Snapshot | None, store: JwksStore,
                 then: Authorizer = allow_all, clients: Asker | None = None) -> None:
        policies = snapshot.policies if snapshot is not None else ()
        # CUSTOM policies: their providers, over the gateway's clients (gateway/_extauthz.py).
        self.providers = tuple(snapshot.extension_providers) if snapshot is not None else ()
        self.custom = CustomCheck(self.providers, clients if clients is not None else NoClients())
        self.revision = snapshot.revision if snapshot is not None else 0
        enforced, self.failed = enforceable(policies)
        try:
            self.set = PolicySet(enforced, revision=self.revision)
        except PolicyError as exc:  # cannot happen after enforceable(); fail closed anyway
            log.error("authz.policy_set_failed", error=str(exc))
            self.set = PolicySet([AuthorizationPolicy(name="isthmus-fail-closed", action="DENY",
                                                      rules=(Rule(),))], revision=self.revision)
        self.store = store
        self.then = then
        # Refined by Authz.build to the services this cluster exports.
        self.jwks_uris = frozenset(r.jwks_uri for p in policies
                                   if isinstance(p, RequestAuthentication)
                                   for r in p.jwt_rules if r.jwks_uri)
        self.digest = policies_digest((*policies, *self.providers))  # a provider decides requests too
        self._validators: dict[tuple[str, str], JwtValidator | None] = {}
        # Header names whose validated token is not forwarded, per (namespace, service).
        self._strip: dict[tuple[str, str], frozenset[bytes]] = {}
        # No policies and no extra hook: skip building attributes per request.
        self.trivial = not len(self.set) and then is allow_all

    def __len__(self) -> int:
        return len(self.set)

    def validator(self, namespace: str, service: str) -> JwtValidator | None:
        key = (namespace, service)
        try:
            return self._validators[key]
        except KeyError:
            pass
        authn = self.set.request_authentications(namespace, service)
        rules = [r for p in authn for r in p.jwt_rules]
        v = JwtValidator(rules, store=self.store) if authn else None
        # Keys are (namespace, service) of exported services: bounded by the route table.
        self._validators[key] = v
        self._strip[key] = frozenset(
            h.lower().encode() for r in rules if not r.forward_original_token for h in r.from_headers)
        return v

    def __call__(self, a: RequestAttrs) -> Decision:
        return self.decide(a, may_defer=True)

    def decide(self, a: RequestAttrs, *, may_defer: bool) -> Decision:
        if self.trivial:
            return ALLOW
        tcp = a.method == "CONNECT"
        jwt: JwtResult | None = None
        strip: frozenset[bytes] = frozenset()
        if not tcp:
            v = self.validator(a.namespace, a.service)
            if v is not None:
                jwt = v.validate(a.headers)
                if not jwt.ok:
                    if jwt.refresh_wanted and may_defer:
                        return Decision(True, "waiting for JWKS",
                                        pending=functools.partial(self.after_refresh, a, v))
                    return jwt_denied(jwt)
                if jwt.request_principal is not None:  # a token was present and valid
                    strip = self._strip.get((a.namespace, a.service), frozenset())
        attrs = RequestAttributes.for_request(
            source_principal=a.source_principal or None,
            source_cluster=a.peer_cluster,
            destination_namespace=a.namespace,
            destination_service=a.service,
            method=None if tcp else a.method,
            path=None if tcp else a.path,
            port=a.port,
            request_principal=jwt.request_principal if jwt is not None else None,
            jwt_claims=jwt.claims if jwt is not None else None,
        )
        d = self.set.evaluate(attrs)
        local = self._local(d, a, strip)
        if d.custom:  # Istio order: the external authorizer first, then DENY and ALLOW
            return Decision(True, "waiting for ext_authz",
                            check=functools.partial(self.custom, d.custom, a, local))
        return local

    def _local(self, d: Any, a: RequestAttrs, strip: frozenset[bytes]) -> Decision:
        if not d.allowed:
            return rbac_denied(d.policy, d.reason, d.audit_policy)
        extra = self.then(a)
        if not extra.allow or extra.pending is not None:
            return extra
        if d.audit_policy is None and d.policy is None:
            return Decision(True, strip_headers=strip) if strip else ALLOW
        return Decision(True, d.reason, policy=d.policy, audit_policy=d.audit_policy, strip_headers=strip)

    def after_refresh(self, a: RequestAttrs, v: JwtValidator) -> Decision:
        """Fetch the key sets ``v`` wants (blocking: a worker thread), then decide for good."""
        v.refresh()
        return self.decide(a, may_defer=False)


# ---------------------------------------------------------------- the gateway-lifetime part


class Authz:
    """Owns the JWKS store and compiles a :class:`PolicyState` per applied snapshot.

    The shell runs the refresher (``gateway.Gateway``): every ``check_interval`` seconds,
    and whenever :attr:`kick` is called, it runs :meth:`refresh` in a worker thread if
    :meth:`refresh_due`.
    """

    def __init__(self, then: Authorizer = allow_all, store: JwksStore | None = None,
                 check_interval: float = REFRESH_CHECK_INTERVAL, cluster: str = "",
                 ext_authz: Asker | None = None) -> None:
        self.then = then
        self.cluster = cluster  # prefetch only key sets of services this cluster exports
        self.ext_authz: Asker = ext_authz if ext_authz is not None else NoClients()
        self.store = store if store is not None else JwksStore()
        self.check_interval = check_interval
        self.kick: Callable[[], None] = _noop  # set by the refresher task
        self._uris: frozenset[str] = frozenset()

    def compile(self, snapshot: Snapshot | None) -> PolicyState:
        """The policies of ``snapshot`` (pure: safe in a worker thread)."""
        state = PolicyState(snapshot, self.store, self.then, self.ext_authz)
        # Refined only when some policy names a key set (a subset of none is none): a
        # walk over every service per change is what a delta must not cost.
        if snapshot is not None and self.cluster and state.jwks_uris:
            local = [(s.namespace, s.name) for s in snapshot.services if s.cluster == self.cluster]
            state.jwks_uris = frozenset(
                r.jwks_uri for ns, svc in local
                for p in state.set.request_authentications(ns, svc)
                for r in p.jwt_rules if r.jwks_uri)
        return state

    def adopt(self, state: PolicyState) -> None:
        """``state`` is now in force (event loop): fetch the key sets it newly names, close
        the channels to authorizers no provider names any more."""
        self.ext_authz.keep(state.providers)
        for uri in state.jwks_uris - self._uris:
            self.store.source(uri)  # register now so the refresher fetches it at once
        if state.jwks_uris - self._uris:
            self.kick()
        self._uris = state.jwks_uris

    def refresh_due(self) -> bool:
        return any(s.refresh_due() for s in self.store.sources())

    def refresh(self) -> None:
        """Fetch every key set that is due (blocking IO: a worker thread, never the loop)."""
        self.store.refresh()


# ---------------------------------------------------------------- parking a request


class Parked(Half):
    """Stands in for the upstream of a request whose decision is pending.

    It holds what the caller sends meanwhile (bounded by the stream's flow-control window,
    since nothing is acknowledged) and replays it into the real upstream, or gives the
    window back if the request is refused.

    An authorizer that wants the body (``include_request_body``) makes it :meth:`collect`
    up to a bound: bytes are then acknowledged as they arrive (the caller's window
    reopens) until more than the bound arrived, so at most the bound plus one frame plus
    one window is held; ``wake`` is called once the body ended, passed the bound, or the
    caller went away.  The acknowledged bytes are replayed with no credit.
    """

    __slots__ = ("items", "aborted", "ended", "limit", "taken", "wake")

    def __init__(self) -> None:
        super().__init__()
        self.items: list[tuple[str, Any, int]] = []
        self.aborted = False
        self.ended = False  # the request's end (or trailers) arrived
        self.limit = -1  # collecting: acknowledge up to this many bytes and a frame (-1: not)
        self.taken = 0  # body bytes held
        self.wake: Callable[[], None] | None = None

    def write_headers(self, headers: Headers, end: bool) -> None:  # never: request headers went by
        self.items.append(("headers", (headers, end), 0))

    def write_data(self, data: bytes, credit: int) -> None:
        self.taken += len(data)
        if 0 <= self.limit and self.taken - len(data) <= self.limit:
            self.give_back(credit)
            credit = 0
        self.items.append(("data", data, credit))
        if self.taken > self.limit >= 0:
            self._woken()

    def write_trailers(self, trailers: Headers) -> None:
        self.items.append(("trailers", trailers, 0))
        self.ended = True
        self._woken()

    def write_end(self) -> None:
        self.items.append(("end", None, 0))
        self.ended = True
        self._woken()

    def abort(self, code: int, flags: str = "UR", message: str = "") -> None:
        self.aborted = True
        self.items.clear()
        self._woken()

    def ack(self, credit: int) -> None:
        self.give_back(credit)

    def collect(self, limit: int, wake: Callable[[], None]) -> None:
        """Hold up to ``limit`` bytes of the body (see the class docstring); ``wake()``
        when there is nothing more to wait for."""
        self.limit, self.wake = limit, wake
        seen = 0
        for i, (kind, value, credit) in enumerate(self.items):
            if kind == "data":
                if seen <= limit and credit:
                    self.give_back(credit)
                    self.items[i] = (kind, value, 0)
                seen += len(value)
        if self.ended or self.aborted or self.taken > limit:
            self._woken()

    def body(self) -> tuple[bytes, bool]:
        """The body held so far and whether it is the whole body."""
        return b"".join(v for k, v, _ in self.items if k == "data"), self.ended

    def _woken(self) -> None:
        wake, self.wake = self.wake, None
        if wake is not None:
            wake()

    def release(self) -> None:
        """Refused: hand the held window back to the caller."""
        credit = sum(c for _, _, c in self.items)
        self.items.clear()
        self.give_back(credit)

    def replay(self, into: Half) -> None:
        items, self.items = self.items, []
        for kind, value, credit in items:
            if kind == "data":
                into.write_data(value, credit)
            elif kind == "trailers":
                into.write_trailers(value)
            elif kind == "end":
                into.write_end()
            else:
                into.write_headers(*value)


__all__ = ["Authz", "JWT_FLAG", "Parked",
           "PolicyState", "RBAC_FLAG", "enforceable", "jwt_denied", "rbac_denied"]

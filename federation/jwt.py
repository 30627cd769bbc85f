"""JWT request authentication (Istio RequestAuthentication semantics) on joserfc.

A :class:`JwtValidator` is built from the RequestAuthentication policies that select one
service.  :meth:`JwtValidator.validate` is synchronous and does no IO: it takes the
request headers and returns a :class:`JwtResult`:

- no token: ``ok`` with ``request_principal=None`` (authentication passes; an
  AuthorizationPolicy asking for ``request_principals`` is what refuses it);
- a valid token: ``ok`` with the claims and ``request_principal = "<iss>/<sub>"``;
- anything else: not ``ok`` with a ``reason`` for the log and a :class:`JwtFailure`
  (the gateway answers 401 with the category's public wording).

Signatures, algorithms and claims are checked by joserfc; we never parse a JWT by hand.
Only asymmetric algorithms are accepted (no ``none``, no ``HS*``: a JWKS is public, so an
HMAC "key" taken from it would let anyone sign), and symmetric (``oct``) keys in a JWKS
are ignored.

Key sets come inline (``jwks``) or from ``jwks_uri``.  A fetched key set lives in a
:class:`JwksSource`, shared across validators and revisions through a :class:`JwksStore`.
The fetch (the only IO) is an injected function, run by :meth:`JwtValidator.refresh`, which
the gateway calls from a worker thread: periodically, and once more when a result says
``refresh_wanted`` (first use, or a token signed with a key id we have not seen - the
issuer rotated its keys).  Fetch attempts are rate-limited and back off after failures, so
no request ever causes more than one fetch per ``min_refresh_interval``.  When fetches
fail, the last good key set is used for up to ``max_stale`` seconds after it was fetched;
then the issuer fails closed with a reason that says so.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import structlog
from joserfc import jwt as jose_jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import JWKRegistry, KeySet
from joserfc.jws import extract_compact

from .models import JwtRule, RequestAuthentication

from ._errors import InvalidRequest


__all__ = [
    "DEFAULT_ALGORITHMS",
    "JwksSource",
    "JwksStore",
    "JwksUnavailable",
    "JwtError",
    "JwtFailure",
    "JwtResult",
    "JwtValidator",
    "default_fetch",
    "parse_jwks",
]

log = structlog.get_logger("isthmus.jwt")

DEFAULT_ALGORITHMS: tuple[str, ...] = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)
MAX_TOKEN_BYTES = 8192
MAX_JWKS_BYTES = 1024 * 1024

Fetcher = Callable[[str, float], "bytes | str"]
Clock = Callable[[], float]


class JwtError(InvalidRequest):
    """A JWT configuration problem: an unusable JWKS or algorithm list."""


class JwksUnavailable(JwtError):
    """No usable key set for an issuer right now (never fetched, or too stale)."""


# ---------------------------------------------------------------- key sets


def parse_jwks(value: str | bytes | Mapping[str, Any]) -> KeySet:
    """Parse a JWKS document into public verification keys; raise :class:`JwtError`.

    Symmetric (``oct``) keys, encryption keys (``use: enc``) and key types joserfc does not
    know are skipped (RFC 7517 says to ignore keys one cannot use); a set left empty is an
    error.
    """
    if isinstance(value, (str, bytes)):
        if len(value) > MAX_JWKS_BYTES:
            raise JwtError(f"invalid JWKS: larger than {MAX_JWKS_BYTES} bytes")
        try:
            doc = json.loads(value)
        except ValueError as exc:
            raise JwtError(f"invalid JWKS: not JSON ({exc})") from None
    else:
        doc = value
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise JwtError('invalid JWKS: expected a JSON object {"keys": [...]}')
    keys = []
    problems = []
    for i, item in enumerate(doc["keys"]):
        if not isinstance(item, Mapping):
            problems.append(f"keys[{i}] is not an object")
            continue
        if item.get("kty") == "oct":
            problems.append(f"keys[{i}] is a symmetric (oct) key")
            continue
        if item.get("use", "sig") != "sig":
            continue
        try:
            key = JWKRegistry.import_key(dict(item))
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            problems.append(f"keys[{i}]: {exc}")
            continue
        keys.append(key)
    if not keys:
        detail = f" ({'; '.join(problems[:3])})" if problems else ""
        raise JwtError(f"invalid JWKS: no usable public signing keys{detail}")
    return KeySet(keys)


def default_fetch(uri: str, timeout: float) -> bytes:
    """GET a JWKS over HTTPS (plain HTTP only to a loopback address), at most 1 MiB."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    if parts.scheme != "https":
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if parts.scheme != "http" or not loopback:
            raise JwtError(f"jwks_uri {uri!r}: use https:// (plain http only to loopback)")
    req = urllib.request.Request(uri, headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - scheme checked
        body = resp.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise JwtError(f"JWKS at {uri} is larger than {MAX_JWKS_BYTES} bytes")
    return body


@dataclass(frozen=True, slots=True)
class _State:
    keyset: KeySet | None = None
    fetched_at: float | None = None  # last success
    last_attempt: float | None = None
    last_error: str | None = None
    failures: int = 0


class JwksSource:
    """The key set of one issuer: fixed (inline) or fetched from ``uri`` and cached.

    ``refresh_interval``: refetch a good key set this often; ``max_stale``: serve a key set
    at most this long after its fetch while refetches fail, then fail closed;
    ``min_refresh_interval``: at most one on-demand (unknown ``kid``) fetch this often;
    after failures the next attempt waits ``backoff`` seconds, doubling up to
    ``max_backoff``.
    """

    def __init__(
        self,
        uri: str = "",
        *,
        inline: str | None = None,
        fetch: Fetcher = default_fetch,
        clock: Clock = time.time,
        refresh_interval: float = 300.0,
        max_stale: float = 3600.0,
        min_refresh_interval: float = 15.0,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        fetch_timeout: float = 5.0,
    ) -> None:
        if bool(uri) == (inline is not None):
            raise JwtError("a JWKS source needs exactly one of uri or inline")
        self.uri = uri
        self._fetch = fetch
        self._clock = clock
        self.refresh_interval = refresh_interval
        self.max_stale = max_stale
        self.min_refresh_interval = min_refresh_interval
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.fetch_timeout = fetch_timeout
        self._lock = threading.Lock()
        self._kid_miss = False
        self.static = inline is not None
        if inline is not None:
            try:
                self._state = _State(keyset=parse_jwks(inline), fetched_at=clock())
            except JwtError as exc:
                self._state = _State(last_error=f"inline {exc}")
        else:
            self._state = _State()

    @property
    def describe(self) -> str:
        return self.uri or "inline JWKS"

    def _next_attempt(self, st: _State) -> float:
        if st.last_attempt is None:
            return float("-inf")
        if st.failures:
            return st.last_attempt + min(self.max_backoff, self.backoff * 2 ** (st.failures - 1))
        return st.last_attempt + self.min_refresh_interval

    def refresh_due(self, now: float | None = None) -> bool:
        if self.static:
            return False
        now = self._clock() if now is None else now
        st = self._state
        if now < self._next_attempt(st):
            return False
        return (
            st.fetched_at is None
            or now - st.fetched_at >= self.refresh_interval
            or self._kid_miss
        )

    def request_refresh(self, now: float | None = None) -> bool:
        """A token named a key id we lack: ask for a refetch.  True if one is allowed now."""
        if self.static:
            return False
        self._kid_miss = True
        return self.refresh_due(now)

    def refresh(self, *, force: bool = False) -> bool:
        """Fetch the key set if due (or ``force``).  Never raises for fetch problems: they
        are recorded, logged and reported by :meth:`keyset`.  Returns True if the key set
        is usable afterwards."""
        if self.static:
            return self._state.keyset is not None
        with self._lock:  # one fetch at a time; callers queued behind it see its result
            now = self._clock()
            if not force and not self.refresh_due(now):
                return self._usable(self._state, now)
            st = self._state
            try:
                body = self._fetch(self.uri, self.fetch_timeout)
                keyset = parse_jwks(body)
            except Exception as exc:  # noqa: BLE001 - any fetch failure is recorded, not raised
                error = f"{type(exc).__name__}: {exc}"[:300]
                self._state = _State(
                    keyset=st.keyset, fetched_at=st.fetched_at, last_attempt=now,
                    last_error=error, failures=st.failures + 1,
                )
                log.warning("jwt.jwks_fetch_failed", uri=self.uri, error=error,
                            failures=st.failures + 1)
                return self._usable(self._state, now)
            self._state = _State(keyset=keyset, fetched_at=now, last_attempt=now)
            self._kid_miss = False
            log.info("jwt.jwks_fetched", uri=self.uri, keys=len(keyset.keys))
            return True

    def _usable(self, st: _State, now: float) -> bool:
        return st.keyset is not None and (
            self.static or st.fetched_at is None or now - st.fetched_at <= self.max_stale
        )

    def keyset(self, now: float | None = None) -> KeySet:
        """The current key set, or :class:`JwksUnavailable` saying why there is none."""
        now = self._clock() if now is None else now
        st = self._state
        if st.keyset is None:
            if self.static:
                raise JwksUnavailable(st.last_error or "inline JWKS unusable")
            why = f"; last fetch failed: {st.last_error}" if st.last_error else ""
            raise JwksUnavailable(f"JWKS from {self.uri} not fetched yet{why}")
        if not self._usable(st, now):
            age = now - (st.fetched_at or now)
            raise JwksUnavailable(
                f"JWKS from {self.uri} is {age:.0f}s old, beyond max-stale {self.max_stale:.0f}s, "
                f"and refetching fails ({st.last_error}); refusing tokens until it recovers"
            )
        return st.keyset

    def status(self) -> dict[str, Any]:
        st = self._state
        return {
            "source": self.describe,
            "fetched_at": st.fetched_at,
            "last_attempt": st.last_attempt,
            "last_error": st.last_error,
            "failures": st.failures,
        }


class JwksStore:
    """Fetched key sets by URI, shared by every validator (and revision) of a gateway."""

    def __init__(self, *, fetch: Fetcher = default_fetch, clock: Clock = time.time,
                 **source_options: float) -> None:
        self.fetch = fetch
        self.clock = clock
        self._options = source_options
        self._sources: dict[str, JwksSource] = {}
        self._lock = threading.Lock()

    def source(self, uri: str) -> JwksSource:
        with self._lock:
            src = self._sources.get(uri)
            if src is None:
                src = JwksSource(uri, fetch=self.fetch, clock=self.clock, **self._options)
                self._sources[uri] = src
            return src

    def sources(self) -> list[JwksSource]:
        with self._lock:
            return list(self._sources.values())

    def refresh(self, *, force: bool = False) -> None:
        """Refresh every source that is due (call from a worker thread)."""
        for src in self.sources():
            src.refresh(force=force)


# ---------------------------------------------------------------- validation


class JwtFailure(enum.Enum):
    """What kind of failure a refused token is: chosen where the failure is detected (by
    exception type or check), never from the text of ``reason``, which quotes the
    token's own ``iss``, ``kid``, ``alg`` and ``aud``."""

    MALFORMED = "malformed"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    AUDIENCE = "audience"
    ISSUER = "issuer"
    JWKS_FETCH = "jwks_fetch"
    VERIFICATION = "verification"


@dataclass(frozen=True, slots=True)
class JwtResult:
    ok: bool
    request_principal: str | None = None
    claims: Mapping[str, Any] | None = None
    reason: str = ""  # for logs: may quote attacker-chosen token fields
    refresh_wanted: bool = False  # call JwtValidator.refresh() (in a thread), then retry once
    failure: JwtFailure | None = None  # set when not ``ok``


_NO_TOKEN = JwtResult(ok=True, reason="no token")


def _reject(failure: JwtFailure, reason: str, *, refresh: bool = False) -> JwtResult:
    return JwtResult(ok=False, reason=f"invalid JWT: {reason}", refresh_wanted=refresh,
                     failure=failure)


def _text(v: str | bytes) -> str:
    return v.decode("latin-1") if isinstance(v, bytes) else v


def _when(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(float(ts), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError, OverflowError, OSError):
        return repr(ts)


@dataclass(frozen=True, slots=True)
class _Issuer:
    rule: JwtRule
    source: JwksSource


class JwtValidator:
    """Validates the bearer token of requests to one service against its JWT rules."""

    def __init__(
        self,
        rules: Iterable[JwtRule],
        *,
        store: JwksStore | None = None,
        clock: Clock | None = None,
        leeway: int = 60,
        algorithms: Iterable[str] = DEFAULT_ALGORITHMS,
        max_token_bytes: int = MAX_TOKEN_BYTES,
    ) -> None:
        self.store = store if store is not None else JwksStore()
        self.clock = clock or self.store.clock
        self.leeway = leeway
        self.algorithms = tuple(algorithms)
        for alg in self.algorithms:
            if alg == "none" or alg.startswith("HS"):
                raise JwtError(
                    f"algorithm {alg!r} is not allowed: use asymmetric algorithms "
                    "(RS*, PS*, ES*, EdDSA) whose public keys can be published in a JWKS"
                )
        self.max_token_bytes = max_token_bytes
        self._issuers: dict[str, list[_Issuer]] = {}
        headers: list[str] = []
        for rule in rules:
            if rule.jwks_uri:
                src = self.store.source(rule.jwks_uri)
            else:
                src = JwksSource(inline=rule.jwks, clock=self.clock)
            self._issuers.setdefault(rule.issuer, []).append(_Issuer(rule, src))
            headers.extend(h.lower() for h in rule.from_headers)
        self.headers = frozenset(headers)

    @classmethod
    def for_service(
        cls, policies: Iterable[Any], namespace: str, service: str, **kwargs: Any
    ) -> JwtValidator:
        """Build from every RequestAuthentication (in ``policies``) selecting the service."""
        rules: list[JwtRule] = []
        for p in policies:
            if isinstance(p, RequestAuthentication) and p.selector.namespace in ("*", namespace) \
                    and p.selector.service in ("*", service):
                rules.extend(p.jwt_rules)
        return cls(rules, **kwargs)

    @property
    def enabled(self) -> bool:
        return bool(self._issuers)

    @property
    def issuers(self) -> tuple[str, ...]:
        return tuple(self._issuers)

    def sources(self) -> list[JwksSource]:
        return [i.source for issuers in self._issuers.values() for i in issuers]

    def refresh_due(self) -> bool:
        return any(s.refresh_due() for s in self.sources())

    def refresh(self, *, force: bool = False) -> None:
        """Fetch the key sets that are due (blocking IO: run it in a worker thread)."""
        for s in self.sources():
            s.refresh(force=force)

    def _tokens(self, headers: Mapping[str, Any] | Iterable[tuple[Any, Any]]) -> set[str]:
        items = headers.items() if isinstance(headers, Mapping) else headers
        tokens = set()
        for name, value in items:
            name = _text(name).lower()
            if name not in self.headers:
                continue
            value = _text(value).strip()
            scheme, _, rest = value.partition(" ")
            if scheme.lower() == "bearer":
                value = rest.strip()
            elif name == "authorization":
                continue  # another scheme (Basic, ...): not a JWT, as in Envoy
            if value:
                tokens.add(value)
        return tokens

    def validate(self, headers: Mapping[str, Any] | Iterable[tuple[Any, Any]]) -> JwtResult:
        """Check the request's token, if any.  Pure apart from reading the clock."""
        if not self._issuers:
            return _NO_TOKEN
        tokens = self._tokens(headers)
        if not tokens:
            return _NO_TOKEN
        if len(tokens) > 1:
            return _reject(JwtFailure.MALFORMED, "the request carries more than one token")
        token = tokens.pop()
        if len(token) > self.max_token_bytes:
            return _reject(JwtFailure.MALFORMED, f"token longer than {self.max_token_bytes} bytes")
        try:
            compact = extract_compact(token.encode("ascii"))
            header = compact.headers()
            peek = json.loads(compact.payload or b"")
        except (JoseError, ValueError, UnicodeError, TypeError) as exc:
            return _reject(JwtFailure.MALFORMED, f"malformed token ({exc})")
        alg = header.get("alg")
        if alg == "none":
            return _reject(JwtFailure.VERIFICATION, "unsigned token (alg none) is not accepted")
        if alg not in self.algorithms:
            return _reject(JwtFailure.VERIFICATION, f"algorithm {alg!r} is not allowed "
                           f"(allowed: {', '.join(self.algorithms)})")
        if not isinstance(peek, dict):
            return _reject(JwtFailure.VERIFICATION, "payload is not a JSON object")
        issuer = peek.get("iss")
        candidates = self._issuers.get(issuer) if isinstance(issuer, str) else None
        if not candidates:
            return _reject(
                JwtFailure.ISSUER,
                f"issuer {issuer!r} is not accepted here (accepted: {', '.join(self._issuers)})"
            )
        first: JwtResult | None = None
        for cand in candidates:
            result = self._verify(token, header, alg, issuer, cand)
            if result.ok:
                return result
            first = first or result
        assert first is not None
        return first

    def _verify(self, token: str, header: Mapping[str, Any], alg: str, issuer: str,
                cand: _Issuer) -> JwtResult:
        now = self.clock()
        try:
            keyset = cand.source.keyset(now)
        except JwksUnavailable as exc:
            return _reject(JwtFailure.JWKS_FETCH, f"issuer {issuer!r}: {exc}",
                           refresh=cand.source.refresh_due(now))
        kid = header.get("kid")
        if kid is not None:
            keys = [k for k in keyset.keys if k.kid == kid]
            if not keys:
                return _reject(
                    JwtFailure.VERIFICATION,
                    f"no key with kid {kid!r} in the JWKS of issuer {issuer!r}",
                    refresh=cand.source.request_refresh(now),
                )
        else:
            keys = list(keyset.keys)
        token_obj = None
        last_error = "no key of a type that fits the algorithm"
        for key in keys:
            try:
                token_obj = jose_jwt.decode(token, key, algorithms=[alg])
                break
            except BadSignatureError:
                last_error = "signature does not verify"
            except JoseError as exc:
                last_error = exc.description or type(exc).__name__
        if token_obj is None:
            return _reject(JwtFailure.VERIFICATION, f"issuer {issuer!r}: {last_error}")
        claims = token_obj.claims
        if not isinstance(claims, dict):
            return _reject(JwtFailure.VERIFICATION, "payload is not a JSON object")
        options: dict[str, Any] = {"iss": {"essential": True, "value": issuer}}
        if cand.rule.audiences:
            options["aud"] = {"essential": True, "values": list(cand.rule.audiences)}
        registry = jose_jwt.JWTClaimsRegistry(now=int(now), leeway=self.leeway, **options)
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            return _reject(JwtFailure.EXPIRED,
                           f"token expired at {_when(claims.get('exp'))} (now {_when(now)})")
        except MissingClaimError as exc:
            return _reject(JwtFailure.VERIFICATION, f"missing claim {exc.claim!r}")
        except InvalidClaimError as exc:
            if exc.claim == "nbf":
                return _reject(JwtFailure.NOT_YET_VALID, f"token not valid before "
                               f"{_when(claims.get('nbf'))} (now {_when(now)})")
            if exc.claim == "aud":
                return _reject(
                    JwtFailure.AUDIENCE,
                    f"audience {claims.get('aud')!r} is not accepted "
                    f"(expected one of: {', '.join(cand.rule.audiences)})"
                )
            return _reject(JwtFailure.VERIFICATION,
                           f"claim {exc.claim!r}: {exc.description or 'invalid'}")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            return _reject(JwtFailure.VERIFICATION,
                           "missing claim 'sub' (the request principal is <iss>/<sub>)")
        return JwtResult(ok=True, request_principal=f"{issuer}/{sub}", claims=claims)

"""Authorization decisions (Istio semantics) and the policy file loader.

Theory of operation
-------------------
The gateway asks one question per request: *may this caller reach this service with this
method, path and port?*  :meth:`PolicySet.evaluate` answers it as a pure function of a
:class:`RequestAttributes` and the policies of one federation revision, in Istio's order:

0. every CUSTOM policy that selects the destination and matches names its ExtensionProvider
   in ``Decision.custom``: the gateway asks that external authorizer first (Istio order:
   CUSTOM, then DENY, then ALLOW; ``gateway/_extauthz.py``), and the answer below only
   holds if it allows.  Offline (``isthmus policy check``) that answer is unknown;
1. every AUDIT policy that selects the destination and matches only sets ``audit=True``;
2. any matching DENY policy denies, naming the policy;
3. if at least one ALLOW policy selects the destination, the request is allowed iff one of
   their rules matches ("default deny once an ALLOW selects");
4. otherwise it is allowed.

Matching follows ``security.istio.io/v1`` AuthorizationPolicy: a rule matches when all of
its present parts (``from``, ``to``, ``when``) match; a list of sources or operations is an
OR, the set fields inside one source or operation are an AND, ``not_*`` fields exclude.
An ALLOW (or DENY, AUDIT) policy without rules matches nothing; ``rules: [{}]`` matches
everything.  Strings (principals, namespaces, clusters, methods, paths, claim values) use
Istio's string match: exact, ``prefix*``, ``*suffix`` or ``*`` (present, any value: a
request without a peer identity never matches ``principals: ["*"]``, which is how a policy
demands authentication).  Paths are matched without their query string, like Envoy's
``url_path``.

Opaque TCP (``method`` and ``path`` both None) cannot be checked against HTTP-only fields
(methods, paths, request principals, JWT claims).  As in Istio, an ALLOW rule using one
does not match TCP, while a DENY rule ignores them, so it matches *more* TCP traffic (the
restrictive reading).  CUSTOM rules read them like DENY (the authorizer is asked more
often, never less).  AUDIT rules read them like ALLOW: a policy auditing DELETEs should
not mark every TCP connection.

Speed: a :class:`PolicySet` is built once per revision.  Every string list is compiled into
one ``frozenset`` plus two ``str.startswith``/``endswith`` tuples; the policies selecting a
destination are looked up in four dict probes (exact and ``*`` selectors) and cached per
destination, so a request costs a handful of set lookups per selecting policy.

Policy files
------------
:func:`load_policies` reads multi-document YAML of AuthorizationPolicy and
RequestAuthentication documents (the JSON form of :mod:`federation.models`), validates each
with :func:`federation.models.parse_input` and :func:`validate_policy`, and names the file,
the document and the field path (``rules[0].from[0].principals[1]: ...``).  ``isthmus
policy apply -f`` and ``isthmus policy check -f`` share it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ._errors import InvalidInput, InvalidRequest
from .models import (
    AuthorizationPolicy,
    JwtClaimMatch,
    Policy,
    RequestAuthentication,
    Rule,
    RuleFrom,
    RuleTo,
    Selector,
    Snapshot,
    parse_input,
)


__all__ = [
    "Decision",
    "PolicyError",
    "PolicyFileError",
    "PolicySet",
    "RequestAttributes",
    "StringMatcher",
    "load_policies",
    "validate_policy",
]

MAX_POLICY_FILE_BYTES = 4 * 1024 * 1024


class PolicyError(InvalidRequest):
    """A policy is malformed (a pattern we cannot evaluate, a port out of range, ...)."""


class PolicyFileError(PolicyError):
    """A policy file could not be read, parsed or validated.

    ``source`` is the file name (or ``<text>``), ``document`` the 0-based YAML document
    index (None for errors about the whole file), ``field`` the dotted field path.
    """

    def __init__(
        self, message: str, *, source: str, document: int | None = None, field: str = ""
    ) -> None:
        self.source = source
        self.document = document
        self.field = field
        where = source if document is None else f"{source} document {document}"
        super().__init__(f"invalid policy file: {where}: {message}")


# ---------------------------------------------------------------- request and decision


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestAttributes:
    """What the inbound gateway knows about one request.

    ``source_principal`` is the verified SPIFFE ID of the calling workload (None when the
    caller is unauthenticated); ``method``/``path`` are None for opaque TCP;
    ``request_principal`` is ``<iss>/<sub>`` of a validated JWT and ``jwt_claims`` its claims.
    """

    source_principal: str | None = None
    source_cluster: str | None = None
    source_namespace: str | None = None
    destination_namespace: str
    destination_service: str
    method: str | None = None
    path: str | None = None
    port: int | None = None
    request_principal: str | None = None
    jwt_claims: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)

    @classmethod
    def for_request(
        cls,
        *,
        source_principal: str | None,
        destination_namespace: str,
        destination_service: str,
        source_cluster: str | None = None,
        **rest: Any,
    ) -> RequestAttributes:
        """Derive the source namespace (``/ns/<ns>/sa/<sa>``) and, unless given, the source
        cluster (first label of a workload's ``<cluster>.<federation-domain>`` trust domain)
        from the principal."""
        namespace = None
        if source_principal is not None:
            td, _, path = source_principal.removeprefix("spiffe://").partition("/")
            segs = path.split("/")
            if len(segs) == 4 and segs[0] == "ns" and segs[2] == "sa":
                namespace = segs[1]
                if source_cluster is None and "." in td:
                    source_cluster = td.split(".", 1)[0]
        return cls(
            source_principal=source_principal,
            source_cluster=source_cluster,
            source_namespace=namespace,
            destination_namespace=destination_namespace,
            destination_service=destination_service,
            **rest,
        )

    @property
    def is_http(self) -> bool:
        return self.method is not None or self.path is not None


Action = Literal["ALLOW", "DENY"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one request.  ``policy`` is None when no policy decided (the
    default allow, or the default deny once an ALLOW policy selects the destination)."""

    allowed: bool
    policy: str | None
    action: Action
    reason: str
    audit: bool = False
    audit_policy: str | None = None  # the first AUDIT policy that matched
    # (policy, provider) of every matching CUSTOM policy, in policy order: the external
    # authorizers to ask before this decision holds.
    custom: tuple[tuple[str, str], ...] = ()


# ---------------------------------------------------------------- compiled matchers


def _check_pattern(pattern: str, what: str) -> None:
    if not isinstance(pattern, str) or pattern == "":
        raise PolicyError(f"{what}: empty pattern; use '*' for any value")
    if pattern == "*":
        return
    inner = pattern[1:-1] if len(pattern) > 1 else ""
    if "*" in inner or (pattern.startswith("*") and pattern.endswith("*")):
        raise PolicyError(
            f"{what}: {pattern!r} is not supported; '*' may appear once, at the start "
            "(suffix match), at the end (prefix match) or alone (any value)"
        )


class StringMatcher:
    """Istio string match over a list of patterns (OR): exact, ``pre*``, ``*suf``, ``*``.

    ``*`` and every other pattern require a value: None (absent) never matches.
    """

    __slots__ = ("any", "exact", "prefixes", "suffixes")

    def __init__(self, patterns: Iterable[str], what: str = "pattern") -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        self.any = False
        for i, p in enumerate(patterns):
            _check_pattern(p, f"{what}[{i}]")
            if p == "*":
                self.any = True
            elif p.endswith("*"):
                prefixes.append(p[:-1])
            elif p.startswith("*"):
                suffixes.append(p[1:])
            else:
                exact.add(p)
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)

    def __call__(self, value: str | None) -> bool:
        if value is None:
            return False
        return (
            self.any
            or value in self.exact
            or (bool(self.prefixes) and value.startswith(self.prefixes))
            or (bool(self.suffixes) and value.endswith(self.suffixes))
        )


def _principal_patterns(patterns: Sequence[str]) -> list[str]:
    # Istio writes principals without the scheme ("cluster.local/ns/a/sa/b"); accept both
    # forms by giving scheme-less exact and prefix patterns the "spiffe://" they lack.
    return [
        p if p == "*" or p.startswith(("*", "spiffe://")) else "spiffe://" + p for p in patterns
    ]


def _strip_query(path: str | None) -> str | None:
    if path is None:
        return None
    return path.split("?", 1)[0].split("#", 1)[0]


_NO = object()


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    # A claim named with dots ("https://example.com/roles") is looked up whole first;
    # otherwise the dots walk nested objects ("realm.roles").
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _NO
        value = value[part]
    return value


def _scalar_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


class _Check:
    """One field test of a source or operation: ``matches(attrs) -> bool``."""

    __slots__ = ("get", "match", "negate", "http_only")

    def __init__(
        self,
        get: Callable[[RequestAttributes], Any],
        match: Callable[[Any], bool],
        *,
        negate: bool = False,
        http_only: bool = False,
    ) -> None:
        self.get = get
        self.match = match
        self.negate = negate
        self.http_only = http_only


def _ports(ports: Sequence[int], what: str) -> Callable[[Any], bool]:
    for i, p in enumerate(ports):
        if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536:
            raise PolicyError(f"{what}[{i}]: port {p!r} is not in 1-65535")
    allowed = frozenset(ports)
    return lambda port: port in allowed


def _compile_from(src: RuleFrom, where: str) -> list[_Check]:
    checks: list[_Check] = []
    spec: list[tuple[str, Callable[[RequestAttributes], Any], bool, bool]] = [
        ("principals", lambda a: a.source_principal, False, False),
        ("not_principals", lambda a: a.source_principal, True, False),
        ("clusters", lambda a: a.source_cluster, False, False),
        ("not_clusters", lambda a: a.source_cluster, True, False),
        ("namespaces", lambda a: a.source_namespace, False, False),
        ("not_namespaces", lambda a: a.source_namespace, True, False),
        ("request_principals", lambda a: a.request_principal, False, True),
    ]
    for name, get, negate, http_only in spec:
        patterns = getattr(src, name)
        if not patterns:
            continue
        if name in ("principals", "not_principals"):
            for i, p in enumerate(patterns):  # report the pattern as written
                _check_pattern(p, f"{where}.{name}[{i}]")
            patterns = _principal_patterns(patterns)
        checks.append(
            _Check(get, StringMatcher(patterns, f"{where}.{name}"), negate=negate, http_only=http_only)
        )
    return checks


def _compile_to(op: RuleTo, where: str) -> list[_Check]:
    checks: list[_Check] = []
    path = lambda a: _strip_query(a.path)  # noqa: E731
    for name, get, negate in (
        ("methods", lambda a: a.method, False),
        ("not_methods", lambda a: a.method, True),
        ("paths", path, False),
        ("not_paths", path, True),
    ):
        patterns = getattr(op, name)
        if patterns:
            checks.append(
                _Check(get, StringMatcher(patterns, f"{where}.{name}"), negate=negate, http_only=True)
            )
    if op.ports:
        checks.append(_Check(lambda a: a.port, _ports(op.ports, f"{where}.ports")))
    if op.not_ports:
        checks.append(_Check(lambda a: a.port, _ports(op.not_ports, f"{where}.not_ports"), negate=True))
    return checks


def _compile_when(cond: JwtClaimMatch, where: str) -> _Check:
    if not cond.claim:
        raise PolicyError(f"{where}.claim: empty claim name")
    if not cond.values:
        raise PolicyError(f"{where}.values: at least one value is required")
    matcher = StringMatcher(cond.values, f"{where}.values")
    name = cond.claim

    def match(claims: Mapping[str, Any] | None) -> bool:
        if claims is None:
            return False
        value = _claim(claims, name)
        if isinstance(value, (list, tuple)):
            return any(matcher(_scalar_text(v)) for v in value)
        return value is not _NO and matcher(_scalar_text(value))

    return _Check(lambda a: a.jwt_claims, match, http_only=True)


class _CompiledRule:
    __slots__ = ("sources", "operations", "conditions")

    def __init__(self, rule: Rule, where: str) -> None:
        self.sources = [_compile_from(s, f"{where}.from[{i}]") for i, s in enumerate(rule.from_)]
        self.operations = [_compile_to(o, f"{where}.to[{i}]") for i, o in enumerate(rule.to)]
        self.conditions = [_compile_when(c, f"{where}.when[{i}]") for i, c in enumerate(rule.when)]

    def matches(self, attrs: RequestAttributes, lenient: bool) -> bool:
        # ``lenient`` (DENY on TCP) skips HTTP-only checks; ALLOW and AUDIT on TCP fail them.
        tcp = not attrs.is_http
        if self.sources and not any(_all(c, attrs, tcp, lenient) for c in self.sources):
            return False
        if self.operations and not any(_all(c, attrs, tcp, lenient) for c in self.operations):
            return False
        return _all(self.conditions, attrs, tcp, lenient)


def _all(checks: list[_Check], attrs: RequestAttributes, tcp: bool, lenient: bool) -> bool:
    for c in checks:
        if tcp and c.http_only:
            if lenient:
                continue
            return False
        if c.match(c.get(attrs)) == c.negate:
            return False
    return True


class _CompiledPolicy:
    __slots__ = ("name", "action", "rules", "order", "provider")

    def __init__(self, policy: AuthorizationPolicy, order: int) -> None:
        self.name = policy.name
        self.action = policy.action
        self.provider = policy.provider
        self.order = order
        self.rules = [_CompiledRule(r, f"rules[{i}]") for i, r in enumerate(policy.rules)]

    def matching_rule(self, attrs: RequestAttributes) -> int | None:
        lenient = self.action in ("DENY", "CUSTOM")
        for i, rule in enumerate(self.rules):
            if rule.matches(attrs, lenient):
                return i
        return None


def _check_selector(sel: Selector) -> None:
    for name in ("namespace", "service"):
        value = getattr(sel, name)
        if not value or (value != "*" and "*" in value):
            raise PolicyError(f"selector.{name}: {value!r} must be '*' (any) or an exact name")


def _check_request_authentication(policy: RequestAuthentication) -> None:
    from .jwt import JwtError, parse_jwks  # joserfc only where JWTs are configured

    _check_selector(policy.selector)
    for i, rule in enumerate(policy.jwt_rules):
        if not rule.issuer:
            raise PolicyError(f"jwt_rules[{i}].issuer: empty; name the token issuer (iss)")
        if rule.jwks:
            try:
                parse_jwks(rule.jwks)
            except JwtError as exc:
                raise PolicyError(f"jwt_rules[{i}].jwks: {exc}") from None
        elif not rule.jwks_uri.startswith(("https://", "http://")):
            raise PolicyError(f"jwt_rules[{i}].jwks_uri: {rule.jwks_uri!r} must be an https:// URL")
        if not rule.from_headers or any(not h for h in rule.from_headers):
            raise PolicyError(f"jwt_rules[{i}].from_headers: name at least one header, none empty")


def validate_policy(policy: Policy) -> None:
    """Raise :class:`PolicyError` (naming the field) if the gateways could not enforce
    ``policy``: beyond the model's own checks, wildcard forms, port ranges, selectors and
    inline JWKS.  The federation service can call it before storing a policy."""
    if isinstance(policy, AuthorizationPolicy):
        compile_policy(policy)
    else:
        try:
            _check_request_authentication(policy)
        except PolicyError as exc:
            raise PolicyError(f"policy {policy.name!r}: {exc}") from None


def compile_policy(policy: AuthorizationPolicy) -> None:
    """Raise :class:`PolicyError` (naming the field) if ``policy`` cannot be evaluated."""
    try:
        _check_selector(policy.selector)
        _CompiledPolicy(policy, 0)
    except PolicyError as exc:
        raise PolicyError(f"policy {policy.name!r}: {exc}") from None


# ---------------------------------------------------------------- the policy set


@dataclass(frozen=True, slots=True)
class _Selected:
    deny: tuple[_CompiledPolicy, ...]
    allow: tuple[_CompiledPolicy, ...]
    audit: tuple[_CompiledPolicy, ...]
    authn: tuple[RequestAuthentication, ...]
    custom: tuple[_CompiledPolicy, ...] = ()


class PolicySet:
    """The policies of one revision, compiled and indexed by selector.

    Build it once per revision (it raises :class:`PolicyError` for a policy it cannot
    evaluate) and call :meth:`evaluate` per request; it is immutable and thread-safe
    (the per-destination cache only ever gains equal entries).
    """

    MAX_CACHED_DESTINATIONS = 65536

    def __init__(self, policies: Iterable[Policy] = (), revision: int = 0) -> None:
        self.revision = revision
        self.policies: tuple[Policy, ...] = tuple(policies)
        self._authz: dict[tuple[str, str], list[_CompiledPolicy]] = {}
        self._authn: dict[tuple[str, str], list[tuple[int, RequestAuthentication]]] = {}
        for order, p in enumerate(self.policies):
            key = (p.selector.namespace, p.selector.service)
            if isinstance(p, AuthorizationPolicy):
                try:
                    _check_selector(p.selector)
                    compiled = _CompiledPolicy(p, order)
                except PolicyError as exc:
                    raise PolicyError(f"policy {p.name!r}: {exc}") from None
                self._authz.setdefault(key, []).append(compiled)
            elif isinstance(p, RequestAuthentication):
                try:
                    _check_selector(p.selector)
                except PolicyError as exc:
                    raise PolicyError(f"policy {p.name!r}: {exc}") from None
                self._authn.setdefault(key, []).append((order, p))
            else:
                raise PolicyError(f"not a policy: {type(p).__name__}")
        self._cache: dict[tuple[str, str], _Selected] = {}

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot) -> PolicySet:
        return cls(snapshot.policies, revision=snapshot.revision)

    def __len__(self) -> int:
        return len(self.policies)

    def _selected(self, namespace: str, service: str) -> _Selected:
        key = (namespace, service)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        probes = {key, (namespace, "*"), ("*", service), ("*", "*")}
        authz = sorted(
            (p for k in probes for p in self._authz.get(k, ())), key=lambda p: p.order
        )
        authn = sorted((x for k in probes for x in self._authn.get(k, ())), key=lambda x: x[0])
        sel = _Selected(
            deny=tuple(p for p in authz if p.action == "DENY"),
            allow=tuple(p for p in authz if p.action == "ALLOW"),
            audit=tuple(p for p in authz if p.action == "AUDIT"),
            authn=tuple(p for _, p in authn),
            custom=tuple(p for p in authz if p.action == "CUSTOM"),
        )
        if len(self._cache) < self.MAX_CACHED_DESTINATIONS:
            self._cache[key] = sel
        return sel

    def request_authentications(
        self, namespace: str, service: str
    ) -> tuple[RequestAuthentication, ...]:
        """The RequestAuthentication policies selecting ``namespace/service`` (policy order)."""
        return self._selected(namespace, service).authn

    def evaluate(self, attrs: RequestAttributes) -> Decision:
        sel = self._selected(attrs.destination_namespace, attrs.destination_service)
        d = self._evaluate(sel, attrs)
        if sel.custom:
            custom = tuple((p.name, p.provider) for p in sel.custom if p.matching_rule(attrs) is not None)
            if custom:
                d = dataclasses.replace(d, custom=custom)
        return d

    def _evaluate(self, sel: _Selected, attrs: RequestAttributes) -> Decision:
        audit_policy = None
        for p in sel.audit:
            if p.matching_rule(attrs) is not None:
                audit_policy = p.name
                break
        audit = audit_policy is not None
        for p in sel.deny:
            rule = p.matching_rule(attrs)
            if rule is not None:
                return Decision(
                    False, p.name, "DENY", f"DENY policy {p.name!r} matched (rule {rule})",
                    audit, audit_policy,
                )
        dest = f"{attrs.destination_namespace}/{attrs.destination_service}"
        if not sel.allow:
            return Decision(
                True, None, "ALLOW", f"no ALLOW policy selects {dest}", audit, audit_policy
            )
        for p in sel.allow:
            rule = p.matching_rule(attrs)
            if rule is not None:
                return Decision(
                    True, p.name, "ALLOW", f"ALLOW policy {p.name!r} matched (rule {rule})",
                    audit, audit_policy,
                )
        names = ", ".join(p.name for p in sel.allow[:5]) + (", ..." if len(sel.allow) > 5 else "")
        return Decision(
            False, None, "DENY",
            f"no ALLOW policy matched (ALLOW policies selecting {dest}: {names})",
            audit, audit_policy,
        )


# ---------------------------------------------------------------- the YAML loader


def _read_source(text_or_path: str | os.PathLike[str], source: str | None) -> tuple[str, str]:
    looks_like_path = isinstance(text_or_path, os.PathLike) or (
        isinstance(text_or_path, str)
        and "\n" not in text_or_path
        and (text_or_path.endswith((".yaml", ".yml", ".json")) or os.path.isfile(text_or_path))
    )
    if not looks_like_path:
        if not isinstance(text_or_path, str):
            raise PolicyFileError(
                f"expected YAML text or a file path, got {type(text_or_path).__name__}",
                source=source or "<text>",
            )
        return text_or_path, source or "<text>"
    path = Path(text_or_path)
    name = source or str(path)
    try:
        size = path.stat().st_size
        if size > MAX_POLICY_FILE_BYTES:
            raise PolicyFileError(
                f"file is {size} bytes, more than the {MAX_POLICY_FILE_BYTES} allowed; split it",
                source=name,
            )
        return path.read_text(encoding="utf-8"), name
    except FileNotFoundError:
        raise PolicyFileError("no such file", source=name) from None
    except UnicodeDecodeError:
        raise PolicyFileError("not UTF-8 text", source=name) from None
    except OSError as exc:
        raise PolicyFileError(f"cannot read: {exc.strerror or exc}", source=name) from None


def load_policies(
    text_or_path: str | os.PathLike[str], *, source: str | None = None
) -> list[Policy]:
    """Parse multi-document YAML (or JSON) of policies; raise :class:`PolicyFileError`.

    ``text_or_path`` is a :class:`~pathlib.Path`, a file name (a one-line string ending in
    ``.yaml``/``.yml``/``.json`` or naming an existing file) or the YAML text itself.
    Empty documents are skipped; a policy name may appear once per kind.
    """
    text, name = _read_source(text_or_path, source)
    if len(text) > MAX_POLICY_FILE_BYTES:
        raise PolicyFileError(f"more than {MAX_POLICY_FILE_BYTES} bytes; split it", source=name)
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyFileError(f"not valid YAML: {where}{problem}", source=name) from None
    except (ValueError, TypeError, RecursionError) as exc:  # odd scalars, deep nesting
        raise PolicyFileError(f"not valid YAML: {exc}", source=name) from None

    policies: list[Policy] = []
    seen: dict[tuple[str, str], int] = {}
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise PolicyFileError(
                f"expected a mapping with 'kind: AuthorizationPolicy' or "
                f"'kind: RequestAuthentication', got {type(doc).__name__}",
                source=name, document=index,
            )
        try:
            policy = parse_input(Policy, doc)
        except InvalidInput as exc:
            raise PolicyFileError(exc.describe(), source=name, document=index, field=exc.field) from None
        except (TypeError, ValueError, RecursionError) as exc:
            raise PolicyFileError(str(exc), source=name, document=index) from None
        try:
            validate_policy(policy)
        except PolicyError as exc:
            text_ = str(exc).removeprefix(f"policy {policy.name!r}: ")
            raise PolicyFileError(
                text_, source=name, document=index, field=text_.split(":", 1)[0]
            ) from None
        key = (policy.kind, policy.name)
        if key in seen:
            raise PolicyFileError(
                f"{policy.kind} {policy.name!r} is already defined in document {seen[key]}",
                source=name, document=index, field="name",
            )
        seen[key] = index
        policies.append(policy)
    return policies

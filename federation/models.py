"""Shared data models (the contract): clusters, exported services, policies, the snapshot.

These are used by all three packages (the federation service stores them in etcd as
JSON, the gateway builds its routes and policy decisions from them, the agent writes
them).  Their JSON form is stable API: it is what lives in etcd and what the watch
stream carries.  Add fields with defaults; never rename or repurpose one.

Parsing, one function per direction, for every model here:

* :func:`parse_input` is for what a user writes (CLI files, API requests): strict.  An
  unknown field is an error, and :class:`~federation.InvalidInput` names every problem
  by its field path (``rules[0].to[0].ports[0]: ...``).
* :func:`read_record` is for what comes from etcd or the wire: lenient.  Unknown fields
  are ignored (a newer peer may have added one with a default; an older reader must keep
  working) and logged once per field; anything else wrong raises
  :class:`~federation.InvalidRecord`, so the caller can skip that one record.

Constructing a model in code is strict, like :func:`parse_input`.

Theory of operation (the file is long because it is the whole contract, in one place):
clusters and exports, then the Istio-shaped policies, then traffic management, as
operators of Istio and Envoy know it: ``TrafficRoute`` (VirtualService) with per-rule
resilience settings (timeout, retries with a Linkerd-style budget, fault injection,
mirroring) and ``TrafficPolicy`` (DestinationRule: connection-pool limits, outlier
detection, locality).  Durations are written as Istio writes them (``2s``, ``500ms``,
``1m``), held as float seconds and stored as written.  Every resilience default is "off",
so a document that leaves a setting out behaves as before the setting existed; the
gateway's state machines for them live in ``gateway/_resilience.py``.  Last come the
snapshot the watch carries and the two parsers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar, overload

import structlog
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, TypeAdapter, ValidationError,
                      field_validator, model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from ._errors import InvalidInput, InvalidRecord
from .names import local_host

log = structlog.get_logger("federation.models")

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def _is_hostport(value: str) -> bool:
    m = _HOSTPORT.match(value)
    return bool(m) and 0 < int(m.group(2)) < 65536


def _label(value: str, what: str) -> str:
    if not _LABEL.match(value):
        raise ValueError(
            f"{what} {value!r} must be a lowercase RFC 1123 label (a-z, 0-9, '-', at most 63 characters)"
        )
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Protocol = Literal["HTTP", "HTTP2", "GRPC", "TCP"]


class ServicePort(_Model):
    name: str = ""
    port: int = Field(ge=1, le=65535)
    protocol: Protocol = "HTTP"
    # Where the exporting cluster's gateway sends this port's traffic (host:port inside
    # that cluster); empty means <svc>.<ns>.svc.cluster.local:<port>.
    target: str = ""
    # Re-originate to the service with the gateway's mTLS certificate ("mtls") or plain.
    target_tls: Literal["mtls", "plain"] = "plain"

    @field_validator("target")
    @classmethod
    def _v_target(cls, v: str) -> str:
        if v and not _is_hostport(v):
            raise ValueError(f"target {v!r} must be HOST:PORT with a port from 1 to 65535, e.g. web.prod.svc:8080")
        return v


class ExportedService(_Model):
    """One Service a cluster exports to the federation."""

    cluster: str
    namespace: str
    name: str
    ports: tuple[ServicePort, ...] = ()
    export_to: tuple[str, ...] = ()  # empty: every other cluster
    ready_endpoints: int = 0
    # Whether ``ready_endpoints`` is a count (the Kubernetes agent publishes one) or
    # unknown (file exports): only a known 0 takes the export out of traffic routing.
    endpoints_known: bool = False

    _v_cluster = field_validator("cluster")(lambda cls, v: _label(v, "cluster"))
    _v_ns = field_validator("namespace")(lambda cls, v: _label(v, "namespace"))
    _v_name = field_validator("name")(lambda cls, v: _label(v, "service name"))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def hostname(self) -> str:
        """The name the exporting cluster knows it by."""
        return local_host(self.name, self.namespace)

    def visible_to(self, cluster: str) -> bool:
        return cluster != self.cluster and (not self.export_to or cluster in self.export_to)


class ClusterRecord(_Model):
    name: str
    trust_domain: str
    gateway_addresses: tuple[str, ...] = ()  # "host:port" of the inbound listener
    labels: dict[str, str] = Field(default_factory=dict)
    ca_cert_pem: str = ""  # the cluster's intermediate CA (PEM)
    joined_at: float = 0.0
    revoked: bool = False
    # CAs this cluster held before a re-join, all revoked (their serials are in the CRL):
    # kept so that every reader can map the CRL onto them (trust.Revocations.from_crl).
    previous_ca_certs_pem: tuple[str, ...] = ()

    _v_name = field_validator("name")(lambda cls, v: _label(v, "cluster name"))

    @field_validator("gateway_addresses")
    @classmethod
    def _v_addresses(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for a in v:
            if not _is_hostport(a):
                raise ValueError(f"gateway address {a!r} must be HOST:PORT")
        return v


# ---------------------------------------------------------------- policies (Istio-shaped)


class Selector(_Model):
    namespace: str = "*"  # "*" matches every namespace
    service: str = "*"


class JwtClaimMatch(_Model):
    claim: str  # dotted path into the claims, e.g. "groups" or "realm.roles"
    values: tuple[str, ...]


class RuleFrom(_Model):
    principals: tuple[str, ...] = ()  # SPIFFE IDs, '*' wildcards (prefix/suffix/any)
    not_principals: tuple[str, ...] = ()
    clusters: tuple[str, ...] = ()
    not_clusters: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()  # "<iss>/<sub>" of a validated JWT


class RuleTo(_Model):
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()  # exact, "prefix*", "*suffix" or "*"
    not_paths: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()


class Rule(_Model):
    from_: tuple[RuleFrom, ...] = Field(default=(), alias="from")
    to: tuple[RuleTo, ...] = ()
    when: tuple[JwtClaimMatch, ...] = ()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class AuthorizationPolicy(_Model):
    kind: Literal["AuthorizationPolicy"] = "AuthorizationPolicy"
    name: str
    selector: Selector = Selector()
    action: Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"] = "ALLOW"
    # Istio semantics: no rules with ALLOW matches nothing; rules=[{}] matches everything.
    rules: tuple[Rule, ...] = ()
    # CUSTOM only: the ExtensionProvider asked for the requests the rules match.
    provider: str = ""

    _v_name = field_validator("name")(lambda cls, v: _label(v, "policy name"))

    @model_validator(mode="after")
    def _provider_with_custom(self) -> AuthorizationPolicy:
        if self.action == "CUSTOM" and not self.provider:
            raise _field_error(("provider",), "a CUSTOM policy names its ExtensionProvider: set provider",
                               "", "AuthorizationPolicy")
        if self.action != "CUSTOM" and self.provider:
            raise _field_error(("provider",), f"provider is for action CUSTOM only; an {self.action} policy is "
                               "decided by the gateway itself: remove provider, or set action: CUSTOM",
                               self.provider, "AuthorizationPolicy")
        return self


class JwtRule(_Model):
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: str = ""  # inline JWKS (JSON text)
    jwks_uri: str = ""
    from_headers: tuple[str, ...] = ("authorization",)
    # Istio's forwardOriginalToken: by default the gateway removes a validated token
    # before the request reaches the service, so the token goes no further than needed.
    forward_original_token: bool = False

    @model_validator(mode="after")
    def _one_jwks_source(self) -> JwtRule:
        if bool(self.jwks) == bool(self.jwks_uri):
            raise ValueError("set exactly one of jwks (inline) or jwks_uri")
        return self


class RequestAuthentication(_Model):
    kind: Literal["RequestAuthentication"] = "RequestAuthentication"
    name: str
    selector: Selector = Selector()
    jwt_rules: tuple[JwtRule, ...] = Field(min_length=1)

    _v_name = field_validator("name")(lambda cls, v: _label(v, "policy name"))


Policy = AuthorizationPolicy | RequestAuthentication
POLICY_KINDS: dict[str, type[AuthorizationPolicy] | type[RequestAuthentication]] = {
    "AuthorizationPolicy": AuthorizationPolicy,
    "RequestAuthentication": RequestAuthentication,
}
# A policy of either kind, told apart by its ``kind`` field.
AnyPolicy = Annotated[Policy, Field(discriminator="kind")]


# ---------------------------------------------------------------- traffic routes (VirtualService-shaped)

_MAX_REGEX = 1024
_METHOD = re.compile(r"^[A-Z]{1,20}$")
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]{1,128}$")


def compile_regex(pattern: str) -> Any:
    """``pattern`` compiled with RE2 semantics (linear time: a request cannot make a
    match slow), anchored nowhere (use ``^``/``$``); ValueError naming the problem."""
    import re2  # google-re2; imported here so a reader of other models does not pay for it

    if len(pattern) > _MAX_REGEX:
        raise ValueError(f"regex is {len(pattern)} characters; at most {_MAX_REGEX}")
    options = re2.Options()
    options.log_errors = False  # the error is ours to report, not a line on stderr
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        why = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"invalid regex {pattern!r} (RE2 syntax): {why}") from None


class StringMatch(_Model):
    """Exactly one of: ``exact``, ``prefix``, ``regex`` (RE2, searched: anchor with ^ $),
    or ``present: true|false`` (headers only)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None
    present: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> StringMatch:
        set_ = [k for k in ("exact", "prefix", "regex", "present") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError("set exactly one of exact, prefix, regex or present"
                             + (f" (got {', '.join(set_)})" if set_ else ""))
        return self

    @field_validator("regex")
    @classmethod
    def _v_regex(cls, v: str | None) -> str | None:
        if v is not None:
            compile_regex(v)
        return v


class PathMatch(StringMatch):
    """``exact``, ``prefix`` or ``regex`` on the request path (without the query)."""

    @model_validator(mode="after")
    def _path(self) -> PathMatch:
        if self.present is not None:
            raise ValueError("a path match is exact, prefix or regex; present is for headers")
        for k in ("exact", "prefix"):
            v = getattr(self, k)
            if v is not None and not v.startswith("/"):
                raise ValueError(f"{k} path {v!r} must start with '/'")
        return self


class RouteMatch(_Model):
    """Every condition set must hold (AND); a rule's matches are alternatives (OR)."""

    path: PathMatch | None = None
    method: str = ""
    headers: dict[str, StringMatch] = Field(default_factory=dict, max_length=16)
    # The calling cluster (the gateway applying the route): empty means any.
    source_clusters: tuple[str, ...] = Field(default=(), max_length=64)

    @field_validator("method")
    @classmethod
    def _v_method(cls, v: str) -> str:
        if v and not _METHOD.match(v):
            raise ValueError(f"method {v!r} must be an upper-case HTTP method such as GET")
        return v

    @field_validator("headers")
    @classmethod
    def _v_headers(cls, v: dict[str, StringMatch]) -> dict[str, StringMatch]:
        for name in v:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"header name {name!r} must be a lower-case HTTP header name")
            if name.startswith(":"):
                raise ValueError(f"header {name!r}: match pseudo-headers with path and method")
        return v

    @field_validator("source_clusters")
    @classmethod
    def _v_sources(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for c in v:
            _label(c, "source cluster")
        return v


class RouteDestination(_Model):
    """A (cluster, service) pair; ``service`` defaults to the route's host service."""

    cluster: str
    service: str = ""
    # Gateway API's default: 1.  Normalised over the rule's destinations, not a percentage.
    weight: int = Field(default=1, ge=0, le=1_000_000, strict=True)

    _v_cluster = field_validator("cluster")(lambda cls, v: _label(v, "destination cluster"))

    @field_validator("service")
    @classmethod
    def _v_service(cls, v: str) -> str:
        return _label(v, "destination service") if v else v


class FailoverTarget(_Model):
    """One failover step: a cluster (``"*"``: any other exporting cluster), and a service
    (default: the route's host service).  Written as a bare cluster name or an object."""

    cluster: str
    service: str = ""

    @field_validator("cluster")
    @classmethod
    def _v_cluster(cls, v: str) -> str:
        return v if v == "*" else _label(v, "failover cluster")

    @field_validator("service")
    @classmethod
    def _v_service(cls, v: str) -> str:
        return _label(v, "failover service") if v else v


def _failover_item(v: Any) -> Any:
    return {"cluster": v} if isinstance(v, str) else v


# ---------------------------------------------------------------- resilience (issue 14): Istio/Envoy-shaped

_DURATION = re.compile(r"^(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MIN_DURATION = 0.001  # Istio refuses timeouts under 1 ms
MAX_DURATION = 7 * 86400.0


def parse_duration(text: str) -> float:
    """Seconds of a duration written as Istio and Envoy users write them (Go's
    ``time.ParseDuration`` syntax: ``2s``, ``500ms``, ``1m30s``, ``1.5h``); ValueError naming
    the problem.  Zero, negative, under 1 ms or over 7 days are refused."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a duration: write it with a unit, such as 2s, 500ms or 1m")
    s = text.strip()
    if s.startswith("-"):
        raise ValueError(f"duration {text!r} is negative: durations must be positive")
    if not _DURATION.match(s):
        raise ValueError(f"{text!r} is not a duration: write it with a unit, such as 2s, 500ms or 1m"
                         " (units: h, m, s, ms, us, ns)")
    seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(s))
    if seconds <= 0:
        raise ValueError(f"duration {text!r} is zero: durations must be positive")
    if seconds < MIN_DURATION:
        raise ValueError(f"duration {text!r} is shorter than 1ms")
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {text!r} is longer than 7 days (168h)")
    return seconds


def format_duration(seconds: float) -> str:
    """``seconds`` in the shortest unit that writes it whole: ``2s``, ``500ms``, ``1m``;
    :func:`parse_duration` reads it back to the same value."""
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        n = round(seconds / size)
        if n >= 1 and abs(n * size - seconds) < 1e-7:  # whole to within 100 ns (float noise)
            return f"{n}{unit}"
    return f"{round(seconds * 1e9)}ns"


# A duration field: written "2s"/"500ms"/"1m", held as float seconds, stored as written
# in the shortest unit (so etcd and ``isthmus get`` show "2s", not 2.0).
Duration = Annotated[float, BeforeValidator(parse_duration),
                     PlainSerializer(format_duration, return_type=str)]


def _percent(v: float) -> float:
    if not 0.0 <= v <= 100.0:  # NaN fails this too
        raise ValueError(f"percent {v!r} must be from 0 to 100")
    return v


def _limit(v: int) -> int:
    if v < 1:
        raise ValueError(f"limit {v} must be at least 1 (0 would refuse every request); leave it out for no limit")
    if v > 2**32 - 1:
        raise ValueError(f"limit {v} is more than 4294967295; leave it out for no limit")
    return v


# Istio's percentages are doubles: 0.5 is one request in 200.
Percent = Annotated[float, Field(strict=True), AfterValidator(_percent)]
# A connection-pool limit: a positive count; absent (None) means no limit.
Limit = Annotated[int, Field(strict=True), AfterValidator(_limit)]

# gRPC status codes by name (grpc/doc/statuscodes.md): the contract's one table of them.
GRPC_STATUS_CODES: dict[str, int] = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}
# Envoy's x-envoy-retry-on conditions that Isthmus implements (Envoy router docs, "x-envoy-
# retry-on"): 5xx includes connect-failure, refused-stream and reset; gateway-error is
# 502/503/504 plus connect failures and resets; retriable-4xx is 409.
RETRY_ON_HTTP = ("5xx", "gateway-error", "reset", "reset-before-request", "connect-failure",
                 "refused-stream", "retriable-4xx")
# Envoy names Isthmus does not implement, and what to write instead.
_RETRY_ON_UNSUPPORTED = {
    "retriable-status-codes": "write the status codes themselves, e.g. 503",
    "retriable-headers": "not supported by Isthmus",
    "envoy-ratelimited": "not supported by Isthmus",
    "http3-post-connect-failure": "not supported by Isthmus (no HTTP/3)",
}
# A gRPC condition is its status name in x-envoy-retry-grpc-on spelling: unavailable,
# deadline-exceeded, resource-exhausted ...
RETRY_ON_GRPC = tuple(n.lower().replace("_", "-") for n in GRPC_STATUS_CODES if n != "OK")
# Istio's default retryOn (connect-failure,refused-stream,unavailable,cancelled,
# retriable-status-codes with 503).
DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "cancelled", "503")


def _field_error(loc: tuple[int | str, ...], message: str, value: Any, title: str) -> ValidationError:
    """A validation error at ``loc`` below the field or model being validated (pydantic
    prefixes the outer location), so a cross-field check still names its field path."""
    return ValidationError.from_exception_data(title, [InitErrorDetails(
        type=PydanticCustomError("value_error", message), loc=loc, input=value)])  # type: ignore[arg-type]


def retry_on_name(name: str) -> str:
    """One ``retry_on`` condition in its stored spelling: an Envoy name, a gRPC status in
    Envoy's spelling (``unavailable``; ``UNAVAILABLE`` is accepted), or an HTTP error status
    to retry (Istio's ``"503"``, 400 to 599).  ValueError naming the problem."""
    n = str(name).strip().lower()
    if n.isdigit():
        if 400 <= int(n) <= 599:
            return str(int(n))
        raise ValueError(f"retry_on status {name!r} must be an HTTP error status, from 400 to 599")
    n = n.replace("_", "-")
    if n in RETRY_ON_HTTP or n in RETRY_ON_GRPC:
        return n
    if n in _RETRY_ON_UNSUPPORTED:
        raise ValueError(f"retry_on {name!r}: {_RETRY_ON_UNSUPPORTED[n]}")
    raise ValueError(f"unknown retry_on {name!r}: use Envoy's names ({', '.join(RETRY_ON_HTTP)}), a gRPC status"
                     " (unavailable, cancelled, deadline-exceeded, resource-exhausted, internal, ...) or an"
                     " HTTP status code such as 503")


class RetryBudget(_Model):
    """Linkerd's retry budget: retries may add at most ``percent`` of the requests seen in
    the last ``ttl``, plus ``min_per_second`` retries a second however few requests come."""

    percent: Percent = 20.0
    min_per_second: int = Field(default=10, ge=0, le=1_000_000, strict=True)
    # Linkerd's ttl (tower's Budget takes 1 to 60 seconds).
    ttl: Duration = 10.0

    @field_validator("ttl")
    @classmethod
    def _v_ttl(cls, v: float) -> float:
        if not 1.0 <= v <= 60.0:
            raise ValueError(f"ttl {format_duration(v)} must be from 1s to 60s")
        return v


class Retries(_Model):
    """Istio's HTTPRetry: ``attempts`` retries after the first try (Istio and Envoy count
    retries, not tries), each try within ``per_try_timeout``, on the ``retry_on`` conditions."""

    attempts: int = Field(default=2, ge=0, le=10, strict=True)  # 0: no retries (Istio's way to turn them off)
    per_try_timeout: Duration | None = None  # None: each try may use what is left of the timeout
    retry_on: tuple[str, ...] = Field(default=DEFAULT_RETRY_ON, max_length=32)
    budget: RetryBudget = RetryBudget()

    @field_validator("retry_on", mode="before")
    @classmethod
    def _v_retry_on_split(cls, v: Any) -> Any:
        return tuple(p for p in v.split(",") if p.strip()) if isinstance(v, str) else v  # Istio: "5xx,reset"

    @field_validator("retry_on")
    @classmethod
    def _v_retry_on(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("retry_on is empty: name at least one condition, or set attempts: 0")
        out: list[str] = []
        for i, name in enumerate(v):
            try:
                n = retry_on_name(name)
            except ValueError as exc:
                raise _field_error((i,), str(exc), name, "Retries") from None
            if n not in out:
                out.append(n)
        return tuple(out)


class FaultDelay(_Model):
    """Istio's HTTPFaultInjection.Delay: hold ``percent`` of requests for ``fixed``."""

    percent: Percent = 100.0
    fixed: Duration


class FaultAbort(_Model):
    """Istio's HTTPFaultInjection.Abort: answer ``percent`` of requests with exactly one of
    ``http_status`` or ``grpc_status`` (a name such as UNAVAILABLE), without routing them."""

    percent: Percent = 100.0
    http_status: int | None = Field(default=None, ge=200, le=599, strict=True)
    grpc_status: str | None = None

    @field_validator("grpc_status")
    @classmethod
    def _v_grpc(cls, v: str | None) -> str | None:
        if v is None:
            return v
        name = v.strip().upper().replace("-", "_")
        if name == "OK":
            raise ValueError("grpc_status OK is not a failure: name an error status such as UNAVAILABLE")
        if name not in GRPC_STATUS_CODES:
            raise ValueError(f"unknown grpc_status {v!r}: use a gRPC status name such as UNAVAILABLE,"
                             " DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED")
        return name

    @model_validator(mode="after")
    def _one(self) -> FaultAbort:
        if (self.http_status is None) == (self.grpc_status is None):
            raise ValueError("set exactly one of http_status or grpc_status")
        return self


class Fault(_Model):
    """Fault injection for the rule's requests, before routing.  It is scoped by the rule's
    own ``match`` (a rule matching ``x-chaos: 1`` rehearses failure for that caller only).
    Injected faults are never retried."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None

    @model_validator(mode="after")
    def _some(self) -> Fault:
        if self.delay is None and self.abort is None:
            raise ValueError("a fault needs a delay, an abort or both")
        return self


class Mirror(_Model):
    """Istio's mirror: a copy of ``percent`` of the requests goes to (cluster, service), with
    ``-shadow`` appended to its authority; its answer is discarded."""

    cluster: str
    service: str = ""  # default: the route's host service
    percent: Percent = 100.0

    _v_cluster = field_validator("cluster")(lambda cls, v: _label(v, "mirror cluster"))

    @field_validator("service")
    @classmethod
    def _v_service(cls, v: str) -> str:
        return _label(v, "mirror service") if v else v


class RouteRule(_Model):
    # Alternatives: the rule applies when any one matches; none: every request.
    match: tuple[RouteMatch, ...] = Field(default=(), max_length=16)
    destinations: tuple[RouteDestination, ...] = Field(max_length=32)
    failover: tuple[FailoverTarget, ...] = Field(default=(), max_length=32)
    # Resilience (issue 14); each default is "off": a rule without them routes as before.
    timeout: Duration | None = None  # the whole request, retries included; None: only grpc-timeout
    retries: Retries | None = None
    fault: Fault | None = None
    mirror: Mirror | None = None

    @field_validator("failover", mode="before")
    @classmethod
    def _v_failover(cls, v: Any) -> Any:
        return tuple(_failover_item(x) for x in v) if isinstance(v, (list, tuple)) else v

    @field_validator("destinations")
    @classmethod
    def _v_destinations(cls, v: tuple[RouteDestination, ...]) -> tuple[RouteDestination, ...]:
        if not v:
            raise ValueError("a rule needs at least one destination")
        return v

    @model_validator(mode="after")
    def _weights(self) -> RouteRule:
        if self.destinations and not any(d.weight for d in self.destinations):
            raise ValueError("every destination weight is 0: give at least one a positive weight")
        return self

    @model_validator(mode="after")
    def _resilience(self) -> RouteRule:
        r = self.retries
        if r is not None and r.per_try_timeout is not None and self.timeout is not None \
                and r.per_try_timeout > self.timeout:
            raise _field_error(("retries", "per_try_timeout"),
                               f"per_try_timeout {format_duration(r.per_try_timeout)} is longer than the rule's"
                               f" timeout {format_duration(self.timeout)}: a try cannot outlast the request",
                               format_duration(r.per_try_timeout), "RouteRule")
        m = self.mirror
        if m is not None:
            for d in self.destinations:
                if d.cluster == m.cluster and d.service == m.service:
                    raise _field_error(("mirror",), _same_as_primary(m.cluster, m.service), m.cluster, "RouteRule")
        return self


def _same_as_primary(cluster: str, service: str) -> str:
    where = f"{cluster}/{service}" if service else cluster
    return (f"mirror {where} is one of the rule's destinations: mirror to another cluster or service"
            " (a copy sent where the request goes anyway is only extra load)")


class RouteHost(_Model):
    namespace: str
    service: str

    _v_ns = field_validator("namespace")(lambda cls, v: _label(v, "host namespace"))
    _v_svc = field_validator("service")(lambda cls, v: _label(v, "host service"))


class TrafficRoute(_Model):
    """Where requests to a federated name go: first matching rule wins (Istio
    VirtualService / Gateway API HTTPRoute semantics); applied by the calling cluster's
    outbound gateway.  Per-cluster names are pins and are never re-routed."""

    kind: Literal["TrafficRoute"] = "TrafficRoute"
    name: str
    host: RouteHost
    rules: tuple[RouteRule, ...] = Field(max_length=64)
    # "prefer-same-region": among healthy destinations, those in the caller's
    # topology.kubernetes.io/region first.
    locality: Literal["", "prefer-same-region"] = ""

    _v_name = field_validator("name")(lambda cls, v: _label(v, "route name"))

    @field_validator("rules")
    @classmethod
    def _v_rules(cls, v: tuple[RouteRule, ...]) -> tuple[RouteRule, ...]:
        if not v:
            raise ValueError("a route needs at least one rule")
        return v

    @model_validator(mode="after")
    def _mirrors(self) -> TrafficRoute:
        """A mirror equal to a destination once defaults are filled in (``service: cart``
        against a destination that leaves the service out), which a rule cannot see."""
        for i, rule in enumerate(self.rules):
            m = rule.mirror
            if m is None:
                continue
            ms = self.destination_service(m.service)
            if any(d.cluster == m.cluster and self.destination_service(d.service) == ms for d in rule.destinations):
                raise _field_error(("rules", i, "mirror"), _same_as_primary(m.cluster, ms), m.cluster, "TrafficRoute")
        return self

    @model_validator(mode="after")
    def _distinct_destinations(self) -> TrafficRoute:
        # A (cluster, service) pair once per rule: its weight is then one number, which
        # set-weights can change and explain can report.
        for r, rule in enumerate(self.rules):
            seen: dict[tuple[str, str], int] = {}
            for d, dest in enumerate(rule.destinations):
                pair = (dest.cluster, self.destination_service(dest.service))
                if pair in seen:
                    raise ValueError(f"rules[{r}].destinations[{d}]: {pair[0]}/{pair[1]} is destinations[{seen[pair]}] "
                                     "again; give each (cluster, service) once")
                seen[pair] = d
        return self

    def destination_service(self, service: str) -> str:
        """A destination's or failover step's service, its default filled in."""
        return service or self.host.service


# ---------------------------------------------------------------- traffic policies (DestinationRule-shaped)


class ConnectionPool(_Model):
    """Circuit breakers for one service (Envoy's per-cluster thresholds): past a limit a
    request is refused at once with 503/``UO`` (gRPC UNAVAILABLE), never queued.  A limit
    left out is no limit; 0 is refused (it would refuse every request)."""

    max_requests: Limit | None = None  # requests in flight to the service (Envoy max_requests)
    max_pending: Limit | None = None  # requests waiting for a connection (max_pending_requests)
    max_retries: Limit | None = None  # retries in flight at once (Envoy max_retries)
    max_connections_per_peer: Limit | None = None  # HTTP/2 connections to one peer gateway


class OutlierDetection(_Model):
    """Envoy's consecutive-error outlier detection, with Istio's defaults: a destination
    with ``consecutive_5xx`` 5xx answers (or ``consecutive_gateway_errors`` 502/503/504 and
    connect failures) in a row is ejected for ``base_ejection_time`` × its ejections, at most
    ``max_ejection_time``, and returns when that is up.  At most ``max_ejection_percent`` of a
    service's destinations are ejected at once; 0 turns a detector off (Istio's way)."""

    consecutive_5xx: int = Field(default=5, ge=0, le=1_000_000, strict=True)
    consecutive_gateway_errors: int = Field(default=0, ge=0, le=1_000_000, strict=True)
    interval: Duration = 10.0
    base_ejection_time: Duration = 30.0
    max_ejection_time: Duration = 300.0  # Envoy's default cap
    max_ejection_percent: Percent = 10.0

    @model_validator(mode="after")
    def _consistent(self) -> OutlierDetection:
        if not self.consecutive_5xx and not self.consecutive_gateway_errors:
            raise _field_error(("consecutive_5xx",), "both detectors are 0 (off): set consecutive_5xx or"
                               " consecutive_gateway_errors above 0, or leave outlier_detection out",
                               0, "OutlierDetection")
        if self.max_ejection_time < self.base_ejection_time:
            raise _field_error(("max_ejection_time",), f"max_ejection_time {format_duration(self.max_ejection_time)}"
                               f" is shorter than base_ejection_time {format_duration(self.base_ejection_time)}",
                               format_duration(self.max_ejection_time), "OutlierDetection")
        return self


class TrafficPolicy(_Model):
    """How the calling gateway treats one service's destinations (Istio's DestinationRule):
    connection-pool limits, outlier detection, locality.  It applies to every name of the
    service, per-cluster pins included.  Every field's default changes nothing: an empty
    TrafficPolicy behaves like none (see :func:`with_defaults`)."""

    kind: Literal["TrafficPolicy"] = "TrafficPolicy"
    name: str
    host: RouteHost
    connection_pool: ConnectionPool = ConnectionPool()
    outlier_detection: OutlierDetection | None = None  # None: no outlier detection
    locality: Literal["", "prefer-same-region"] = ""

    _v_name = field_validator("name")(lambda cls, v: _label(v, "traffic policy name"))


def with_defaults(doc: M) -> M:
    """``doc`` with every default filled in and marked as set, so that a dump with
    ``exclude_unset``/``exclude_defaults`` off or on shows each effective setting
    (``isthmus get trafficpolicy NAME -o yaml --show-defaults``).  Blocks whose presence
    turns a feature on (``outlier_detection``, a rule's ``retries``, ``fault``, ``mirror``)
    stay as written: filling them in would change what the document does."""
    return type(doc).model_validate(doc.model_dump(mode="json", by_alias=True))


# ---------------------------------------------------------------- telemetry (Istio Telemetry-shaped)

_COLLECTOR_URL = re.compile(r"^https?://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})(/[!-~]*)?$")


def _collector(v: str | None) -> str | None:
    if v:
        m = _COLLECTOR_URL.match(v)
        if not (_is_hostport(v) or (m and 0 < int(m.group(2)) < 65536)):
            raise ValueError(f"collector {v!r} must be HOST:PORT (OTLP/gRPC, e.g. otel-collector.observability:4317)"
                             " or an http(s):// URL with a port (e.g. http://otel-collector:4318/v1/traces)")
    return v


class TracingSettings(_Model):
    """Span export, as Istio's Telemetry ``tracing`` sets it (with the provider inline).
    A field left out keeps what the gateway config (or a broader document) sets."""

    collector: Annotated[str | None, AfterValidator(_collector)] = None  # "" : export no spans
    protocol: Literal["grpc", "http"] | None = None  # OTLP over gRPC or HTTP/protobuf
    random_sampling_percentage: Percent | None = None  # of new traces; a parent's decision is kept
    disable_span_reporting: bool = False


class Telemetry(_Model):
    """Tracing settings for the gateways of the clusters named (every cluster if none);
    applied live (see ``gateway/_tracing.py``: effective_settings for how several combine)."""

    kind: Literal["Telemetry"] = "Telemetry"
    name: str
    clusters: tuple[str, ...] = Field(default=(), max_length=256)
    tracing: TracingSettings = TracingSettings()

    _v_name = field_validator("name")(lambda cls, v: _label(v, "telemetry name"))

    @field_validator("clusters")
    @classmethod
    def _v_clusters(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_label(c, "cluster") for c in v)


# ---------------------------------------------------------------- extension providers (Istio MeshConfig-shaped)

_ADDRESS_HELP = "must be HOST:PORT, e.g. opa.authz.svc.cluster.local:9191"


def _address(v: str) -> str:
    if v and not _is_hostport(v):
        raise ValueError(f"address {v!r} {_ADDRESS_HELP}")
    return v


def _header_names(v: tuple[str, ...]) -> tuple[str, ...]:
    out = tuple(h.lower() for h in v)
    for h in out:
        if not _HEADER_NAME.match(h):
            raise ValueError(f"header name {h!r} is not a lowercase HTTP header name")
    return out


HeaderNames = Annotated[tuple[str, ...], AfterValidator(_header_names)]


MAX_CHECK_BODY = 1024 * 1024  # the most of a request body a gateway holds for one check


class IncludeRequestBody(_Model):
    """Send the request body with the check (Istio's ``includeRequestBodyInCheck``, Envoy's
    ``with_request_body``): the inbound gateway holds up to ``max_request_bytes`` of it
    before asking.  A larger body is answered 413 unless ``allow_partial_message`` (then its
    first ``max_request_bytes`` are sent); ``pack_as_bytes`` sends it in ``raw_body``
    (binary bodies, gRPC messages) instead of ``body`` (UTF-8 text).  The HTTP variant
    sends it as the body of the authorization request."""

    max_request_bytes: int = Field(ge=1, le=MAX_CHECK_BODY, strict=True)
    allow_partial_message: bool = False
    pack_as_bytes: bool = False


class ExtAuthz(_Model):
    """What both ext_authz variants share (Istio's ``envoyExtAuthzGrpc``/``Http``).  The
    address is resolved and called from the inbound gateway of the cluster that runs the
    protected service: ``addresses`` names a per-cluster one, ``address`` the rest."""

    address: Annotated[str, AfterValidator(_address)] = ""
    addresses: dict[str, Annotated[str, AfterValidator(_address)]] = {}
    timeout: Duration = 0.2  # Envoy's default
    fail_open: bool = False  # Envoy's failure_mode_allow
    status_on_error: int = Field(default=403, ge=200, le=599, strict=True)
    max_concurrency: Limit = 256  # checks in flight to the provider, per gateway
    include_request_body: IncludeRequestBody | None = None  # None: headers only

    @field_validator("addresses")
    @classmethod
    def _v_clusters(cls, v: dict[str, str]) -> dict[str, str]:
        for cluster in v:
            _label(cluster, "cluster")
        return v

    @model_validator(mode="after")
    def _some_address(self) -> ExtAuthz:
        if not self.address and not self.addresses:
            raise _field_error(("address",), "missing: set address (HOST:PORT) or addresses (cluster: HOST:PORT)",
                               "", "ExtAuthz")
        return self

    def address_for(self, cluster: str) -> str:
        """Where ``cluster``'s gateway calls the authorizer ("" if nowhere)."""
        return self.addresses.get(cluster, self.address)


class ExtAuthzGrpc(ExtAuthz):
    """Envoy's ``envoy.service.auth.v3.Authorization/Check`` over plain-text HTTP/2."""


class ExtAuthzHttp(ExtAuthz):
    """Envoy's HTTP ext_authz service: the request's method and ``path_prefix`` + path, the
    headers named in ``include_request_headers`` (plus Envoy's defaults); 200 allows (copying
    ``headers_to_upstream_on_allow`` onto the request and ``headers_to_downstream_on_allow``
    onto the response to the caller), any other status denies (with
    ``headers_to_downstream_on_deny`` and the body), 5xx and failures are errors."""

    path_prefix: str = ""
    include_request_headers: HeaderNames = ()
    headers_to_upstream_on_allow: HeaderNames = ()
    headers_to_downstream_on_allow: HeaderNames = ()
    headers_to_downstream_on_deny: HeaderNames = ()

    @field_validator("path_prefix")
    @classmethod
    def _v_prefix(cls, v: str) -> str:
        if v and (not v.startswith("/") or any(c in v for c in "?# ")):
            raise ValueError(f"path_prefix {v!r} must start with '/' and hold no '?', '#' or space")
        return v


class ExtensionProvider(_Model):
    """An external authorizer a CUSTOM AuthorizationPolicy names (Istio's MeshConfig
    ``extensionProviders``): federation-wide, one of ``ext_authz_grpc`` or ``ext_authz_http``."""

    kind: Literal["ExtensionProvider"] = "ExtensionProvider"
    name: str
    ext_authz_grpc: ExtAuthzGrpc | None = None
    ext_authz_http: ExtAuthzHttp | None = None

    _v_name = field_validator("name")(lambda cls, v: _label(v, "provider name"))

    @model_validator(mode="after")
    def _one_variant(self) -> ExtensionProvider:
        if self.ext_authz_grpc is not None and self.ext_authz_http is not None:
            raise _field_error(("ext_authz_http",), "set one of ext_authz_grpc or ext_authz_http, not both",
                               "", "ExtensionProvider")
        if self.ext_authz_grpc is None and self.ext_authz_http is None:
            raise _field_error(("ext_authz_grpc",), "missing: set ext_authz_grpc or ext_authz_http",
                               "", "ExtensionProvider")
        return self

    @property
    def ext_authz(self) -> ExtAuthz:
        out = self.ext_authz_grpc or self.ext_authz_http
        assert out is not None
        return out


# Every kind ``isthmus apply -f`` takes, by its ``kind`` field.
DOCUMENT_KINDS: dict[str, type[BaseModel]] = {
    "AuthorizationPolicy": AuthorizationPolicy,
    "RequestAuthentication": RequestAuthentication,
    "TrafficRoute": TrafficRoute,
    "TrafficPolicy": TrafficPolicy,
    "Telemetry": Telemetry,
    "ExtensionProvider": ExtensionProvider,
}


# ---------------------------------------------------------------- what the watch carries


class ClusterLiveness(_Model):
    """A joined cluster the federation sees as not LIVE (its heartbeats stopped: STALE,
    see ``isthmus status``).  The federation's background-job leader writes one under
    ``liveness/<cluster>`` when a cluster turns STALE and deletes it when it is LIVE again,
    so every gateway leaves a STALE cluster out of its splits (``route explain``: STALE)."""

    cluster: str = Field(min_length=1, max_length=63)
    state: Literal["STALE", "EXPIRED"] = "STALE"
    since: float = 0.0  # unix time the federation first saw it so
    last_heartbeat_age: float = -1.0  # seconds, when known


class Snapshot(_Model):
    """The whole federation config at one etcd revision."""

    revision: int = 0
    clusters: tuple[ClusterRecord, ...] = ()
    services: tuple[ExportedService, ...] = ()
    policies: tuple[AnyPolicy, ...] = ()
    routes: tuple[TrafficRoute, ...] = ()
    traffic_policies: tuple[TrafficPolicy, ...] = ()
    liveness: tuple[ClusterLiveness, ...] = ()  # the clusters that are not LIVE
    telemetry: tuple[Telemetry, ...] = ()
    extension_providers: tuple[ExtensionProvider, ...] = ()
    bundle_pem: str = ""
    crl_pem: str = ""


# ---------------------------------------------------------------- parsing: input and records

M = TypeVar("M", bound=BaseModel)
_ADAPTERS: dict[Any, TypeAdapter[Any]] = {Policy: TypeAdapter(AnyPolicy)}
_REPORTED_UNKNOWN: set[tuple[str, str]] = set()
_MAX_REPORTED_UNKNOWN = 1024


def field_path(loc: Sequence[int | str]) -> str:
    """pydantic's error location as a field path: ``rules[0].from[0].principals[1]``.

    A policy kind in the location is the union member pydantic tried, not a field: left out.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in POLICY_KINDS:
            out += ("." if out else "") + str(part)
    return out


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    return [(field_path(e["loc"]), e["msg"].removeprefix("Value error, ")) for e in exc.errors(include_url=False)]


def _name(model: Any) -> str:
    return "policy" if model == Policy else getattr(model, "__name__", str(model))


def _validate(model: Any, data: Any, extra: Literal["forbid", "ignore"]) -> Any:
    adapter = _ADAPTERS.get(model)
    if adapter is None:
        adapter = _ADAPTERS[model] = TypeAdapter(model)
    if isinstance(data, (str, bytes, bytearray)):
        return adapter.validate_json(data, extra=extra)
    return adapter.validate_python(data, extra=extra)


def _policy_kind(data: Any) -> tuple[type[AuthorizationPolicy] | type[RequestAuthentication], Any]:
    """The model for a policy document (by its ``kind``), and the document as Python data."""
    if isinstance(data, (str, bytes, bytearray)):
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise InvalidInput("policy", [("", f"not JSON: {exc}")]) from None
    if not isinstance(data, dict):
        raise InvalidInput("policy", [("", "expected an object with kind, name, ...")])
    kind = data.get("kind")
    if kind is None:
        raise InvalidInput("policy", [("kind", "missing; set kind: AuthorizationPolicy or RequestAuthentication")])
    if not isinstance(kind, str) or kind not in POLICY_KINDS:
        raise InvalidInput(
            "policy", [("kind", f"{kind!r} is not a policy kind; use AuthorizationPolicy or RequestAuthentication")]
        )
    return POLICY_KINDS[kind], data


@overload
def parse_input(model: type[M], data: Any, *, what: str | None = None) -> M: ...
@overload
def parse_input(model: Any, data: Any, *, what: str | None = None) -> Any: ...
def parse_input(model: Any, data: Any, *, what: str | None = None) -> Any:
    """Validate what a user wrote (JSON text or Python data) as ``model`` (or :data:`Policy`,
    dispatched on ``kind``); unknown fields are errors.  Raises :class:`InvalidInput`
    naming ``what`` (default: the model's name, or a policy's kind) and the field paths."""
    if model == Policy:
        model, data = _policy_kind(data)
    try:
        return _validate(model, data, "forbid")
    except ValidationError as exc:
        raise InvalidInput(what or _name(model), _problems(exc)) from None


@overload
def read_record(model: type[M], data: Any, *, what: str | None = None) -> M: ...
@overload
def read_record(model: Any, data: Any, *, what: str | None = None) -> Any: ...
def read_record(model: Any, data: Any, *, what: str | None = None) -> Any:
    """Validate a value read from etcd or the wire as ``model`` (or :data:`Policy`).

    Unknown fields are ignored and logged once per model and field; anything else raises
    :class:`InvalidRecord`.  The common case (nothing unknown) costs one validation.
    """
    return read_record_dropping(model, data, what=what)[0]


def read_record_dropping(model: Any, data: Any, *, what: str | None = None) -> tuple[Any, bool]:
    """:func:`read_record`, and whether unknown fields were dropped (a writer that keeps
    the stored bytes re-encodes the value only then)."""
    name = what or _name(model)
    try:
        return _validate(model, data, "forbid"), False
    except ValidationError as exc:
        unknown = {
            re.sub(r"\[\d+\]", "[]", field_path(e["loc"]))
            for e in exc.errors(include_url=False)
            if e["type"] == "extra_forbidden"
        }
        if not unknown:
            raise InvalidRecord(name, _problems(exc)) from None
    try:
        value = _validate(model, data, "ignore")
    except ValidationError as exc:
        raise InvalidRecord(name, _problems(exc)) from None
    new = sorted(f for f in unknown if (name, f) not in _REPORTED_UNKNOWN)
    if new and len(_REPORTED_UNKNOWN) < _MAX_REPORTED_UNKNOWN:  # bounded: names come from etcd
        _REPORTED_UNKNOWN.update((name, f) for f in new)
        log.warning("record.unknown_fields_ignored", model=name, fields=new,
                    hint="written by a newer Isthmus; upgrade this component to use them")
    return value, True

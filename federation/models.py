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
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar, overload

import structlog
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

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
    action: Literal["ALLOW", "DENY", "AUDIT"] = "ALLOW"
    # Istio semantics: no rules with ALLOW matches nothing; rules=[{}] matches everything.
    rules: tuple[Rule, ...] = ()

    _v_name = field_validator("name")(lambda cls, v: _label(v, "policy name"))


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


# ---------------------------------------------------------------- what the watch carries


class Snapshot(_Model):
    """The whole federation config at one etcd revision."""

    revision: int = 0
    clusters: tuple[ClusterRecord, ...] = ()
    services: tuple[ExportedService, ...] = ()
    policies: tuple[AnyPolicy, ...] = ()
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

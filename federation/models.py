"""Shared data models: clusters, exported services, policies, the config snapshot.

These are used by all three packages (the federation service stores them in etcd as
JSON, the gateway builds its routes and policy decisions from them, the agent writes
them).  Their JSON form is stable API: it is what lives in etcd and what the watch
stream carries.  Add fields with defaults; never rename or repurpose one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
        return f"{self.name}.{self.namespace}.svc.cluster.local"

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


# ---------------------------------------------------------------- what the watch carries


class Snapshot(_Model):
    """The whole federation config at one etcd revision."""

    revision: int = 0
    clusters: tuple[ClusterRecord, ...] = ()
    services: tuple[ExportedService, ...] = ()
    policies: tuple[AuthorizationPolicy | RequestAuthentication, ...] = ()
    bundle_pem: str = ""
    crl_pem: str = ""


# ---------------------------------------------------------------- lenient reading

T = TypeVar("T")
_log = structlog.get_logger("federation.models")
_UNKNOWN_LOGGED: set[tuple[str, str]] = set()
_MAX_UNKNOWN_LOGGED = 1024


def read_lenient(validate: Callable[..., T], data: Any, what: str) -> T:
    """Validate a value read from etcd or the wire, ignoring unknown fields.

    ``validate`` is a model's ``model_validate_json``/``model_validate`` or a
    ``TypeAdapter``'s ``validate_json``/``validate_python``.  Unknown fields (from a newer
    writer) are logged once per field path and dropped; any other problem raises the
    :class:`pydantic.ValidationError` as usual, for the caller to skip the record.
    """
    try:
        return validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        if not errors or any(e["type"] != "extra_forbidden" for e in errors):
            raise
    for e in errors:
        field = ".".join(str(p) for p in e["loc"])
        if (what, field) not in _UNKNOWN_LOGGED and len(_UNKNOWN_LOGGED) < _MAX_UNKNOWN_LOGGED:
            _UNKNOWN_LOGGED.add((what, field))
            _log.info("record.unknown_field_ignored", record=what, field=field)
    return validate(data, extra="ignore")

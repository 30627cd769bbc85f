"""SPIFFE IDs and trust domains, validated per the SPIFFE ID spec.

Our naming scheme: the federation trust domain, e.g. ``isthmus.local``; each cluster's
trust domain ``<cluster>.<federation-domain>``; workloads
``spiffe://<cluster-td>/ns/<ns>/sa/<sa>``, a cluster's gateway and agent among them
(service accounts :data:`GATEWAY_SERVICE_ACCOUNT` and :data:`AGENT_SERVICE_ACCOUNT` in
:data:`SYSTEM_NAMESPACE`); operators
``spiffe://<federation-td>/admin/<name>``; the federation server
``spiffe://<federation-td>/federation``.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from ._errors import InvalidName, InvalidSpiffeId

MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255
_TD_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

# Where a cluster's Isthmus components run and the service accounts they run as: their
# SPIFFE IDs (gateway_id, agent_id) are built from these.  Stable API.
SYSTEM_NAMESPACE = "isthmus-system"
GATEWAY_SERVICE_ACCOUNT = "isthmus-gateway"
AGENT_SERVICE_ACCOUNT = "isthmus-agent"


def validate_trust_domain(td: str) -> str:
    """Return ``td`` if it is a valid trust domain name, else raise :class:`InvalidSpiffeId`."""
    if not td:
        raise InvalidSpiffeId("invalid trust domain: empty")
    if len(td) > MAX_TRUST_DOMAIN_LENGTH:
        raise InvalidSpiffeId(
            f"invalid trust domain {td!r}: longer than {MAX_TRUST_DOMAIN_LENGTH} characters"
        )
    bad = sorted(set(td) - _TD_CHARS)
    if bad:
        hint = " (trust domains are lowercase)" if any(c.isupper() for c in bad) else ""
        raise InvalidSpiffeId(
            f"invalid trust domain {td!r}: characters {''.join(bad)!r} are not allowed; "
            f"use lowercase letters, digits, '.', '-' and '_'{hint}"
        )
    return td


def validate_cluster_name(name: str) -> str:
    """A cluster (or admin) name must be a lowercase RFC 1123 label."""
    if not isinstance(name, str) or not _LABEL.match(name):
        raise InvalidName(
            f"invalid name {name!r}: use a lowercase RFC 1123 label — 1 to 63 characters "
            "from a-z, 0-9 and '-', starting and ending with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed ``spiffe://trust-domain/path`` identifier."""

    trust_domain: str
    path: str = ""

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        if self.path:
            _validate_path(self.path, str(self))

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        if not isinstance(value, str) or not value:
            raise InvalidSpiffeId("invalid SPIFFE ID: empty")
        if len(value.encode()) > MAX_ID_LENGTH:
            raise InvalidSpiffeId(
                f"invalid SPIFFE ID: longer than {MAX_ID_LENGTH} bytes ({len(value.encode())})"
            )
        if not value.startswith("spiffe://"):
            raise InvalidSpiffeId(
                f"invalid SPIFFE ID {value!r}: must start with 'spiffe://' (scheme is lowercase)"
            )
        rest = value[len("spiffe://") :]
        td, sep, path = rest.partition("/")
        if not td:
            raise InvalidSpiffeId(f"invalid SPIFFE ID {value!r}: missing trust domain")
        if "?" in value or "#" in value:
            raise InvalidSpiffeId(
                f"invalid SPIFFE ID {value!r}: query and fragment are not allowed"
            )
        if ":" in td or "@" in td:
            raise InvalidSpiffeId(
                f"invalid SPIFFE ID {value!r}: port and user info are not allowed"
            )
        try:
            validate_trust_domain(td)
        except InvalidSpiffeId as exc:
            raise InvalidSpiffeId(f"invalid SPIFFE ID {value!r}: {exc}") from None
        path = sep + path
        if path:
            _validate_path(path, value)
        return cls(td, path)

    def member_of(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain

    @property
    def segments(self) -> list[str]:
        return self.path.split("/")[1:] if self.path else []

    @property
    def namespace(self) -> str | None:
        """``<ns>`` of a ``/ns/<ns>/sa/<sa>`` workload ID, else None."""
        s = self.segments
        return s[1] if len(s) == 4 and s[0] == "ns" and s[2] == "sa" else None

    @property
    def service_account(self) -> str | None:
        s = self.segments
        return s[3] if len(s) == 4 and s[0] == "ns" and s[2] == "sa" else None


def _validate_path(path: str, whole: str) -> None:
    if path == "/":
        raise InvalidSpiffeId(f"invalid SPIFFE ID {whole!r}: path must not end with '/'")
    for seg in path.split("/")[1:]:
        if seg == "":
            raise InvalidSpiffeId(f"invalid SPIFFE ID {whole!r}: empty path segment")
        if seg in (".", ".."):
            raise InvalidSpiffeId(f"invalid SPIFFE ID {whole!r}: '.' and '..' segments are not allowed")
        bad = sorted(set(seg) - _SEGMENT_CHARS)
        if bad:
            raise InvalidSpiffeId(
                f"invalid SPIFFE ID {whole!r}: characters {''.join(bad)!r} are not allowed in the "
                "path; use letters, digits, '.', '-' and '_'"
            )


def cluster_trust_domain(cluster: str, federation_td: str) -> str:
    return f"{validate_cluster_name(cluster)}.{validate_trust_domain(federation_td)}"


def workload_id(cluster_td: str, namespace: str, service_account: str) -> SpiffeId:
    return SpiffeId(cluster_td, f"/ns/{namespace}/sa/{service_account}")


def gateway_id(cluster_td: str) -> SpiffeId:
    return workload_id(cluster_td, SYSTEM_NAMESPACE, GATEWAY_SERVICE_ACCOUNT)


def agent_id(cluster_td: str) -> SpiffeId:
    return workload_id(cluster_td, SYSTEM_NAMESPACE, AGENT_SERVICE_ACCOUNT)


def admin_id(federation_td: str, name: str) -> SpiffeId:
    return SpiffeId(federation_td, f"/admin/{validate_cluster_name(name)}")


def federation_server_id(federation_td: str) -> SpiffeId:
    return SpiffeId(federation_td, "/federation")

"""ConfigState: everything the gateway derives from one federation snapshot.

Theory of operation
-------------------
A snapshot (:class:`federation.models.Snapshot`) is turned into one immutable
:class:`ConfigState` by :func:`build_state`, in one place: the route table, the compiled
policies, the revocation list mapped onto the clusters' CAs, the revision and where the
snapshot came from.  Building is pure and may be slow (tens of milliseconds for
thousands of services and hundreds of policies), so the gateway runs it in a worker
thread and only the swap — one attribute assignment — happens on the event loop.

Every request reads ``gateway.state`` once and uses that object to its end, so a request
never sees routes of one revision and policies of another, and a stream in flight keeps
the state it started with whatever is applied meanwhile.  The admin endpoint reads the
same object, so ``/config`` always describes one revision.

A snapshot that cannot be built raises :class:`~gateway._errors.SnapshotRejected`; the
gateway then keeps its previous state (see :meth:`gateway.Gateway.apply_snapshot`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509

import trust
from federation.models import Snapshot

from ._authz import Authz, PolicyState
from ._routes import RouteTable, build_routes

log = structlog.get_logger("isthmus.gateway")


@dataclass(frozen=True, slots=True)
class Rejected:
    """The last snapshot the gateway could not build."""

    revision: int
    reason: str
    source: str
    at: float  # unix time


@dataclass(frozen=True, slots=True)
class ConfigState:
    """The config in force: built whole from one snapshot, swapped whole."""

    revision: int
    source: str  # "none", "file", "last-known-good" or "federation"
    snapshot: Snapshot | None
    routes: RouteTable
    policy: PolicyState
    revocations: trust.Revocations
    applied_at: float  # unix time

    @property
    def ready(self) -> bool:
        return self.snapshot is not None

    def document(self) -> dict[str, Any]:
        """The state as the admin endpoint's ``/config`` shows it."""
        snap, policy, routes = self.snapshot, self.policy, self.routes
        return {
            "revision": snap.revision if snap is not None else None,
            "source": self.source,
            "policy_revision": policy.revision,
            "policies": {"count": len(policy), "digest": policy.digest,
                         "failed_closed": policy.failed},
            "snapshot": snap.model_dump(mode="json") if snap is not None else None,
            "routes": {
                "outbound": sorted(f"{h}:{p}" for (h, p) in routes.outbound if p is not None),
                "inbound": sorted({f"{h}:{p}" for (h, p) in routes.inbound if p is not None}),
                "peers": sorted(p.name for p in routes.peers_by_td.values()),
            },
        }


def empty_state(cluster: str, dns_suffix: str, authz: Authz) -> ConfigState:
    """What a gateway holds before any snapshot: no routes, no policies, not ready."""
    return ConfigState(0, "none", None, RouteTable(0, cluster, dns_suffix), authz.compile(None),
                       trust.Revocations(), time.time())


def build_state(snap: Snapshot, source: str, *, cluster: str, dns_suffix: str,
                crl_file: Path | None, authz: Authz, previous: ConfigState,
                bundle_file: Path | None = None) -> ConfigState:
    """The state of ``snap`` for ``cluster``'s gateway (pure; safe in a worker thread).

    Raises :class:`~gateway._errors.SnapshotRejected` if the snapshot cannot be built.
    """
    routes = build_routes(snap, cluster, dns_suffix)
    return ConfigState(snap.revision, source, snap, routes, authz.compile(snap),
                       _revocations(snap, crl_file, bundle_file, previous.revocations), time.time())


def _revocations(snap: Snapshot, crl_file: Path | None, bundle_file: Path | None,
                 previous: trust.Revocations) -> trust.Revocations:
    crl = snap.crl_pem.encode() if snap.crl_pem else b""
    if not crl and crl_file is not None and crl_file.exists():
        crl = crl_file.read_bytes()
    intermediates: list[x509.Certificate] = []
    for c in snap.clusters:
        # A re-joined cluster's earlier CAs are revoked: map the CRL onto them too.
        for pem in (c.ca_cert_pem, *c.previous_ca_certs_pem):
            if not pem:
                continue
            try:
                intermediates.extend(x509.load_pem_x509_certificates(pem.encode()))
            except ValueError:
                log.warning("config.bad_cluster_ca", cluster=c.name)
    try:
        # Only a CRL signed by a root our TLS trusts (the bundle file) counts; a bad one
        # is refused and the last good revocations stay.
        roots = trust.load_certs(bundle_file, "trust bundle") if crl and bundle_file is not None else None
        return trust.Revocations.from_crl(crl or None, intermediates, roots)
    except trust.TrustError as exc:
        log.warning("config.bad_crl", error=str(exc))
        return previous


__all__ = ["ConfigState", "Rejected", "build_state", "empty_state"]

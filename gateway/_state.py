"""ConfigState: everything the gateway derives from one federation snapshot.

Theory of operation
-------------------
A snapshot (:class:`federation.models.Snapshot`) is turned into one immutable
:class:`ConfigState` by :func:`build_state`, in one place: the route table, the compiled
TrafficRoutes (:func:`federation.traffic.compile_routes`), the compiled policies, the
revocation list mapped onto the clusters' CAs, the revision and where the snapshot came
from.  Building is pure and may be slow (tens of milliseconds for
thousands of services and hundreds of policies), so the gateway runs it in a worker
thread and only the swap — one attribute assignment — happens on the event loop.

Every request reads ``gateway.state`` once and uses that object to its end, so a request
never sees the route table of one revision and TrafficRoutes or policies of another, and a stream in flight keeps
the state it started with whatever is applied meanwhile.  The admin endpoint reads the
same object, so ``/config`` always describes one revision.

A snapshot that cannot be built (a TrafficRoute that does not compile included) raises
:class:`~gateway._errors.SnapshotRejected`; the gateway then keeps its previous state
(see :meth:`gateway.Gateway.apply_snapshot`).

Deltas
------
A watch delta changes a record or two of tens of thousands, so a state is derived from
the one in force rather than built from nothing: a
:class:`~federation.snapshot_index.ServiceIndex` says which ``(namespace, name)`` groups
of services changed (from the tracker's steps, else by identity), the route table and the
compiled TrafficRoutes replace only those groups' entries in their
:class:`~federation.snapshot_index.CowMap` tables (sharing the rest with the previous
state, which stays as it was for the requests still holding it), and the revocations,
guards and tracing settings are reused when nothing they are made of changed.  A change
of clusters or routes, or more than :data:`FULL_ABOVE` changed services, builds from
scratch.  Either way the result is the state a build from scratch makes
(tests/gateway/test_config_deltas.py checks it on random deltas); a delta that fails to
build is rejected as before, and the next one derives from the state still in force.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509

import trust
from federation.models import Snapshot
from federation.snapshot_index import CowMap, ServiceIndex
from federation.traffic import RouteSet, compile_routes

from ._authz import Authz, PolicyState
from ._errors import SnapshotRejected
from ._guards import EMPTY_PLAN, GuardPlan, compile_guards
from ._routes import RouteTable, build_routes

# More changed services than this in one build: index them from scratch (cheaper than
# patching group by group, and the same result).
FULL_ABOVE = 5000
from ._tracing import TracingSettings, effective_settings

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
    traffic: RouteSet  # the TrafficRoutes, compiled for this cluster
    policy: PolicyState
    revocations: trust.Revocations
    applied_at: float  # unix time
    guards: GuardPlan = EMPTY_PLAN  # timeouts, retries, faults, TrafficPolicies (gateway/_guards.py)
    # Span export: the gateway config's tracing with the snapshot's Telemetry documents
    # applied (None: the gateway config's alone).
    tracing: TracingSettings | None = None
    # What the next build compares with to reuse parts (see build_state).
    tracing_base: TracingSettings | None = field(default=None, compare=False, repr=False)
    revocation_inputs: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    @property
    def ready(self) -> bool:
        return self.snapshot is not None

    def document(self) -> dict[str, Any]:
        """The state as the admin endpoint's ``/config`` shows it."""
        snap, policy, routes, traffic = self.snapshot, self.policy, self.routes, self.traffic
        return {
            "revision": snap.revision if snap is not None else None,
            "source": self.source,
            "policy_revision": policy.revision,
            "policies": {"count": len(policy), "digest": policy.digest,
                         "failed_closed": policy.failed},
            "route_revision": traffic.revision,
            "traffic_policies": {"count": len(self.guards.services), "digest": self.guards.digest},
            "traffic_routes": {"count": len(traffic), "names": traffic.names,
                               "digest": traffic.digest},
            "stale_clusters": {c: out.describe() for c, out in sorted(traffic.stale.items())},
            "snapshot": snap.model_dump(mode="json") if snap is not None else None,
            "routes": {
                "outbound": sorted(f"{h}:{p}" for (h, p) in routes.outbound if p is not None),
                "inbound": sorted({f"{h}:{p}" for (h, p) in routes.inbound if p is not None}),
                "peers": sorted(p.name for p in routes.peers_by_td.values()),
            },
        }


def empty_state(cluster: str, dns_suffix: str, authz: Authz) -> ConfigState:
    """What a gateway holds before any snapshot: no routes, no policies, not ready."""
    return ConfigState(0, "none", None, RouteTable(0, cluster, dns_suffix),
                       RouteSet.empty(cluster, dns_suffix), authz.compile(None), trust.Revocations(),
                       time.time())


def build_state(snap: Snapshot, source: str, *, cluster: str, dns_suffix: str,
                crl_file: Path | None, authz: Authz, previous: ConfigState,
                bundle_file: Path | None = None,
                tracing: TracingSettings = TracingSettings()) -> ConfigState:
    """The state of ``snap`` for ``cluster``'s gateway (pure; safe in a worker thread).

    Derived from ``previous`` (see "Deltas" in the module doc): what did not change is
    shared with it, so a delta costs what it changed, and the result is the state a build
    from scratch makes.  Raises :class:`~gateway._errors.SnapshotRejected` if the snapshot
    cannot be built.
    """
    prior = previous.routes.index
    index = ServiceIndex.of(snap.services, prior, full_above=FULL_ABOVE)
    routes = build_routes(snap, cluster, dns_suffix, index, previous.routes)
    try:
        traffic = compile_routes(snap, cluster, dns_suffix, index, previous.traffic)
    except ValueError as exc:  # RouteConflict too: a route that cannot be compiled
        raise SnapshotRejected(f"traffic routes: {exc}") from None
    prev = previous.snapshot
    same_routes = prev is not None and prev.routes == snap.routes
    guards = previous.guards if same_routes and prev.traffic_policies == snap.traffic_policies else compile_guards(snap)
    tracing_settings = (previous.tracing if prev is not None and previous.tracing_base == tracing
                        and prev.telemetry == snap.telemetry
                        else effective_settings(tracing, snap.telemetry, cluster))
    return ConfigState(snap.revision, source, snap, routes, traffic, authz.compile(snap),
                       _revocations(snap, crl_file, bundle_file, previous), time.time(),
                       guards, tracing=tracing_settings, tracing_base=tracing,
                       revocation_inputs=_revocation_inputs(snap, crl_file, bundle_file))


def retire(box: list[ConfigState]) -> None:
    """Free the state in ``box`` piecemeal (call it in a worker thread, after the swap).

    Freeing a big table at once is one C call (the dict's deallocation frees every entry
    in turn) that holds the GIL for its whole length: ~10 ms for 50,000 routes, a stall
    of the event loop no switch interval can shorten.  Taking a table apart in steps (a
    dict entry by entry, a :class:`~federation.snapshot_index.CowMap` shard by shard;
    shards the new state shares stay alive) frees the same objects in small steps the
    interpreter can switch between.  Only a table nobody else still holds is taken apart
    (a request keeps the routes it started with).
    """
    state = box.pop()
    for name in ("outbound", "inbound"):
        table = getattr(state.routes, name)
        # References: the RouteTable's field, ``table`` and getrefcount's argument.
        if sys.getrefcount(table) <= 3:
            if isinstance(table, CowMap):
                table.take_apart()
            else:
                while table:
                    table.popitem()
    del state


def _file_stamp(path: Path | None) -> tuple[int, int, int] | None:
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino) if st is not None else None


def _revocation_inputs(snap: Snapshot, crl_file: Path | None, bundle_file: Path | None) -> tuple[Any, ...]:
    """Everything the revocations are made of: equal inputs, equal revocations."""
    return (snap.crl_pem, tuple((c.name, c.ca_cert_pem, c.previous_ca_certs_pem) for c in snap.clusters),
            crl_file, _file_stamp(crl_file), bundle_file, _file_stamp(bundle_file))


def _revocations(snap: Snapshot, crl_file: Path | None, bundle_file: Path | None,
                 previous: ConfigState) -> trust.Revocations:
    if previous.snapshot is not None and previous.revocation_inputs == _revocation_inputs(snap, crl_file, bundle_file):
        return previous.revocations  # nothing it is made of changed
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
        return previous.revocations


__all__ = ["ConfigState", "Rejected", "build_state", "empty_state", "retire"]

"""Routing table: which names a cluster's gateway answers and where they lead.

Naming scheme (stable API — workloads and the agent's mirror Services use these names):

* Inbound, at the exporting cluster's gateway: a peer gateway names the service exactly as
  the exporting cluster knows it, ``<svc>.<ns>.svc.cluster.local[:port]`` (as ``:authority``
  or the CONNECT target).  Nothing that is not exported (to the calling cluster) resolves.
* Outbound, at the importing cluster's gateway (``dns_suffix`` defaults to
  ``isthmus.local``):

  - ``<svc>.<ns>.<cluster>.<dns_suffix>[:port]`` — the service as exported by one source
    cluster;
  - ``<svc>.<ns>.<dns_suffix>[:port]`` — the federated name, spread across every cluster
    that exports ``<ns>/<svc>`` to us.

  - the Kubernetes agent's mirror Services, as a workload calls them:
    ``<svc>--<cluster>.<ns>[.svc[.cluster.local]][:port]`` for one source cluster and
    ``<svc>--isthmus.<ns>[.svc[.cluster.local]][:port]`` for the federated name (the agent's
    scheme, ``federation/names.py``; a mirror's endpoints are this listener).

  Without a port the service's only port is meant; with several ports, port 80 if it has
  one, else its first port.  The label count tells the two forms apart (2 vs 3 labels in
  front of the suffix), which is why namespaces and services are single DNS labels.

  A per-cluster name is a pin: it leads to its cluster, whatever routes say.  Where a
  federated name leads, request by request, is :mod:`federation.traffic`'s decision (its
  TrafficRoute, or an even spread over the healthy exporting clusters).

:func:`build_routes` is pure: a :class:`~federation.models.Snapshot` and the local cluster
name in, a :class:`RouteTable` out (or :class:`~gateway._errors.SnapshotRejected`); the
gateway swaps whole tables atomically (:mod:`gateway._state`), so a request sees one
revision from start to end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from federation.models import ClusterRecord, ExportedService, ServicePort, Snapshot
from federation.names import DNS_SUFFIX as DEFAULT_DNS_SUFFIX
from federation.names import LOCAL_SUFFIX, service_hosts, split_authority
from federation.snapshot_index import CowMap, ServiceIndex
from federation.traffic import default_port

from ._errors import SnapshotRejected


@dataclass(frozen=True, slots=True)
class PeerCluster:
    """A joined, non-revoked cluster other than ours, as a destination."""

    name: str
    trust_domain: str
    addresses: tuple[str, ...]


class Destination(NamedTuple):
    """Where one request (or TCP connection) goes: a peer cluster's gateway, naming the
    service as that cluster knows it."""

    peer: PeerCluster
    authority: str  # what the peer's inbound listener expects as :authority
    destination_service: str  # <svc>.<ns>.svc.cluster.local
    port: int
    route: str = ""  # the TrafficRoute that chose it ("" : none)
    rule: int | None = None  # that route's rule index


@dataclass(frozen=True, slots=True)
class OutboundRoute:
    namespace: str
    service: str
    port: int
    protocol: str
    # Clusters exporting the service to us, each with its gateway addresses.
    clusters: tuple[PeerCluster, ...]
    # What the peer's inbound listener expects as :authority.
    authority: str
    # The federated name (routed by federation.traffic); else a per-cluster pin.
    federated: bool = False

    @property
    def destination_service(self) -> str:
        return f"{self.service}.{self.namespace}.{LOCAL_SUFFIX}"

    @property
    def pin(self) -> Destination:
        """A per-cluster name's one destination."""
        return Destination(self.clusters[0], self.authority, self.destination_service, self.port)


@dataclass(frozen=True, slots=True)
class LocalTarget:
    """An exported local service port, as the inbound listener reaches it."""

    namespace: str
    service: str
    port: int
    protocol: str
    host: str
    target_port: int
    tls: bool
    export_to: tuple[str, ...]

    def visible_to(self, cluster: str) -> bool:
        return not self.export_to or cluster in self.export_to

    @property
    def destination_service(self) -> str:
        return f"{self.service}.{self.namespace}.{LOCAL_SUFFIX}"


@dataclass(frozen=True, slots=True)
class RouteTable:
    revision: int
    local_cluster: str
    dns_suffix: str = DEFAULT_DNS_SUFFIX
    # (host, port or None) -> route; the None entry is the default port.  Built as
    # CowMaps (federation/snapshot_index.py): a change copies only what it touches.
    outbound: Mapping[tuple[str, int | None], OutboundRoute] = field(default_factory=dict)
    inbound: Mapping[tuple[str, int | None], LocalTarget] = field(default_factory=dict)
    # trust domain -> peer cluster, for every joined, non-revoked cluster but ours.
    peers_by_td: dict[str, PeerCluster] = field(default_factory=dict)
    # the same peers by cluster name
    peers_by_name: dict[str, PeerCluster] = field(default_factory=dict)
    # What the next build derives from (gateway/_state.py): the services it was built
    # from, and whether an entry of one (namespace, name) replaced another's (then the
    # next build is a full one).
    index: ServiceIndex | None = field(default=None, compare=False, repr=False)
    shadowed: bool = field(default=False, compare=False, repr=False)

    def outbound_route(self, authority: str) -> OutboundRoute | None:
        host, port = split_authority(authority)
        return self.outbound.get((host, port))

    def inbound_target(self, authority: str) -> LocalTarget | None:
        host, port = split_authority(authority)
        return self.inbound.get((host, port))

    def peer(self, trust_domain: str) -> PeerCluster | None:
        return self.peers_by_td.get(trust_domain)

    def trust_domains(self) -> frozenset[str]:
        return frozenset(self.peers_by_td)


def _target(svc: ExportedService, p: ServicePort) -> tuple[str, int]:
    if not p.target:
        return svc.hostname, p.port
    host, sep, port = p.target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SnapshotRejected(
            f"service {svc.namespace}/{svc.name} of cluster {svc.cluster!r}, port {p.port}: "
            f"target {p.target!r} is not HOST:PORT")
    return host, int(port)


def build_routes(
    snapshot: Snapshot, local_cluster: str, dns_suffix: str = DEFAULT_DNS_SUFFIX,
    index: ServiceIndex | None = None, previous: RouteTable | None = None,
) -> RouteTable:
    """The routing table of ``local_cluster``'s gateway for ``snapshot``.

    ``index``: the snapshot's :class:`~federation.snapshot_index.ServiceIndex`; when it was
    derived from ``previous``'s index (and the clusters, the cluster and the suffix are
    the same), only the entries of the changed ``(namespace, name)`` groups are rebuilt
    and the rest is shared with ``previous``: the same table a full build makes.
    """
    peers: dict[str, PeerCluster] = {}
    by_name: dict[str, PeerCluster] = {}
    for c in snapshot.clusters:
        if c.revoked or c.name == local_cluster:
            continue
        pc = _peer(c)
        peers[c.trust_domain] = pc
        by_name[c.name] = pc
    if index is None:
        index = ServiceIndex.of(snapshot.services)
    if (previous is not None and index.derived_from(previous.index) and not previous.shadowed
            and previous.local_cluster == local_cluster and previous.dns_suffix == dns_suffix
            and previous.peers_by_name == by_name):
        table = _update_routes(snapshot.revision, index, previous, previous.peers_by_td,
                               previous.peers_by_name)
        if table is not None:
            return table
    return _full_routes(snapshot, local_cluster, dns_suffix, index, peers, by_name)


def _full_routes(snapshot: Snapshot, local_cluster: str, dns_suffix: str, index: ServiceIndex,
                 peers: dict[str, PeerCluster], by_name: dict[str, PeerCluster]) -> RouteTable:
    outbound: dict[tuple[str, int | None], OutboundRoute] = {}
    inbound: dict[tuple[str, int | None], LocalTarget] = {}
    shadowed = False  # an entry of one (namespace, name) replaced another's

    def put(table: dict[tuple[str, int | None], Any], entries: _Entries) -> None:
        nonlocal shadowed
        for key, value in entries:
            old = table.get(key)
            if old is not None and (old.namespace, old.service) != (value.namespace, value.service):
                shadowed = True
            table[key] = value

    # Sorted so that the same snapshot always yields the same table (and spread order);
    # every cluster's names first, then the federated names, as a later entry wins.
    federated: list[_Entries] = []
    for g in sorted(index.groups):
        i, o, f = _group_entries(index.groups[g], local_cluster, dns_suffix, by_name)
        put(inbound, i)
        put(outbound, o)
        federated.append(f)
    for f in federated:
        put(outbound, f)
    return RouteTable(snapshot.revision, local_cluster, dns_suffix, CowMap(outbound), CowMap(inbound),
                      peers, by_name, index=index, shadowed=shadowed)


_Entries = list[tuple[tuple[str, int | None], Any]]


def _group_entries(members: Mapping[str, ExportedService], local_cluster: str, dns_suffix: str,
                   by_name: Mapping[str, PeerCluster]) -> tuple[_Entries, _Entries, _Entries]:
    """The entries of one (namespace, name), its records in cluster order: inbound (the
    local cluster's record), outbound by each peer cluster's names, and outbound by the
    federated name (every visible peer's record, one route per port)."""
    inbound: _Entries = []
    outbound: _Entries = []
    federated: dict[int, list[PeerCluster]] = {}
    fed_ports: dict[int, ServicePort] = {}
    ns = name = ""
    for svc in members.values():
        if not svc.ports:
            continue
        ns, name = svc.namespace, svc.name
        default = default_port(svc.ports)
        if svc.cluster == local_cluster:
            for p in svc.ports:
                host, tport = _target(svc, p)
                t = LocalTarget(svc.namespace, svc.name, p.port, p.protocol, host, tport,
                                p.target_tls == "mtls", svc.export_to)
                inbound.append(((svc.hostname, p.port), t))
                if p is default:
                    inbound.append(((svc.hostname, None), t))
            continue
        pc = by_name.get(svc.cluster)
        if pc is None or not svc.visible_to(local_cluster):
            continue
        hosts = service_hosts(svc.name, svc.namespace, svc.cluster, dns_suffix)
        for p in svc.ports:
            r = OutboundRoute(svc.namespace, svc.name, p.port, p.protocol, (pc,),
                              f"{svc.hostname}:{p.port}")
            _add(outbound, hosts, p, default, r)
            federated.setdefault(p.port, []).append(pc)
            fed_ports[p.port] = p
    fed: _Entries = []
    if fed_ports:
        hosts = service_hosts(name, ns, None, dns_suffix)
        plist = tuple(fed_ports.values())
        default = default_port(plist)
        for p in plist:
            r = OutboundRoute(ns, name, p.port, p.protocol, tuple(federated[p.port]),
                              f"{name}.{ns}.{LOCAL_SUFFIX}:{p.port}", federated=True)
            _add(fed, hosts, p, default, r)
    return inbound, outbound, fed


def _add(entries: _Entries, hosts: Iterable[str], p: ServicePort, default: ServicePort | None,
         r: OutboundRoute) -> None:
    for host in hosts:
        entries.append(((host, p.port), r))
        if p is default:
            entries.append(((host, None), r))


def _update_routes(revision: int, index: ServiceIndex, previous: RouteTable,
                   peers: dict[str, PeerCluster], by_name: dict[str, PeerCluster]) -> RouteTable | None:
    """``previous`` with the entries of ``index.changed`` rebuilt; None when a new entry
    would replace another (namespace, name)'s (a full build decides those)."""
    assert previous.index is not None and index.changed is not None
    if not index.changed:
        return RouteTable(revision, previous.local_cluster, previous.dns_suffix, previous.outbound,
                          previous.inbound, peers, by_name, index=index)
    local, suffix = previous.local_cluster, previous.dns_suffix
    in_old: list[tuple[str, int | None]] = []
    out_old: list[tuple[str, int | None]] = []
    in_new: _Entries = []
    out_new: _Entries = []
    for g in sorted(index.changed):  # entries in group order, as a full build puts them
        before = previous.index.groups.get(g)
        if before:
            i, o, f = _group_entries(before, local, suffix, by_name)
            in_old.extend(k for k, _ in i)
            out_old.extend(k for k, _ in o + f)
        after = index.groups.get(g)
        if after:
            i, o, f = _group_entries(after, local, suffix, by_name)
            in_new.extend(i)
            out_new.extend(o + f)
    inbound = previous.inbound.evolve(in_old)
    outbound = previous.outbound.evolve(out_old)
    for table, entries in ((inbound, in_new), (outbound, out_new)):
        owners: dict[tuple[str, int | None], tuple[str, str]] = {}
        for k, v in entries:
            owner = (v.namespace, v.service)
            old = table.get(k)
            if (old is not None and (old.namespace, old.service) != owner) or owners.setdefault(k, owner) != owner:
                return None
    return RouteTable(revision, local, suffix, outbound.evolve(put=out_new), inbound.evolve(put=in_new),
                      peers, by_name, index=index)


def _peer(c: ClusterRecord) -> PeerCluster:
    return PeerCluster(c.name, c.trust_domain, tuple(c.gateway_addresses))


__all__ = ["Destination", "LocalTarget", "OutboundRoute", "PeerCluster", "RouteTable", "build_routes",
           "split_authority"]

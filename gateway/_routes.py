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

:func:`build_routes` is pure: a :class:`~federation.models.Snapshot` and the local cluster
name in, a :class:`RouteTable` out (or :class:`~gateway._errors.SnapshotRejected`); the
gateway swaps whole tables atomically (:mod:`gateway._state`), so a request sees one
revision from start to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from federation.models import ClusterRecord, ExportedService, ServicePort, Snapshot
from federation.names import DNS_SUFFIX as DEFAULT_DNS_SUFFIX
from federation.names import LOCAL_SUFFIX, mirror_hosts

from ._errors import SnapshotRejected


@dataclass(frozen=True, slots=True)
class PeerCluster:
    """A joined, non-revoked cluster other than ours, as a destination."""

    name: str
    trust_domain: str
    addresses: tuple[str, ...]


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

    @property
    def destination_service(self) -> str:
        return f"{self.service}.{self.namespace}.{LOCAL_SUFFIX}"


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
    # (host, port or None) -> route; the None entry is the default port.
    outbound: dict[tuple[str, int | None], OutboundRoute] = field(default_factory=dict)
    inbound: dict[tuple[str, int | None], LocalTarget] = field(default_factory=dict)
    # trust domain -> peer cluster, for every joined, non-revoked cluster but ours.
    peers_by_td: dict[str, PeerCluster] = field(default_factory=dict)

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


def split_authority(authority: str) -> tuple[str, int | None]:
    """``host[:port]`` -> (lowercase host without a trailing dot, port or None)."""
    host, sep, port = authority.rpartition(":")
    # ASCII digits only: str.isdigit() also accepts "²" (which int() refuses) and "١٢"
    if not sep or not (port.isascii() and port.isdigit()):
        host, port = authority, ""
    host = host.lower().rstrip(".")
    return host, (int(port) if port else None)


def _default_port(ports: tuple[ServicePort, ...]) -> ServicePort:
    for p in ports:
        if p.port == 80:
            return p
    return ports[0]


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
    snapshot: Snapshot, local_cluster: str, dns_suffix: str = DEFAULT_DNS_SUFFIX
) -> RouteTable:
    """The routing table of ``local_cluster``'s gateway for ``snapshot``."""
    peers: dict[str, PeerCluster] = {}
    by_name: dict[str, PeerCluster] = {}
    for c in snapshot.clusters:
        if c.revoked or c.name == local_cluster:
            continue
        pc = _peer(c)
        peers[c.trust_domain] = pc
        by_name[c.name] = pc

    outbound: dict[tuple[str, int | None], OutboundRoute] = {}
    inbound: dict[tuple[str, int | None], LocalTarget] = {}
    federated: dict[tuple[str, str, int], list[PeerCluster]] = {}
    fed_ports: dict[tuple[str, str], dict[int, ServicePort]] = {}
    # Sorted so that the same snapshot always yields the same table (and spread order).
    for svc in sorted(snapshot.services, key=lambda s: (s.namespace, s.name, s.cluster)):
        if not svc.ports:
            continue
        if svc.cluster == local_cluster:
            default = _default_port(svc.ports)
            for p in svc.ports:
                host, tport = _target(svc, p)
                t = LocalTarget(svc.namespace, svc.name, p.port, p.protocol, host, tport,
                                p.target_tls == "mtls", svc.export_to)
                inbound[(svc.hostname, p.port)] = t
                if p is default:
                    inbound[(svc.hostname, None)] = t
            continue
        pc = by_name.get(svc.cluster)
        if pc is None or not svc.visible_to(local_cluster):
            continue
        hosts = (f"{svc.name}.{svc.namespace}.{svc.cluster}.{dns_suffix}",
                 *mirror_hosts(svc.name, svc.namespace, svc.cluster))
        default = _default_port(svc.ports)
        for p in svc.ports:
            r = OutboundRoute(svc.namespace, svc.name, p.port, p.protocol, (pc,),
                              f"{svc.hostname}:{p.port}")
            for host in hosts:
                outbound[(host, p.port)] = r
                if p is default:
                    outbound[(host, None)] = r
            federated.setdefault((svc.namespace, svc.name, p.port), []).append(pc)
            fed_ports.setdefault((svc.namespace, svc.name), {})[p.port] = p

    for (ns, name), ports in fed_ports.items():
        hosts = (f"{name}.{ns}.{dns_suffix}", *mirror_hosts(name, ns, None))
        plist = tuple(ports.values())
        default = _default_port(plist)
        for p in plist:
            r = OutboundRoute(ns, name, p.port, p.protocol,
                              tuple(federated[(ns, name, p.port)]),
                              f"{name}.{ns}.{LOCAL_SUFFIX}:{p.port}")
            for host in hosts:
                outbound[(host, p.port)] = r
                if p is default:
                    outbound[(host, None)] = r
    return RouteTable(snapshot.revision, local_cluster, dns_suffix, outbound, inbound, peers)


def _peer(c: ClusterRecord) -> PeerCluster:
    return PeerCluster(c.name, c.trust_domain, tuple(c.gateway_addresses))

"""The outbound listener answers the Kubernetes agent's mirror Service names."""

from __future__ import annotations

import pytest

from federation.models import ClusterRecord, ExportedService, ServicePort, Snapshot
from federation.names import mirror_name, outbound_host
from gateway._routes import build_routes


def _snapshot() -> Snapshot:
    clusters = tuple(
        ClusterRecord(name=c, trust_domain=f"{c}.isthmus.local", gateway_addresses=(f"10.0.0.{i}:15443",))
        for i, c in enumerate(("east", "west", "central"), start=1)
    )
    web = lambda c: ExportedService(cluster=c, namespace="shop", name="web",  # noqa: E731
                                    ports=(ServicePort(port=80), ServicePort(port=9090, protocol="GRPC")))
    return Snapshot(revision=7, clusters=clusters, services=(web("west"), web("central")))


@pytest.mark.parametrize("host", ["web--west.shop.svc.cluster.local", "web--west.shop.svc", "web--west.shop"])
@pytest.mark.parametrize("port", [None, 80, 9090])
def test_per_cluster_mirror_names_route_like_the_isthmus_name(host: str, port: int | None) -> None:
    table = build_routes(_snapshot(), "east")
    authority = host if port is None else f"{host}:{port}"
    canonical = outbound_host("web", "shop", "west") + ("" if port is None else f":{port}")
    got, want = table.outbound_route(authority), table.outbound_route(canonical)
    assert got is not None and got == want
    assert [c.name for c in got.clusters] == ["west"]


def test_federated_mirror_spreads_over_every_exporting_cluster() -> None:
    table = build_routes(_snapshot(), "east")
    r = table.outbound_route("web--isthmus.shop.svc.cluster.local:9090")
    assert r is not None and sorted(c.name for c in r.clusters) == ["central", "west"]
    assert r.protocol == "GRPC"


def test_mirror_of_a_service_not_exported_to_us_does_not_route() -> None:
    snap = _snapshot()
    only_central = ExportedService(cluster="west", namespace="shop", name="db", export_to=("central",),
                                   ports=(ServicePort(port=5432, protocol="TCP"),))
    snap = snap.model_copy(update={"services": (*snap.services, only_central)})
    assert build_routes(snap, "east").outbound_route("db--west.shop:5432") is None
    assert build_routes(snap, "central").outbound_route("db--west.shop:5432") is not None


def test_long_names_use_the_agents_hashed_form() -> None:
    long = "a" * 60
    snap = Snapshot(revision=1, clusters=(ClusterRecord(name="west", trust_domain="west.isthmus.local",
                                                        gateway_addresses=("10.0.0.2:15443",)),),
                    services=(ExportedService(cluster="west", namespace="ns", name=long, ports=(ServicePort(port=80),)),))
    m = mirror_name(long, "west")
    assert len(m) <= 63
    assert build_routes(snap, "east").outbound_route(f"{m}.ns.svc.cluster.local") is not None

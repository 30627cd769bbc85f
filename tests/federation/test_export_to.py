"""export_to is enforced where routes are built: the watch sends every service to every
gateway, and each gateway keeps only what is exported to its cluster (pure, no IO)."""

from __future__ import annotations

from federation.models import ClusterRecord, ExportedService, ServicePort, Snapshot
from gateway._routes import build_routes

SNAP = Snapshot(
    revision=7,
    clusters=tuple(
        ClusterRecord(name=n, trust_domain=f"{n}.isthmus.local", gateway_addresses=(f"10.0.0.{i}:15443",))
        for i, n in enumerate(("east", "west", "central"), 1)
    ),
    services=(
        ExportedService(cluster="east", namespace="shop", name="cart", ports=(ServicePort(port=80),), export_to=("west",)),
        ExportedService(cluster="east", namespace="shop", name="web", ports=(ServicePort(port=80),)),
    ),
)
HOSTS = ("cart.shop.east.isthmus.global", "cart.shop.isthmus.global")


def test_service_exported_only_to_west_is_not_routable_from_central() -> None:
    central = build_routes(SNAP, "central", "isthmus.global")
    west = build_routes(SNAP, "west", "isthmus.global")
    for host in HOSTS:  # per-cluster name and federated name
        assert central.outbound_route(f"{host}:80") is None
        assert central.outbound_route(host) is None
        route = west.outbound_route(f"{host}:80")
        assert route is not None and [p.name for p in route.clusters] == ["east"]
    # Exported to everyone: both see it.
    assert central.outbound_route("web.shop.east.isthmus.global:80") is not None
    assert west.outbound_route("web.shop.east.isthmus.global:80") is not None


def test_exporting_gateway_refuses_clusters_outside_export_to() -> None:
    """Second line of defence: east's inbound target knows who may call it."""
    east = build_routes(SNAP, "east", "isthmus.global")
    target = east.inbound_target("cart.shop.svc.cluster.local:80")
    assert target is not None
    assert target.visible_to("west") and not target.visible_to("central")

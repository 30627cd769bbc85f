"""Table-driven tests of the agent's pure converters: objects in, decisions out, no server."""

from __future__ import annotations

from typing import Any

import pytest

from federation.agent import _names as n
from federation.agent._convert import (
    SPEC_HASH,
    ObjectRef,
    desired_exports,
    export_status,
    gateway_endpoints,
    parse_export_to,
    plan_mirrors,
    port_protocol,
)
from federation.models import ClusterRecord, ExportedService, ServicePort, Snapshot
from federation.names import SYSTEM_NAMESPACE, mirror_name


def svc(name: str, ns: str = "shop", *, ann: dict[str, str] | None = None, labels: dict[str, str] | None = None,
        ports: list[dict[str, Any]] | None = None, type_: str = "ClusterIP") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "annotations": ann or {}, "labels": labels or {}},
        "spec": {"type": type_, "ports": ports if ports is not None else [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }


def eps(service: str, ns: str = "shop", *, ready: list[bool | None], name: str | None = None, base: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"name": name or f"{service}-abc", "namespace": ns, "labels": {n.SERVICE_NAME_LABEL: service}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [f"10.0.0.{base + i}"], **({} if r is None else {"conditions": {"ready": r}})}
            for i, r in enumerate(ready)
        ],
    }


def sexport(name: str, ns: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport", "metadata": {"name": name, "namespace": ns}}


EXPORT = {n.EXPORT: "true"}


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        ({"name": "http", "port": 80}, "HTTP"),
        ({"name": "http-web", "port": 80}, "HTTP"),
        ({"name": "grpc-api", "port": 9090}, "GRPC"),
        ({"name": "http2", "port": 80}, "HTTP2"),
        ({"name": "httpx", "port": 80}, "TCP"),  # only the exact prefix plus '-' counts (Istio)
        ({"name": "", "port": 5432}, "TCP"),
        ({"name": "web", "port": 80, "appProtocol": "grpc"}, "GRPC"),
        ({"name": "grpc", "port": 80, "appProtocol": "kubernetes.io/h2c"}, "HTTP2"),  # appProtocol wins
        ({"name": "http", "port": 443, "appProtocol": "https"}, "TCP"),  # TLS passes through opaque
    ],
)
def test_port_protocol_from_app_protocol_then_name(port: dict[str, Any], expected: str) -> None:
    assert port_protocol(port) == expected


# (services, slices, serviceexports) -> (exported keys, refused keys with a fragment of the reason)
EXPORT_TABLE = [
    pytest.param([svc("web")], [], [], {}, {}, id="not-annotated-not-exported"),
    pytest.param([svc("web", ann=EXPORT)], [], [], {"shop/web": 0}, {}, id="annotated"),
    pytest.param([svc("web")], [], [sexport("web")], {"shop/web": 0}, {}, id="service-export"),
    pytest.param([svc("web", ann={n.EXPORT: "false"})], [], [sexport("web")], {}, {}, id="explicit-false-wins"),
    pytest.param([], [], [sexport("web")], {}, {}, id="service-export-without-service"),
    pytest.param([svc("web", ns="other")], [], [sexport("web")], {}, {}, id="service-export-other-namespace"),
    pytest.param([svc("web", ann={n.EXPORT: "yes"})], [], [], {}, {"shop/web": 'must be "true" or "false"'}, id="bad-value"),
    pytest.param([svc("web", ann=EXPORT)], [eps("web", ready=[True, None, False])], [], {"shop/web": 2}, {}, id="ready-count"),
    pytest.param(
        [svc("web", ann=EXPORT)],
        [eps("web", ready=[True]), eps("web", ready=[True, True], name="web-def", base=2), eps("api", ready=[True])],
        [], {"shop/web": 3}, {}, id="ready-count-across-slices",
    ),
    pytest.param(
        [svc("dns", ann=EXPORT, ports=[{"name": "dns", "port": 53, "protocol": "UDP"}])], [], [],
        {}, {"shop/dns": "no TCP ports to export (skipped 53/UDP)"}, id="udp-only-refused",
    ),
    pytest.param([svc("ext", ann=EXPORT, type_="ExternalName")], [], [], {}, {"shop/ext": "ExternalName"}, id="external-name"),
    pytest.param(
        [svc("web--west", ann=EXPORT, labels={n.MIRRORED_FROM: "west", n.MANAGED_BY: n.AGENT})], [], [],
        {}, {"shop/web--west": "mirror"}, id="mirror-never-re-exported",
    ),
    pytest.param([svc("gw", ns="isthmus-system", ann=EXPORT)], [], [], {}, {"isthmus-system/gw": "isthmus-system"}, id="system-ns"),
    pytest.param(
        [svc("web", ann={**EXPORT, n.EXPORT_TO: "West"})], [], [], {}, {"shop/web": "not a cluster name"}, id="bad-export-to",
    ),
]


@pytest.mark.parametrize(("services", "slices", "ses", "exported", "refused"), EXPORT_TABLE)
def test_desired_exports(services, slices, ses, exported, refused) -> None:  # type: ignore[no-untyped-def]
    plan = desired_exports("east", services, slices, ses)
    assert {k: e.ready_endpoints for k, e in plan.exports.items()} == exported
    assert set(plan.refused) == set(refused)
    for key, fragment in refused.items():
        assert fragment in plan.refused[key]


def test_export_carries_ports_protocols_and_export_to() -> None:
    s = svc("web", ann={**EXPORT, n.EXPORT_TO: " west, central,west "}, ports=[
        {"name": "grpc", "port": 9090, "protocol": "TCP"},
        {"name": "http", "port": 80},
        {"name": "stats", "port": 9125, "protocol": "UDP"},
    ])
    (e,) = desired_exports("east", [s], [], []).exports.values()
    assert e == ExportedService(
        cluster="east", namespace="shop", name="web", export_to=("central", "west"),
        ports=(ServicePort(name="http", port=80, protocol="HTTP"), ServicePort(name="grpc", port=9090, protocol="GRPC")),
        endpoints_known=True,  # counted from EndpointSlices (none here: a known 0)
    )


def test_parse_export_to_names_the_bad_entry() -> None:
    assert parse_export_to("") == ()
    with pytest.raises(ValueError, match="'we_st' is not a cluster name"):
        parse_export_to("east,we_st")


def test_export_status_text() -> None:
    assert export_status(42, None) == "exported at revision 42"
    assert export_status(None, "no TCP ports") == "refused: no TCP ports"


# ---------------------------------------------------------------- import side


def cluster(name: str, revoked: bool = False) -> ClusterRecord:
    return ClusterRecord(name=name, trust_domain=f"{name}.isthmus.local", gateway_addresses=(f"{name}.example:15443",), revoked=revoked)


def exported(cl: str, name: str = "web", ns: str = "shop", ports: tuple[int, ...] = (80,), to: tuple[str, ...] = ()) -> ExportedService:
    return ExportedService(cluster=cl, namespace=ns, name=name, export_to=to,
                           ports=tuple(ServicePort(name=f"http-{p}", port=p) for p in ports))


def snap(*services: ExportedService, clusters: tuple[str, ...] = ("east", "west", "central"), revoked: tuple[str, ...] = ()) -> Snapshot:
    return Snapshot(revision=7, clusters=tuple(cluster(c, c in revoked) for c in clusters), services=services)


def names(plan_objs) -> set[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    return {(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in plan_objs}


def both(ns: str, name: str) -> set[tuple[str, str, str]]:
    return {("Service", ns, name), ("EndpointSlice", ns, name)}


def test_remote_export_gets_per_cluster_and_federated_mirrors() -> None:
    plan = plan_mirrors(snap(exported("west")), "east", [], [], gateway=("10.1.0.5",))
    assert names(plan.upserts) == both("shop", "web--west") | both("shop", "web--isthmus")
    assert plan.deletes == () and plan.conflicts == ()
    svc_obj = next(o for o in plan.upserts if o["kind"] == "Service" and o["metadata"]["name"] == "web--west")
    assert svc_obj["metadata"]["labels"] == {n.MIRRORED_FROM: "west", n.MANAGED_BY: n.AGENT}
    assert svc_obj["metadata"]["annotations"][n.REMOTE_AUTHORITY] == "web.shop.west.isthmus.local"
    assert svc_obj["spec"]["ports"] == [{"name": "http-80", "port": 80, "protocol": "TCP", "appProtocol": "http", "targetPort": 15001}]
    slice_obj = next(o for o in plan.upserts if o["kind"] == "EndpointSlice" and o["metadata"]["name"] == "web--west")
    assert slice_obj["endpoints"] == [{"addresses": ["10.1.0.5"], "conditions": {"ready": True}}]
    assert slice_obj["ports"][0]["port"] == 15001
    fed = next(o for o in plan.upserts if o["kind"] == "Service" and o["metadata"]["name"] == "web--isthmus")
    assert fed["metadata"]["annotations"][n.REMOTE_AUTHORITY] == "web.shop.isthmus.local"
    assert fed["metadata"]["labels"][n.MIRRORED_FROM] == n.FEDERATED


IMPORT_TABLE = [
    pytest.param(snap(exported("east")), set(), id="own-export-not-mirrored"),
    pytest.param(snap(exported("west", to=("central",))), set(), id="export-to-excludes-us"),
    pytest.param(snap(exported("west", to=("east",))), both("shop", "web--west") | both("shop", "web--isthmus"), id="export-to-includes-us"),
    pytest.param(snap(exported("west"), revoked=("west",)), set(), id="revoked-cluster-ignored"),
    pytest.param(snap(exported("west"), clusters=("east",)), set(), id="unknown-cluster-ignored"),
    pytest.param(
        snap(exported("west"), exported("central")),
        both("shop", "web--west") | both("shop", "web--central") | both("shop", "web--isthmus"),
        id="two-sources-one-federated",
    ),
]


@pytest.mark.parametrize(("snapshot", "expected"), IMPORT_TABLE)
def test_plan_mirrors_from_empty(snapshot: Snapshot, expected: set[tuple[str, str, str]]) -> None:
    assert names(plan_mirrors(snapshot, "east", [], []).upserts) == expected


def _split(objs):  # type: ignore[no-untyped-def]
    services = [o for o in objs if o["kind"] == "Service"]
    slices = [o for o in objs if o["kind"] == "EndpointSlice"]
    return services, slices


def test_converged_state_plans_nothing() -> None:
    s = snap(exported("west"), exported("central", ports=(80, 9090)))
    first = plan_mirrors(s, "east", [], [], gateway=("10.1.0.5",))
    services, slices = _split(first.upserts)
    again = plan_mirrors(s, "east", services, slices, gateway=("10.1.0.5",))
    assert again.upserts == () and again.deletes == ()


def test_changed_export_or_gateway_updates_only_what_changed() -> None:
    s = snap(exported("west"))
    services, slices = _split(plan_mirrors(s, "east", [], [], gateway=("10.1.0.5",)).upserts)
    moved = plan_mirrors(s, "east", services, slices, gateway=("10.1.0.6",))
    assert names(moved.upserts) == {("EndpointSlice", "shop", "web--west"), ("EndpointSlice", "shop", "web--isthmus")}
    grown = plan_mirrors(snap(exported("west", ports=(80, 81))), "east", services, slices, gateway=("10.1.0.5",))
    assert names(grown.upserts) == both("shop", "web--west") | both("shop", "web--isthmus")


def test_export_gone_deletes_mirrors_slices_first() -> None:
    services, slices = _split(plan_mirrors(snap(exported("west")), "east", [], []).upserts)
    plan = plan_mirrors(snap(), "east", services, slices)
    assert plan.upserts == ()
    assert [r.kind for r in plan.deletes] == ["EndpointSlice", "EndpointSlice", "Service", "Service"]
    assert {(r.namespace, r.name) for r in plan.deletes} == {("shop", "web--west"), ("shop", "web--isthmus")}


def test_one_source_gone_keeps_federated_mirror() -> None:
    s2 = snap(exported("west"), exported("central"))
    services, slices = _split(plan_mirrors(s2, "east", [], []).upserts)
    plan = plan_mirrors(snap(exported("central")), "east", services, slices)
    assert set(plan.deletes) == {ObjectRef(kind=k, namespace="shop", name="web--west") for k in ("Service", "EndpointSlice")}
    assert names(plan.upserts) == set()  # federated mirror's ports did not change


def test_orphan_mirror_deleted_but_users_services_untouched() -> None:
    orphan = svc("old--west", labels={n.MIRRORED_FROM: "west", n.MANAGED_BY: n.AGENT})
    users = svc("web")
    look_alike = svc("api--west", labels={n.MIRRORED_FROM: "west"})  # not managed by us: leave it
    plan = plan_mirrors(snap(), "east", [orphan, users, look_alike], [])
    assert plan.deletes == (ObjectRef(kind="Service", namespace="shop", name="old--west"),)


def test_users_service_with_mirror_name_is_a_conflict_not_clobbered() -> None:
    squatter = svc("web--west")
    plan = plan_mirrors(snap(exported("west")), "east", [squatter], [])
    assert names(plan.upserts) == both("shop", "web--isthmus")
    assert plan.deletes == ()
    (conflict,) = plan.conflicts
    assert "Service shop/web--west exists and is not an Isthmus mirror" in conflict


def test_spec_hash_is_stamped_and_stable() -> None:
    a = plan_mirrors(snap(exported("west")), "east", [], []).upserts
    b = plan_mirrors(snap(exported("west")), "east", [], []).upserts
    assert [o["metadata"]["annotations"][SPEC_HASH] for o in a] == [o["metadata"]["annotations"][SPEC_HASH] for o in b]


def test_gateway_endpoints_only_ready_gateway_pods() -> None:
    gw = eps(n.GATEWAY_SERVICE, ns=SYSTEM_NAMESPACE, ready=[True, False, None])
    other = eps("web", ready=[True], base=50)
    assert gateway_endpoints([gw, other]) == ("10.0.0.1", "10.0.0.3")


@pytest.mark.parametrize(
    ("name", "cluster", "expected"),
    [("web", "west", "web--west"), ("web", None, "web--isthmus")],
)
def test_mirror_name_scheme(name: str, cluster: str | None, expected: str) -> None:
    assert mirror_name(name, cluster) == expected


def test_mirror_name_long_is_hashed_unique_and_valid() -> None:
    a = mirror_name("a" * 60, "west")
    b = mirror_name("a" * 60, "east")
    assert len(a) <= 63 and len(b) <= 63 and a != b
    assert a == mirror_name("a" * 60, "west")
    with pytest.raises(ValueError, match="reserved"):
        mirror_name("web", "isthmus")

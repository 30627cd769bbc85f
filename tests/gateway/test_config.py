"""Config: validation errors name the field; routes from snapshots; swaps under load."""

from __future__ import annotations

import httpx
import pytest
import trio

from federation.models import ClusterRecord, ExportedService, ServicePort, Snapshot
from gateway import ConfigError, build_routes, parse_config
from gateway._routes import split_authority

from .backends import H2Backend
from .conftest import Mesh


def test_empty_config_is_valid_with_envoy_like_defaults() -> None:
    cfg = parse_config({})
    assert cfg.inbound.port == 15443 and cfg.outbound.port == 15001
    assert cfg.admin.host == "127.0.0.1" and cfg.admin.port == 15000
    assert cfg.limits.idle_timeout == 3600 and cfg.limits.max_header_list_size == 60 * 1024


@pytest.mark.parametrize("data, field", [
    ({"limits": {"max_concurrent_streams": 0}}, "limits.max_concurrent_streams"),
    ({"inbound": {"port": 70000}}, "inbound.port"),
    ({"tcp_ports": [{"port": 5432, "target": "db"}]}, "tcp_ports.0.target"),
    ({"surprise": 1}, "surprise"),
    ({"dns_suffix": ".."}, "dns_suffix"),
])
def test_config_errors_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(data, "gw.yaml")
    assert f"{field}:" in str(e.value)
    assert "gw.yaml" in str(e.value)


def _snap() -> Snapshot:
    return Snapshot(revision=7, clusters=(
        ClusterRecord(name="east", trust_domain="east.isthmus.local", gateway_addresses=("10.0.0.1:15443",)),
        ClusterRecord(name="west", trust_domain="west.isthmus.local", gateway_addresses=("10.0.0.2:15443",)),
        ClusterRecord(name="north", trust_domain="north.isthmus.local", gateway_addresses=("10.0.0.3:15443",)),
        ClusterRecord(name="gone", trust_domain="gone.isthmus.local", revoked=True, gateway_addresses=("10.0.0.4:1",)),
    ), services=(
        ExportedService(cluster="west", namespace="shop", name="cart", ports=(
            ServicePort(port=80), ServicePort(port=9090, protocol="GRPC"))),
        ExportedService(cluster="north", namespace="shop", name="cart", ports=(ServicePort(port=80),)),
        ExportedService(cluster="gone", namespace="shop", name="cart", ports=(ServicePort(port=80),)),
        ExportedService(cluster="west", namespace="shop", name="secret", export_to=("north",),
                        ports=(ServicePort(port=80),)),
        ExportedService(cluster="east", namespace="shop", name="pay", ports=(
            ServicePort(port=8443, target="pay-backend:9443", target_tls="mtls"),)),
    ))


def test_build_routes_naming_scheme() -> None:
    t = build_routes(_snap(), "east")
    one = t.outbound_route("cart.shop.west.isthmus.local:9090")
    assert one is not None and [c.name for c in one.clusters] == ["west"]
    assert one.authority == "cart.shop.svc.cluster.local:9090" and one.protocol == "GRPC"
    fed = t.outbound_route("cart.shop.isthmus.local")  # default port: 80
    assert fed is not None and fed.port == 80
    assert [c.name for c in fed.clusters] == ["north", "west"]  # never the revoked one
    assert t.outbound_route("cart.shop.gone.isthmus.local") is None
    assert t.outbound_route("secret.shop.west.isthmus.local") is None  # not exported to east
    assert t.outbound_route("CART.shop.west.isthmus.local.:80") is not None  # case, trailing dot
    pay = t.inbound_target("pay.shop.svc.cluster.local:8443")
    assert pay is not None and (pay.host, pay.target_port, pay.tls) == ("pay-backend", 9443, True)
    assert t.trust_domains() == {"west.isthmus.local", "north.isthmus.local"}


def _names(*forms: str, ports: tuple[int | None, ...]) -> set[tuple[str, int | None]]:
    return {(f, p) for f in forms for p in ports}


def _mirrors(m: str) -> tuple[str, ...]:
    return (f"{m}.shop.svc.cluster.local", f"{m}.shop.svc", f"{m}.shop")


def test_build_routes_answers_exactly_the_exported_names_and_where_they_lead() -> None:
    t = build_routes(_snap(), "east")
    assert set(t.outbound) == (
        _names("cart.shop.west.isthmus.local", *_mirrors("cart--west"), ports=(80, 9090, None))
        | _names("cart.shop.north.isthmus.local", *_mirrors("cart--north"), ports=(80, None))
        | _names("cart.shop.isthmus.local", *_mirrors("cart--isthmus"), ports=(80, 9090, None))
    )  # nothing of the revoked cluster, nothing not exported to east, nothing of east's own
    for (host, port), r in t.outbound.items():
        want_port = 80 if port is None else port
        assert (r.namespace, r.service, r.port) == ("shop", "cart", want_port), (host, port)
        assert r.authority == f"cart.shop.svc.cluster.local:{want_port}"
        assert r.protocol == ("GRPC" if want_port == 9090 else "HTTP")
        source = next((c for c in ("west", "north") if host.startswith((f"cart.shop.{c}.", f"cart--{c}."))), "isthmus")
        want = {"west": ["west"], "north": ["north"], "isthmus": ["north", "west"] if want_port == 80 else ["west"]}
        assert [c.name for c in r.clusters] == want[source], (host, port)
    assert {c.name: c.addresses for c in t.outbound[("cart.shop.isthmus.local", None)].clusters} == {
        "north": ("10.0.0.3:15443",), "west": ("10.0.0.2:15443",)}
    assert set(t.inbound) == {("pay.shop.svc.cluster.local", 8443), ("pay.shop.svc.cluster.local", None)}
    assert {td: p.name for td, p in t.peers_by_td.items()} == {"west.isthmus.local": "west", "north.isthmus.local": "north"}


def test_build_routes_does_not_depend_on_snapshot_order() -> None:
    """The same records in another order give the same table, spread order included."""
    snap = _snap()
    shuffled = snap.model_copy(update={"clusters": snap.clusters[::-1], "services": snap.services[::-1]})
    a, b = build_routes(snap, "east"), build_routes(shuffled, "east")
    assert a == b
    assert [c.name for c in b.outbound_route("cart.shop.isthmus.local").clusters] == ["north", "west"]  # type: ignore[union-attr]


@pytest.mark.parametrize("value, expected", [
    ("a.b:80", ("a.b", 80)), ("A.B", ("a.b", None)), ("[::1]:8080", ("[::1]", 8080)),
    ("host:", ("host:", None)),
])
def test_split_authority(value: str, expected: tuple) -> None:
    assert split_authority(value) == expected


async def test_config_swap_under_load_fails_no_request(mesh: Mesh, nursery: trio.Nursery) -> None:
    web2 = await nursery.start(H2Backend().serve)
    failures: list[str] = []
    ok = 0
    done = False

    async def client() -> None:
        nonlocal ok
        async with httpx.AsyncClient(http2=True, http1=False) as c:
            while not done:
                try:
                    r = await c.get(f"http://127.0.0.1:{mesh.east_out}/echo",
                                    headers={"host": "web.default.west.isthmus.local:8080"})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:100]}")
                    else:
                        ok += 1
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    async with trio.open_nursery() as n:
        for _ in range(8):
            n.start_soon(client)
        for rev in range(2, 32):
            # Alternate the service's backend and add/remove an unrelated export.
            snap = mesh.snapshot(revision=rev)
            if rev % 2:
                services = tuple(
                    s.model_copy(update={"ports": (s.ports[0].model_copy(
                        update={"target": f"127.0.0.1:{web2.port}"}),)}) if s.name == "web" else s
                    for s in snap.services)
                services += (ExportedService(cluster="west", namespace="x", name=f"s{rev}",
                                             ports=(ServicePort(port=80),)),)
                snap = snap.model_copy(update={"services": services})
            mesh.west.apply_snapshot(snap)
            mesh.east.apply_snapshot(snap)
            # event-driven: requests keep completing across every swap, however slow the machine
            seen = ok
            with trio.fail_after(30):
                while ok < seen + 2:
                    await trio.sleep(0.01)
        done = True
    assert not failures, failures[:5]
    assert mesh.web.requests > 0 and web2.requests > 0
    assert mesh.east.state.routes.revision == 31

"""TrafficRoutes at the calling cluster's outbound gateway: four real gateways in-process
(south calls; east, west and central export), real TLS between them, one backend per
(cluster, service) so that the backend that answered says where the request went."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import trio

from federation.models import ClusterRecord, ExportedService, ServicePort, Snapshot, TrafficRoute
from federation.traffic import Request
from gateway import Gateway

from .backends import SERVICE, H2Backend, start_grpc_server, tcp_echo
from .conftest import Pki, gateway_config, make_pki

CLUSTERS = ("south", "east", "west", "central")
CART = "cart.shop.isthmus.local:8080"
CANARY = {"match": [{"headers": {"x-canary": {"exact": "1"}}}],
          "destinations": [{"cluster": "west", "service": "cart-v2"}]}
GRPC_RULE = {"match": [{"path": {"prefix": f"/{SERVICE}/"}, "headers": {"content-type": {"prefix": "application/grpc"}}}],
             "destinations": [{"cluster": "central"}]}
SPLIT = {"destinations": [{"cluster": "east", "weight": 90}, {"cluster": "west", "weight": 10}],
         "failover": ["central", "*"]}


@pytest.fixture(scope="module")
def pki4(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki4"), CLUSTERS)


def cart_route(rules: list[dict], name: str = "cart") -> TrafficRoute:
    return TrafficRoute.model_validate({"name": name, "host": {"namespace": "shop", "service": "cart"}, "rules": rules})


@dataclass
class Four:
    pki: Pki
    gws: dict[str, Gateway]
    backends: dict[tuple[str, str], H2Backend]
    echo: dict[str, int]
    grpc_port: int
    tmp: Path

    def snapshot(self, routes: list[TrafficRoute], revision: int = 1) -> Snapshot:
        clusters = tuple(ClusterRecord(name=c, trust_domain=self.pki.td(c), ca_cert_pem=self.pki.ca_pem(c),
                                       gateway_addresses=(f"127.0.0.1:{g.ports['inbound']}",))
                         for c, g in self.gws.items())
        services = [ExportedService(cluster=c, namespace="shop", name=s, ports=(
            ServicePort(port=8080, protocol="HTTP2", target=f"127.0.0.1:{b.port}"),))
            for (c, s), b in self.backends.items()]
        services += [ExportedService(cluster=c, namespace="shop", name="echo", ports=(
            ServicePort(port=7, protocol="TCP", target=f"127.0.0.1:{port}"),)) for c, port in self.echo.items()]
        services += [ExportedService(cluster=c, namespace="shop", name="grpc", ports=(
            ServicePort(port=50051, protocol="GRPC", target=f"127.0.0.1:{self.grpc_port}"),)) for c in ("east", "central")]
        return Snapshot(revision=revision, clusters=clusters, services=tuple(services), routes=tuple(routes),
                        crl_pem=self.pki.root.crl_pem().decode())

    def apply(self, routes: list[TrafficRoute], revision: int = 1) -> None:
        snap = self.snapshot(routes, revision)
        for g in self.gws.values():
            assert g.apply_snapshot(snap), g.last_rejected

    @property
    def out(self) -> str:
        return f"http://127.0.0.1:{self.gws['south'].ports['outbound']}"

    def served(self) -> dict[tuple[str, str], int]:
        return {k: b.requests for k, b in self.backends.items() if b.requests}

    def reset(self) -> None:
        for b in self.backends.values():
            b.requests = 0

    async def explain(self, **query: str | list[str]) -> dict:
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{self.gws['south'].ports['admin']}/explain", params=query)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture
async def four(pki4: Pki, nursery: trio.Nursery, tmp_path: Path) -> Four:
    backends = {}
    for key in (("east", "cart"), ("west", "cart"), ("central", "cart"), ("west", "cart-v2")):
        backends[key] = await nursery.start(H2Backend().serve)
    echo = {c: await nursery.start(tcp_echo) for c in ("east", "west")}
    grpc_server, grpc_port = start_grpc_server()
    gws = {}
    for c in CLUSTERS:
        extra = {}
        if c == "south":
            extra = {"tcp_ports": [{"host": "127.0.0.1", "port": 0, "target": "echo.shop.isthmus.local:7"}],
                     "limits": {"reconnect_backoff_initial": 0.05, "reconnect_backoff_max": 0.2}}
        gws[c] = Gateway(gateway_config(pki4, c, tmp_path, **extra))
        await nursery.start(gws[c].run)
    f = Four(pki4, gws, backends, echo, grpc_port, tmp_path)
    f.apply([cart_route([CANARY, GRPC_RULE, SPLIT])])
    yield f
    for g in gws.values():
        g.stop()
    grpc_server.stop(0)


async def _get(f: Four, n: int, http2: bool = True, headers: dict[str, str] | None = None,
               path: str = "/echo") -> list[httpx.Response]:
    out = []
    async with httpx.AsyncClient(http1=not http2, http2=http2) as c:
        for _ in range(n):
            out.append(await c.get(f.out + path, headers={"host": CART, **(headers or {})}))
    return out


@pytest.mark.parametrize("http2", [True, False])
async def test_split_sends_most_to_east_some_to_west(four: Four, http2: bool) -> None:
    rs = await _get(four, 300, http2=http2)
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200][:3]
    served = four.served()
    assert set(served) == {("east", "cart"), ("west", "cart")}, served
    assert 10 <= served[("west", "cart")] <= 60, served  # 10 % of 300, generous for sampling
    assert {r.json()["authority"] for r in rs} == {"cart.shop.svc.cluster.local:8080"}


@pytest.mark.parametrize("http2", [True, False])
async def test_header_match_sends_every_request_to_cart_v2_with_its_authority(four: Four, http2: bool) -> None:
    rs = await _get(four, 40, http2=http2, headers={"X-Canary": "1"})
    assert all(r.status_code == 200 for r in rs)
    assert four.served() == {("west", "cart-v2"): 40}
    assert {r.json()["authority"] for r in rs} == {"cart-v2.shop.svc.cluster.local:8080"}
    m = await _metrics(four)
    assert 'isthmus_route_destination_requests_total{cluster="west",route="cart",' \
           'service="cart-v2.shop.svc.cluster.local"} 40.0' in m, m[-3000:]
    assert any('destination_cluster="west"' in line and 'destination_service="cart-v2.shop.svc.cluster.local"' in line
               for line in m.splitlines() if line.startswith("istio_requests_total{")), m[-3000:]


async def test_grpc_is_matched_on_its_path_and_content_type(four: Four) -> None:
    def call() -> bytes:
        with grpc.insecure_channel(f"127.0.0.1:{four.gws['south'].ports['outbound']}",
                                   options=[("grpc.default_authority", CART)]) as ch:
            return ch.unary_unary(f"/{SERVICE}/Unary")(b"hi", timeout=10)
    four.backends[("central", "cart")].requests = 0
    # cart's gRPC rule sends to central's cart port, whose backend (h2, not gRPC) answers
    # JSON: the call fails to decode, but the request went where the rule says
    with pytest.raises(grpc.RpcError):
        await trio.to_thread.run_sync(call)
    assert four.served() == {("central", "cart"): 1}


async def test_failover_in_order_and_explain_agrees(four: Four) -> None:
    four.gws["east"].stop()
    four.gws["west"].stop()
    await trio.sleep(0.2)
    # the first requests find both peers gone (the pool learns they fail), then none fail
    rs = await _get(four, 60)
    failed = [i for i, r in enumerate(rs) if r.status_code != 200]
    assert len(failed) <= 4 and (not failed or max(failed) < 10), [(i, rs[i].status_code) for i in failed]
    served = four.served()
    assert served.get(("central", "cart"), 0) >= 50 and served.get(("central", "cart"), 0) + served.get(("east", "cart"), 0) \
        + served.get(("west", "cart"), 0) == len(rs) - len(failed), served
    doc = await four.explain(host=CART, path="/echo")
    assert doc["source"] == "gateway" and doc["rule"] == 2
    assert [(d["cluster"], d["state"], d["reason"]) for d in doc["destinations"]] == [
        ("east", "out", "unreachable"), ("west", "out", "unreachable")]
    assert doc["serving"] == [{"cluster": "central", "service": "cart", "effective_weight": 100.0}]


async def test_nothing_healthy_is_503_uh_with_the_route_in_the_access_log(four: Four, logs) -> None:
    for c in ("east", "west", "central"):
        four.gws[c].stop()
    await trio.sleep(0.2)
    rs = await _get(four, 30)
    assert rs[-1].status_code == 503 and "no healthy cluster" in rs[-1].text
    access = [e for e in logs if e.get("event") == "access" and e.get("reporter") == "source"]
    last = access[-1]
    assert last["response_flags"] == "UH" and last["route_name"] == "cart" and last["route_rule"] == 2
    doc = await four.explain(host=CART)
    assert doc["result"]["outcome"] == "no-healthy-destination" and doc["result"]["flags"] == "UH"


async def test_access_log_names_the_route_and_rule(four: Four, logs) -> None:
    await _get(four, 1, headers={"x-canary": "1"})
    await _get(four, 1)
    access = [e for e in logs if e.get("event") == "access" and e.get("reporter") == "source"]
    assert [(e["route_name"], e["route_rule"], e["destination_service"]) for e in access][:1] == [
        ("cart", 0, "cart-v2.shop.svc.cluster.local")]
    assert access[1]["route_rule"] == 2 and access[1]["destination_cluster"] in ("east", "west")


async def test_a_per_cluster_name_is_never_rerouted(four: Four) -> None:
    async with httpx.AsyncClient(http2=True, http1=False) as c:
        for _ in range(20):
            r = await c.get(four.out + "/echo", headers={"host": "cart.shop.central.isthmus.local:8080",
                                                         "x-canary": "1"})
            assert r.status_code == 200
    assert four.served() == {("central", "cart"): 20}


async def test_tcp_connections_take_destinations_and_failover_only(four: Four) -> None:
    echo_route = TrafficRoute.model_validate({"name": "echo", "host": {"namespace": "shop", "service": "echo"}, "rules": [
        {"match": [{"headers": {"x-any": {"present": True}}}], "destinations": [{"cluster": "east"}]},
        {"destinations": [{"cluster": "west"}], "failover": ["east"]}]})
    four.apply([cart_route([SPLIT]), echo_route], revision=2)
    port = four.gws["south"].ports["tcp:echo.shop.isthmus.local:7"]

    async def roundtrip() -> bytes:
        s = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            await s.send_all(b"ping")
            got = b""
            while len(got) < 4 and (data := await s.receive_some(100)):
                got += data
        await s.aclose()
        return got

    assert await roundtrip() == b"ping"
    m = await _metrics(four)
    assert 'isthmus_route_destination_requests_total{cluster="west",route="echo",' \
           'service="echo.shop.svc.cluster.local"} 1.0' in m, m[-2000:]
    four.gws["west"].stop()
    await trio.sleep(0.2)
    results = []
    for _ in range(5):  # the first may find west gone (and be reset); then failover to east
        try:
            results.append(await roundtrip())
        except trio.BrokenResourceError:
            results.append(b"reset")
    assert results[-3:] == [b"ping"] * 3 and results.count(b"reset") <= 1, results
    doc = await four.explain(host="echo.shop.isthmus.local:7", tcp="1")
    assert doc["rule"] == 1 and doc["serving"] == [{"cluster": "east", "service": "echo", "effective_weight": 100.0}]


async def test_a_route_that_does_not_compile_is_rejected_and_the_last_good_keeps_serving(four: Four) -> None:
    south = four.gws["south"]
    bad = four.snapshot([cart_route([SPLIT], "a"), cart_route([CANARY], "b")], revision=9)
    assert south.apply_snapshot(bad) is False
    assert south.last_rejected is not None and "'a' and 'b'" in south.last_rejected.reason
    assert south.state.revision == 1
    rs = await _get(four, 5, headers={"x-canary": "1"})
    assert all(r.status_code == 200 for r in rs) and four.served() == {("west", "cart-v2"): 5}


async def test_config_shows_route_names_and_revision(four: Four) -> None:
    async with httpx.AsyncClient() as c:
        doc = (await c.get(f"http://127.0.0.1:{four.gws['south'].ports['admin']}/config")).json()
    assert doc["route_revision"] == 1 and doc["traffic_routes"]["names"] == ["cart"]
    assert doc["traffic_routes"]["digest"].startswith("sha256:")


async def test_explain_endpoint_refuses_a_bad_query(four: Four) -> None:
    async with httpx.AsyncClient() as c:
        base = f"http://127.0.0.1:{four.gws['south'].ports['admin']}/explain"
        r = await c.get(base)
        assert r.status_code == 400 and "host=" in r.json()["error"]
        r = await c.get(base, params={"host": CART, "header": "nocolon"})
        assert r.status_code == 400 and "NAME:VALUE" in r.json()["error"]
        doc = (await c.get(base, params={"host": CART, "header": ["x-canary:1"]})).json()
    assert doc["rule"] == 0 and json.dumps(doc)  # JSON all the way


async def _metrics(f: Four) -> str:
    async with httpx.AsyncClient() as c:
        return (await c.get(f"http://127.0.0.1:{f.gws['south'].ports['admin']}/metrics")).text


async def test_a_peer_that_comes_back_takes_traffic_again_without_failed_requests(
        four: Four, nursery: trio.Nursery) -> None:
    four.apply([cart_route([{"destinations": [{"cluster": "east"}, {"cluster": "west"}]}])], revision=3)
    west = four.gws["west"]
    port = west.ports["inbound"]
    west.stop()
    await trio.sleep(0.2)
    before = await _get(four, 40)
    assert sum(r.status_code != 200 for r in before) <= 2
    four.reset()
    # west returns on the same address: the pool's background re-dial finds it, with no
    # request spent on finding out
    back = Gateway(gateway_config(four.pki, "west", four.tmp, inbound={"host": "127.0.0.1", "port": port}))
    await nursery.start(back.run)
    assert back.apply_snapshot(four.snapshot([], revision=3))
    four.gws["west"] = back
    with trio.fail_after(10):
        while four.gws["south"].dialer.health(_west_target(four)) is not None:
            await trio.sleep(0.05)
    rs = await _get(four, 100)
    assert all(r.status_code == 200 for r in rs)
    served = four.served()
    assert served.get(("west", "cart"), 0) >= 25 and served.get(("east", "cart"), 0) >= 25, served


def _west_target(f: Four):  # type: ignore[no-untyped-def]
    sel = f.gws["south"].state.traffic.select("shop", "cart", 8080, Request(), rand=lambda: 0.99)
    assert sel is not None and sel.target is not None and sel.target.cluster == "west"
    return sel.target


async def test_route_explain_live_asks_the_calling_gateway(four: Four) -> None:
    import subprocess
    import sys

    admin = f"http://127.0.0.1:{four.gws['south'].ports['admin']}"
    four.gws["east"].stop()
    await trio.sleep(0.2)
    await _get(four, 20)  # the pool learns that east is gone

    def explain(*args: str) -> subprocess.CompletedProcess[str]:
        # a process of its own: this one's gateways log to stdout meanwhile
        return subprocess.run([sys.executable, "-m", "federation.cli", "route", "explain", CART, "--live",
                               "--admin", admin, *args], capture_output=True, text=True, timeout=60)

    r = await trio.to_thread.run_sync(explain, "--from", "south", "-o", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["source"] == "gateway" and doc["cluster"] == "south" and doc["rule"] == 2
    assert doc["serving"] == [{"cluster": "west", "service": "cart", "effective_weight": 100.0}]
    east = doc["destinations"][0]
    assert east["cluster"] == "east" and east["reason"] == "unreachable" and "127.0.0.1:" in east["detail"]
    four.reset()
    rs = await _get(four, 30)
    assert all(r.status_code == 200 for r in rs) and four.served() == {("west", "cart"): 30}
    text = await trio.to_thread.run_sync(explain, "--from", "south", "--header", "x-canary=1")
    assert text.returncode == 0 and "gateway of south" in text.stdout and "west/cart-v2" in text.stdout
    wrong = await trio.to_thread.run_sync(explain, "--from", "east")
    assert wrong.returncode == 2 and "is 'south''s, not 'east''s" in wrong.stderr


async def test_a_cluster_the_federation_streams_as_stale_leaves_the_split(four: Four) -> None:
    from federation.models import ClusterLiveness

    snap = four.snapshot([cart_route([SPLIT])], revision=2)
    snap = snap.model_copy(update={"liveness": (ClusterLiveness(cluster="east", since=1.0, last_heartbeat_age=33.0),)})
    assert four.gws["south"].apply_snapshot(snap), four.gws["south"].last_rejected
    four.reset()
    rs = await _get(four, 40)
    assert all(r.status_code == 200 for r in rs)
    assert four.served() == {("west", "cart"): 40}  # east's 90 % went to west, the healthy one
    doc = await four.explain(host=CART, path="/echo")
    dests = {d["cluster"]: d for d in doc["destinations"]}
    assert dests["east"]["state"] == "out" and dests["east"]["reason"] == "stale"
    async with httpx.AsyncClient() as c:
        config = (await c.get(f"http://127.0.0.1:{four.gws['south'].ports['admin']}/config")).json()
    assert config["stale_clusters"] == {"east": "STALE (heartbeats missed): last heartbeat 33s ago"}
    # LIVE again (the record deleted): east takes its share again
    assert four.gws["south"].apply_snapshot(four.snapshot([cart_route([SPLIT])], revision=3))
    four.reset()
    await _get(four, 40)
    assert four.served().get(("east", "cart"), 0) > 20

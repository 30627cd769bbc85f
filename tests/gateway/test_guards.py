"""Timeouts, retries, circuit breaking, outlier detection and fault injection at the calling
cluster's outbound gateway: three real gateways in-process (south calls; east and west
export), real TLS between them, the demo's sample services (with their test knobs) behind
east and west, real clients (httpx, grpcio)."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trio

from federation.demo.samples import GRPC_SAY, make_grpc_server, make_http_server
from federation.models import ClusterRecord, ExportedService, ServicePort, Snapshot, TrafficPolicy, TrafficRoute
from gateway import Gateway

from .backends import H2Backend
from .conftest import Pki, gateway_config, make_pki

CLUSTERS = ("south", "east", "west")
CART = "cart.shop.isthmus.local:8080"
HELLO = "hello.shop.isthmus.local:9090"


@pytest.fixture(scope="module")
def pki3(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki3"), CLUSTERS)


@pytest.fixture(scope="module")
def samples() -> Any:
    """HTTP/1.1 and gRPC sample services for east and west (threads; module-wide)."""
    http, grpcs, ports = [], [], {}
    for c in ("east", "west"):
        h = make_http_server(c, "127.0.0.1:0")
        threading.Thread(target=h.serve_forever, daemon=True).start()
        g = make_grpc_server(c, "127.0.0.1:0")
        gport = g.add_insecure_port("127.0.0.1:0")
        g.start()
        http.append(h)
        grpcs.append(g)
        ports[c] = (h.server_address[1], gport)
    yield ports
    for h in http:
        h.shutdown()
    for g in grpcs:
        g.stop(0)


def route(rules: list[dict], name: str = "cart", service: str = "cart") -> TrafficRoute:
    return TrafficRoute.model_validate({"name": name, "host": {"namespace": "shop", "service": service},
                                        "rules": rules})


def policy(service: str = "cart", **body: Any) -> TrafficPolicy:
    return TrafficPolicy.model_validate({"name": service, "host": {"namespace": "shop", "service": service}, **body})


@dataclass
class Three:
    pki: Pki
    gws: dict[str, Gateway]
    ports: dict[str, tuple[int, int]]
    revision: int = 0
    also: list[Gateway] = field(default_factory=list)  # more gateways of these clusters, given each snapshot

    def apply(self, routes: list[TrafficRoute] = (), policies: list[TrafficPolicy] = (),
              extra: tuple[ExportedService, ...] = ()) -> None:
        self.revision += 1
        clusters = tuple(ClusterRecord(name=c, trust_domain=self.pki.td(c), ca_cert_pem=self.pki.ca_pem(c),
                                       gateway_addresses=(f"127.0.0.1:{g.ports['inbound']}",))
                         for c, g in self.gws.items())
        services = []
        for c, (http, grpc_port) in self.ports.items():
            services.append(ExportedService(cluster=c, namespace="shop", name="cart", ports=(
                ServicePort(port=8080, protocol="HTTP", target=f"127.0.0.1:{http}"),)))
            services.append(ExportedService(cluster=c, namespace="shop", name="hello", ports=(
                ServicePort(port=9090, protocol="GRPC", target=f"127.0.0.1:{grpc_port}"),)))
        snap = Snapshot(revision=self.revision, clusters=clusters, services=(*services, *extra), routes=tuple(routes),
                        traffic_policies=tuple(policies), crl_pem=self.pki.root.crl_pem().decode())
        for g in (*self.gws.values(), *self.also):
            assert g.apply_snapshot(snap), g.last_rejected

    @property
    def out(self) -> str:
        return f"http://127.0.0.1:{self.gws['south'].ports['outbound']}"

    @property
    def out_addr(self) -> str:
        return f"127.0.0.1:{self.gws['south'].ports['outbound']}"

    async def admin(self, what: str, **query: str) -> Any:
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{self.gws['south'].ports['admin']}/{what}", params=query)
        assert r.status_code == 200, r.text
        return r.json() if what != "metrics" else r.text


@pytest.fixture
async def three(pki3: Pki, samples: Any, nursery: trio.Nursery, tmp_path: Path) -> Three:
    gws = {}
    for c in CLUSTERS:
        gws[c] = Gateway(gateway_config(pki3, c, tmp_path))
        await nursery.start(gws[c].run)
    t = Three(pki3, gws, samples)
    yield t
    for g in gws.values():
        g.stop()


async def get_all(t: Three, n: int, headers: dict[str, str] | None = None, concurrency: int = 1,
                  path: str = "/") -> list[httpx.Response]:
    out: list[httpx.Response] = []
    async with httpx.AsyncClient(http2=True, http1=False, timeout=10) as c:
        async def one() -> None:
            out.append(await c.get(t.out + path, headers={"host": CART, **(headers or {})}))

        for start in range(0, n, concurrency):
            async with trio.open_nursery() as nursery:
                for _ in range(min(concurrency, n - start)):
                    nursery.start_soon(one)
    return out


def grpc_call(t: Three, name: str = "x", timeout: float = 5.0, metadata: tuple = ()) -> tuple[Any, float]:
    """(reply text or the grpc.StatusCode, seconds)."""
    t0 = time.monotonic()
    with grpc.insecure_channel(t.out_addr, options=[("grpc.default_authority", HELLO)]) as ch:
        try:
            r = ch.unary_unary(GRPC_SAY)(name.encode(), timeout=timeout, metadata=metadata).decode()
        except grpc.RpcError as exc:
            r = exc.code()
    return r, time.monotonic() - t0


def access(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e.get("event") == "access" and e.get("reporter") == "source"]


# ---------------------------------------------------------------- timeouts


async def test_a_hung_upstream_gets_504_ut_at_the_rule_timeout(three: Three, logs) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}], "timeout": "300ms"}])])
    async with httpx.AsyncClient(http2=True, http1=False, timeout=10) as c:
        await c.get(three.out, headers={"host": CART})  # connections up: only the request is timed
        t0 = time.monotonic()
        r = await c.get(three.out, headers={"host": CART, "x-sample-hang": "100"})
        took = time.monotonic() - t0
    assert r.status_code == 504 and "timeout" in r.text
    assert 0.29 <= took <= 0.45, took  # the 300 ms +- 50 ms, with room for a loaded machine
    assert access(logs)[-1]["response_flags"] == "UT"
    [ok] = await get_all(three, 1)
    assert ok.status_code == 200 and ok.text == "hello from east\n"


async def test_grpc_gets_deadline_exceeded_at_the_lower_of_timeout_and_grpc_timeout(three: Three) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}], "timeout": "300ms"}], "hello", "hello")])
    hang = (("x-sample-hang", "100"),)
    code, took = await trio.to_thread.run_sync(lambda: grpc_call(three, timeout=5.0, metadata=hang))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and 0.29 <= took <= 0.6, (code, took)
    code, took = await trio.to_thread.run_sync(lambda: grpc_call(three, timeout=5.0))
    assert code == "hello x from east"


async def test_the_outbound_sets_x_isthmus_deadline_from_the_rules_timeout_not_the_workloads(
        three: Three, nursery: trio.Nursery) -> None:
    """A workload's x-isthmus-deadline is stripped; the rule's timeout sets the one that goes
    upstream (the inbound gateway honours it: see the RequestContext test below)."""
    be = await nursery.start(H2Backend().serve)
    probe = ExportedService(cluster="east", namespace="shop", name="probe", ports=(
        ServicePort(port=8080, protocol="HTTP2", target=f"127.0.0.1:{be.port}"),))

    async def seen() -> dict[str, str]:
        async with httpx.AsyncClient(http2=True, http1=False, timeout=10) as c:
            r = await c.get(three.out + "/echo", headers={"host": "probe.shop.isthmus.local:8080",
                                                          "x-isthmus-deadline": "99999999"})
        assert r.status_code == 200, r.text
        return r.json()["headers"]
    three.apply([route([{"destinations": [{"cluster": "east"}]}], "probe", "probe")], extra=(probe,))
    assert "x-isthmus-deadline" not in await seen()
    three.apply([route([{"destinations": [{"cluster": "east"}], "timeout": "2s"}], "probe", "probe")],
                extra=(probe,))
    assert 1000 < int((await seen())["x-isthmus-deadline"]) <= 2000


async def test_a_workloads_short_x_isthmus_deadline_does_not_cut_its_request(three: Three) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}]}])])
    [r] = await get_all(three, 1, {"x-sample-delay": "300ms", "x-isthmus-deadline": "50"})
    assert r.status_code == 200 and r.text == "hello from east\n"


def test_only_the_inbound_honours_x_isthmus_deadline() -> None:
    from gateway._context import DEADLINE_GRACE, RequestContext
    from gateway._telemetry import Exchange
    hs = [(b":method", b"GET"), (b":path", b"/"), (b":authority", b"cart"), (b"x-isthmus-deadline", b"200")]
    inbound = RequestContext.parse(hs, Exchange("destination", "HTTP/2", lambda x: None))
    assert inbound.timeout == pytest.approx(0.2 + DEADLINE_GRACE)
    outbound = RequestContext.parse(hs, Exchange("source", "HTTP/2", lambda x: None), deadline_header=False)
    assert outbound.timeout is None


# ---------------------------------------------------------------- circuit breaking


async def test_past_max_requests_the_rest_get_an_immediate_503_uo(three: Three, logs) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}]}])], [policy(connection_pool={"max_requests": 10})])
    t0 = time.monotonic()
    rs = await get_all(three, 50, {"x-sample-delay": "600ms"}, concurrency=50)
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) == 10 and codes.count(503) == 40, codes
    assert all("overflow" in r.text for r in rs if r.status_code == 503)
    flags = [e["response_flags"] for e in access(logs)]
    assert flags.count("UO") == 40
    assert time.monotonic() - t0 < 5
    m = await three.admin("metrics")
    assert 'isthmus_circuit_breaker_overflows_total{service="cart.shop"} 40.0' in m
    assert 'isthmus_circuit_breaker_fill{resource="requests",service="cart.shop"} 0.0' in m
    doc = await three.admin("config")
    assert doc["resilience"]["breakers"]["cart.shop"]["requests"] == 0.0


async def test_the_breaker_gauge_shows_requests_in_flight(three: Three) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}]}])], [policy(connection_pool={"max_requests": 4})])
    seen = []
    async with trio.open_nursery() as n:
        n.start_soon(get_all, three, 2, {"x-sample-delay": "500ms"}, 2)
        await trio.sleep(0.25)
        seen.append((await three.admin("config"))["resilience"]["breakers"]["cart.shop"]["requests"])
    assert seen == [0.5]


async def test_grpc_past_the_breaker_gets_unavailable(three: Three) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}]}], "hello", "hello")],
                [policy("hello", connection_pool={"max_requests": 1})])
    slow = (("x-sample-delay", "500ms"),)
    results = []
    async with trio.open_nursery() as n:
        async def call(md: tuple) -> None:
            results.append((await trio.to_thread.run_sync(lambda: grpc_call(three, metadata=md)))[0])
        n.start_soon(call, slow)
        await trio.sleep(0.2)
        n.start_soon(call, ())
    assert sorted(map(str, results)) == sorted(map(str, ["hello x from east", grpc.StatusCode.UNAVAILABLE]))


async def _connect(t: Three, authority: str) -> tuple[Any, Any, int, bytes]:
    """A workload's HTTP/2 CONNECT through south's outbound: (stream, h2 connection,
    stream id, the answer's status)."""
    import h2.config
    import h2.connection
    import h2.events

    stream = await trio.open_tcp_stream("127.0.0.1", t.gws["south"].ports["outbound"])
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", authority.encode())])
    await stream.send_all(conn.data_to_send())
    with trio.fail_after(5):
        while True:
            for e in conn.receive_data(await stream.receive_some(65536)):
                if isinstance(e, h2.events.ResponseReceived):
                    return stream, conn, sid, dict(e.headers)[b":status"]


async def _echoes(stream: Any, conn: Any, sid: int) -> bool:
    import h2.events

    conn.send_data(sid, b"ping")
    await stream.send_all(conn.data_to_send())
    got = b""
    with trio.fail_after(5):
        while got != b"ping":
            for e in conn.receive_data(await stream.receive_some(65536)):
                if isinstance(e, h2.events.DataReceived):
                    got += e.data
                    conn.acknowledge_received_data(e.flow_controlled_length, sid)
    return True


async def test_connect_tunnels_and_tcp_ports_hold_a_breaker_slot_while_they_last(
        three: Three, nursery: trio.Nursery, tmp_path: Path, logs) -> None:
    """A TCP service's max_requests bounds the tunnels to it: an HTTP/2 CONNECT past it gets
    503 UO at once, a connection to an opaque TCP port is closed (UO); a tunnel's end gives
    its slot back."""
    from .backends import tcp_echo

    port = await nursery.start(tcp_echo)
    db = ExportedService(cluster="east", namespace="shop", name="db", ports=(
        ServicePort(port=7000, protocol="TCP", target=f"127.0.0.1:{port}"),))
    # A second south gateway with an opaque TCP port for db (same identity, own listeners).
    (tmp_path / "tcp").mkdir()
    tcp_gw = Gateway(gateway_config(three.pki, "south", tmp_path / "tcp", tcp_ports=[
        {"host": "127.0.0.1", "port": 0, "target": "db.shop.isthmus.local:7000"}]))
    await nursery.start(tcp_gw.run)
    three.also.append(tcp_gw)
    three.apply([], [policy("db", connection_pool={"max_requests": 1})], extra=(db,))
    first = await _connect(three, "db.shop.isthmus.local:7000")
    assert first[3] == b"200" and await _echoes(*first[:3])
    second = await _connect(three, "db.shop.isthmus.local:7000")
    assert second[3] == b"503"
    await second[0].aclose()
    # The opaque port: south-tcp's breaker is its own (one gateway's slots), so hold its one.
    tcp_port = tcp_gw.ports["tcp:db.shop.isthmus.local:7000"]
    held = await trio.open_tcp_stream("127.0.0.1", tcp_port)
    await held.send_all(b"ping")
    with trio.fail_after(5):
        assert await held.receive_some(4) == b"ping"
    refused = await trio.open_tcp_stream("127.0.0.1", tcp_port)
    with trio.fail_after(5):
        try:
            assert await refused.receive_some(10) == b""  # closed at once
        except trio.BrokenResourceError:
            pass  # or reset
    await refused.aclose()
    await held.aclose()
    await first[0].aclose()
    db_log = [e for e in access(logs) if e.get("destination_service") == "db.shop.svc.cluster.local"]
    assert sorted((e["protocol"], e["response_flags"]) for e in db_log if e["response_flags"] == "UO") == [
        ("HTTP/2", "UO"), ("TCP", "UO")], db_log
    # Both slots come back when their tunnels end: a new tunnel and a new connection open.
    with trio.fail_after(5):
        while (await three.admin("config"))["resilience"]["breakers"]["db.shop"]["requests"] != 0.0:
            await trio.sleep(0.05)
    third = await _connect(three, "db.shop.isthmus.local:7000")
    assert third[3] == b"200" and await _echoes(*third[:3])
    await third[0].aclose()
    again = await trio.open_tcp_stream("127.0.0.1", tcp_port)
    with trio.fail_after(5):
        while True:  # south-tcp's slot comes back once it has seen the first connection end
            await again.send_all(b"ping")
            try:
                if await again.receive_some(4) == b"ping":
                    break
            except trio.BrokenResourceError:
                pass
            await again.aclose()
            await trio.sleep(0.05)
            again = await trio.open_tcp_stream("127.0.0.1", tcp_port)
    await again.aclose()
    m = await three.admin("metrics")
    assert 'isthmus_circuit_breaker_overflows_total{service="db.shop"} 1.0' in m


# ---------------------------------------------------------------- retries


def _binomial_tail(n: int, p: float, k: int) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


RETRIES = {"attempts": 3, "retry_on": ["connect-failure", "reset", "503"], "budget": {"percent": 20, "min_per_second": 10}}


async def test_retries_with_a_budget_keep_success_at_99_percent_when_30_percent_fail(three: Three, logs) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}, {"cluster": "west"}], "retries": RETRIES}])])
    n = 300
    rs = await get_all(three, n, {"x-sample-fail": "30"}, concurrency=10)
    failed = sum(r.status_code != 200 for r in rs)
    # The sample fails each try at random (30 %), so 3 retries leave 0.3**4 = 0.81 % failing
    # on average: the promise is a success *rate* of at least 99 %, and a sample of 300 is
    # judged against it as a one-sided binomial test at 0.1 % (a 99 % rate gives `limit` or
    # more failures less than once in 1,000 runs; no retries would give ~90, one retry ~27).
    limit = next(k for k in range(n) if _binomial_tail(n, 0.01, k) < 0.001)
    assert failed < limit, f"{failed} of {n} failed: not consistent with a 99 % success rate"
    m = await three.admin("metrics")
    retried = float(next(line.split()[-1] for line in m.splitlines() if line.startswith('isthmus_retries_total{reason="503"}')))
    assert 60 <= retried <= 0.2 * 300 + 10 * 10, retried  # percent of the requests + min_per_second x ttl
    assert max(e.get("attempts") or 0 for e in access(logs)) >= 2


async def test_when_everything_fails_retries_stay_within_the_budget(three: Three) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}],
                         "retries": {**RETRIES, "budget": {"percent": 20, "min_per_second": 1}}}])])
    rs = await get_all(three, 200, {"x-sample-fail": "100"}, concurrency=10)
    assert all(r.status_code == 503 for r in rs)
    m = await three.admin("metrics")

    def value(prefix: str) -> float:
        return sum(float(line.split()[-1]) for line in m.splitlines() if line.startswith(prefix))
    retried = value('isthmus_retries_total{reason="503"}')
    assert 40 <= retried <= 0.2 * 200 + 1 * 10, retried
    assert value('isthmus_retries_skipped_total{reason="budget"}') >= 140


async def test_exhausted_retries_return_the_last_answer_with_urx(three: Three, logs) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}, {"cluster": "west"}],
                         "retries": {**RETRIES, "attempts": 2, "budget": {"percent": 100, "min_per_second": 100}}}])])
    rs = await get_all(three, 5, {"x-sample-fail": "100"})
    assert {r.status_code for r in rs} == {503} and all("injected failure" in r.text for r in rs)
    assert [(e["response_flags"], e["attempts"]) for e in access(logs)] == [("URX", 3)] * 5


async def test_a_retry_goes_to_the_other_destination_and_no_request_fails(three: Three, logs) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}, {"cluster": "west"}],
                         "retries": {**RETRIES, "budget": {"percent": 100, "min_per_second": 100}}}])])
    rs = await get_all(three, 100, {"x-sample-fail": "100", "x-sample-only": "east"}, concurrency=5)
    assert [r.status_code for r in rs] == [200] * 100
    assert {r.text for r in rs} == {"hello from west\n"}
    tried = [e for e in access(logs) if e.get("attempts") == 2]
    assert tried and all(e["destination_cluster"] == "west" for e in tried)


async def test_http1_callers_get_retries_and_timeouts_too(three: Three) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}, {"cluster": "west"}], "timeout": "300ms",
                         "retries": {**RETRIES, "budget": {"percent": 100, "min_per_second": 100}}}])])
    async with httpx.AsyncClient(timeout=10) as c:
        rs = [await c.post(three.out + "/echo", content=b"abc" * 1000,
                           headers={"host": CART, "x-sample-fail": "100", "x-sample-only": "east"}) for _ in range(10)]
        assert {(r.status_code, r.content) for r in rs} == {(200, b"abc" * 1000)}
        r = await c.get(three.out, headers={"host": CART, "x-sample-hang": "100"})
        assert r.status_code == 504


async def test_grpc_unavailable_is_retried_on_the_other_cluster(three: Three) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}, {"cluster": "west"}],
                         "retries": {"attempts": 2, "retry_on": ["unavailable"],
                                     "budget": {"percent": 100, "min_per_second": 100}}}], "hello", "hello")])
    md = (("x-sample-fail", "100"), ("x-sample-only", "east"))
    results = [(await trio.to_thread.run_sync(lambda: grpc_call(three, metadata=md)))[0] for _ in range(20)]
    assert results == ["hello x from west"] * 20


async def test_a_per_try_timeout_ends_only_that_try(three: Three) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}, {"cluster": "west"}], "timeout": "2s",
                         "retries": {"attempts": 2, "per_try_timeout": "200ms", "retry_on": ["reset"],
                                     "budget": {"percent": 100, "min_per_second": 100}}}])])
    rs = await get_all(three, 10, {"x-sample-hang": "100", "x-sample-only": "east"})
    assert {r.text for r in rs} == {"hello from west\n"}


async def test_a_post_body_is_replayed_on_the_retry(three: Three) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}, {"cluster": "west"}],
                         "retries": {**RETRIES, "budget": {"percent": 100, "min_per_second": 100}}}])])
    body = b"y" * 30000
    async with httpx.AsyncClient(http2=True, http1=False) as c:
        for _ in range(6):
            r = await c.post(three.out + "/echo", content=body,
                             headers={"host": CART, "x-sample-fail": "100", "x-sample-only": "east"})
            assert r.status_code == 200 and r.content == body


# ---------------------------------------------------------------- outlier detection


async def test_a_failing_destination_is_ejected_gets_no_traffic_and_returns(three: Three) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}, {"cluster": "west"}]}])],
                [policy(outlier_detection={"consecutive_5xx": 3, "base_ejection_time": "3s", "interval": "1s"})])
    rs = await get_all(three, 30, {"x-sample-fail": "100", "x-sample-only": "east"})
    east_fails = [i for i, r in enumerate(rs) if r.status_code == 503]
    assert len(east_fails) == 3, east_fails  # then east is out
    doc = await three.admin("explain", host=CART)
    assert [(d["cluster"], d["state"], d["reason"]) for d in doc["destinations"]] == [
        ("east", "out", "ejected"), ("west", "serving", None)]
    assert doc["ejections"][0]["cluster"] == "east"
    conf = await three.admin("config")
    assert [e["cluster"] for e in conf["resilience"]["ejections"]] == ["east"]
    rs = await get_all(three, 20)
    assert {r.text for r in rs} == {"hello from west\n"}
    await trio.sleep(max(0.0, doc["ejections"][0]["remaining_seconds"]) + 0.1)
    rs = await get_all(three, 40)
    assert "hello from east\n" in {r.text for r in rs}
    m = await three.admin("metrics")
    assert 'isthmus_outlier_ejections_total{cluster="east",service="cart.shop"} 1.0' in m


async def test_grpc_failures_eject_by_their_status(three: Three) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}, {"cluster": "west"}]}], "hello", "hello")],
                [policy("hello", outlier_detection={"consecutive_5xx": 2, "base_ejection_time": "30s"})])
    md = (("x-sample-fail", "100"), ("x-sample-only", "east"))
    results = [(await trio.to_thread.run_sync(lambda: grpc_call(three, metadata=md)))[0] for _ in range(30)]
    assert results.count(grpc.StatusCode.UNAVAILABLE) == 2 and results[-10:] == ["hello x from west"] * 10
    doc = await three.admin("explain", host=HELLO)
    assert [(d["cluster"], d["reason"]) for d in doc["destinations"]] == [("east", "ejected"), ("west", None)]


async def test_when_every_destination_is_ejected_all_are_used_in_panic_mode(three: Three, logs) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}]}])],
                [policy(outlier_detection={"consecutive_5xx": 2, "base_ejection_time": "30s"})])
    await get_all(three, 2, {"x-sample-fail": "100"})
    rs = await get_all(three, 5)
    assert {r.status_code for r in rs} == {200}
    last = access(logs)[-1]
    # Envoy sets no response flag for panic routing (it counts lb_healthy_panic): nor do we.
    assert last["response_code_details"] == "outlier_panic" and last["response_flags"] == "-"
    assert 'isthmus_outlier_panic_total{service="cart.shop"} 5.0' in await three.admin("metrics")


# ---------------------------------------------------------------- faults


async def test_an_abort_at_50_percent_fails_half_of_1000_requests(three: Three) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}],
                         "fault": {"abort": {"percent": 50, "http_status": 418}}}])])
    rs = await get_all(three, 1000, concurrency=20)
    aborted = sum(r.status_code == 418 for r in rs)
    assert 450 <= aborted <= 550, aborted
    assert aborted + sum(r.status_code == 200 for r in rs) == 1000


async def test_a_delay_at_100_percent_adds_the_delay_and_flag_di(three: Three, logs) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}]}])])
    await get_all(three, 3)
    t0 = time.monotonic()
    await get_all(three, 5)
    base = (time.monotonic() - t0) / 5
    three.apply([route([{"destinations": [{"cluster": "east"}], "fault": {"delay": {"percent": 100, "fixed": "150ms"}}}])])
    t0 = time.monotonic()
    rs = await get_all(three, 5)
    took = (time.monotonic() - t0) / 5
    assert all(r.status_code == 200 for r in rs)
    assert 0.13 <= took - base <= 0.2, (took, base)
    assert access(logs)[-1]["response_flags"] == "DI"


async def test_an_injected_delay_then_a_timeout_keeps_both_flags_in_order(three: Three, logs) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}], "timeout": "150ms",
                         "fault": {"delay": {"percent": 100, "fixed": "400ms"}}}])])
    t0 = time.monotonic()
    [r] = await get_all(three, 1)
    assert r.status_code == 504 and time.monotonic() - t0 < 0.39
    assert access(logs)[-1]["response_flags"] == "DI,UT"
    assert 'response_flags="DI,UT"' in await three.admin("metrics")


async def test_a_delay_then_an_abort_keeps_di_and_fi(three: Three, logs) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}],
                         "fault": {"delay": {"percent": 100, "fixed": "50ms"},
                                   "abort": {"percent": 100, "http_status": 503}}}])])
    [r] = await get_all(three, 1)
    assert r.status_code == 503
    assert access(logs)[-1]["response_flags"] == "DI,FI"


async def test_a_header_scoped_fault_touches_only_matching_requests(three: Three) -> None:
    three.apply([route([{"match": [{"headers": {"x-chaos": {"exact": "1"}}}], "destinations": [{"cluster": "east"}],
                         "fault": {"abort": {"percent": 100, "http_status": 503}}},
                        {"destinations": [{"cluster": "east"}]}])])
    chaos = await get_all(three, 20, {"x-chaos": "1"})
    calm = await get_all(three, 20)
    assert {r.status_code for r in chaos} == {503} and {r.status_code for r in calm} == {200}


async def test_grpc_aborts_answer_the_configured_status_and_are_not_retried(three: Three, logs) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}, {"cluster": "west"}],
                         "retries": {"attempts": 3, "retry_on": ["unavailable"]},
                         "fault": {"abort": {"percent": 100, "grpc_status": "UNAVAILABLE"}}}], "hello", "hello")])
    code, _ = await trio.to_thread.run_sync(lambda: grpc_call(three))
    assert code == grpc.StatusCode.UNAVAILABLE
    last = access(logs)[-1]
    assert last["response_flags"] == "FI" and not last.get("attempts")
    assert "isthmus_retries_total{" not in await three.admin("metrics")


# ---------------------------------------------------------------- config


async def test_config_shows_the_policies_and_rules_in_force(three: Three) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}], "timeout": "1s", "retries": {"attempts": 2}}])],
                [policy(connection_pool={"max_requests": 7})])
    doc = await three.admin("config")
    res = doc["resilience"]
    assert res["rules"] == [{"route": "cart", "rule": 0, "timeout": "1s", "retries": 2, "fault": False, "mirror": None}]
    assert res["traffic_policies"][0]["connection_pool"] == {"max_requests": 7}
    assert doc["traffic_policies"]["count"] == 1
    assert json.dumps(doc)  # serialisable whole
    # The TrafficPolicies' digest moves with a policy change (and with it alone: the
    # routes' stays), so two gateways' /config tell whether they enforce the same ones.
    before = (doc["traffic_policies"]["digest"], doc["traffic_routes"]["digest"])
    three.apply([route([{"destinations": [{"cluster": "east"}], "timeout": "1s", "retries": {"attempts": 2}}])],
                [policy(connection_pool={"max_requests": 8})])
    doc = await three.admin("config")
    assert doc["traffic_policies"]["digest"].startswith("sha256:")
    assert doc["traffic_policies"]["digest"] != before[0] and doc["traffic_routes"]["digest"] == before[1]


# ---------------------------------------------------------------- mirroring


class Recording(H2Backend):
    """An h2 backend that keeps the :authority of every request it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.authorities: list[str] = []
        self.grpc = 0  # requests with a gRPC content-type and a body

    def _respond(self, conn, sid, r, big) -> None:  # type: ignore[no-untyped-def]
        self.authorities.append(r["headers"].get(b":authority", b"").decode())
        if r["headers"].get(b"content-type", b"").startswith(b"application/grpc") and r["n"] > 0:
            self.grpc += 1
        super()._respond(conn, sid, r, big)


async def test_the_mirror_gets_its_share_with_shadow_authorities_and_answers_are_discarded(
        three: Three, nursery: trio.Nursery) -> None:
    rec = await nursery.start(Recording().serve)
    shadow = ExportedService(cluster="west", namespace="shop", name="shadow", ports=(
        ServicePort(port=8080, protocol="HTTP2", target=f"127.0.0.1:{rec.port}"),))
    three.apply([route([{"destinations": [{"cluster": "east"}],
                         "mirror": {"cluster": "west", "service": "shadow", "percent": 30}}])], extra=(shadow,))
    rs = await get_all(three, 400, concurrency=10)
    assert {r.text for r in rs} == {"hello from east\n"}
    with trio.fail_after(5):
        while len(rec.authorities) < 60:
            await trio.sleep(0.05)
    await trio.sleep(0.2)
    assert 80 <= len(rec.authorities) <= 160, len(rec.authorities)  # 30 % of 400
    assert set(rec.authorities) == {"shadow.shop.svc.cluster.local-shadow:8080"}
    m = await three.admin("metrics")
    assert f'isthmus_mirror_requests_total{{outcome="sent"}} {float(len(rec.authorities))}' in m


async def test_a_slow_or_dead_mirror_never_delays_or_fails_the_primary(three: Three) -> None:
    three.apply([route([{"destinations": [{"cluster": "east"}],
                         "mirror": {"cluster": "west", "service": "cart", "percent": 100}}])])
    slow_mirror = {"x-sample-delay": "1s", "x-sample-only": "west"}
    t0 = time.monotonic()
    rs = await get_all(three, 10, slow_mirror)
    assert {r.text for r in rs} == {"hello from east\n"}
    assert time.monotonic() - t0 < 5  # 10 sequential requests: none waited for its 1 s mirror
    three.gws["west"].stop()
    await trio.sleep(0.2)
    rs = await get_all(three, 20)
    assert {r.status_code for r in rs} == {200}


# ---------------------------------------------------------------- connections per peer


def pool_connections(metrics: str, cluster: str) -> float:
    prefix = f'isthmus_pool_connections{{destination_cluster="{cluster}"}} '
    return next((float(line[len(prefix):]) for line in metrics.splitlines() if line.startswith(prefix)), 0.0)


async def test_max_connections_per_peer_keeps_a_service_on_one_connection(
        pki3: Pki, samples: Any, nursery: trio.Nursery, tmp_path: Path) -> None:
    """With 2 streams per connection the gateway would open a connection per 2 concurrent
    requests (up to its limit of 4); the service's TrafficPolicy says 1."""
    gws = {}
    for c in CLUSTERS:
        gws[c] = Gateway(gateway_config(pki3, c, tmp_path, limits={"streams_per_connection": 2}))
        await nursery.start(gws[c].run)
    t = Three(pki3, gws, samples)
    try:
        t.apply([route([{"destinations": [{"cluster": "east"}]}])],
                [policy(connection_pool={"max_connections_per_peer": 1})])
        rs = await get_all(t, 12, {"x-sample-delay": "200ms"}, concurrency=12)
        assert {r.status_code for r in rs} == {200}
        assert pool_connections(await t.admin("metrics"), "east") == 1.0
        doc = await t.admin("config")
        assert doc["resilience"]["traffic_policies"][0]["connection_pool"] == {"max_connections_per_peer": 1}
        t.apply([route([{"destinations": [{"cluster": "east"}]}])])  # the gateway's own limits only
        rs = await get_all(t, 12, {"x-sample-delay": "200ms"}, concurrency=12)
        assert {r.status_code for r in rs} == {200}
        assert pool_connections(await t.admin("metrics"), "east") >= 2.0  # one dial at a time: 2 to 4
    finally:
        for g in gws.values():
            g.stop()


async def test_mirror_copies_keep_to_the_mirrored_services_max_connections_per_peer(
        pki3: Pki, samples: Any, nursery: trio.Nursery, tmp_path: Path) -> None:
    """The copies of 12 concurrent slow requests to west (2 streams per connection) would
    open more connections there; the service's TrafficPolicy says 1, for its copies too."""
    gws = {}
    for c in CLUSTERS:
        gws[c] = Gateway(gateway_config(pki3, c, tmp_path, limits={"streams_per_connection": 2}))
        await nursery.start(gws[c].run)
    t = Three(pki3, gws, samples)
    mirrored = [route([{"destinations": [{"cluster": "east"}],
                        "mirror": {"cluster": "west", "service": "cart", "percent": 100}}])]

    async def copies_sent(n: int) -> None:
        with trio.fail_after(5):  # the copies are on their way when the answers are in
            while f'isthmus_mirror_requests_total{{outcome="sent"}} {n:.1f}' not in await t.admin("metrics"):
                await trio.sleep(0.05)
        await trio.sleep(0.3)  # and answered (200 ms each)

    try:
        t.apply(mirrored, [policy(connection_pool={"max_connections_per_peer": 1})])
        assert [r.status_code for r in await get_all(t, 1)] == [200]  # one connection to west, idle
        await copies_sent(1)
        rs = await get_all(t, 12, {"x-sample-delay": "200ms"}, concurrency=12)
        assert {r.status_code for r in rs} == {200}
        await copies_sent(13)
        assert pool_connections(await t.admin("metrics"), "west") == 1.0
        t.apply(mirrored)  # the gateway's own limits only: the same copies open more
        rs = await get_all(t, 12, {"x-sample-delay": "200ms"}, concurrency=12)
        assert {r.status_code for r in rs} == {200}
        await copies_sent(25)
        assert pool_connections(await t.admin("metrics"), "west") >= 2.0
    finally:
        for g in gws.values():
            g.stop()


def test_flags_are_kept_once_each_in_the_order_they_were_set() -> None:
    from gateway._flags import add_flag, ended
    flags = ""
    for f in ("DI", "UT", "DI", "UT"):
        flags = add_flag(flags, f)
    assert flags == "DI,UT"
    assert add_flag("DI", "FI") == "DI,FI" and add_flag("", "") == ""
    assert not ended("") and not ended("DI") and ended("DI,UT") and ended("UO")


async def test_a_mirrored_grpc_call_reaches_the_mirror_as_shadow_and_a_dead_mirror_changes_nothing(
        three: Three, nursery: trio.Nursery) -> None:
    rec = await nursery.start(Recording().serve)
    shadow = ExportedService(cluster="west", namespace="shop", name="shadow", ports=(
        ServicePort(port=9090, protocol="GRPC", target=f"127.0.0.1:{rec.port}"),))
    mirror = [route([{"destinations": [{"cluster": "east"}],
                      "mirror": {"cluster": "west", "service": "shadow", "percent": 100}}], "hello", "hello")]
    three.apply(mirror, extra=(shadow,))
    results = [(await trio.to_thread.run_sync(lambda: grpc_call(three)))[0] for _ in range(5)]
    assert results == ["hello x from east"] * 5
    with trio.fail_after(5):
        while len(rec.authorities) < 5:
            await trio.sleep(0.02)
    assert set(rec.authorities) == {"shadow.shop.svc.cluster.local-shadow:9090"}
    assert rec.grpc == 5  # the copies are gRPC requests (content-type application/grpc), body included
    # The mirror's service goes away (nothing listens on its port): the primary is unaffected.
    dead = ExportedService(cluster="west", namespace="shop", name="shadow", ports=(
        ServicePort(port=9090, protocol="GRPC", target="127.0.0.1:1"),))
    three.apply(mirror, extra=(dead,))
    calls = [await trio.to_thread.run_sync(lambda: grpc_call(three)) for _ in range(10)]
    assert [r for r, _ in calls] == ["hello x from east"] * 10
    assert max(took for _, took in calls) < 1.0
    three.gws["west"].stop()  # and the mirror's gateway too
    await trio.sleep(0.2)
    calls = [await trio.to_thread.run_sync(lambda: grpc_call(three)) for _ in range(10)]
    assert [r for r, _ in calls] == ["hello x from east"] * 10
    m = await three.admin("metrics")
    assert 'isthmus_mirror_requests_total{outcome="failed"}' in m


async def test_requests_under_a_timeout_leave_no_live_timer_behind(three: Three) -> None:
    """A 30 s route timeout and 200 answered requests: the outbound gateway's heap keeps
    none of their callbacks (each request's timer was cancelled when it finished)."""
    three.apply([route([{"destinations": [{"cluster": "east"}], "timeout": "30s",
                         "retries": {"attempts": 2, "per_try_timeout": "20s"}}])])
    south = three.gws["south"]
    rs = await get_all(three, 200, concurrency=8)
    assert all(r.status_code == 200 for r in rs), {r.status_code for r in rs}
    await trio.sleep(0.05)
    live = [e for e in south.deadlines.heap if e[2].expire is not None]
    assert len(live) <= 8, len(live)  # at most the requests still closing

"""Traffic summaries and the topology page (issue 15): a real federation on real etcd.

The summary RPC is authorized like ReportApplied (a cluster's gateway reports only its
own cluster's traffic) and size-capped; summaries live under a short lease; the page
needs its token (401 otherwise) and escapes every name it shows.  One federation for
the module (its page behind a token on loopback).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from aetcd.rpc import rpc_pb2 as etcd_pb

from federation._errors import RemoteError
from federation.server import free_port
from federation.server._etcd import Etcd
from federation.server._summaries import summary_key
from federation.server._store import Keys
from federation.topology import MAX_EDGES, MAX_SUMMARY_BYTES, NBUCKETS, SUMMARY_TTL

from .fixtures import FederationProcess, JoinedCluster, Pki, join_cluster, make_pki, start_etcd, start_federation
from tests.scratch import scratch_dir

TOKEN = "topology-test-token-0123456789"
EVIL = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FederationProcess, Pki, str, dict[str, JoinedCluster], object]]:
    tmp = scratch_dir(request, tmp_path_factory, "topology")
    etcd = start_etcd(tmp)
    pki = make_pki(tmp)
    (tmp / "token").write_text(TOKEN + "\n")
    web = free_port()
    fed = start_federation(pki, etcd.endpoint, tmp, extra=("--web-listen", f"127.0.0.1:{web}",
                                                          "--web-token-file", str(tmp / "token")))
    clusters = {
        "east": join_cluster(fed, pki, "east", tmp, labels={"region": EVIL}),
        "west": join_cluster(fed, pki, "west", tmp, gateway_addresses=("127.0.0.1:15444",)),
    }
    try:
        yield fed, pki, f"http://127.0.0.1:{web}", clusters, etcd
    finally:
        fed.stop()
        etcd.stop()


def summary(at: float, edges: list[dict[str, object]], interval: float = 5.0) -> str:
    return json.dumps({"at": at, "interval": interval, "edges": edges})


def edge(src: str = "east", dst: str = "west", svc: str = "web", reporter: str = "source", requests: int = 50,
         errors: int = 0, latency: list[int] | None = None, **kw: object) -> dict[str, object]:
    return {"source_cluster": src, "destination_cluster": dst, "namespace": "shop", "service": svc,
            "reporter": reporter, "requests": requests, "errors": errors,
            "latency": latency if latency is not None else [0, 0, 0, requests], **kw}


def refused(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(RemoteError) as err:
        call()
    return err.value.code


def test_a_gateway_may_report_only_its_own_clusters_traffic(world) -> None:  # type: ignore[no-untyped-def]
    fed, pki, _, clusters, _ = world
    now = time.time()
    with fed.client(clusters["east"].gateway_dir) as east, fed.client(pki.admin_dir) as admin:
        # As another cluster's gateway ...
        assert refused(lambda: east.report_traffic("west/gw-1", summary(now, [edge()]))) == grpc.StatusCode.PERMISSION_DENIED
        # ... or an edge whose reporting end is another cluster (outbound: source; inbound: destination).
        assert refused(lambda: east.report_traffic("east/gw-1", summary(now, [edge(src="west", dst="east")]))) == (
            grpc.StatusCode.PERMISSION_DENIED)
        assert refused(lambda: east.report_traffic("east/gw-1", summary(now, [edge(reporter="destination")]))) == (
            grpc.StatusCode.PERMISSION_DENIED)
        # An admin has no traffic to report; nonsense counts are refused with their field.
        assert refused(lambda: admin.report_traffic("", summary(now, []))) == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(RemoteError) as err:
            east.report_traffic("east/gw-1", summary(now, [edge(requests=1, errors=2)]))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "edges[0]" in str(err.value)
        assert refused(lambda: east.report_traffic("east/gw-1", "{not json")) == grpc.StatusCode.INVALID_ARGUMENT
        assert admin.traffic()["edges"] == []  # nothing refused was stored
        # Its own outbound edge, and the inbound edge of a call into east, are accepted.
        east.report_traffic("east/gw-1", summary(now, [edge(), edge(src="west", dst="east", reporter="destination")]))
        edges = {(e["source_cluster"], e["destination_cluster"]) for e in admin.traffic()["edges"]}
        assert edges == {("east", "west"), ("west", "east")}


def test_summaries_are_capped_in_size_and_edges(world) -> None:  # type: ignore[no-untyped-def]
    fed, _, _, clusters, _ = world
    now = time.time()
    with fed.client(clusters["west"].gateway_dir) as west:
        many = [edge(src="west", dst="east", svc=f"s{i}") for i in range(MAX_EDGES + 1)]
        assert refused(lambda: west.report_traffic("west/gw-1", summary(now, many))) == grpc.StatusCode.RESOURCE_EXHAUSTED
        big = [edge(src="west", dst="east", svc="x" * 250 + str(i)) for i in range(MAX_SUMMARY_BYTES // 250)]
        assert len(summary(now, big)) > MAX_SUMMARY_BYTES
        assert refused(lambda: west.report_traffic("west/gw-1", summary(now, big))) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert west.report_traffic("west/gw-1", summary(now, many[:MAX_EDGES])) == SUMMARY_TTL


def test_figures_over_the_window_and_the_lease_that_ages_a_gateway_out(world) -> None:  # type: ignore[no-untyped-def]
    fed, pki, _, clusters, etcd = world
    now = time.time()
    latency = [0] * NBUCKETS
    latency[5] = 90  # 20-50 ms
    latency[8] = 10  # 200-500 ms
    with fed.client(clusters["east"].gateway_dir) as east, fed.client(pki.admin_dir) as admin:
        # Two pushes 5 s apart: 200 requests over 10 s, 10 failed.
        east.report_traffic("east/fig", summary(now - 5, [edge(svc="cart", requests=100, latency=latency)]))
        east.report_traffic("east/fig", summary(now, [edge(svc="cart", requests=100, errors=10, latency=latency,
                                                           tcp_active=3, tcp_opened=3)]))
        [e] = [e for e in admin.traffic()["edges"] if e["service"] == "cart"]
        assert e["requests"] == 200 and e["errors"] == 10
        assert e["rps"] == pytest.approx(20.0, rel=0.01)
        assert e["success_rate"] == pytest.approx(0.95)
        assert 20 <= e["p50_ms"] <= 50 and 200 <= e["p99_ms"] <= 500
        assert e["tcp_active"] == 3 and e["gateways"] == ["east/fig"]
        assert [s["error_rate"] for s in e["recent"]] == [0.0, 2.0]

    async def lease() -> tuple[int, int]:
        async with Etcd(etcd.endpoint) as c:
            kv = await c.get(summary_key(Keys(), "east", "fig"))
            assert kv is not None and kv.lease
            ttl = await c.lease.LeaseTimeToLive(etcd_pb.LeaseTimeToLiveRequest(ID=kv.lease))
            await c.revoke(kv.lease)  # what the lease's expiry does when the gateway is gone
            return ttl.grantedTTL, ttl.TTL

    granted, left = asyncio.run(lease())
    assert granted == SUMMARY_TTL and 0 < left <= SUMMARY_TTL
    with fed.client(pki.admin_dir) as admin:
        assert not [e for e in admin.traffic()["edges"] if e["service"] == "cart"]


def _get(base: str, path: str, **kw: object) -> httpx.Response:
    return httpx.get(base + path, timeout=5, **kw)  # type: ignore[arg-type]


def test_the_page_needs_its_token_and_a_bad_one_gets_401(world) -> None:  # type: ignore[no-untyped-def]
    _, _, base, _, _ = world
    assert _get(base, "/").status_code == 401
    assert _get(base, "/api/v1/topology").status_code == 401
    assert _get(base, "/api/v1/topology", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _get(base, "/", cookies={"isthmus_session": "forged"}).status_code == 401
    bad = httpx.post(base + "/login", data={"token": "not-the-token"}, timeout=5)
    assert bad.status_code == 401 and "set-cookie" not in bad.headers
    ok = httpx.post(base + "/login", data={"token": TOKEN}, timeout=5, follow_redirects=False)
    assert ok.status_code == 303
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    session = ok.cookies["isthmus_session"]
    page = _get(base, "/", cookies={"isthmus_session": session})
    assert page.status_code == 200 and "<svg" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert _get(base, "/api/v1/topology", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert _get(base, "/static/topology.js").status_code == 200  # the login page's assets need no login


def test_the_page_and_its_json_escape_cluster_labels(world) -> None:  # type: ignore[no-untyped-def]
    _, _, base, _, _ = world
    auth = {"Authorization": f"Bearer {TOKEN}"}
    page = _get(base, "/", headers=auth).text
    assert EVIL not in page and "<script>alert" not in page
    assert "region=&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert re.findall(r"<script[^>]*>", page) == ["<script src=/static/topology.js defer>"]
    raw = _get(base, "/api/v1/topology", headers=auth)
    assert "<" not in raw.text and ">" not in raw.text  # \u003c: safe even if sniffed as HTML
    doc = raw.json()
    [east] = [c for c in doc["clusters"] if c["name"] == "east"]
    assert east["labels"] == {"region": EVIL}  # the data itself is intact
    assert 80 <= east["cert_days_left"] <= 90 and east["state"] in ("LIVE", "STALE", "EXPIRED")
    assert doc["version"] == 1 and {"clusters", "gateways", "services", "edges", "graph"} <= doc.keys()


def test_a_page_on_a_non_loopback_address_needs_a_token_file(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    r = subprocess.run([sys.executable, "-m", "federation", "serve", "--trust-dir", str(pki.trust_dir),
                        "--data-dir", str(tmp_path / "d"), "--listen", f"127.0.0.1:{free_port()}",
                        "--web-listen", "0.0.0.0:18099"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "--web-token-file" in r.stderr and "Traceback" not in r.stderr


def test_an_unreachable_prometheus_is_shown_on_the_page_and_is_not_fatal(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, pki, _, _, etcd = world
    web = free_port()
    fed = start_federation(pki, etcd.endpoint, tmp_path, name="prom", extra=(
        "--etcd-prefix", "/prom/", "--web-listen", f"127.0.0.1:{web}", "--prometheus", f"http://127.0.0.1:{free_port()}"))
    try:
        doc = httpx.get(f"http://127.0.0.1:{web}/api/v1/topology", timeout=10).json()
        assert doc["source"] == "prometheus" and doc["edges"] == []
        [problem] = doc["problems"]
        assert problem.startswith("Prometheus at http://127.0.0.1:") and "ConnectError" in problem
        page = httpx.get(f"http://127.0.0.1:{web}/", timeout=10)
        assert page.status_code == 200 and "class=problem" in page.text
        assert fed.proc.poll() is None
    finally:
        fed.stop()


def test_an_edge_names_the_routes_and_policies_that_apply_to_its_service(world) -> None:  # type: ignore[no-untyped-def]
    fed, pki, base, clusters, _ = world
    with fed.client(pki.admin_dir) as admin, fed.client(clusters["east"].gateway_dir) as east:
        admin.apply_documents([
            {"kind": "TrafficRoute", "name": "shop-api", "host": {"namespace": "shop", "service": "api"},
             "rules": [{"destinations": [{"cluster": "west"}]}]},
            {"kind": "AuthorizationPolicy", "name": "api-from-east", "selector": {"namespace": "shop", "service": "api"},
             "rules": [{"from": [{"clusters": ["east"]}]}]},
            {"kind": "AuthorizationPolicy", "name": "other", "selector": {"namespace": "shop", "service": "db"}},
        ])
        east.report_traffic("east/routes", summary(time.time(), [edge(svc="api")]))
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def api_edge() -> dict[str, object] | None:
        doc = _get(base, "/api/v1/topology", headers=auth).json()
        return next((e for e in doc["edges"] if e["id"] == "east>shop/api@west" and e["routes"]), None)

    deadline = time.monotonic() + 10
    while (got := api_edge()) is None and time.monotonic() < deadline:  # the hub streams the apply
        time.sleep(0.2)
    assert got is not None
    assert got["routes"] == ["shop-api"] and got["policies"] == ["AuthorizationPolicy/api-from-east"]


def test_any_replica_shows_every_gateways_summaries(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fed, pki, _, clusters, etcd = world
    with fed.client(clusters["west"].gateway_dir) as west:  # pushed to the first replica
        west.report_traffic("west/ha", summary(time.time(), [edge(src="west", dst="east", svc="ha-only")]))
    web = free_port()
    (tmp_path / "token").write_text(TOKEN)
    other = start_federation(pki, etcd.endpoint, tmp_path, name="replica2", extra=(
        "--web-listen", f"127.0.0.1:{web}", "--web-token-file", str(tmp_path / "token")))
    try:
        doc = httpx.get(f"http://127.0.0.1:{web}/api/v1/topology", headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=10).json()
        [e] = [e for e in doc["edges"] if e["service"] == "ha-only"]
        assert e["gateways"] == ["west/ha"] and e["rps"] > 0
    finally:
        other.stop()

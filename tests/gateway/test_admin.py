"""Admin endpoint: health, readiness, Prometheus metrics (Istio names/labels), /config;
one JSON access-log line per request."""

from __future__ import annotations

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from gateway import Gateway

from .conftest import Mesh, gateway_config

WEB = "web.default.west.isthmus.local:8080"


async def _admin(gw: Gateway, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as c:
        return await c.get(f"http://127.0.0.1:{gw.ports['admin']}{path}")


async def test_health_and_readiness(pki, nursery: trio.Nursery, tmp_path) -> None:
    gw = Gateway(gateway_config(pki, "east", tmp_path))
    await nursery.start(gw.run)
    assert (await _admin(gw, "/healthz")).status_code == 200
    assert (await _admin(gw, "/readyz")).status_code == 503  # no config yet
    from .conftest import make_snapshot
    gw.apply_snapshot(make_snapshot(pki, {"east": 1, "west": 2}, 1, 1, 1, 1))
    assert (await _admin(gw, "/readyz")).status_code == 200
    assert (await _admin(gw, "/nope")).status_code == 404
    gw.stop()


def _samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


async def test_metrics_have_istio_names_and_bounded_labels(mesh: Mesh, logs) -> None:
    async with httpx.AsyncClient(http2=True, http1=False) as c:
        for path in ("/echo?a=1", "/echo?a=2", "/status/503"):
            await c.get(f"http://127.0.0.1:{mesh.east_out}{path}", headers={"host": WEB})
    r = await _admin(mesh.east, "/metrics")
    assert r.status_code == 200
    s = _samples(r.text)
    reqs = s["istio_requests_total"]
    ok = [x for x in reqs if x.labels["response_code"] == "200"]
    assert ok and ok[0].value == 2
    labels = ok[0].labels
    assert labels["reporter"] == "source"
    assert labels["source_cluster"] == "east" and labels["destination_cluster"] == "west"
    assert labels["destination_service"] == "web.default.svc.cluster.local"
    assert labels["destination_principal"] == "spiffe://west.isthmus.local/ns/isthmus-system/sa/isthmus-gateway"
    assert {"source_principal", "grpc_response_status", "response_flags"} <= labels.keys()
    assert any(x.labels["response_code"] == "503" for x in reqs)
    assert "istio_request_duration_milliseconds_bucket" in s
    # Paths and IPs never become label values.
    assert "/echo" not in r.text.split("# EOF")[0].replace("HELP", "")
    assert "127.0.0.1" not in r.text
    assert s["isthmus_config_revision"][0].value == 1
    assert "isthmus_config_staleness_seconds" in s
    assert s["isthmus_certificate_expiry_timestamp_seconds"][0].value > 1e9
    assert any(x.value == 1 for x in s["isthmus_pool_connections"])
    w = _samples((await _admin(mesh.west, "/metrics")).text)
    inbound = [x for x in w["istio_requests_total"] if x.labels["response_code"] == "200"]
    assert inbound and inbound[0].labels["reporter"] == "destination"
    assert inbound[0].labels["source_cluster"] == "east"
    # One access-log line per request on each gateway, with Istio's field names.
    access = [e for e in logs if e["event"] == "access"]
    assert len(access) == 6
    a = next(e for e in access if e["reporter"] == "source" and e["path"] == "/echo?a=1")
    for f in ("start_time", "method", "path", "protocol", "response_code", "response_flags",
              "bytes_received", "bytes_sent", "duration", "upstream_cluster", "authority",
              "x_forwarded_for", "trace_id", "source_cluster", "destination_cluster"):
        assert f in a
    b = next(e for e in access if e["reporter"] == "destination" and e["path"] == "/echo?a=1")
    assert a["trace_id"] == b["trace_id"]  # one trace across the hop
    assert b["peer_principal"] == "spiffe://east.isthmus.local/ns/isthmus-system/sa/isthmus-gateway"


async def test_tcp_metrics(mesh: Mesh, nursery: trio.Nursery) -> None:
    cfg = gateway_config(mesh.pki, "east", mesh.tmp, tcp_ports=[
        {"host": "127.0.0.1", "port": 0, "target": "tcpecho.default.west.isthmus.local:7"}])
    gw = Gateway(cfg)
    await nursery.start(gw.run)
    gw.apply_snapshot(mesh.snapshot())
    stream = await trio.open_tcp_stream("127.0.0.1", gw.ports["tcp:tcpecho.default.west.isthmus.local:7"])
    await stream.send_all(b"x" * 1000)
    await stream.send_eof()
    got = b""
    with trio.fail_after(5):
        while d := await stream.receive_some(4096):
            got += d
    await stream.aclose()
    await trio.sleep(0.05)
    s = _samples((await _admin(gw, "/metrics")).text)
    assert s["istio_tcp_connections_opened_total"][0].value == 1
    assert s["istio_tcp_connections_closed_total"][0].value == 1
    assert s["istio_tcp_received_bytes_total"][0].value == 1000
    assert s["istio_tcp_sent_bytes_total"][0].value == 1000
    gw.stop()


async def test_config_endpoint_shows_revision_and_routes(mesh: Mesh) -> None:
    doc = (await _admin(mesh.east, "/config")).json()
    assert doc["revision"] == 1
    assert doc["cluster"] == "east"
    assert "web.default.west.isthmus.local:8080" in doc["routes"]["outbound"]
    assert doc["config"]["limits"]["max_concurrent_streams"] == 1024
    assert "key_file" in doc["config"]["tls"]  # the path, never the key

"""Istio's standard metric labels, filled as a sidecar fills them, and kept bounded.

Unit tests drive :class:`gateway._telemetry.Recorder` with records as the handlers fill
them; the last tests run requests through two real gateways (a workload calling over
mTLS with its SVID, and a CONNECT tunnel) and read both ``/metrics`` endpoints.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

import trust
from gateway._routes import LocalTarget, OutboundRoute
from gateway._istio import BUCKETS, REQUEST_LABELS, TCP_LABELS, grpc_status, peer_labels
from gateway._telemetry import Exchange, Metrics, Recorder

from .conftest import Mesh

CART = "spiffe://east.isthmus.local/ns/shop/sa/cart"
EAST_GW = "spiffe://east.isthmus.local/ns/isthmus-system/sa/isthmus-gateway"
WEST_GW = "spiffe://west.isthmus.local/ns/isthmus-system/sa/isthmus-gateway"
ROUTE = OutboundRoute("default", "web", 8080, "HTTP2", (), "web.default.svc.cluster.local:8080")
TARGET = LocalTarget("default", "web", 8080, "HTTP2", "127.0.0.1", 1, False, ())


def samples(registry_or_text, name: str) -> list:
    text = registry_or_text if isinstance(registry_or_text, str) else _expose(registry_or_text)
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


def _expose(m: Metrics) -> str:
    from prometheus_client import generate_latest
    return generate_latest(m.registry).decode()


def outbound_record(rec: Recorder, source: str = CART, code: int = 200) -> Exchange:
    x = Exchange("source", "HTTP/2", rec)
    x.source_principal, x.source_cluster = source, "east"
    x.to_service(ROUTE)
    x.destination_cluster, x.destination_principal = "west", WEST_GW
    x.response_code = code
    x.bytes_received, x.bytes_sent = 300, 7000
    return x


def inbound_record(rec: Recorder, source: str = CART) -> Exchange:
    x = Exchange("destination", "HTTP/2", rec)
    x.source_principal, x.source_cluster = source, "east"
    x.to_service(TARGET)
    x.destination_cluster, x.destination_principal = "west", WEST_GW
    x.response_code = 200
    return x


def test_outbound_reports_istios_full_label_set_with_the_callers_workload() -> None:
    m = Metrics("east")
    outbound_record(Recorder(m, False)).finish()
    (s,) = samples(m, "istio_requests_total")
    assert sorted(s.labels) == sorted(REQUEST_LABELS)  # every label of Istio's set
    assert s.labels == {
        "reporter": "source",
        "source_workload": "cart", "source_workload_namespace": "shop", "source_principal": CART,
        "source_app": "unknown", "source_version": "unknown",
        "source_canonical_service": "cart", "source_canonical_revision": "latest",
        "source_cluster": "east",
        # the outbound gateway sees the service, never the pod that will answer
        "destination_workload": "unknown", "destination_workload_namespace": "unknown",
        "destination_principal": WEST_GW, "destination_app": "unknown",
        "destination_version": "unknown",
        "destination_service": "web.default.svc.cluster.local",
        "destination_service_name": "web", "destination_service_namespace": "default",
        "destination_canonical_service": "unknown", "destination_canonical_revision": "latest",
        "destination_cluster": "west",
        "request_protocol": "http", "response_code": "200", "grpc_response_status": "",
        "response_flags": "-", "connection_security_policy": "unknown",
    }
    assert s.value == 1


def test_inbound_reports_mutual_tls_and_the_destination_namespace() -> None:
    m = Metrics("west")
    inbound_record(Recorder(m, False)).finish()
    (s,) = samples(m, "istio_requests_total")
    assert s.labels["reporter"] == "destination"
    assert s.labels["connection_security_policy"] == "mutual_tls"
    assert s.labels["destination_workload_namespace"] == "default"
    assert s.labels["destination_workload"] == "unknown"
    assert (s.labels["source_workload"], s.labels["source_workload_namespace"]) == ("cart", "shop")
    assert (s.labels["source_cluster"], s.labels["destination_cluster"]) == ("east", "west")


def test_a_caller_without_identity_is_unknown_and_one_that_is_no_workload_keeps_its_principal() -> None:
    assert peer_labels("") == ("unknown",) * 6 + ("latest",)
    admin = "spiffe://isthmus.local/admin/ops"
    assert peer_labels(admin) == ("unknown", "unknown", admin, "unknown", "unknown", "unknown",
                                  "latest")
    assert peer_labels("not a spiffe id")[2] == "unknown"
    m = Metrics()
    rec = Recorder(m, False)
    outbound_record(rec, source="").finish()
    (s,) = samples(m, "istio_requests_total")
    assert s.labels["source_workload"] == s.labels["source_principal"] == "unknown"
    assert s.labels["source_canonical_revision"] == "latest"


def test_size_histograms_use_istios_names_and_envoys_buckets() -> None:
    m = Metrics()
    outbound_record(Recorder(m, False)).finish()
    req = samples(m, "istio_request_bytes_bucket")
    resp = samples(m, "istio_response_bytes_bucket")
    assert [float(s.labels["le"]) for s in req] == [*map(float, BUCKETS), float("inf")]
    assert next(s.value for s in req if s.labels["le"] == "500.0") == 1  # 300 bytes
    assert next(s.value for s in resp if s.labels["le"] == "5000.0") == 0  # 7000 bytes
    assert next(s.value for s in resp if s.labels["le"] == "10000.0") == 1
    assert samples(m, "istio_request_bytes_sum")[0].value == 300
    assert samples(m, "istio_response_bytes_sum")[0].value == 7000
    assert samples(m, "istio_request_duration_milliseconds_count")[0].value == 1


def test_identities_past_the_cap_are_reported_as_unknown_and_counted() -> None:
    m = Metrics(max_identities=3)
    rec = Recorder(m, False)
    for i in range(10):
        for _ in range(2):
            outbound_record(rec, source=f"spiffe://east.isthmus.local/ns/shop/sa/w{i}").finish()
    series = samples(m, "istio_requests_total")
    assert sorted(s.labels["source_workload"] for s in series) == ["unknown", "w0", "w1", "w2"]
    assert next(s.value for s in series if s.labels["source_workload"] == "unknown") == 14
    assert samples(m, "isthmus_telemetry_identities_overflow_total")[0].value == 14
    assert len(series) == 4  # and so is every series behind them


def test_grpc_status_label_is_bounded() -> None:
    assert grpc_status(b"0") == "0" and grpc_status(b"14") == "14"
    for bad in (b"", b"123", b"x", b"\xff\xfe", b"1" * 4096, "٣".encode()):
        assert grpc_status(bad) == "2"
    m = Metrics()
    rec = Recorder(m, False)
    for v in (b"\xff", b"99999", b"abc"):
        x = outbound_record(rec)
        x.grpc = True
        x.on_trailers([(b"grpc-status", v)])
        x.finish()
    (s,) = samples(m, "istio_requests_total")
    assert (s.labels["request_protocol"], s.labels["grpc_response_status"]) == ("grpc", "2")
    assert s.value == 3


def test_tcp_metrics_carry_the_tcp_label_set() -> None:
    m = Metrics()
    rec = Recorder(m, False)
    for _ in range(3):
        x = outbound_record(rec)
        x.tcp = True
        rec.tcp_opened(x)
        x.finish()
    (opened,) = samples(m, "istio_tcp_connections_opened_total")
    (closed,) = samples(m, "istio_tcp_connections_closed_total")
    assert sorted(opened.labels) == sorted(TCP_LABELS) and opened.labels == closed.labels
    assert opened.labels["request_protocol"] == "tcp" and opened.value == closed.value == 3
    assert samples(m, "istio_tcp_received_bytes_total")[0].value == 900
    assert samples(m, "istio_tcp_sent_bytes_total")[0].value == 21000
    assert samples(m, "istio_requests_total") == []


def test_the_gateway_names_its_cluster_once() -> None:
    (s,) = samples(Metrics("east"), "isthmus_gateway_info")
    assert s.labels == {"cluster": "east"} and s.value == 1


# -- through real gateways ----------------------------------------------------------------
async def _metrics(gw) -> str:
    async with httpx.AsyncClient() as c:
        return (await c.get(f"http://127.0.0.1:{gw.ports['admin']}/metrics")).text


async def test_an_mtls_callers_workload_labels_on_both_gateways(mesh: Mesh) -> None:
    f = mesh.pki.issue("east", "shop", "cart", "wl-cart-telemetry")
    ctx = trust.client_context(f.bundle, f.cert, f.key, alpn=("h2",))
    async with httpx.AsyncClient(http2=True, verify=ctx) as c:
        for _ in range(3):
            r = await c.post(f"https://127.0.0.1:{mesh.east_out}/echo", content=b"x" * 1000,
                             headers={"host": "web.default.west.isthmus.local:8080"})
            assert r.status_code == 200, r.text
    await trio.sleep(0.05)
    for gw, reporter in ((mesh.east, "source"), (mesh.west, "destination")):
        text = await _metrics(gw)
        (s,) = [s for s in samples(text, "istio_requests_total")
                if s.labels["response_code"] == "200"]
        assert s.value == 3 and s.labels["reporter"] == reporter
        assert s.labels["source_principal"] == CART
        assert (s.labels["source_workload"], s.labels["source_workload_namespace"]) == ("cart", "shop")
        assert (s.labels["destination_service_name"],
                s.labels["destination_service_namespace"]) == ("web", "default")
        assert (s.labels["source_cluster"], s.labels["destination_cluster"]) == ("east", "west")
        assert s.labels["connection_security_policy"] == (
            "mutual_tls" if reporter == "destination" else "unknown")
        assert samples(text, "istio_request_bytes_sum")[0].value == 3000
        assert samples(text, "istio_response_bytes_sum")[0].value > 0
        (info,) = samples(text, "isthmus_gateway_info")
        assert info.labels["cluster"] == ("east" if reporter == "source" else "west")


async def _tunnel(port: int, ctx, authority: bytes, data: bytes) -> bytes:
    """A CONNECT tunnel over mTLS HTTP/2: on its 200 send ``data`` and end our side; read
    to the end."""
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx,
                            server_hostname="gateway")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                 header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(1, [(b":method", b"CONNECT"), (b":authority", authority)])
    got = b""
    with trio.fail_after(5):
        await stream.send_all(conn.data_to_send())
        while True:
            for e in conn.receive_data(await stream.receive_some(65536)):
                if isinstance(e, h2.events.ResponseReceived):
                    assert dict(e.headers)[b":status"] == b"200", e.headers
                    conn.send_data(1, data, end_stream=True)
                elif isinstance(e, h2.events.DataReceived):
                    got += e.data
                    conn.acknowledge_received_data(e.flow_controlled_length, 1)
                elif isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)):
                    await trio.aclose_forcefully(stream)
                    return got
            await stream.send_all(conn.data_to_send())


async def test_a_tunnel_is_reported_on_both_gateways_with_the_callers_workload(mesh: Mesh) -> None:
    f = mesh.pki.issue("east", "shop", "cart", "wl-cart-tunnel")
    ctx = trust.client_context(f.bundle, f.cert, f.key, alpn=("h2",))
    assert await _tunnel(mesh.east_out, ctx, b"tcpecho.default.west.isthmus.local:7",
                         b"x" * 5000) == b"x" * 5000
    with trio.fail_after(5):
        while True:
            texts = [await _metrics(gw) for gw in (mesh.east, mesh.west)]
            if all(samples(t, "istio_tcp_connections_closed_total") for t in texts):
                break
            await trio.sleep(0.05)
    for text, reporter in zip(texts, ("source", "destination"), strict=True):
        (s,) = samples(text, "istio_tcp_connections_opened_total")
        assert s.labels["reporter"] == reporter and s.labels["request_protocol"] == "tcp"
        assert (s.labels["source_workload"], s.labels["source_cluster"]) == ("cart", "east")
        assert (s.labels["destination_service_name"], s.labels["destination_cluster"]) == (
            "tcpecho", "west")
        assert samples(text, "istio_tcp_received_bytes_total")[0].value == 5000
        assert samples(text, "istio_tcp_sent_bytes_total")[0].value == 5000


def test_recording_benchmark_smoke_mode_runs() -> None:
    """tests/bench/telemetry.py --smoke records through every scenario (its figures are
    the benchmark's, not bounds here)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "telemetry.py"
    out = subprocess.run([sys.executable, str(bench), "--smoke", "--json"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    for k in ("record_only_us", "bare_prometheus_us", "http_one_key_us", "http_500_keys_us", "tcp_us"):
        assert r[k] > 0, (k, r)

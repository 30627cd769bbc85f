"""Spans over OTLP: two real gateways in-process and a real OTLP/gRPC receiver
(opentelemetry-proto's TraceService on grpcio, tests/gateway/otlp.py); the propagation
and sampling cores checked against OpenTelemetry's own propagators and sampler."""

from __future__ import annotations

import random
import socket
import ssl

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, get_current_span, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import trust
from federation.documents import parse_document
from federation.models import AuthorizationPolicy, InvalidInput, Telemetry, TrafficRoute
from gateway._propagation import B3_MULTIPLE, B3_SINGLE, begin, incoming, parse_b3, parse_b3_multi, parse_traceparent
from gateway._tracing import TracingSettings, effective_settings, ratio_bound

from .conftest import Mesh
from .otlp import Receiver, Span

WEB_FED = "web.default.isthmus.local:8080"
CLIENT_KIND, SERVER_KIND = 3, 2


# ---------------------------------------------------------------- the pure cores


def _otel(carrier: dict[str, str], propagator) -> SpanContext:  # type: ignore[no-untyped-def]
    return get_current_span(propagator.extract(carrier)).get_span_context()


def test_w3c_and_b3_read_as_opentelemetrys_propagators_read_them() -> None:
    rng = random.Random(7)
    for _ in range(200):
        trace, span = rng.getrandbits(128) or 1, rng.getrandbits(64) or 1
        sampled = rng.choice((True, False))
        tp = f"00-{trace:032x}-{span:016x}-{'01' if sampled else '00'}"
        ours = parse_traceparent(tp.encode())
        theirs = _otel({"traceparent": tp}, TraceContextTextMapPropagator())
        assert ours is not None and (int(ours.trace, 16), int(ours.span, 16), ours.sampled) == \
            (theirs.trace_id, theirs.span_id, theirs.trace_flags.sampled)
        single = f"{trace:032x}-{span:016x}-{'1' if sampled else '0'}"
        ours = parse_b3(single.encode())
        theirs = _otel({"b3": single}, B3SingleFormat())
        assert ours is not None and (int(ours.trace, 16), int(ours.span, 16), ours.sampled) == \
            (theirs.trace_id, theirs.span_id, theirs.trace_flags.sampled)
        multi = {"x-b3-traceid": f"{trace & ((1 << 64) - 1):016x}", "x-b3-spanid": f"{span:016x}",
                 "x-b3-sampled": "1" if sampled else "0"}
        ours = parse_b3_multi({k.encode(): v.encode() for k, v in multi.items()})
        theirs = _otel(multi, B3MultiFormat())
        assert ours is not None and (int(ours.trace, 16), int(ours.span, 16), ours.sampled) == \
            (theirs.trace_id, theirs.span_id, theirs.trace_flags.sampled)
    for bad in (b"", b"00-" + b"0" * 32 + b"-" + b"1" * 16 + b"-01", b"ff-" + b"1" * 32 + b"-" + b"1" * 16 + b"-01",
                b"00-" + b"G" * 32 + b"-" + b"1" * 16 + b"-01"):
        assert parse_traceparent(bad) is None
    assert parse_b3(b"abc-def") is None and parse_b3(b"x") is None


def test_sampling_is_opentelemetrys_parent_based_ratio_sampler() -> None:
    rng = random.Random(11)
    for pct in (0.0, 1.0, 37.5, 100.0):
        sdk = ParentBased(TraceIdRatioBased(pct / 100))
        bound = ratio_bound(pct)
        for _ in range(300):
            trace = rng.getrandbits(128) or 1
            parent = rng.choice((None, True, False))
            if parent is None:
                ctx, inc = None, None
            else:
                sc = SpanContext(trace, rng.getrandbits(64) or 1, True, TraceFlags(1 if parent else 0))
                ctx = set_span_in_context(NonRecordingSpan(sc))
                inc = parse_traceparent(f"00-{trace:032x}-{sc.span_id:016x}-{'01' if parent else '00'}".encode())
            hop = begin(inc, bound=bound)
            if parent is None:  # a new trace: judge the id the hop chose
                trace = hop.trace_id
            want = sdk.should_sample(ctx or Context(), trace, "x").decision == Decision.RECORD_AND_SAMPLE
            assert hop.sampled == want


def test_b3_is_written_back_in_the_form_it_came_in() -> None:
    ctx, fmt = incoming(None, b"a3ce929d0e0e4736-00f067aa0ba902b7-1", None)
    assert fmt == B3_SINGLE
    hop = begin(ctx, fmt)
    h = dict(hop.headers())
    assert h[b"b3"].startswith(b"a3ce929d0e0e4736-") and h[b"b3"].endswith(b"-1-00f067aa0ba902b7")
    assert h[b"traceparent"].startswith(b"00-0000000000000000a3ce929d0e0e4736-")
    ctx, fmt = incoming(None, None, {b"x-b3-traceid": b"1" * 32, b"x-b3-spanid": b"2" * 16, b"x-b3-flags": b"1"})
    h = dict(begin(ctx, fmt).headers())
    assert fmt == B3_MULTIPLE and h[b"x-b3-traceid"] == b"1" * 32 and h[b"x-b3-parentspanid"] == b"2" * 16
    assert h[b"x-b3-sampled"] == b"1" and b"b3" not in h


def test_telemetry_documents_override_the_gateway_config_narrowest_last() -> None:
    base = TracingSettings(collector="", sampling_percentage=1.0)
    docs = [Telemetry.model_validate({"name": "mesh", "tracing": {"collector": "otel:4317",
                                                                  "random_sampling_percentage": 10}}),
            Telemetry.model_validate({"name": "east-only", "clusters": ["east"],
                                      "tracing": {"random_sampling_percentage": 50}})]
    assert effective_settings(base, docs, "east") == TracingSettings(collector="otel:4317", sampling_percentage=50)
    assert effective_settings(base, docs, "west") == TracingSettings(collector="otel:4317", sampling_percentage=10)
    off = Telemetry.model_validate({"name": "zz", "clusters": ["west"], "tracing": {"disable_span_reporting": True}})
    assert not effective_settings(base, [*docs, off], "west").enabled


@pytest.mark.parametrize(("tracing", "field"), [
    ({"collector": "otel"}, "tracing.collector"),
    ({"random_sampling_percentage": 101}, "tracing.random_sampling_percentage"),
    ({"protocol": "zipkin"}, "tracing.protocol"),
])
def test_a_bad_telemetry_document_is_refused_with_its_field_path(tracing: dict, field: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_document({"kind": "Telemetry", "name": "t", "tracing": tracing})
    assert e.value.field == field


# ---------------------------------------------------------------- through two gateways


@pytest.fixture
def receiver():  # type: ignore[no-untyped-def]
    r = Receiver()
    yield r
    r.stop()


def _telemetry(collector: str, pct: float) -> Telemetry:
    return Telemetry.model_validate({"name": "mesh", "tracing": {"collector": collector,
                                                                 "random_sampling_percentage": pct}})


ROUTE = TrafficRoute.model_validate({"name": "web", "host": {"namespace": "default", "service": "web"},
                                     "rules": [{"destinations": [{"cluster": "west"}]}]})
DENY = AuthorizationPolicy.model_validate({"name": "no-admin", "action": "DENY",
                                           "selector": {"namespace": "default", "service": "web"},
                                           "rules": [{"to": [{"paths": ["/admin*"]}]}]})


def _apply(mesh: Mesh, revision: int, *telemetry: Telemetry) -> None:
    snap = mesh.snapshot(revision).model_copy(update={"telemetry": telemetry, "routes": (ROUTE,),
                                                       "policies": (DENY,)})
    for g in (mesh.east, mesh.west):
        assert g.apply_snapshot(snap), g.last_rejected


def _workload(mesh: Mesh) -> ssl.SSLContext:
    f = mesh.pki.issue("east", "default", "client", "wl-east-client")
    return trust.client_context(f.bundle, f.cert, f.key, alpn=("h2",))


async def _spans(receiver: Receiver, n: int) -> list[Span]:
    return await trio.to_thread.run_sync(receiver.wait_for, n)


def _pair(spans: list[Span], trace: str) -> tuple[Span, Span]:
    [client] = [s for s in spans if s.trace_id == trace and s.kind == CLIENT_KIND]
    [server] = [s for s in spans if s.trace_id == trace and s.kind == SERVER_KIND]
    return client, server


async def test_a_request_through_two_gateways_yields_a_client_and_a_server_span(mesh: Mesh, receiver: Receiver) -> None:
    _apply(mesh, 2, _telemetry(receiver.address, 100))
    async with httpx.AsyncClient(http2=True, http1=False, verify=_workload(mesh)) as c:
        r = await c.get(f"https://127.0.0.1:{mesh.east_out}/echo?x=1", headers={"host": WEB_FED})
        denied = await c.get(f"https://127.0.0.1:{mesh.east_out}/admin", headers={"host": WEB_FED})
    assert r.status_code == 200 and denied.status_code == 403
    seen = r.json()["headers"]["traceparent"].split("-")
    client, server = _pair(await _spans(receiver, 4), seen[1])
    assert server.parent_span_id == client.span_id and client.parent_span_id == ""
    assert seen[2] == server.span_id  # the service's parent is the inbound's span
    assert (client.service, server.service) == ("isthmus-gateway.east", "isthmus-gateway.west")
    assert client.name == server.name == "GET" and client.status_code == server.status_code == 0
    east_wl = "spiffe://east.isthmus.local/ns/default/sa/client"
    for s in (client, server):
        a = s.attributes
        assert a["http.request.method"] == "GET" and a["http.response.status_code"] == 200
        assert a["network.protocol.version"] == "2"
        assert a["isthmus.source_cluster"] == "east" and a["isthmus.destination_cluster"] == "west"
        assert a["isthmus.source_principal"] == east_wl
        assert a["isthmus.destination_principal"].startswith("spiffe://west.isthmus.local/")
    assert client.attributes["url.full"] == f"https://{WEB_FED}/echo?x=1"
    assert client.attributes["isthmus.route.name"] == "web" and client.attributes["isthmus.route.rule"] == 0
    assert server.attributes["url.path"] == "/echo" and server.attributes["url.query"] == "x=1"
    assert server.attributes["isthmus.authz.decision"] == "allow"
    assert server.attributes["isthmus.peer_principal"].startswith("spiffe://east.isthmus.local/")
    spans = receiver.wait_for(4)
    [deny] = [s for s in spans if s.kind == SERVER_KIND and s.attributes.get("url.path") == "/admin"]
    assert deny.attributes["isthmus.authz.decision"] == "deny"
    assert deny.attributes["isthmus.authz.policy"] == "no-admin"
    assert deny.attributes["isthmus.response_flags"] == "RBAC" and deny.attributes["http.response.status_code"] == 403
    # HTTP conventions: a 4xx is the server span's success and the client span's error.
    [caller] = [s for s in spans if s.kind == CLIENT_KIND and s.trace_id == deny.trace_id]
    assert "error.type" not in deny.attributes and deny.status_code == 0
    assert caller.attributes["error.type"] == "403" and caller.status_code == 2


@pytest.mark.parametrize("case", ["w3c", "b3", "b3multi", "none"])
async def test_each_incoming_context_is_continued_across_both_gateways(mesh: Mesh, receiver: Receiver,
                                                                       case: str) -> None:
    _apply(mesh, 2, _telemetry(receiver.address, 100))
    trace, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {"host": WEB_FED, **{
        "w3c": {"traceparent": f"00-{trace}-{parent}-01"},
        "b3": {"b3": f"{trace}-{parent}-1"},
        "b3multi": {"x-b3-traceid": trace, "x-b3-spanid": parent, "x-b3-sampled": "1"},
        "none": {},
    }[case]}
    async with httpx.AsyncClient(http2=True, http1=False) as c:
        r = await c.get(f"http://127.0.0.1:{mesh.east_out}/echo", headers=headers)
    assert r.status_code == 200
    seen = r.json()["headers"]
    got = seen["traceparent"].split("-")[1]
    client, server = _pair(await _spans(receiver, 2), got)
    assert server.parent_span_id == client.span_id
    if case == "none":
        assert client.parent_span_id == "" and got != trace
    else:
        assert got == trace and client.parent_span_id == parent
    if case == "b3":
        assert seen["b3"] == f"{trace}-{server.span_id}-1-{client.span_id}"
    if case == "b3multi":
        assert (seen["x-b3-traceid"], seen["x-b3-spanid"], seen["x-b3-parentspanid"]) == \
            (trace, server.span_id, client.span_id)


async def test_sampling_zero_exports_no_span_of_a_new_trace(mesh: Mesh, receiver: Receiver) -> None:
    _apply(mesh, 2, _telemetry(receiver.address, 0))
    async with httpx.AsyncClient(http2=True, http1=False) as c:
        for _ in range(5):
            r = await c.get(f"http://127.0.0.1:{mesh.east_out}/echo", headers={"host": WEB_FED})
            assert r.status_code == 200 and r.json()["headers"]["traceparent"].endswith("-00")
        _apply(mesh, 3, _telemetry(receiver.address, 100))  # a marker: spans are exported again
        r = await c.get(f"http://127.0.0.1:{mesh.east_out}/echo", headers={"host": WEB_FED})
    marker = r.json()["headers"]["traceparent"].split("-")[1]
    spans = await _spans(receiver, 2)
    for g in (mesh.east, mesh.west):
        g.tracing.flush()
    assert {s.trace_id for s in receiver.wait_for(2)} == {marker} and len(spans) == 2


def _metric(registry, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    v = registry.get_sample_value(name, labels)
    return v or 0.0


async def _twenty_requests(mesh: Mesh) -> None:
    async with httpx.AsyncClient(http2=True, http1=False) as c:
        for _ in range(20):
            r = await c.get(f"http://127.0.0.1:{mesh.east_out}/echo", headers={"host": WEB_FED})
            assert r.status_code == 200


async def test_a_dead_collector_drops_and_counts_spans_and_is_logged_once(mesh: Mesh, logs) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    east, reg = mesh.east, mesh.east.metrics.registry
    east.tracing.apply(TracingSettings(collector=dead, sampling_percentage=100, max_queue_size=4,
                                       max_export_batch_size=1, schedule_delay=0.01, export_timeout=0.5))
    await _twenty_requests(mesh)

    def dropped() -> float:
        return sum(_metric(reg, "isthmus_trace_spans_dropped_total", reason=r)
                   for r in ("queue_full", "export_failed", "collector_down"))

    with trio.fail_after(30):  # every span is dropped and counted, one way or the other
        while dropped() < 20:
            await trio.sleep(0.05)
    assert dropped() == 20 and _metric(reg, "isthmus_trace_spans_exported_total") == 0
    assert _metric(reg, "isthmus_trace_spans_dropped_total", reason="export_failed") >= 1
    # After the first failure the collector is left alone: later spans are not even made.
    assert _metric(reg, "isthmus_trace_spans_dropped_total", reason="collector_down") > 0
    assert [e["event"] for e in logs].count("tracing.export_failed") == 1  # once a minute at most
    assert east.config_document()["tracing"]["collector_reachable"] is False
    east.tracing.apply(TracingSettings())


async def test_a_slow_collector_fills_the_queue_and_new_spans_are_dropped(mesh: Mesh) -> None:
    slow = Receiver(delay=2.0)
    try:
        east, reg = mesh.east, mesh.east.metrics.registry
        east.tracing.apply(TracingSettings(collector=slow.address, sampling_percentage=100, max_queue_size=2,
                                           max_export_batch_size=1, schedule_delay=0.01, export_timeout=5))
        await _twenty_requests(mesh)  # each answered while the exporter waits on the collector
        assert _metric(reg, "isthmus_trace_spans_dropped_total", reason="queue_full") >= 10
        east.tracing.apply(TracingSettings())
    finally:
        slow.stop()


def test_spans_go_over_otlp_http_too() -> None:
    from prometheus_client import CollectorRegistry

    from gateway._propagation import begin as begin_hop
    from gateway._telemetry import Exchange
    from gateway._tracing import Tracing

    from .otlp import HttpReceiver

    r = HttpReceiver()
    t = Tracing("east", CollectorRegistry(), TracingSettings(collector=r.address, protocol="http",
                                                             sampling_percentage=100))
    try:
        x = Exchange("source", "HTTP/1.1", lambda x: None)
        x.method, x.path, x.authority, x.response_code = "POST", "/cart", "cart.shop.isthmus.local:8080", 503
        x.response_flags, x.trace = "UH", begin_hop(None, bound=t.bound)
        t.record(x, 2.5)
        t.flush()
        [span] = r.wait_for(1)
        assert span.trace_id == x.trace.trace_hex and span.kind == CLIENT_KIND and span.status_code == 2
        assert span.attributes["error.type"] == "503" and span.attributes["isthmus.response_flags"] == "UH"
        assert span.attributes["network.protocol.version"] == "1.1" and span.end - span.start == 2_500_000
    finally:
        t.close()
        r.stop()


def test_the_gateway_configs_tracing_block_is_validated_with_its_field_path() -> None:
    from gateway._config import parse_config
    from gateway._errors import ConfigError

    for bad in ({"collector": "otel"}, {"random_sampling_percentage": -1}, {"collector": "ftp://x:1"}):
        with pytest.raises(ConfigError, match=r"tracing\.(collector|random_sampling_percentage)"):
            parse_config({"tracing": bad})
    assert parse_config({"tracing": {"collector": "http://otel:4318/v1/traces", "protocol": "http"}})


def test_telemetry_rides_the_watch_in_snapshots_and_deltas() -> None:
    import json

    from federation.client import Change, SnapshotTracker, WatchMessage, decode_event, read_snapshot
    from federation.proto import federation_pb2 as pb

    doc = _telemetry("otel:4317", 5)
    snap, _ = read_snapshot(json.dumps({"revision": 3, "telemetry": [doc.model_dump(mode="json"),
                                                                     {"name": "BAD", "tracing": {}}]}),
                            on_invalid=lambda *a: None)
    assert snap.telemetry == (doc,)  # the unreadable one is skipped
    tracker = SnapshotTracker()
    tracker.apply(WatchMessage(3, snapshot=snap))
    narrower = Telemetry.model_validate({"name": "east", "clusters": ["east"], "tracing": {"collector": ""}})
    msg = decode_event(pb.WatchEvent(revision=4, changes=[pb.Change(
        kind=pb.TRAFFIC, key="Telemetry/east", json=narrower.model_dump_json())]))
    assert msg.changes == (Change("traffic", "Telemetry/east", False, narrower),)
    assert tracker.apply(msg).telemetry == (narrower, doc)  # by key: Telemetry/east, Telemetry/mesh


@given(st.binary(max_size=80), st.binary(max_size=80), st.dictionaries(
    st.sampled_from([b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled", b"x-b3-flags", b"x-b3-parentspanid"]),
    st.binary(max_size=40), max_size=5))
def test_any_incoming_context_yields_valid_headers_onward(tp: bytes, b3: bytes, multi: dict) -> None:
    ctx, fmt = incoming(tp, b3 or None, multi or None)
    hop = begin(ctx, fmt, bound=ratio_bound(50))
    h = dict(hop.headers())
    parsed = parse_traceparent(h[b"traceparent"])
    assert parsed is not None and parsed.trace == hop.trace_hex and parsed.span == hop.span_hex
    assert parsed.sampled == hop.sampled
    if b"b3" in h:
        again = parse_b3(h[b"b3"])
        assert again is not None and again.span == hop.span_hex and again.sampled == hop.sampled

"""The per-edge figures of federation/topology.py: quantiles, rates over the window, which
reporter wins, and the checks on what a gateway sends (pure: no federation)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation import models
from federation._errors import InvalidRecord
from federation.topology import (BUCKETS_MS, NBUCKETS, EdgeCounts, GatewayWindow, TrafficSummary, edge_views,
                                 quantile)
from federation.server._web import edge_class, render
from federation.server._webdata import layout


def e(src: str = "east", dst: str = "west", reporter: str = "source", requests: int = 10, errors: int = 0,
      **kw: object) -> EdgeCounts:
    return EdgeCounts(source_cluster=src, destination_cluster=dst, namespace="shop", service="cart",
                      reporter=reporter, requests=requests, errors=errors, **kw)  # type: ignore[arg-type]


def window(gw: str, *pushes: tuple[float, list[EdgeCounts]]) -> GatewayWindow:
    return GatewayWindow(gw.split("/")[0], gw, tuple(TrafficSummary(at=at, interval=5.0, edges=tuple(es))
                                                     for at, es in pushes))


def test_quantiles_interpolate_inside_the_bucket_like_histogram_quantile() -> None:
    counts = [0] * NBUCKETS
    counts[3] = 100  # (5, 10] ms
    assert quantile(0.5, counts) == pytest.approx(7.5)
    assert quantile(0.99, counts) == pytest.approx(9.95)
    assert quantile(0.5, [0] * NBUCKETS) is None
    top = [0] * NBUCKETS
    top[-1] = 1  # above the last bound: the last bound, as Prometheus answers
    assert quantile(0.99, top) == BUCKETS_MS[-1]


@given(st.lists(st.integers(0, 1000), min_size=NBUCKETS, max_size=NBUCKETS), st.floats(0.01, 1.0))
def test_a_quantile_lies_in_the_bucket_of_its_rank(counts: list[int], q: float) -> None:
    v = quantile(q, counts)
    if sum(counts) == 0:
        assert v is None
        return
    assert v is not None and 0 <= v <= BUCKETS_MS[-1]
    assert quantile(min(1.0, q + 0.01), counts) >= v - 1e-9  # monotone in q


def test_rates_cover_the_time_each_gateway_pushed_and_gateways_add_up() -> None:
    now = 1000.0
    views = edge_views([
        window("east/a", (now - 10, [e(requests=50)]), (now - 5, [e(requests=50)]), (now, [e(requests=50, errors=5)])),
        window("east/b", (now, [e(requests=25, tcp_active=2)])),  # started 5 s ago
        window("east/old", (now - 120, [e(requests=1000)])),  # outside the minute
    ], now)
    [v] = views
    assert v.requests == 175 and v.errors == 5
    assert v.rps == pytest.approx(150 / 15 + 25 / 5)
    assert v.success_rate == pytest.approx(170 / 175)
    assert v.tcp_active == 2 and sorted(v.gateways) == ["east/a", "east/b"]
    assert [s.error_rate for s in v.slots] == [0.0, 0.0, 1.0]


def test_the_source_reports_of_an_edge_win_over_the_destinations() -> None:
    now = 1000.0
    both = edge_views([window("east/a", (now, [e(requests=10, errors=10)])),
                       window("west/a", (now, [e(reporter="destination", requests=3)]))], now)
    assert [(v.reporter, v.errors) for v in both] == [("source", 10)]  # west's gateway never saw the failures
    only_inbound = edge_views([window("west/a", (now, [e(reporter="destination", requests=3)]))], now)
    assert [(v.reporter, v.requests) for v in only_inbound] == [("destination", 3)]


@pytest.mark.parametrize("bad", [
    {"errors": 11},  # more errors than requests
    {"latency": [0] * (NBUCKETS + 1)},
    {"latency": [20]},  # more observations than requests
    {"requests": -1},
    {"source_cluster": ""},
])
def test_a_summary_that_does_not_add_up_is_refused(bad: dict[str, object]) -> None:
    edge = {"source_cluster": "east", "destination_cluster": "west", "requests": 10, **bad}
    with pytest.raises(InvalidRecord):
        models.read_record(TrafficSummary, {"at": 1.0, "edges": [edge]})


def test_an_unknown_field_from_a_newer_gateway_is_ignored() -> None:
    s = models.read_record(TrafficSummary, {"at": 1.0, "edges": [
        {"source_cluster": "east", "destination_cluster": "west", "requests": 1, "bytes": 7}], "future": 1})
    assert s.edges[0].requests == 1


def test_the_same_edge_twice_in_one_push_is_refused() -> None:
    with pytest.raises(InvalidRecord):
        models.read_record(TrafficSummary, {"at": 1.0, "edges": [
            {"source_cluster": "east", "destination_cluster": "west"}] * 2})


def test_edges_are_coloured_by_success_rate() -> None:
    assert [edge_class({"success_rate": v}) for v in (1.0, 0.98, 0.5, None)] == ["ok", "degraded", "failing", "idle"]
    assert edge_class({"success_rate": None, "tcp_opened": 3}) == "tcp"


def test_the_server_side_page_escapes_every_name() -> None:
    evil = "<img src=x onerror=alert(1)>"
    edge = {"id": f"{evil}>ns/{evil}@west", "source_cluster": evil, "destination_cluster": "west", "namespace": "ns",
            "service": evil, "requests": 1, "errors": 0, "rps": 1.0, "success_rate": 1.0, "p50_ms": 1.0,
            "p99_ms": 2.0, "tcp_active": 0, "tcp_opened": 0, "recent": [], "routes": [], "policies": []}
    services = [{"namespace": "ns", "name": evil, "exported_by": ["west"], "importable_by": [evil],
                 "ports": [{"name": evil, "port": 80, "protocol": "HTTP"}]}]
    doc = {"graph": layout([evil, "west"], services, [edge]), "edges": [edge], "problems": [evil],
           "clusters": [{"name": evil, "state": "LIVE", "labels": {evil: evil}, "exports": 1, "cert_days_left": 3}],
           "gateways": [{"gateway_id": evil, "state": "REJECTED rev 3: " + evil, "applied_revision": 2,
                         "enforces_policy": True, "routes_applied": True, "rejected_revision": 3,
                         "rejected_reason": evil}],
           "services": services, "config_revision": 2, "window_seconds": 60, "source": evil, "generated_at": 0}
    html = render(doc)
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html

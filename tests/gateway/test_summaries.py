"""The gateway's per-edge counts (gateway/_summaries.py): fed by the Recorder where requests
finish, drained into the summary the federation takes (federation/topology.py)."""

from __future__ import annotations

import json

from federation import models
from federation.topology import TrafficSummary, quantile

from gateway._summaries import EdgeCollector
from gateway._telemetry import Exchange, Metrics, Recorder


def exchange(rec: Recorder, code: int = 200, *, grpc: str = "", tcp: bool = False, dst: str = "west",
             svc: str = "web", reporter: str = "source") -> Exchange:
    x = Exchange(reporter, "HTTP/2", rec)
    x.source_cluster, x.destination_cluster = "east", dst
    x.destination_namespace, x.destination_name = "default", svc
    x.response_code = code
    if grpc:
        x.grpc, x.grpc_status = True, grpc
    x.tcp = tcp
    return x


def test_requests_finish_into_their_edge_and_a_drain_starts_over() -> None:
    clock = iter([100.0, 105.0, 110.0]).__next__
    rec = Recorder(Metrics("east"), access_log_enabled=False)
    rec.edges = EdgeCollector(clock=clock)
    for code in (200, 200, 503, 404):
        exchange(rec, code).finish()
    exchange(rec, 200, grpc="14", svc="greeter").finish()  # UNAVAILABLE: an error
    exchange(rec, 200, grpc="0", svc="greeter").finish()
    x = exchange(rec, 0)
    x.destination_cluster = ""  # refused before a destination was chosen: no edge
    x.finish()
    doc = rec.edges.drain()
    summary = models.read_record(TrafficSummary, json.dumps(doc))  # what the federation checks
    assert summary.at == 105.0 and summary.interval == 5.0
    by = {e.service: e for e in summary.edges}
    assert (by["web"].requests, by["web"].errors) == (4, 1)  # a 404 is the caller's problem, not the edge's
    assert (by["greeter"].requests, by["greeter"].errors) == (2, 1)
    assert sum(by["web"].latency) == 4 and quantile(0.5, by["web"].latency) is not None
    assert rec.edges.drain()["edges"] == []  # idle edges are dropped at the next drain


def test_open_tcp_connections_stay_counted_across_drains() -> None:
    rec = Recorder(Metrics("east"), access_log_enabled=False)
    conns = [exchange(rec, tcp=True, svc="echo") for _ in range(3)]
    for c in conns:
        rec.tcp_opened(c)
    conns[0].finish()
    [edge] = rec.edges.drain()["edges"]
    assert (edge["tcp_opened"], edge["tcp_closed"], edge["tcp_active"], edge["requests"]) == (3, 1, 2, 0)
    [edge] = rec.edges.drain()["edges"]  # nothing new, still two open
    assert (edge["tcp_opened"], edge["tcp_active"]) == (0, 2)
    never_opened = exchange(rec, tcp=True, svc="echo")
    never_opened.finish()  # refused before it opened: not a close of an open connection
    for c in conns[1:]:
        c.finish()
    [edge] = rec.edges.drain()["edges"]
    assert (edge["tcp_closed"], edge["tcp_active"]) == (2, 0)


def test_edges_past_the_cap_are_counted_as_dropped() -> None:
    rec = Recorder(Metrics("east"), access_log_enabled=False)
    rec.edges = EdgeCollector(max_edges=2)
    for svc in ("a", "b", "c", "c"):
        exchange(rec, svc=svc).finish()
    doc = rec.edges.drain()
    assert [e["service"] for e in doc["edges"]] == ["a", "b"] and doc["dropped_edges"] == 2

"""Kiali's graph queries and our Grafana dashboard's, run by a real Prometheus that scrapes
both gateways of the network-namespace federation after east->west traffic.

A workload of east (``shop/cart``, with an SVID) calls west's ``web`` (HTTP/2 over mTLS),
``greeter`` (gRPC) and ``echo`` (a TCP tunnel) for a few seconds, while Debian's
``prometheus`` scrapes both gateways' admin ports every second.  Then, over its HTTP API:

* the PromQL that Kiali's graph issues for a namespace graph (traffic, and its response
  time, security and throughput appenders) and for a service node graph, written down
  below from kiali/kiali with the file each comes from, with Kiali's defaults (10 minute
  window, idle edges hidden, ambient traffic "total"); every one must return series of
  the east -> west edge;
* every query in deploy/monitoring/grafana-dashboard.json, for each reporter the
  dashboard offers, the other variables at "All": each must return series, and together
  they must name both clusters.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import trust
from federation import names
from federation.demo._netns import netns_available
from federation.demo.harness import GRPC_PORT, HTTP_PORT, TCP_PORT, LocalFederation, Proc
from federation.server import free_port

from .conftest import logs_of
from tests.scratch import scratch_dir

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "monitoring" / "grafana-dashboard.json"
CLUSTERS = {"east", "west"}
TRAFFIC_SECONDS = 5

# -- Kiali's queries (kiali/kiali) --------------------------------------------------------
# Kiali's defaults: graph.GetReporter with ambient traffic "total" (graph/options.go
# defaultAmbientTraffic) matches the waypoint reporter too, graph.GetApp adds nothing;
# duration 10m; idle edges hidden ("> 0").  "\\." is what Kiali's Go raw strings carry
# into PromQL (a regex "\." once PromQL unquotes it).
DURATION = 600
IDLE = "> 0"


def rep(reporter: str) -> str:  # graph/telemetry/istio/util/util.go GetReporter
    return f'reporter=~"waypoint|{reporter}"'


_WORKLOADS = ("source_cluster,source_workload_namespace,source_workload,source_canonical_service,"
              "source_canonical_revision,destination_cluster,destination_service_namespace,"
              "destination_service,destination_service_name,destination_workload_namespace,"
              "destination_workload,destination_canonical_service,destination_canonical_revision")
G_REQUESTS = _WORKLOADS + ",request_protocol,response_code,grpc_response_status,response_flags"
G_TCP = "app," + _WORKLOADS + ",response_flags"
G_RESPONSE_TIME = "le," + _WORKLOADS + ",request_protocol"
G_SECURITY = ("source_cluster,source_workload_namespace,source_workload,source_canonical_service,"
              "source_canonical_revision,source_principal,destination_cluster,"
              "destination_service_namespace,destination_service_name,"
              "destination_workload_namespace,destination_workload,destination_canonical_service,"
              "destination_canonical_revision,destination_principal,connection_security_policy")


def kiali_namespace_graph(ns: str) -> dict[str, str]:
    """The queries Kiali runs for namespace ``ns`` of a namespace graph (not ambient)."""
    d = DURATION
    q = {
        # graph/telemetry/istio/istio.go, buildNamespaceTrafficMap: HTTP/gRPC requests
        "requests 0) incoming, unserviced (source telemetry)":
            f'sum(rate(istio_requests_total{{{rep("source")},source_workload_namespace!="{ns}",'
            f'destination_workload_namespace="unknown",destination_workload="unknown",'
            f'destination_service=~"^.+\\\\.{ns}\\\\..+$"}} [{d}s])) by ({G_REQUESTS}) {IDLE}',
        "requests 2) incoming (destination telemetry)":
            f'sum(rate(istio_requests_total{{{rep("destination")},destination_workload_namespace="{ns}"}} '
            f'[{d}s])) by ({G_REQUESTS}) {IDLE}',
        "requests 3) outgoing (source telemetry)":
            f'sum(rate(istio_requests_total{{{rep("source")},source_workload_namespace="{ns}"}} [{d}s])) '
            f'by ({G_REQUESTS}) {IDLE}',
    }
    # ... TCP bytes: "sent" is Kiali's default (istio_tcp_received_bytes_total, "L4
    # telemetry is backwards"), "total" adds istio_tcp_sent_bytes_total.
    for m in ("istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total"):
        q |= {
            f"{m} 0) incoming, unserviced":
                f'sum(rate({m}{{{rep("source")},source_workload_namespace!="{ns}",'
                f'destination_workload_namespace="unknown",destination_workload="unknown",'
                f'destination_service=~"^.+\\\\.{ns}\\\\..+$"}} [{d}s])) by ({G_TCP}) {IDLE}',
            f"{m} 1) incoming":
                f'sum(rate({m}{{{rep("destination")},destination_workload_namespace="{ns}"}} [{d}s])) '
                f'by ({G_TCP}) {IDLE}',
            f"{m} 2) outgoing":
                f'sum(rate({m}{{{rep("source")},source_workload_namespace="{ns}"}} [{d}s])) '
                f'by ({G_TCP}) {IDLE}',
        }
    # graph/telemetry/istio/appender/response_time.go (default quantile 0.95, appender.go)
    for i, (r, sel) in enumerate((("destination", f'destination_service_namespace="{ns}"'),
                                  ("source", f'source_workload_namespace="{ns}"')), 1):
        q[f"response time {i})"] = (
            f"histogram_quantile(0.95, sum(rate(istio_request_duration_milliseconds_bucket"
            f"{{{rep(r)},{sel}}}[{d}s])) by ({G_RESPONSE_TIME})) > 0")
    # graph/telemetry/istio/appender/security_policy.go (default rates: requests, tcp sent)
    for i, sel in enumerate((f'source_workload_namespace!="{ns}",destination_service_namespace="{ns}"',
                             f'source_workload_namespace="{ns}"'), 1):
        q[f"security policy {i})"] = (
            f'(sum(rate(istio_requests_total{{{rep("destination")},{sel}}}[{d}s])) by ({G_SECURITY}) > 0)'
            f' OR (sum(rate(istio_tcp_sent_bytes_total{{{rep("destination")},{sel}}}[{d}s])) '
            f'by ({G_SECURITY}) > 0)')
    # graph/telemetry/istio/appender/throughput.go ("response" is the default type)
    for kind, r in (("response", "destination"), ("request", "source")):
        for i, sel in enumerate((f'source_workload_namespace!="{ns}",destination_service_namespace="{ns}"',
                                 f'source_workload_namespace="{ns}"'), 1):
            q[f"throughput {kind} {i})"] = (
                f"sum(rate(istio_{kind}_bytes_sum{{{rep(r)},{sel}}}[{d}s])) by ({_WORKLOADS}) > 0")
    return q


def kiali_service_graph(cluster: str, ns: str, service: str, tcp: bool) -> dict[str, str]:
    """graph/telemetry/istio/istio.go, buildNodeTrafficMap for a service node."""
    d, dest = DURATION, f',destination_cluster="{cluster}"'
    svc = f'destination_service=~"^{service}\\\\.{ns}\\\\..*$"'
    if not tcp:
        return {
            "1.a) requests that could not be serviced (source telemetry)":
                f'sum(rate(istio_requests_total{{{rep("source")}{dest},destination_workload="unknown",'
                f'{svc}}} [{d}s])) by ({G_REQUESTS}) {IDLE}',
            "1.b) requests serviced (destination telemetry)":
                f'sum(rate(istio_requests_total{{{rep("destination")}{dest},'
                f'destination_service_namespace="{ns}",{svc}}} [{d}s])) by ({G_REQUESTS}) {IDLE}',
        }
    return {f"{m} incoming": f'sum(rate({m}{{reporter="destination"{dest},'
                             f'destination_service_namespace="{ns}",{svc}}} [{d}s])) by ({G_TCP}) {IDLE}'
            for m in ("istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total")}


# -- the rig ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scraped(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalFederation, str]]:
    """east and west, east's traffic sent, and the URL of a Prometheus that scraped it all."""
    why = netns_available()
    if why:
        pytest.skip(f"end-to-end tests need network namespaces: {why}")
    if shutil.which("prometheus") is None:
        pytest.skip("needs Prometheus (apt-get install prometheus)")
    work = scratch_dir(request, tmp_path_factory, "prom")
    # The admin port on every address, so the root namespace reaches it at the WAN address
    # (the port a Kubernetes Prometheus scrapes on the pod IP).
    lf = LocalFederation(work / "fed", use_netns=True, lease_ttl=30, gateway_overrides={
        "admin": {"host": "0.0.0.0", "port": names.GATEWAY_ADMIN_PORT}})
    prom: Proc | None = None
    try:
        lf.start(["east", "west"])
        east = lf.clusters["east"]
        port = free_port()
        (work / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{
                "job_name": "isthmus-gateway", "scrape_interval": "1s", "scrape_timeout": "1s",
                "static_configs": [{"targets": [f"{c.wan_address}:{names.GATEWAY_ADMIN_PORT}"
                                                for c in lf.clusters.values()]}]}]}))
        prom = Proc("prometheus", ["prometheus", f"--config.file={work / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={work / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                    work / "prometheus.log").start()
        url = f"http://127.0.0.1:{port}"
        _until(lambda: len([s for s in query(url, "up == 1")]) == 2, 30, "both gateways up", prom)
        svid = work / "cart"
        trust.ClusterCA(east.dir / "join" / "ca").issue(
            trust.workload_id("east.isthmus.local", "shop", "cart"), svid)
        to = "west"
        r = subprocess.run(
            ["ip", "netns", "exec", east.namespace or "", sys.executable, str(Path(__file__).with_name("traffic.py")),
             "--outbound", east.outbound, "--cert-dir", str(svid), "--seconds", str(TRAFFIC_SECONDS),
             "--http-host", f"{names.outbound_host('web', 'default', to)}:{HTTP_PORT}",
             "--grpc-authority", f"{names.outbound_host('greeter', 'default', to)}:{GRPC_PORT}",
             "--tcp-authority", f"{names.outbound_host('echo', 'default', to)}:{TCP_PORT}"],
            capture_output=True, text=True, timeout=TRAFFIC_SECONDS + 30)
        assert r.returncode == 0, r.stderr[-3000:]
        counts = json.loads(r.stdout.strip().splitlines()[-1])
        assert all(ok >= 3 and not failed for ok, failed in counts.values()), (counts, logs_of(lf))
        # Two more scrapes, so the last calls are in Prometheus.
        time.sleep(2.5)
        yield lf, url
    finally:
        if prom is not None:
            prom.stop(timeout=5)
        lf.close()


def _until(cond: Any, timeout: float, what: str, proc: Proc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.alive(), f"prometheus exited: {proc.tail()}"
        try:
            if cond():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"no {what} after {timeout:.0f}s; prometheus log: {proc.tail()}")


def query(url: str, promql: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    doc = r.json()
    assert r.status_code == 200 and doc["status"] == "success", (promql, doc)
    return doc["data"]["result"]


def _edge(series: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(s["metric"].get("source_cluster", ""), s["metric"].get("destination_cluster", ""))
            for s in series}


# -- the tests ----------------------------------------------------------------------------
def test_kiali_namespace_graph_queries_return_the_cross_cluster_edge(scraped) -> None:
    """Kiali runs every query for each namespace of the graph (here: the caller's "shop"
    and the service's "default"); each returns the east -> west edge for one of them."""
    _, url = scraped
    by_name: dict[str, list[dict[str, Any]]] = {}
    for ns in ("shop", "default"):
        for name, promql in kiali_namespace_graph(ns).items():
            by_name.setdefault(name, []).extend(query(url, promql))
    empty = [n for n, series in by_name.items() if not series]
    assert not empty, f"Kiali's namespace-graph queries returned nothing: {empty}"
    for name, series in by_name.items():
        assert _edge(series) == {("east", "west")}, (name, series)
    # The edge is between workloads Kiali can draw: the caller by its SPIFFE ID, the
    # services by name; and its security badge says mTLS.
    edges = {(m["source_workload_namespace"], m["source_workload"], m["destination_service_name"])
             for s in by_name["requests 3) outgoing (source telemetry)"] for m in [s["metric"]]}
    assert ("shop", "cart", "web") in edges, edges
    security = {s["metric"]["connection_security_policy"] for s in by_name["security policy 1)"]}
    assert security == {"mutual_tls"}
    assert all(float(s["value"][1]) > 0 for s in by_name["response time 1)"])


def test_kiali_service_graph_queries_return_the_cross_cluster_edge(scraped) -> None:
    _, url = scraped
    for service, tcp in (("web", False), ("greeter", False), ("echo", True)):
        for name, promql in kiali_service_graph("west", "default", service, tcp).items():
            series = query(url, promql)
            assert series, f"Kiali's service graph of {service}: {name} returned nothing"
            assert _edge(series) == {("east", "west")}, (service, name, series)
            assert {s["metric"]["destination_service_name"] for s in series} == {service}


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel, variables, PromQL) of every target of the dashboard, for each value of a
    variable with a fixed list of options (the reporter), the others at their "All" value;
    $__rate_interval one minute."""
    dash = json.loads(DASHBOARD.read_text())
    choices: list[dict[str, str]] = [{"$__rate_interval": "1m"}]
    for v in dash["templating"]["list"]:
        if v["type"] == "datasource":
            continue
        values = [o["value"] for o in v.get("options", [])] or [v.get("allValue", ".*")]
        choices = [{**c, f"${v['name']}": value} for c in choices for value in values]
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for c in choices:
                expr = target["expr"]
                for var in sorted(c, key=len, reverse=True):  # $destination_service first
                    expr = expr.replace(var, c[var])
                assert "$" not in expr, (panel["title"], expr)
                out.append((panel["title"], json.dumps(c), expr))
    return out


def test_every_dashboard_query_returns_series_naming_both_clusters(scraped) -> None:
    _, url = scraped
    queries = dashboard_queries()
    assert len(queries) >= 15
    for title, variables, promql in queries:
        series = query(url, promql)
        assert series, f"panel {title!r} ({variables}) shows no data: {promql}"
        named = set()
        for s in series:
            m = s["metric"]
            named |= {m.get("source_cluster"), m.get("destination_cluster"), m.get("cluster")}
        assert CLUSTERS <= named, f"panel {title!r} ({variables}) names {named - {None}}: {promql}"


def test_the_topology_page_reads_the_edges_from_prometheus(scraped) -> None:
    """``federation serve --prometheus URL``: the page's edges from the gateways' Istio
    metrics (federation/server/_promtraffic.py), as Kiali reads them; a Prometheus that
    does not answer is a problem shown on the page and logged once a minute."""
    import asyncio

    from structlog.testing import capture_logs

    from federation.server._promtraffic import PrometheusTraffic

    _, url = scraped
    prom = PrometheusTraffic(url)
    doc = asyncio.run(prom.traffic())
    edges = {(e["source_cluster"], e["namespace"], e["service"], e["destination_cluster"]): e for e in doc["edges"]}
    web = edges[("east", "default", "web", "west")]
    assert web["rps"] > 0 and web["success_rate"] == 1.0 and web["p99_ms"] > 0, web
    assert ("east", "default", "greeter", "west") in edges and prom.problems() == []
    down = PrometheusTraffic(f"http://127.0.0.1:{free_port()}")
    with capture_logs() as logs:
        for _ in range(3):
            assert asyncio.run(down.traffic())["edges"] == []
    [problem] = down.problems()
    assert problem.startswith(f"Prometheus at {down.url}: ConnectError")
    assert len([entry for entry in logs if entry["event"] == "web.prometheus_failed"]) == 1

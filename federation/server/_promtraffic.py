"""The topology page's traffic from Prometheus (``--prometheus URL``), as Kiali reads it.

Instead of the gateways' pushed summaries, the edges come from the Istio metrics the
gateways export (``gateway/_istio.py``), scraped by the operator's Prometheus, with the
queries below (``reporter="source"``: the calling cluster's outbound gateway, which also
sees a peer that is down).  The edges have the summaries' JSON shape
(``federation.topology.EdgeView.as_json``), without the per-push ``recent`` figures.

An unreachable or failing Prometheus is never fatal: the page shows the problem (and no
traffic), and it is logged at most once a minute.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import structlog

from ..topology import WINDOW

log = structlog.get_logger("federation.web")

BY = "source_cluster, destination_cluster, destination_service_namespace, destination_service_name"
SEL = 'reporter="source"'
QUERIES = {
    "rps": f"sum by ({BY}) (rate(istio_requests_total{{{SEL}}}[1m]))",
    "eps": f'sum by ({BY}) (rate(istio_requests_total{{{SEL},response_code=~"0|5.."}}[1m]))',
    "p50": f"histogram_quantile(0.5, sum by (le, {BY}) (rate(istio_request_duration_milliseconds_bucket{{{SEL}}}[1m])))",
    "p99": f"histogram_quantile(0.99, sum by (le, {BY}) (rate(istio_request_duration_milliseconds_bucket{{{SEL}}}[1m])))",
    "tcp": (f"sum by ({BY}) (istio_tcp_connections_opened_total{{{SEL}}}) - "
            f"sum by ({BY}) (istio_tcp_connections_closed_total{{{SEL}}})"),
}
LOG_EVERY = 60.0


class PrometheusTraffic:
    def __init__(self, url: str, timeout: float = 3.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._problem = ""
        self._problem_at = 0.0
        self._logged_at = float("-inf")

    def problems(self) -> list[str]:
        return [self._problem] if self._problem and time.time() - self._problem_at < 2 * WINDOW else []

    def _failed(self, text: str) -> None:
        self._problem, self._problem_at = f"Prometheus at {self.url}: {text}", time.time()
        if time.monotonic() - self._logged_at >= LOG_EVERY:
            self._logged_at = time.monotonic()
            log.warning("web.prometheus_failed", url=self.url, error=text)

    async def traffic(self) -> dict[str, Any]:
        results: dict[str, list[Any]] = {}
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                for name, q in QUERIES.items():
                    r = await client.get(f"{self.url}/api/v1/query", params={"query": q})
                    body = r.json()
                    if r.status_code != 200 or body.get("status") != "success":
                        raise ValueError(f"query failed ({r.status_code}): {str(body.get('error', ''))[:200]}")
                    results[name] = body["data"]["result"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            self._failed(f"{type(exc).__name__}: {str(exc)[:200]}")
            return {"window_seconds": WINDOW, "now": time.time(), "edges": [], "source": "prometheus"}
        self._problem = ""
        edges: dict[tuple[str, ...], dict[str, Any]] = {}
        for name, series in results.items():
            for s in series:
                m = s.get("metric", {})
                key = tuple(str(m.get(k, "")) for k in ("source_cluster", "destination_cluster",
                                                          "destination_service_namespace", "destination_service_name"))
                try:
                    value = float(s["value"][1])
                except (KeyError, IndexError, ValueError, TypeError):
                    continue
                e = edges.setdefault(key, {"rps": 0.0, "eps": 0.0, "p50": None, "p99": None, "tcp": 0})
                e[name] = value if value == value else None  # NaN: no observations
        out = []
        for (src, dst, ns, svc), e in sorted(edges.items()):
            if not src or not dst or src == "unknown":
                continue
            rps, eps = e["rps"] or 0.0, e["eps"] or 0.0
            out.append({"source_cluster": src, "destination_cluster": dst, "namespace": ns, "service": svc,
                        "reporter": "source", "requests": round(rps * WINDOW), "errors": round(eps * WINDOW),
                        "rps": round(rps, 3), "cps": 0.0, "success_rate": None if rps <= 0 else round(max(0.0, 1 - eps / rps), 4),
                        "p50_ms": e["p50"], "p99_ms": e["p99"], "tcp_active": int(e["tcp"] or 0), "tcp_opened": 0,
                        "gateways": [], "recent": []})
        return {"window_seconds": WINDOW, "now": time.time(), "edges": out, "source": "prometheus"}

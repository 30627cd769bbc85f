"""Per-edge traffic summaries: counted where requests finish (sans-IO).

:class:`EdgeCollector` is fed by the :class:`~gateway._telemetry.Recorder` as each
request (or TCP connection) finishes: per edge — reporter, source cluster, destination
cluster, namespace, service, the figures of :mod:`federation.topology` — one dict lookup,
a few additions and a C ``bisect``.  At most :data:`~federation.topology.MAX_EDGES`
edges are counted between two pushes; the rest is counted as ``dropped_edges``.

:mod:`gateway._traffic_push` drains it every :data:`~federation.topology.PUSH_INTERVAL`
and sends the summary to the federation.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any

from federation.topology import BUCKETS_MS, MAX_EDGES, NBUCKETS

from ._istio import Record as Exchange  # what is read of a finished request


class _Edge:
    __slots__ = ("requests", "errors", "latency", "latency_sum", "tcp_opened", "tcp_closed", "tcp_active")

    def __init__(self) -> None:
        self.requests = self.errors = self.tcp_opened = self.tcp_closed = self.tcp_active = 0
        self.latency = [0] * NBUCKETS
        self.latency_sum = 0.0

    def idle(self) -> bool:
        return not (self.requests or self.tcp_opened or self.tcp_closed or self.tcp_active)


def failed(x: Exchange) -> bool:
    """An error for the success rate: no response or a 5xx; for gRPC, a status other than OK."""
    if x.grpc:
        return x.grpc_status != "0"
    return x.response_code == 0 or x.response_code >= 500


class EdgeCollector:
    """Counts per edge since the last :meth:`drain` (the event loop is the only writer)."""

    def __init__(self, max_edges: int = MAX_EDGES, clock: Any = time.time) -> None:
        self.max_edges = max_edges
        self.clock = clock
        self._edges: dict[tuple[str, str, str, str, str], _Edge] = {}
        self._open: dict[int, _Edge] = {}  # id(exchange) of open TCP connections -> its edge
        self.dropped = 0
        self.since = clock()

    def _edge(self, x: Exchange) -> _Edge | None:
        if not x.destination_cluster or not x.source_cluster:
            return None  # refused before a destination was chosen: no edge to count it on
        key = (x.reporter, x.source_cluster, x.destination_cluster, x.destination_namespace, x.destination_name)
        e = self._edges.get(key)
        if e is None:
            if len(self._edges) >= self.max_edges:
                self.dropped += 1
                return None
            e = self._edges[key] = _Edge()
        return e

    def request(self, x: Exchange, duration_ms: float) -> None:
        e = self._edge(x)
        if e is not None:
            e.requests += 1
            if failed(x):
                e.errors += 1
            e.latency[bisect_left(BUCKETS_MS, duration_ms)] += 1
            e.latency_sum += duration_ms

    def tcp_opened(self, x: Exchange) -> None:
        e = self._edge(x)
        if e is not None and id(x) not in self._open:
            self._open[id(x)] = e
            e.tcp_opened += 1
            e.tcp_active += 1

    def tcp_closed(self, x: Exchange, duration_ms: float) -> None:
        e = self._open.pop(id(x), None)
        if e is not None:
            e.tcp_closed += 1
            e.tcp_active -= 1
            # The connection's lifetime is not a request latency: not in the histogram.

    def drain(self) -> dict[str, Any]:
        """The summary since the last drain (``federation.topology.TrafficSummary`` as a
        dict); counters restart, open connections stay counted as active."""
        now = self.clock()
        edges = []
        for (reporter, src, dst, ns, svc), e in list(self._edges.items()):
            if e.idle():  # (an edge with open connections is not idle)
                del self._edges[(reporter, src, dst, ns, svc)]
                continue
            edges.append({"source_cluster": src, "destination_cluster": dst, "namespace": ns, "service": svc,
                          "reporter": reporter, "requests": e.requests, "errors": e.errors,
                          "latency": _trimmed(e.latency), "latency_sum_ms": round(e.latency_sum, 3),
                          "tcp_opened": e.tcp_opened, "tcp_closed": e.tcp_closed, "tcp_active": e.tcp_active})
            e.requests = e.errors = e.tcp_opened = e.tcp_closed = 0
            e.latency = [0] * NBUCKETS
            e.latency_sum = 0.0
        summary = {"at": now, "interval": max(0.001, now - self.since), "edges": edges,
                   "dropped_edges": self.dropped}
        self.since, self.dropped = now, 0
        return summary


def _trimmed(counts: list[int]) -> list[int]:
    n = len(counts)
    while n and not counts[n - 1]:
        n -= 1
    return counts[:n]

"""Per-edge traffic summaries: what gateways push, and the figures shown from them.

A gateway counts the requests it relays per *edge* — (source cluster, destination
cluster, namespace, service) — and every :data:`PUSH_INTERVAL` pushes what it counted
since its last push (``ReportTraffic``): requests, errors, a latency histogram in
:data:`BUCKETS_MS`, TCP connections opened and closed, and the TCP connections open now.
The federation keeps each gateway's pushes of the last :data:`WINDOW` seconds under a
short lease (``federation/server/_summaries.py``), so every replica sees every gateway
and a gateway that stops pushing ages out.  :func:`edge_views` turns those windows into
what the topology page and ``isthmus top`` show: req/s, success rate, p50 and p99 per
edge, and the recent per-push figures (RED: rate, errors, duration).

Both ends of a cross-cluster call may report it (the outbound gateway as ``source``, the
inbound as ``destination``, Istio's ``reporter`` label); an edge's figures come from its
source reports when there are any (they also see a peer gateway that is down), else
from its destination reports.

The JSON of :class:`TrafficSummary` is stable wire format: fields are only added, with
defaults.  A summary is read leniently (unknown fields ignored) but checked: bounded
names, counts that add up, at most :data:`MAX_EDGES` edges.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PUSH_INTERVAL = 5.0  # seconds between a gateway's pushes
WINDOW = 60.0  # seconds of pushes the federation keeps and the figures cover
SUMMARY_TTL = 15  # lease of a gateway's summaries: three missed pushes and it is gone
MAX_EDGES = 256  # edges in one push (a gateway counts at most this many; the rest: dropped_edges)
MAX_SUMMARY_BYTES = 96 * 1024  # one push, as JSON
# Upper bounds (ms) of the latency buckets; one more bucket counts everything above.
BUCKETS_MS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)
NBUCKETS = len(BUCKETS_MS) + 1

Reporter = Literal["source", "destination"]
EdgeKey = tuple[str, str, str, str]  # source cluster, destination cluster, namespace, service


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_Name = Field(min_length=1, max_length=253)
_Count = Field(default=0, ge=0, le=2**53)


class EdgeCounts(_Model):
    """One edge's figures over one push interval (and its open TCP connections)."""

    source_cluster: str = _Name
    destination_cluster: str = _Name
    namespace: str = Field(default="", max_length=253)
    service: str = Field(default="", max_length=253)
    reporter: Reporter = "source"
    requests: int = _Count
    errors: int = _Count  # 5xx or no response; gRPC: a status other than OK
    latency: tuple[int, ...] = Field(default=(), max_length=NBUCKETS)  # per bucket, not cumulative
    latency_sum_ms: float = Field(default=0.0, ge=0)
    tcp_opened: int = _Count
    tcp_closed: int = _Count
    tcp_active: int = _Count  # open at the end of the interval

    @model_validator(mode="after")
    def _adds_up(self) -> EdgeCounts:
        if self.errors > self.requests:
            raise ValueError(f"errors ({self.errors}) exceed requests ({self.requests})")
        if any(c < 0 for c in self.latency):
            raise ValueError("latency: bucket counts must not be negative")
        if sum(self.latency) > self.requests:
            raise ValueError(f"latency: {sum(self.latency)} observations for {self.requests} requests")
        return self

    @property
    def key(self) -> EdgeKey:
        return (self.source_cluster, self.destination_cluster, self.namespace, self.service)


class TrafficSummary(_Model):
    """One push: what a gateway counted over ``interval`` seconds ending at ``at``."""

    at: float = Field(ge=0)  # unix time
    interval: float = Field(default=PUSH_INTERVAL, gt=0, le=3600)
    edges: tuple[EdgeCounts, ...] = Field(default=(), max_length=MAX_EDGES)
    dropped_edges: int = _Count  # edges past MAX_EDGES, not counted

    @model_validator(mode="after")
    def _distinct(self) -> TrafficSummary:
        keys = [(e.key, e.reporter) for e in self.edges]
        if len(set(keys)) != len(keys):
            raise ValueError("edges: an edge appears twice for the same reporter")
        return self


@dataclass(frozen=True)
class GatewayWindow:
    """A gateway's recent pushes, as the federation keeps them."""

    cluster: str
    gateway_id: str
    pushes: tuple[TrafficSummary, ...]


# ---------------------------------------------------------------------- figures


def quantile(q: float, counts: Sequence[int]) -> float | None:
    """The ``q`` quantile (ms) of a histogram in :data:`BUCKETS_MS`, interpolated linearly
    inside its bucket as Prometheus' ``histogram_quantile`` does; None when empty.  The
    top bucket has no upper bound: its quantiles are the highest finite bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            if i >= len(BUCKETS_MS):
                return float(BUCKETS_MS[-1])
            lower = BUCKETS_MS[i - 1] if i else 0.0
            return lower + (BUCKETS_MS[i] - lower) * ((rank - seen) / c)
        seen += c
    return float(BUCKETS_MS[-1])


def _add(into: list[int], counts: Sequence[int]) -> None:
    for i, c in enumerate(counts[:NBUCKETS]):
        into[i] += c


@dataclass(frozen=True)
class Slot:
    """One push interval of an edge (all its gateways together): RED figures."""

    at: float
    rps: float
    error_rate: float  # errors per second
    p99_ms: float | None


@dataclass
class EdgeView:
    """An edge over the window: what the page and ``isthmus top`` show."""

    source_cluster: str
    destination_cluster: str
    namespace: str
    service: str
    reporter: Reporter
    requests: int = 0
    errors: int = 0
    rps: float = 0.0
    cps: float = 0.0  # TCP connections opened per second
    tcp_active: int = 0
    tcp_opened: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * NBUCKETS)
    slots: list[Slot] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)

    @property
    def success_rate(self) -> float | None:
        """Share of requests that succeeded (0-1); None when there were none."""
        return (self.requests - self.errors) / self.requests if self.requests else None

    @property
    def p50_ms(self) -> float | None:
        return quantile(0.5, self.latency)

    @property
    def p99_ms(self) -> float | None:
        return quantile(0.99, self.latency)

    @property
    def name(self) -> str:
        """``source → namespace/service@destination``."""
        return f"{self.source_cluster} → {self.namespace}/{self.service}@{self.destination_cluster}"

    def as_json(self) -> dict[str, object]:
        """The stable JSON form of an edge (the page's endpoint and ``isthmus top -o json``)."""
        return {
            "source_cluster": self.source_cluster,
            "destination_cluster": self.destination_cluster,
            "namespace": self.namespace,
            "service": self.service,
            "reporter": self.reporter,
            "requests": self.requests,
            "errors": self.errors,
            "rps": round(self.rps, 3),
            "cps": round(self.cps, 3),
            "success_rate": None if self.success_rate is None else round(self.success_rate, 4),
            "p50_ms": _round(self.p50_ms),
            "p99_ms": _round(self.p99_ms),
            "tcp_active": self.tcp_active,
            "tcp_opened": self.tcp_opened,
            "gateways": sorted(self.gateways),
            "recent": [{"at": s.at, "rps": round(s.rps, 3), "error_rate": round(s.error_rate, 3),
                        "p99_ms": _round(s.p99_ms)} for s in self.slots],
        }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def edge_views(windows: Iterable[GatewayWindow], now: float, window: float = WINDOW) -> list[EdgeView]:
    """Every edge seen in the last ``window`` seconds, by name.

    A gateway's rate is its requests over the time its pushes in the window cover (a
    gateway that started 10 s ago is not averaged over a minute); the edge's rate is the
    sum over its gateways.  Open TCP connections are each gateway's newest push's.
    """
    # (edge, reporter) -> gateway -> (requests, errors, seconds covered, latency, tcp, slots)
    per: dict[tuple[EdgeKey, str], dict[str, _Acc]] = {}
    for w in windows:
        recent = [p for p in w.pushes if now - window < p.at <= now + PUSH_INTERVAL]
        if not recent:
            continue
        newest = max(recent, key=lambda p: p.at)
        covered = min(window, sum(p.interval for p in recent))
        for p in recent:
            for e in p.edges:
                acc = per.setdefault((e.key, e.reporter), {}).setdefault(w.gateway_id, _Acc(covered))
                acc.add(p, e, newest)
    views: dict[EdgeKey, EdgeView] = {}
    for (key, reporter), gateways in sorted(per.items(), key=lambda kv: (kv[0][0], kv[0][1] != "source")):
        if key in views and views[key].reporter != reporter:
            continue  # the source reports of this edge win
        v = views[key] = EdgeView(*key, reporter=reporter)  # type: ignore[arg-type]
        slots: dict[float, list[object]] = {}
        for gw, acc in gateways.items():
            v.gateways.append(gw)
            v.requests += acc.requests
            v.errors += acc.errors
            v.rps += acc.requests / max(acc.covered, PUSH_INTERVAL)
            v.cps += acc.tcp_opened / max(acc.covered, PUSH_INTERVAL)
            v.tcp_active += acc.tcp_active
            v.tcp_opened += acc.tcp_opened
            _add(v.latency, acc.latency)
            for at, (interval, req, err, lat) in acc.slots.items():
                s = slots.setdefault(at, [interval, 0, 0, [0] * NBUCKETS])
                s[1] += req  # type: ignore[operator]
                s[2] += err  # type: ignore[operator]
                _add(s[3], lat)  # type: ignore[arg-type]
        v.slots = [Slot(at, s[1] / s[0], s[2] / s[0], quantile(0.99, s[3]))  # type: ignore[operator, arg-type]
                   for at, s in sorted(slots.items())]
    return [views[k] for k in sorted(views)]


class _Acc:
    __slots__ = ("covered", "requests", "errors", "latency", "tcp_active", "tcp_opened", "slots")

    def __init__(self, covered: float) -> None:
        self.covered = covered
        self.requests = self.errors = self.tcp_active = self.tcp_opened = 0
        self.latency = [0] * NBUCKETS
        self.slots: dict[float, tuple[float, int, int, Sequence[int]]] = {}

    def add(self, p: TrafficSummary, e: EdgeCounts, newest: TrafficSummary) -> None:
        self.requests += e.requests
        self.errors += e.errors
        self.tcp_opened += e.tcp_opened
        if p is newest:
            self.tcp_active = e.tcp_active
        _add(self.latency, e.latency)
        # Pushes of several gateways line up on the push grid (rounded to the interval).
        at = math.floor(p.at / PUSH_INTERVAL) * PUSH_INTERVAL
        prev = self.slots.get(at)
        if prev is None:
            self.slots[at] = (p.interval, e.requests, e.errors, e.latency)
        else:  # two pushes in one slot (a restarted gateway): one slot of their sum
            lat = [0] * NBUCKETS
            _add(lat, prev[3])
            _add(lat, e.latency)
            self.slots[at] = (max(prev[0], p.interval), prev[1] + e.requests, prev[2] + e.errors, lat)


__all__ = ["BUCKETS_MS", "EdgeCounts", "EdgeView", "GatewayWindow", "MAX_EDGES", "MAX_SUMMARY_BYTES",
           "NBUCKETS", "PUSH_INTERVAL", "SUMMARY_TTL", "Slot", "TrafficSummary", "WINDOW",
           "edge_views", "quantile"]

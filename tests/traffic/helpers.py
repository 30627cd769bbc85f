"""Snapshots for the traffic tests: clusters, exports and routes built in a line each."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from federation.models import ClusterRecord, ExportedService, ServicePort, Snapshot, TrafficRoute
from federation.traffic import REGION_LABEL, Out, Request, RouteSet, Target, all_healthy

NS = "shop"


def cluster(name: str, region: str = "", revoked: bool = False, addresses: tuple[str, ...] | None = None) -> ClusterRecord:
    return ClusterRecord(name=name, trust_domain=f"{name}.isthmus.local",
                         gateway_addresses=(f"10.0.0.{len(name)}:15443",) if addresses is None else addresses,
                         labels={REGION_LABEL: region} if region else {}, revoked=revoked)


def export(c: str, name: str = "cart", ports: Iterable[int] = (8080,), **kw: Any) -> ExportedService:
    return ExportedService(cluster=c, namespace=NS, name=name, ports=tuple(ServicePort(port=p) for p in ports), **kw)


def route(rules: list[dict[str, Any]], name: str = "cart", service: str = "cart", **kw: Any) -> TrafficRoute:
    return TrafficRoute.model_validate({"name": name, "host": {"namespace": NS, "service": service},
                                        "rules": rules, **kw})


def snapshot(clusters: Iterable[ClusterRecord], services: Iterable[ExportedService],
             routes: Iterable[TrafficRoute] = (), revision: int = 1) -> Snapshot:
    return Snapshot(revision=revision, clusters=tuple(clusters), services=tuple(services), routes=tuple(routes))


def down(*names: str) -> Callable[[Target], Out | None]:
    """A health input: the clusters named are unreachable."""
    return lambda t: Out("unreachable", "test") if t.cluster in names else None


def spread(rs: RouteSet, req: Request | None = None, health: Callable[[Target], Out | None] = all_healthy,
           n: int = 4000, port: int = 8080, service: str = "cart", seed: int = 7) -> Counter[tuple[str, str] | None]:
    """Where ``n`` requests went: (cluster, service) -> count; None for no destination."""
    rand = random.Random(seed).random
    out: Counter[tuple[str, str] | None] = Counter()
    for _ in range(n):
        sel = rs.select(NS, service, port, req or Request(), health, rand)
        assert sel is not None
        out[(sel.target.cluster, sel.target.service) if sel.target else None] += 1
    return out

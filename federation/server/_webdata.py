"""The topology page's data: one JSON document, built from what a replica knows.

:func:`topology` assembles the document that ``GET /api/v1/topology`` returns and that
the page renders (server side first, then its script on every poll).  Its shape is
STABLE API for other tools (documented in the README): keys are only added.

    {"version": 1, "generated_at": <unix time>, "config_revision", "policy_revision",
     "route_revision", "window_seconds": 60, "source": "summaries" | "prometheus",
     "problems": [<text>, ...],                   # e.g. Prometheus unreachable
     "clusters": [{"name", "state", "labels", "gateway_addresses", "exports",
                   "cert_expires_at", "cert_days_left", "revoked"}],
     "gateways": [{"cluster", "gateway_id", "state", "synced", "applied_revision",
                   "enforces_policy", "routes_applied", "rejected_revision",
                   "rejected_reason", "reported_at", "confirmed_at"}],
     "services": [{"namespace", "name", "exported_by": [cluster], "importable_by": [cluster],
                   "ports": [{"name", "port", "protocol"}]}],
     "edges": [federation.topology.EdgeView.as_json() + {"id", "routes": [name],
               "policies": ["<kind>/<name>"]}],
     "graph": {"width", "height", "nodes": [{"id", "kind": "cluster" | "service", "label",
               "cluster", "x", "y"}], "links": [{"edge", "source", "target"}]}}

Where the traffic comes from: the gateways' pushed summaries (``_summaries``), or with
``--prometheus URL`` the gateways' Istio metrics in Prometheus (``_promtraffic``).
Names come from clusters and are only data here: the renderers escape them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from cryptography import x509

from .. import models
from .._errors import FederationError, InvalidRecord
from ..client import status_from_pb

if TYPE_CHECKING:
    from ._server import FederationService

VERSION = 1
_CERT_EXPIRY: dict[str, float] = {}  # CA PEM -> not-after (unix time)


def _cert_expiry(pem: str) -> float:
    if not pem:
        return 0.0
    t = _CERT_EXPIRY.get(pem)
    if t is None:
        try:
            t = x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc.timestamp()
        except ValueError:
            t = 0.0
        if len(_CERT_EXPIRY) > 1024:
            _CERT_EXPIRY.clear()
        _CERT_EXPIRY[pem] = t
    return t


def _records(service: FederationService, family: str, model: Any) -> list[Any]:
    out = []
    for raw in service.hub.values(family):
        try:
            out.append(models.read_record(model, raw))
        except InvalidRecord:
            continue  # the hub logged and counted it when it arrived
    return out


def _selects(sel: models.Selector, namespace: str, name: str) -> bool:
    return sel.namespace in ("*", namespace) and sel.service in ("*", name)


async def topology(service: FederationService, traffic: dict[str, Any], problems: list[str] = ()) -> dict[str, Any]:
    """The page's document; ``traffic``: ``{"edges": [...], "source": ...}``."""
    now = time.time()
    status = status_from_pb(await service.status(catch_up=False))
    records = {c.name: c for c in service.hub.clusters()}
    liveness = {lv.cluster: lv for lv in status.liveness}
    clusters = []
    for name in sorted(records):
        c = records[name]
        expires = _cert_expiry(c.ca_cert_pem)
        lv = liveness.get(name)
        clusters.append({
            "name": name, "state": lv.state if lv else "EXPIRED", "labels": dict(sorted(c.labels.items())),
            "gateway_addresses": list(c.gateway_addresses), "exports": lv.exports if lv else 0,
            "cert_expires_at": expires or None,
            "cert_days_left": None if not expires else int((expires - now) // 86400),
            "revoked": c.revoked,
        })
    gateways = [{
        "cluster": g.cluster, "gateway_id": g.gateway_id, "state": g.state, "synced": g.synced,
        "applied_revision": g.applied_revision, "enforces_policy": g.enforces_policy,
        "routes_applied": g.routes_applied, "rejected_revision": g.rejected_revision,
        "rejected_reason": g.rejected_reason, "reported_at": g.reported_at, "confirmed_at": g.confirmed_at,
    } for g in status.gateways]

    exports = _records(service, "exports/", models.ExportedService)
    by_name: dict[tuple[str, str], list[models.ExportedService]] = {}
    for s in exports:
        by_name.setdefault((s.namespace, s.name), []).append(s)
    services = []
    for (ns, name), group in sorted(by_name.items()):
        exporters = sorted({s.cluster for s in group})
        importers: set[str] = set()
        for s in group:
            allowed = set(s.export_to) if s.export_to else set(records)
            importers |= {c for c in allowed if c != s.cluster and c in records}
        ports = {(p.name, p.port, p.protocol) for s in group for p in s.ports}
        services.append({"namespace": ns, "name": name, "exported_by": exporters, "importable_by": sorted(importers),
                         "ports": [{"name": n, "port": p, "protocol": pr} for n, p, pr in sorted(ports)]})

    routes = _records(service, "traffic/TrafficRoute/", models.TrafficRoute)
    policies = [p for p in (_policy(raw) for raw in service.hub.values("policies/")) if p is not None]
    edges = []
    for e in traffic.get("edges", ()):
        ns, svc = e.get("namespace", ""), e.get("service", "")
        applies = [r.name for r in routes
                   if (r.host.namespace, r.host.service) == (ns, svc)
                   or any(d.service in (svc, f"{svc}.{ns}") for rule in r.rules for d in rule.destinations)]
        pols = [f"{p.kind}/{p.name}" for p in policies if _selects(p.selector, ns, svc)]
        edges.append({**e, "id": _edge_id(e), "routes": sorted(applies), "policies": sorted(pols)})
    return {
        "version": VERSION, "generated_at": now, "config_revision": status.config_revision,
        "policy_revision": status.policy_revision, "route_revision": status.route_revision,
        "window_seconds": traffic.get("window_seconds", 60.0), "source": traffic.get("source", "summaries"),
        "problems": list(problems), "clusters": clusters, "gateways": gateways, "services": services,
        "edges": edges, "graph": layout([c["name"] for c in clusters], services, edges),
    }


def _policy(raw: bytes) -> Any:
    try:
        return models.read_record(models.Policy, raw)
    except (InvalidRecord, FederationError, ValueError):
        return None


def _edge_id(e: dict[str, Any]) -> str:
    return f"{e['source_cluster']}>{e['namespace']}/{e['service']}@{e['destination_cluster']}"


def layout(cluster_names: list[str], services: list[dict[str, Any]], edges: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the graph's nodes go: one column per cluster, its node on top and the services
    it serves (exports, or receives traffic for) below it; a link per edge, from the
    calling cluster to the service in the cluster that served it."""
    names = list(cluster_names)
    in_cluster: dict[str, set[tuple[str, str]]] = {c: set() for c in names}
    for s in services:
        for c in s["exported_by"]:
            in_cluster.setdefault(c, set()).add((s["namespace"], s["name"]))
    for e in edges:
        for c in (e["source_cluster"], e["destination_cluster"]):
            in_cluster.setdefault(c, set())
        in_cluster[e["destination_cluster"]].add((e["namespace"], e["service"]))
    names = sorted(in_cluster)
    col, top, row = 440, 50, 64
    nodes = []
    tallest = 0
    for i, c in enumerate(names):
        x = 110 + i * col
        nodes.append({"id": f"cluster:{c}", "kind": "cluster", "label": c, "cluster": c, "x": x, "y": top})
        for j, (ns, svc) in enumerate(sorted(in_cluster[c])):
            nodes.append({"id": f"service:{ns}/{svc}@{c}", "kind": "service", "label": f"{ns}/{svc}", "cluster": c,
                          "x": x, "y": top + 90 + j * row})
            tallest = max(tallest, j + 1)
    links = [{"edge": _edge_id(e), "source": f"cluster:{e['source_cluster']}",
              "target": f"service:{e['namespace']}/{e['service']}@{e['destination_cluster']}"} for e in edges]
    return {"width": max(640, 220 + col * (len(names) - 1)), "height": top + 60 + tallest * row, "nodes": nodes,
            "links": links}

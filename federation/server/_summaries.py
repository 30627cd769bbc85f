"""Gateways' traffic summaries in etcd: checked on the way in, kept for a minute, aged out.

Key layout (STABLE API, one more family beside those in ``_store``):

    <prefix>summaries/<cluster>/<instance>   {"gateway_id", "lease", "pushes": [
                                              federation.topology.TrafficSummary, ...]}:
                                              the pushes of the last minute (at most
                                              MAX_PUSHES), bound to a lease of
                                              topology.SUMMARY_TTL that each push renews

Each push rewrites its gateway's one key (compare-and-swap on its mod revision: two
replicas that each take a push of the same gateway never lose one), so the page reads
every gateway with one prefix read, from any replica; a gateway that stops pushing loses
its key when the lease lapses, within :data:`~federation.topology.SUMMARY_TTL` seconds.
These keys are not config: the hub's watch never carries them to gateways.

What a gateway sends is checked before it is stored (:func:`check_summary`): its size,
its edges (at most :data:`~federation.topology.MAX_EDGES`), and that every edge has the
caller's cluster at the end it reports — a gateway reports only its own cluster's
traffic.  What is read back is read leniently: a push that does not validate is skipped
and counted, never an error of the page.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any
from urllib.parse import quote, unquote

import structlog

from .. import models, names
from .._errors import InvalidRecord, InvalidRequest, PermissionDenied, ResourceExhausted, StoreUnavailable
from ..topology import (MAX_EDGES, MAX_SUMMARY_BYTES, PUSH_INTERVAL, SUMMARY_TTL, WINDOW, GatewayWindow,
                        TrafficSummary)
from ._etcd import prefix_end
from ._store import MAX_GATEWAYS_PER_CLUSTER, Keys, Store, skip_invalid

log = structlog.get_logger("federation.summaries")

MAX_PUSHES = int(WINDOW / PUSH_INTERVAL)  # kept per gateway (a faster pusher keeps less time)
FAMILY = "summaries/"


def check_summary(cluster: str, text: str) -> TrafficSummary:
    """The summary a gateway of ``cluster`` sent, or the refusal naming the problem."""
    if len(text) > MAX_SUMMARY_BYTES:
        raise ResourceExhausted(
            f"traffic summary of {len(text)} bytes refused: at most {MAX_SUMMARY_BYTES} bytes per push")
    try:
        edges = json.loads(text).get("edges", ())
        many = isinstance(edges, list) and len(edges) > MAX_EDGES
    except (ValueError, AttributeError):
        many = False
    if many:
        raise ResourceExhausted(f"traffic summary with {len(edges)} edges refused: at most {MAX_EDGES} per push")
    try:
        summary = models.read_record(TrafficSummary, text, what="traffic summary")
    except InvalidRecord as exc:
        raise InvalidRequest(str(exc)) from None
    for i, e in enumerate(summary.edges):
        own = e.source_cluster if e.reporter == "source" else e.destination_cluster
        if own != cluster:
            end = "source_cluster" if e.reporter == "source" else "destination_cluster"
            raise PermissionDenied(
                f"traffic summary: edges[{i}].{end}: {own!r} is not the caller's cluster {cluster!r}; "
                "a gateway reports only its own cluster's traffic")
    return summary


def summary_key(keys: Keys, cluster: str, instance: str) -> bytes:
    return keys.k("summaries", cluster, quote(instance, safe=""))


class Summaries:
    """The summaries' reads and writes (stateless over etcd, like :class:`Store`)."""

    def __init__(self, store: Store, ttl: int = SUMMARY_TTL) -> None:
        self.etcd = store.etcd
        self.keys = store.keys
        self.ttl = ttl

    def key(self, cluster: str, instance: str) -> bytes:
        return summary_key(self.keys, cluster, instance)

    async def push(self, cluster: str, instance: str, summary: TrafficSummary) -> int:
        """Add ``summary`` to gateway ``<cluster>/<instance>``'s window; the lease TTL."""
        key = self.key(cluster, instance)
        for attempt in range(5):
            kv = await self.etcd.get(key)
            old = self._read(kv) if kv is not None else None
            if kv is None:
                prefix = self.keys.k("summaries", cluster, "")
                count = (await self.etcd.range(prefix, prefix_end(prefix), count_only=True)).count
                if count >= MAX_GATEWAYS_PER_CLUSTER:
                    raise ResourceExhausted(
                        f"cluster {cluster!r} already has {count} gateways pushing traffic summaries "
                        f"(at most {MAX_GATEWAYS_PER_CLUSTER}); silent ones age out after {self.ttl}s")
            lease = 0
            pushes: list[Any] = []
            if old is not None:
                lease = int(old.get("lease") or 0)
                if lease and await self.etcd.keepalive_once(lease) <= 0:
                    lease = 0
                pushes = [p for p in old.get("pushes", ()) if isinstance(p, dict)
                          and isinstance(p.get("at"), (int, float)) and summary.at - WINDOW < p["at"] < summary.at]
            if not lease:
                lease, _ = await self.etcd.grant(self.ttl)
            pushes = [*pushes[-(MAX_PUSHES - 1):], json.loads(summary.model_dump_json())]
            value = json.dumps({"gateway_id": names.gateway_name(cluster, instance), "lease": lease,
                                "pushes": pushes}, separators=(",", ":")).encode()
            compare = [self.etcd.cmp_mod(key, kv.mod_revision) if kv is not None else self.etcd.cmp_missing(key)]
            resp = await self.etcd.txn(compare=compare, success=[self.etcd.op_put(key, value, lease)])
            if resp.succeeded:
                return self.ttl
            await asyncio.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        raise StoreUnavailable("traffic summary: the gateway's entry changed concurrently too often; push again")

    def _read(self, kv: Any) -> dict[str, Any] | None:
        try:
            doc = json.loads(kv.value)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            skip_invalid("summaries", kv.key, kv.mod_revision, "invalid traffic summaries: not a JSON object")
            return None
        return doc

    async def windows(self) -> list[GatewayWindow]:
        """Every gateway's recent pushes (bad ones skipped and counted), by gateway."""
        resp = await self.etcd.get_prefix(self.keys.family(FAMILY))
        out: list[GatewayWindow] = []
        for kv in resp.kvs:
            split = self.keys.split(kv.key)
            doc = self._read(kv)
            if split is None or doc is None:
                continue
            cluster, _, part = split[1].partition("/")
            pushes: list[TrafficSummary] = []
            for raw in doc.get("pushes", ()) if isinstance(doc.get("pushes"), list) else ():
                try:
                    pushes.append(models.read_record(TrafficSummary, raw, what="traffic summary"))
                except InvalidRecord as exc:
                    skip_invalid("summaries", kv.key, kv.mod_revision, str(exc))
            out.append(GatewayWindow(cluster, names.gateway_name(cluster, unquote(part)), tuple(pushes)))
        return sorted(out, key=lambda w: w.gateway_id)


def traffic_json(windows: list[GatewayWindow], now: float | None = None) -> dict[str, Any]:
    """The ``GetTraffic`` answer (and the page's ``edges``): the stable JSON form."""
    from ..topology import edge_views

    now = time.time() if now is None else now
    return {"window_seconds": WINDOW, "now": now,
            "edges": [v.as_json() for v in edge_views(windows, now)],
            "gateways": [w.gateway_id for w in windows]}

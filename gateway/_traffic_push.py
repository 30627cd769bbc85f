"""Pushing the per-edge traffic summaries to the federation (trio shell).

:func:`push_traffic` drains the gateway's :class:`~gateway._summaries.EdgeCollector`
every :data:`~federation.topology.PUSH_INTERVAL` and sends the summary (``ReportTraffic``)
from a worker thread, so the event loop only copies counters.  It runs beside the
ReportApplied reporter in :func:`gateway._control.follow_federation` (and, under
``--workers N``, in each worker: :func:`push_worker_traffic`).  A failed push is dropped
(its counts are lost, never queued without bound) and logged at most once a minute; it
never touches the data path.  A gateway with no traffic pushes nothing, except for a
minute after its last traffic, so that the federation's figures decay to zero instead of
vanishing at once.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import structlog
import trio

from federation.topology import PUSH_INTERVAL, WINDOW

if TYPE_CHECKING:
    from federation.client import FederationClient

    from ._gateway import Gateway

log = structlog.get_logger("isthmus.gateway")

LOG_EVERY = 60.0  # seconds between two log lines about failing pushes


async def push_traffic(gw: Gateway, client: FederationClient, instance: str,
                       interval: float = PUSH_INTERVAL) -> None:
    """Push ``gw``'s summaries every ``interval`` seconds, forever (best effort)."""
    collector = gw.recorder.edges
    last_traffic = float("-inf")
    logged = float("-inf")
    collector.drain()  # start a fresh interval now
    while True:
        await trio.sleep(interval)
        summary = collector.drain()
        now = time.monotonic()
        if summary["edges"] or summary["dropped_edges"]:
            last_traffic = now
        elif now - last_traffic > WINDOW:
            continue
        text = json.dumps(summary, separators=(",", ":"))
        try:
            await trio.to_thread.run_sync(client.report_traffic, instance, text)
        except Exception as exc:  # noqa: BLE001 - best effort: the data path never waits for it
            if now - logged >= LOG_EVERY:
                logged = now
                log.warning("federation.traffic_push_failed", error=f"{type(exc).__name__}: {str(exc)[:200]}",
                            message="per-edge summaries are not reaching the federation (retried every push)")


async def push_worker_traffic(gw: Gateway, instance: str) -> None:
    """:func:`push_traffic` for a worker process (``--workers N``): a worker's watch neither
    reports nor pushes (the control process reports), but each counts its own requests, so each pushes
    its own summaries, under its own ``instance`` name (gateway._control.gateway_instance_id)."""
    from federation.client import FederationClient

    cfg = gw.cfg
    fed = cfg.federation
    client = FederationClient(fed.address, cert_file=fed.cert_file or cfg.tls.cert_file,
                              key_file=fed.key_file or cfg.tls.key_file,
                              bundle_file=fed.bundle_file or cfg.tls.bundle_file)
    try:
        await push_traffic(gw, client, instance)
    finally:
        client.close()

"""A Telemetry document applied through a real federation (etcd, the federation service,
``isthmus gateway run`` as a process) moves a gateway's spans to another collector and
changes its sampler, live; both collectors are real OTLP/gRPC receivers."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from federation.documents import parse_document
from federation.server import free_port

from ..federation.fixtures import join_cluster, make_pki, start_etcd, start_federation
from .otlp import Receiver
from .test_subprocess import GatewayProcess


async def _sampling_ratio(admin: int) -> float | None:
    async with httpx.AsyncClient() as c:
        for line in (await c.get(f"http://127.0.0.1:{admin}/metrics")).text.splitlines():
            if line.startswith("isthmus_trace_sampling_ratio "):
                return float(line.split()[1])
    return None


async def test_a_telemetry_document_changes_collector_and_sampler_live(tmp_path: Path) -> None:
    etcd = start_etcd(tmp_path)
    a, b = Receiver(), Receiver()
    fed = gw = None
    try:
        pki = make_pki(tmp_path)
        fed = await trio.to_thread.run_sync(start_federation, pki, etcd.endpoint, tmp_path)
        ports = {k: free_port() for k in ("inbound", "outbound", "admin")}
        east = await trio.to_thread.run_sync(lambda: join_cluster(
            fed, pki, "east", tmp_path, gateway_addresses=(f"127.0.0.1:{ports['inbound']}",)))
        gdir = east.out_dir / "gateway"
        cfg = {"cluster": "east", **{k: {"host": "127.0.0.1", "port": p} for k, p in ports.items()},
               "tls": {f: str(gdir / f"{f.removesuffix('_file')}.pem") for f in ("cert_file", "key_file", "bundle_file")},
               "outbound_allow_plain": True, "federation": {"address": fed.address},
               "last_known_good": str(tmp_path / "east-lkg.json")}
        gw = GatewayProcess("east", cfg, tmp_path).start()
        await gw.wait_ready()
        assert await _sampling_ratio(ports["admin"]) == 0  # no collector: no spans

        def apply(collector: str, pct: float) -> None:
            doc = parse_document({"kind": "Telemetry", "name": "mesh",
                                  "tracing": {"collector": collector, "random_sampling_percentage": pct}})
            with fed.client(pki.admin_dir) as admin:
                admin.apply_documents([doc])
                assert admin.list_documents("Telemetry") == [doc]

        async def request_until_received(r: Receiver) -> None:
            # An unknown name: the outbound answers 404 itself, and records its span.
            with trio.fail_after(30):
                async with httpx.AsyncClient(http2=True, http1=False) as c:
                    while not r.spans:
                        resp = await c.get(f"http://127.0.0.1:{ports['outbound']}/x", headers={
                            "host": "nothing.default.isthmus.local:80",
                            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
                        assert resp.status_code == 404
                        await trio.to_thread.run_sync(r.wait_for, 1, 0.2)

        await trio.to_thread.run_sync(apply, a.address, 100)
        await request_until_received(a)
        span = a.spans[0]
        assert span.service == "isthmus-gateway.east" and span.attributes["isthmus.response_flags"] == "NR"
        assert span.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and span.parent_span_id == "00f067aa0ba902b7"
        assert await _sampling_ratio(ports["admin"]) == 1.0

        await trio.to_thread.run_sync(apply, b.address, 25)
        await request_until_received(b)  # the parent's decision (sampled) is kept at any ratio
        assert await _sampling_ratio(ports["admin"]) == 0.25
        tracing = (await gw.config())["tracing"]
        assert (tracing["collector"], tracing["sampling_percentage"]) == (b.address, 25.0)
    finally:
        if gw is not None:
            gw.stop()
        if fed is not None:
            fed.kill()
        etcd.stop()
        a.stop()
        b.stop()

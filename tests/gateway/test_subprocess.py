"""`isthmus gateway run` as real processes: following a real federation service (etcd,
join, exports), surviving its outage with the last-known-good config, and --workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio
import yaml

from federation.server import free_port
from federation.models import ExportedService, ServicePort

from ..federation.fixtures import join_cluster, make_pki, start_etcd, start_federation
from .backends import H2Backend

REPO = Path(__file__).resolve().parents[2]


class GatewayProcess:
    def __init__(self, name: str, cfg: dict, tmp: Path, workers: int = 1) -> None:
        self.name = name
        self.cfg_path = tmp / f"{name}.yaml"
        self.cfg_path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / f"{name}.log"
        self.admin = cfg["admin"]["port"]
        self.workers = workers
        self.proc: subprocess.Popen | None = None

    def start(self) -> GatewayProcess:
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from federation.cli import main; main()", "gateway", "run",
                 "--config", str(self.cfg_path), "--workers", str(self.workers)],
                stdout=logf, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)})
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, timeout: float = 20, worker: int = 0) -> None:
        deadline = trio.current_time() + timeout
        async with httpx.AsyncClient() as c:
            while trio.current_time() < deadline:
                assert self.proc is not None and self.proc.poll() is None, self.log()[-3000:]
                try:
                    r = await c.get(f"http://127.0.0.1:{self.admin + worker}/readyz")
                    if r.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.1)
        raise AssertionError(f"{self.name} not ready:\n{self.log()[-3000:]}")

    async def config(self, worker: int = 0) -> dict:
        async with httpx.AsyncClient() as c:
            return (await c.get(f"http://127.0.0.1:{self.admin + worker}/config")).json()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _gw_cfg(cluster_dir: Path, name: str, ports: dict[str, int], tmp: Path, fed: str) -> dict:
    gdir = cluster_dir / "gateway"
    return {
        "cluster": name,
        "inbound": {"host": "127.0.0.1", "port": ports["inbound"]},
        "outbound": {"host": "127.0.0.1", "port": ports["outbound"]},
        "admin": {"host": "127.0.0.1", "port": ports["admin"]},
        "tls": {"cert_file": str(gdir / "cert.pem"), "key_file": str(gdir / "key.pem"),
                "bundle_file": str(gdir / "bundle.pem")},
        "outbound_allow_plain": True,
        "federation": {"address": fed},
        "last_known_good": str(tmp / f"{name}-lkg.json"),
    }


async def _get(port: int, host: str) -> httpx.Response:
    async with httpx.AsyncClient(http2=True, http1=False) as c:
        return await c.get(f"http://127.0.0.1:{port}/echo", headers={"host": host})


async def test_gateway_processes_follow_federation_and_serve_last_good_config_when_it_is_down(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    web = await nursery.start(H2Backend().serve)
    etcd = start_etcd(tmp_path)  # on this thread: etcd dies with the thread that started it
    procs: list[GatewayProcess] = []
    fed = None
    try:
        pki = make_pki(tmp_path)
        fed = await trio.to_thread.run_sync(start_federation, pki, etcd.endpoint, tmp_path)
        ports = {c: {k: free_port() for k in ("inbound", "outbound", "admin")} for c in ("east", "west")}
        joined = {}
        for c in ("east", "west"):
            joined[c] = await trio.to_thread.run_sync(
                lambda c=c: join_cluster(fed, pki, c, tmp_path,
                                         gateway_addresses=(f"127.0.0.1:{ports[c]['inbound']}",)))
        with fed.client(joined["west"].agent_dir) as agent:
            agent.publish("west", [ExportedService(
                cluster="west", namespace="default", name="web",
                ports=(ServicePort(port=8080, protocol="HTTP2", target=f"127.0.0.1:{web.port}"),))],
                ttl=60)
        for c in ("west", "east"):
            p = GatewayProcess(c, _gw_cfg(joined[c].out_dir, c, ports[c], tmp_path, fed.address),
                               tmp_path).start()
            procs.append(p)
        for p in procs:
            await p.wait_ready()
        host = "web.default.west.isthmus.local:8080"
        with trio.fail_after(20):
            while True:  # the export reaches east's gateway through the watch
                r = await _get(ports["east"]["outbound"], host)
                if r.status_code == 200:
                    break
                await trio.sleep(0.1)
        assert r.json()["authority"] == "web.default.svc.cluster.local:8080"
        east = procs[1]
        doc = await east.config()
        assert doc["source"] == "federation" and doc["revision"] > 0
        revision = doc["revision"]
        assert (tmp_path / "east-lkg.json").exists()
        assert (tmp_path / "east-lkg.json").stat().st_mode & 0o777 == 0o600
        # The gateway reports the revision it applied back to the federation.
        with trio.fail_after(10):
            while True:
                with fed.client(pki.admin_dir) as admin:
                    st = await trio.to_thread.run_sync(admin.status)
                if any(g.cluster == "east" and g.applied_revision >= revision for g in st.gateways):
                    break
                await trio.sleep(0.2)

        # Federation and etcd down, east restarted: it serves the last good config.
        fed.stop()
        etcd.stop()
        east.stop()
        east.start()
        await east.wait_ready()
        doc = await east.config()
        assert doc["source"] == "last-known-good" and doc["revision"] == revision
        r = await _get(ports["east"]["outbound"], host)
        assert r.status_code == 200, r.text
    finally:
        for p in procs:
            p.stop()
        if fed is not None:
            fed.kill()
        etcd.stop()


async def test_workers_share_the_listeners(tmp_path: Path, nursery: trio.Nursery) -> None:
    """--workers 2 without federation: static config, two processes on one port."""
    import trust

    web = await nursery.start(H2Backend().serve)
    root = trust.TrustDir(tmp_path / "root")
    root.init("isthmus.local")
    files = {}
    for c in ("east", "west"):
        ca = root.issue_cluster(c)
        files[c] = ca.issue(trust.gateway_id(f"{c}.isthmus.local"), tmp_path / f"gw-{c}")
    ports = {c: {k: free_port() for k in ("inbound", "outbound")} for c in ("east", "west")}
    ports["east"]["admin"] = free_port()
    ports["west"]["admin"] = free_port()
    # East's workers use admin ports base+0 and base+1.
    while True:
        try:
            import socket
            s = socket.socket()
            s.bind(("127.0.0.1", ports["east"]["admin"] + 1))
            s.close()
            break
        except OSError:
            ports["east"]["admin"] = free_port()
    static = {
        "revision": 3,
        "clusters": [{"name": c, "trust_domain": f"{c}.isthmus.local",
                      "gateway_addresses": [f"127.0.0.1:{ports[c]['inbound']}"]} for c in ("east", "west")],
        "services": [{"cluster": "west", "namespace": "default", "name": "web",
                      "ports": [{"port": 8080, "protocol": "HTTP2", "target": f"127.0.0.1:{web.port}"}]}],
    }
    procs = []
    for c, workers in (("west", 1), ("east", 2)):
        cfg = {
            "cluster": c,
            "inbound": {"host": "127.0.0.1", "port": ports[c]["inbound"]},
            "outbound": {"host": "127.0.0.1", "port": ports[c]["outbound"]},
            "admin": {"host": "127.0.0.1", "port": ports[c]["admin"]},
            "tls": {"cert_file": str(files[c].cert), "key_file": str(files[c].key),
                    "bundle_file": str(files[c].bundle)},
            "outbound_allow_plain": True,
            "static": static,
            "last_known_good": str(tmp_path / f"{c}-lkg.json"),
        }
        procs.append(GatewayProcess(c, cfg, tmp_path, workers).start())
    try:
        await procs[0].wait_ready()
        await procs[1].wait_ready(worker=0)
        await procs[1].wait_ready(worker=1)
        for _ in range(40):  # new connection each time: the kernel spreads them
            r = await _get(ports["east"]["outbound"], "web.default.west.isthmus.local:8080")
            assert r.status_code == 200, r.text
        served = []
        async with httpx.AsyncClient() as c:
            for w in (0, 1):
                text = (await c.get(f"http://127.0.0.1:{ports['east']['admin'] + w}/metrics")).text
                n = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith("istio_requests_total{"))
                served.append(n)
        assert sum(served) == 40
        assert all(n > 0 for n in served), served
    finally:
        for p in procs:
            p.stop()


async def test_a_last_known_good_file_that_cannot_be_built_does_not_kill_the_gateway(
        tmp_path: Path) -> None:
    """`isthmus gateway run` starting from a last-known-good snapshot whose export has no
    port in its target (``target: localhost``): that record is skipped (read leniently,
    logged), the rest of the snapshot serves, and the gateway runs."""
    import json

    import trust

    root = trust.TrustDir(tmp_path / "root")
    root.init("isthmus.local")
    files = root.issue_cluster("west").issue(trust.gateway_id("west.isthmus.local"),
                                             tmp_path / "gw-west")
    lkg = tmp_path / "west-lkg.json"
    lkg.write_text(json.dumps({
        "revision": 12,
        "clusters": [{"name": "west", "trust_domain": "west.isthmus.local"}],
        "services": [{"cluster": "west", "namespace": "default", "name": "web",
                      "ports": [{"port": 80, "target": "localhost"}]}],
    }))
    ports = {k: free_port() for k in ("inbound", "outbound", "admin")}
    cfg = {
        "cluster": "west",
        **{k: {"host": "127.0.0.1", "port": ports[k]} for k in ports},
        "tls": {"cert_file": str(files.cert), "key_file": str(files.key),
                "bundle_file": str(files.bundle)},
        "last_known_good": str(lkg),
    }
    gw = GatewayProcess("west", cfg, tmp_path).start()
    try:
        async with httpx.AsyncClient() as c:
            with trio.fail_after(20):
                while True:
                    assert gw.proc is not None and gw.proc.poll() is None, gw.log()[-3000:]
                    try:
                        doc = (await c.get(f"http://127.0.0.1:{ports['admin']}/config")).json()
                        break
                    except httpx.HTTPError:
                        await trio.sleep(0.1)
            assert doc["revision"] == 12 and doc["last_rejected"] is None
            assert (await c.get(f"http://127.0.0.1:{ports['admin']}/readyz")).status_code == 200
        await trio.sleep(0.5)
        assert gw.proc.poll() is None, gw.log()[-3000:]  # still running
        assert '"event": "config.lkg_record_skipped"' in gw.log() and "HOST:PORT" in gw.log()
        assert "Traceback" not in gw.log()
    finally:
        gw.stop()
    assert gw.proc.returncode == 0, gw.log()[-3000:]

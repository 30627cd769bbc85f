"""With ``--workers N`` the control process is supervised (issue 11, §6): it is restarted
with backoff when it dies, and the workers serve meanwhile; every worker watches the
federation itself.  Real processes throughout:
etcd, the federation service, ``isthmus gateway run`` for two clusters, an HTTP/2 backend."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import httpx
import trio

from federation.server._embedded import free_port
from federation.models import ExportedService, ServicePort

from ..federation.fixtures import join_cluster, make_pki, start_etcd, start_federation
from .backends import H2Backend
from .test_subprocess import GatewayProcess


def _free_pair() -> int:
    """A port p with p + 1 free too (worker i serves its admin endpoint on p + i)."""
    while True:
        p = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue


def gateway_config(cluster_dir: Path, name: str, ports: dict[str, int], tmp: Path, fed: str) -> dict:
    gdir = cluster_dir / "gateway"
    return {
        "cluster": name,
        **{k: {"host": "127.0.0.1", "port": ports[k]} for k in ("inbound", "outbound", "admin")},
        "tls": {f: str(gdir / f"{f.removesuffix('_file')}.pem") for f in ("cert_file", "key_file", "bundle_file")},
        "outbound_allow_plain": True,
        "federation": {"address": fed},
        "last_known_good": str(tmp / f"{name}-lkg.json"),
    }


def control_pids(supervisor: int) -> list[int]:
    out = []
    for child in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split():
        try:
            if b"_control_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(int(child))
        except FileNotFoundError:
            continue
    return out


async def test_the_control_process_is_restarted_while_the_workers_keep_serving(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    web = await nursery.start(H2Backend().serve)
    etcd = start_etcd(tmp_path)  # on this thread: etcd dies with the thread that started it
    procs: list[GatewayProcess] = []
    fed = None
    try:
        pki = make_pki(tmp_path)
        fed = await trio.to_thread.run_sync(start_federation, pki, etcd.endpoint, tmp_path)
        ports = {c: {"inbound": free_port(), "outbound": free_port(), "admin": _free_pair()} for c in ("east", "west")}
        joined = {}
        for c in ("east", "west"):
            joined[c] = await trio.to_thread.run_sync(
                lambda c=c: join_cluster(fed, pki, c, tmp_path, gateway_addresses=(f"127.0.0.1:{ports[c]['inbound']}",)))

        def publish(*names: str) -> None:
            with fed.client(joined["west"].agent_dir) as agent:
                agent.publish("west", [ExportedService(
                    cluster="west", namespace="default", name=n,
                    ports=(ServicePort(port=8080, protocol="HTTP2", target=f"127.0.0.1:{web.port}"),))
                    for n in names], ttl=600)

        await trio.to_thread.run_sync(publish, "web")
        west = GatewayProcess("west", gateway_config(joined["west"].out_dir, "west", ports["west"], tmp_path, fed.address),
                              tmp_path).start()
        east = GatewayProcess("east", gateway_config(joined["east"].out_dir, "east", ports["east"], tmp_path, fed.address),
                              tmp_path, workers=2).start()
        procs += [west, east]
        await west.wait_ready()
        await east.wait_ready(worker=0)
        await east.wait_ready(worker=1)

        async def status(name: str) -> int:
            async with httpx.AsyncClient(http2=True, http1=False) as c:
                r = await c.get(f"http://127.0.0.1:{ports['east']['outbound']}/echo",
                                headers={"host": f"{name}.default.west.isthmus.local:8080"})
                return r.status_code

        with trio.fail_after(30):
            while await status("web") != 200:
                await trio.sleep(0.1)
        assert east.proc is not None
        [control] = control_pids(east.proc.pid)
        os.kill(control, signal.SIGKILL)
        for _ in range(10):  # the workers serve the last good config meanwhile
            assert await status("web") == 200
            await trio.sleep(0.05)
        await trio.to_thread.run_sync(publish, "web", "late")
        with trio.fail_after(30):  # the workers follow the federation themselves
            while await status("late") != 200:
                await trio.sleep(0.2)
        # The supervisor restarts the control process after its backoff, which may end
        # after the workers already serve "late": wait for it rather than race it.
        with trio.fail_after(30):
            while not (fresh := [p for p in control_pids(east.proc.pid) if p != control]) \
                    or '"gateway.control_restarted"' not in east.log():
                await trio.sleep(0.1)
        [again] = fresh
        assert '"gateway.control_exited"' in east.log()

        # Every worker watches the federation itself and applies its deltas (issue 17: a
        # change costs what it changes): with the control process frozen, so that the
        # last-known-good file cannot move, a change still reaches both workers.
        os.kill(again, signal.SIGSTOP)
        try:
            await trio.to_thread.run_sync(publish, "web", "late", "later")
            with trio.fail_after(30):
                while True:
                    configs = [await east.config(worker=i) for i in (0, 1)]
                    served = [await status("later") for _ in range(6)]  # new connections: both workers
                    if served == [200] * 6 and len({c["revision"] for c in configs}) == 1:
                        break
                    await trio.sleep(0.2)
            assert [c["source"] for c in configs] == ["federation", "federation"]
        finally:
            os.kill(again, signal.SIGCONT)
    finally:
        for p in procs:
            p.stop()
        if fed is not None:
            fed.kill()
        etcd.stop()

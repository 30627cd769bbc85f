"""Quorum loss: etcd loses 2 of 3 members under a running federation with real gateways.

The whole local federation of ``isthmus demo --etcd-members 3`` (loopback): a 3-member
etcd, the federation service, east and west each with its gateway, exporter and sample
services.  With 2 of 3 members SIGKILLed, the gateways keep serving their last good config
(requests flow east → west throughout, probed every 0.2 s), ``isthmus status`` exits
non-zero saying the federation's etcd is unavailable, and a change made meanwhile (west
withdraws a service) cannot commit.  With quorum back the change lands, reaches east's
gateway, and three watch clients, checked against etcd's own history, missed nothing.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation import names
from federation.demo.harness import HTTP_PORT, LocalFederation
from federation.server import EtcdCluster

from ..federation.history import EtcdHistory, Watcher, check, etcd_state, wait_caught_up

pytestmark = pytest.mark.slow


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalFederation]:
    lf = LocalFederation(tmp_path / "fed", use_netns=False, etcd_members=3, lease_ttl=30)
    try:
        lf.start(["east", "west"])
        yield lf
    finally:
        lf.close()


class Prober:
    """east's workload calling west's web through east's outbound gateway, every 0.2 s."""

    def __init__(self, lf: LocalFederation) -> None:
        self.host, _, port = lf.clusters["east"].outbound.rpartition(":")
        self.port = int(port)
        self.authority = f"{names.outbound_host('web', 'default', 'west')}:{HTTP_PORT}"
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="prober")

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
            try:
                conn.request("GET", "/", headers={"Host": self.authority})
                r = conn.getresponse()
                body = r.read()
                if r.status == 200 and b"west" in body:
                    self.ok += 1
                else:
                    self.failed.append(f"{r.status} {body[:80]!r}")
            except OSError as exc:
                self.failed.append(repr(exc))
            finally:
                conn.close()

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _status(lf: LocalFederation) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "federation.cli", "status", "--federation", lf.fed_address,
                           "--cert-dir", str(lf.admin_dir)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "NO_COLOR": "1"})


def test_quorum_loss_gateways_serve_last_good_status_says_so_and_quorum_back_resyncs(local: LocalFederation) -> None:
    lf = local
    etcd = lf.etcd
    assert isinstance(etcd, EtcdCluster)
    assert lf.wait_for(lambda: lf.call_http("east", "west"), 30).ok
    assert lf.wait_for(lambda: lf.call_tcp("east", "west"), 30).ok
    ref = EtcdHistory(etcd.endpoints).start()
    watchers = [Watcher([lf.fed_address], lf.admin_dir, name=f"w{i}").start() for i in range(3)]
    try:
        wait_caught_up(watchers, ref.last_change)
        routes_before = lf.gateway_config("east")["routes"]
        with Prober(lf) as prober:
            leader = etcd.wait_leader()
            down = [leader, next(i for i in etcd.running() if i != leader)]
            for i in down:
                etcd.kill(i)

            status = _status(lf)
            assert status.returncode != 0, status.stdout
            assert "etcd is unavailable" in status.stderr and "quorum" in status.stderr, status.stderr
            assert "Traceback" not in status.stderr

            # A change made now cannot commit: west's exporter keeps trying.
            lf.write_exports("west", [s for s in lf.default_exports(lf.clusters["west"]) if s["name"] != "echo"])
            time.sleep(3)
            assert lf.gateway_config("east")["routes"] == routes_before  # the last good config, unchanged
            assert lf.call_tcp("east", "west").ok  # echo still routed: nothing committed
            served_during = prober.ok

            for i in down:
                etcd.restart(i, wait=False)
            etcd.wait_leader()
            deadline = time.monotonic() + 45
            while lf.gateway_config("east")["routes"] == routes_before:
                assert time.monotonic() < deadline, "the change made during the outage never reached east's gateway"
                time.sleep(0.3)
        assert prober.failed == [], prober.failed[:5]
        assert served_during > 5  # requests flowed while etcd had no quorum
        gone = lf.wait_for(lambda: lf.call_tcp("east", "west"), 30, want_ok=False)
        assert not gone.ok, gone  # west's withdrawal is enforced at east

        assert _status(lf).returncode == 0
        final = etcd_state(etcd.endpoints)
        ref.wait_for(final[0])
        wait_caught_up(watchers, ref.last_change)
        assert not any(k == ("service", "west/default/echo") for k in final[1])
    finally:
        for w in watchers:
            w.stop()
        ref.stop()
    report = check(watchers, ref, final)
    assert report.ok, report.describe()
    print(f"\nquorum loss: {prober.ok} requests served, none failed; {report.describe()}")

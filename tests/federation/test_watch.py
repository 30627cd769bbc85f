"""Watch: snapshot then deltas, resume across restarts, compaction, etcd restarts, slow watchers, replicas."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from pathlib import Path

import pytest

from federation import models
from federation.server import Etcd
from federation.client import FederationClient, SnapshotTracker, WatchMessage

from .fixtures import Pki, join_cluster, restart_federation, start_federation
from .test_exports import svc, wait_until


class Watcher:
    """Runs client.watch() in a thread (as the gateway does) and records every message."""

    def __init__(self, client: FederationClient, from_revision: int = 0) -> None:
        self.client = client
        self.stop = threading.Event()
        self.messages: queue.Queue[WatchMessage] = queue.Queue()
        self.all: list[WatchMessage] = []
        self.tracker = SnapshotTracker()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(from_revision,), daemon=True)
        self.thread.start()

    def _run(self, from_revision: int) -> None:
        try:
            for m in self.client.watch(from_revision, stop=self.stop):
                self.all.append(m)
                self.tracker.apply(m)
                self.messages.put(m)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            self.error = exc

    def next(self, timeout: float = 10.0) -> WatchMessage:
        return self.messages.get(timeout=timeout)

    def wait_for(self, pred, timeout: float = 10.0) -> models.Snapshot:  # type: ignore[no-untyped-def]
        assert wait_until(lambda: pred(self.tracker.snapshot()), timeout), (self.tracker.snapshot(), self.error)
        return self.tracker.snapshot()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def names(s: models.Snapshot) -> set[str]:
    return {f"{x.cluster}/{x.name}" for x in s.services}


@pytest.fixture
def east(fed, pki: Pki, tmp_path: Path):  # type: ignore[no-untyped-def]
    return join_cluster(fed, pki, "east", tmp_path)


def test_snapshot_first_then_tagged_deltas(fed, admin, east) -> None:  # type: ignore[no-untyped-def]
    with fed.client(east.gateway_dir) as gw:
        gw.publish("east", [svc("east", "a")])
        w = Watcher(fed.client(east.gateway_dir))
        try:
            first = w.next()
            assert first.snapshot is not None
            assert names(first.snapshot) == {"east/a"}
            assert [c.name for c in first.snapshot.clusters] == ["east"]
            assert first.snapshot.bundle_pem.startswith("-----BEGIN CERTIFICATE")
            assert first.snapshot.crl_pem.startswith("-----BEGIN X509 CRL")
            r = gw.publish("east", [svc("east", "a"), svc("east", "b")])
            delta = w.next()
            assert delta.snapshot is None and delta.revision == r.revision > first.revision
            assert [(c.kind, c.key, c.deleted) for c in delta.changes] == [("service", "east/default/b", False)]
            admin.apply_policy({"kind": "AuthorizationPolicy", "name": "deny-all", "action": "DENY", "rules": [{}]})
            pol = w.next()
            assert [(c.kind, c.key) for c in pol.changes] == [("policy", "AuthorizationPolicy/deny-all")]
            gw.withdraw("east", "default", "a")
            gone = w.next()
            assert [(c.key, c.deleted) for c in gone.changes] == [("east/default/a", True)]
            snap = w.tracker.snapshot()
            assert names(snap) == {"east/b"} and [p.name for p in snap.policies] == ["deny-all"]
            # Status: the gateway reports what it applied; SYNCED until the next change.
            gw.report_applied("", snap.revision)
            assert [g.state for g in admin.status().gateways] == ["SYNCED"]
            gw.publish("east", [svc("east", "b"), svc("east", "c")])
            assert [g.state for g in admin.status().gateways] == ["STALE"]
        finally:
            w.close()


def test_watch_resumes_after_federation_restart(fed, admin, east, pki: Pki, etcd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Changes made (through another replica) while this one was down arrive as a delta, not a snapshot."""
    gw = fed.client(east.gateway_dir)
    gw.publish("east", [svc("east", "a"), svc("east", "b")])
    w = Watcher(fed.client(east.gateway_dir))
    try:
        w.wait_for(lambda s: names(s) == {"east/a", "east/b"})
        fed.stop()
        other = start_federation(pki, etcd.endpoint, tmp_path, name="fed2")
        try:
            with other.client(east.gateway_dir) as gw2:
                gw2.publish("east", [svc("east", "b", port=8080), svc("east", "c")])
        finally:
            other.stop()
        restarted = restart_federation(fed)
        try:
            snap = w.wait_for(lambda s: names(s) == {"east/b", "east/c"}, timeout=20)
            assert {s.name: s.ports[0].port for s in snap.services} == {"b": 8080, "c": 80}
            assert sum(1 for m in w.all if m.snapshot is not None) == 1, "resume must not fall back to a snapshot"
            resumed = w.all[-1]
            assert {(c.key, c.deleted) for c in resumed.changes} == {
                ("east/default/a", True), ("east/default/b", False), ("east/default/c", False)
            }  # fmt: skip
            with restarted.client(east.gateway_dir) as gw3:
                gw3.publish("east", [svc("east", "c")])
            w.wait_for(lambda s: names(s) == {"east/c"})
        finally:
            restarted.stop()
    finally:
        w.close()
        gw.close()


def test_compaction_during_disconnect_yields_a_snapshot(fed, admin, east, etcd) -> None:  # type: ignore[no-untyped-def]
    with fed.client(east.gateway_dir) as gw:
        gw.publish("east", [svc("east", "a")])
        first = next(iter(gw.watch()))
        gw.close()  # disconnect
        gw.publish("east", [svc("east", "b")])
        gw.publish("east", [svc("east", "c")])

        async def compact() -> None:
            async with Etcd(etcd.endpoint) as e:
                rev = (await e.get(b"/isthmus/clusters/east")).mod_revision  # any read gives the header
                head = (await e.range(b"/isthmus/", b"/isthmus0")).header.revision
                assert head > rev
                await e.compact(head)

        asyncio.run(compact())
    with FederationClient([fed.address], east.gateway_dir) as again:
        resumed = next(iter(again.watch(first.revision)))
    assert resumed.snapshot is not None, "a compacted revision must give a fresh snapshot, never a gap"
    assert names(resumed.snapshot) == {"east/c"}
    assert '"watch.resume_compacted"' in fed.log_text()


def test_etcd_restart_under_a_live_watch(fed, admin, east, etcd) -> None:  # type: ignore[no-untyped-def]
    with fed.client(east.gateway_dir) as gw:
        gw.publish("east", [svc("east", "a")], ttl=60)
        w = Watcher(fed.client(east.gateway_dir))
        try:
            w.wait_for(lambda s: names(s) == {"east/a"})
            etcd.stop()
            time.sleep(0.5)
            etcd.start()
            assert wait_until(lambda: _try(lambda: gw.publish("east", [svc("east", "a"), svc("east", "b")], ttl=60)), 20)
            w.wait_for(lambda s: names(s) == {"east/a", "east/b"}, timeout=20)
            assert w.error is None
            assert '"hub.etcd_unavailable"' in fed.log_text()
        finally:
            w.close()


def _try(fn) -> bool:  # type: ignore[no-untyped-def]
    try:
        fn()
        return True
    except Exception:  # noqa: BLE001
        return False


def test_two_replicas_one_killed(pki: Pki, etcd, tmp_path: Path) -> None:
    a = start_federation(pki, etcd.endpoint, tmp_path, name="fed-a")
    b = start_federation(pki, etcd.endpoint, tmp_path, name="fed-b")
    try:
        east = join_cluster(a, pki, "east", tmp_path)
        both = [a.address, b.address]
        with FederationClient(both, pki.admin_dir, timeout=3) as admin, FederationClient(both, east.gateway_dir, timeout=3) as gw:
            gw.publish("east", [svc("east", "a")])
            w = Watcher(FederationClient(both, east.gateway_dir, timeout=3))
            try:
                w.wait_for(lambda s: names(s) == {"east/a"})
                assert admin.address == a.address
                a.kill()
                # Calls fail over to b; the watch reconnects there and resumes.
                gw.publish("east", [svc("east", "a"), svc("east", "b")])
                assert [c.name for c in admin.list_clusters()] == ["east"]
                assert admin.address == b.address
                w.wait_for(lambda s: names(s) == {"east/a", "east/b"}, timeout=15)
                assert sum(1 for m in w.all if m.snapshot is not None) == 1
            finally:
                w.close()
    finally:
        a.kill()
        b.stop()

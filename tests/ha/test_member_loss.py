"""Member loss under load: 10 exports/s while etcd loses a follower, then its leader.

Two federation replicas over a 3-member etcd; four clusters publish a new export set
every 0.4 s (10 publishes/s in all), through both replicas; ten watch clients (standing in
for gateways: the same FederationClient watch a gateway runs) follow the federation.
One follower is SIGKILLed and restarted, then the leader.  A publish may fail while a
leader is being elected; the publisher retries it.  Then, checked against etcd's own
history (tests/federation/history.py): every watcher saw every change once and in order,
kept receiving changes while each member was down, and ends with etcd's state; every
acknowledged publish is in etcd at the revision it was acknowledged with.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from federation.server import EtcdCluster

from ..federation.fixtures import Pki
from ..federation.history import EtcdHistory, Watcher, check, etcd_state, wait_caught_up
from .conftest import acked_versions_hold, join_publishers, start_replicas

pytestmark = pytest.mark.slow

STEADY = 3.0  # seconds of load between faults
DOWN = 4.0  # seconds a member stays dead


def test_member_loss_under_load_loses_no_update_and_watchers_keep_up(etcd3: EtcdCluster, pki: Pki, tmp_path: Path) -> None:
    a, b = start_replicas(pki, etcd3, tmp_path, 2)
    ref = EtcdHistory(etcd3.endpoints).start()
    watchers = [Watcher([x.address, y.address], pki.admin_dir, name=f"w{i}")
                for i, (x, y) in enumerate([(a, b), (b, a)] * 5)]
    publishers = join_publishers(a, pki, tmp_path, ["c1", "c2", "c3", "c4"],
                                 addresses=[a.address, b.address], period=0.4)
    windows: list[tuple[str, int, int]] = []  # (fault, first revision, last revision) while down
    try:
        for w in watchers:
            w.start()
        for p in publishers:
            p.start()
        time.sleep(STEADY)
        for fault in ("follower", "leader"):
            leader = etcd3.wait_leader()
            victim = leader if fault == "leader" else next(i for i in etcd3.running() if i != leader)
            etcd3.kill(victim)
            start = ref.revision
            time.sleep(DOWN)
            windows.append((fault, start, ref.revision))
            etcd3.restart(victim)
            etcd3.wait_leader()
            time.sleep(STEADY)
        for p in publishers:
            p.stop()
        final = etcd_state(etcd3.endpoints)
        ref.wait_for(final[0])
        wait_caught_up(watchers, ref.last_change)
    finally:
        for p in publishers:
            p.stop()
        for w in watchers:
            w.stop()
        ref.stop()
        logs = "\n".join(f.log_text()[-2000:] for f in (a, b))
        alive = [f.proc.poll() is None for f in (a, b)]
        for f in (a, b):
            f.stop()

    assert alive == [True, True], logs
    assert [p.error for p in publishers] == [None] * 4
    acked = sum(len(p.acks) for p in publishers)
    assert acked >= 40, acked
    report = check(watchers, ref, final)
    assert report.ok, report.describe()
    assert not acked_versions_hold(publishers, ref)
    # Watchers kept receiving while each member was down (they did not wait for it).
    for fault, lo, hi in windows:
        assert ref.changes_between(lo, hi), f"no change committed while the {fault} was down"
        for w in watchers:
            assert any(lo < m.revision <= hi and m.kind != "progress" for m in w.applied), (fault, w.name)
    failures = sum(len(p.failures) for p in publishers)
    print(f"\nmember loss: {acked} publishes acknowledged, {failures} failed attempts retried; {report.describe()}")

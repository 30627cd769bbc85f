"""Compaction under load: 50 watchers resume across etcd compactions and miss nothing.

A 3-member etcd compacting every 2 s (``--auto-compaction-retention 2s``), two federation
replicas: two clusters publish 10 export sets a second through replica B while 50 watch
clients follow replica A, half of them with B as their second address.  A is SIGKILLed
for long enough that etcd compacts past every watcher's revision: those with only A
resume, once it is back, into a compacted history and must get a fresh snapshot; those
with B fail over and resume there with a delta.  Then every watcher drops its stream
and resumes a second later from the revision it holds (a restarted gateway), with a
delta that must account for the deletes as well as the puts of that second.  Checked against etcd's own
history, not assumed: the compacted resumes happened, and every watcher saw every change
once and in order, or a snapshot that accounts for it, and ends with etcd's state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation._errors import Compacted
from federation.server import Etcd, EtcdCluster

from ..federation.fixtures import Pki, restart_federation
from ..federation.history import EtcdHistory, Watcher, check, etcd_state, wait_caught_up
from .conftest import acked_versions_hold, join_publishers, start_replicas

pytestmark = pytest.mark.slow

RETENTION = "2s"
WATCHERS = 50


@pytest.fixture
def compacting(tmp_path: Path) -> Iterator[EtcdCluster]:
    c = EtcdCluster(tmp_path / "etcd", members=3, auto_compaction=RETENTION).start()
    yield c
    c.stop()


def _compacted_past(endpoints: list[str], revision: int) -> bool:
    async def probe() -> bool:
        async with Etcd(endpoints) as etcd:
            try:
                await etcd.range(b"/isthmus/", revision=revision)
            except Compacted:
                return True
        return False

    return asyncio.run(probe())


def test_fifty_watchers_resume_across_compactions_without_a_missed_change(
    compacting: EtcdCluster, pki: Pki, tmp_path: Path
) -> None:
    etcd = compacting
    a, b = start_replicas(pki, etcd, tmp_path, 2)
    ref = EtcdHistory(etcd.endpoints).start()
    publishers = join_publishers(b, pki, tmp_path, ["c1", "c2"], addresses=[b.address], period=0.2)
    only_a = [Watcher([a.address], pki.admin_dir, name=f"a{i}") for i in range(WATCHERS // 2)]
    a_then_b = [Watcher([a.address, b.address], pki.admin_dir, name=f"ab{i}") for i in range(WATCHERS - len(only_a))]
    watchers = only_a + a_then_b
    try:
        for w in (*watchers, *publishers):
            w.start()
        wait_caught_up(watchers, ref.revision, timeout=60)
        time.sleep(2)
        before_outage = min(w.revision for w in watchers)

        a.kill()  # long outage: etcd compacts past every watcher's revision meanwhile
        deadline = time.monotonic() + 30
        while not _compacted_past(etcd.endpoints, before_outage):
            assert time.monotonic() < deadline, "etcd never compacted"
            time.sleep(0.5)
        a = restart_federation(a)
        wait_caught_up(watchers, ref.revision, timeout=60)
        time.sleep(2)

        for w in watchers:  # each resumes 1 s later, before etcd compacts what it missed
            w.bounce(1.0)
        time.sleep(1.5)
        wait_caught_up(watchers, ref.revision, timeout=60)
        time.sleep(1)

        for p in publishers:
            p.stop()
        final = etcd_state(etcd.endpoints)
        ref.wait_for(final[0])
        wait_caught_up(watchers, ref.last_change, timeout=60)
        compacted_resumes = a.log_text().count("watch.resume_compacted")
    finally:
        for p in publishers:
            p.stop()
        for w in watchers:
            w.stop()
        ref.stop()
        a.stop()
        b.stop()

    assert [p.error for p in publishers] == [None, None]
    assert not acked_versions_hold(publishers, ref)
    report = check(watchers, ref, final)
    assert report.ok, report.describe()
    # Checked, not assumed: every watcher resumed; those on A alone into a compacted
    # history (a snapshot), those with B by a delta (from a revision etcd still had);
    # and after the bounce, most by a delta that covered several changes.
    assert all(w.streams >= 3 for w in watchers), [w.streams for w in watchers]
    for w in only_a:
        assert any(m.kind == "snapshot" and m.stream > 1 for m in w.applied), w.name
    for w in a_then_b:
        assert any(m.kind == "delta" and m.first_of_stream and m.stream > 1 for m in w.applied), w.name
    assert report.resumes_covering_several >= WATCHERS // 2, report.resumes_covering_several
    print(f"\ncompaction: {report.describe()}; {report.resumes_covering_several} resumes covered several changes; "
          f"replica A logged {compacted_resumes} compacted resumes")

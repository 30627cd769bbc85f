"""A 3-member etcd on loopback (federation.server.EtcdCluster), and the federation's etcd
client over it: it fails over between members and retries what is safe to retry."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation import models
from federation._errors import FederationError, RemoteError, StoreUnavailable
from federation.server import Etcd, EtcdCluster
from federation.server._embedded import ADVISORY_FIXED_IN, etcd_binary, etcd_binary_version

from .fixtures import Pki, join_cluster, make_pki, start_federation
from .history import EtcdHistory, Watcher, check, etcd_state, wait_caught_up


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    c = EtcdCluster(tmp_path / "etcd", members=3).start()
    yield c
    c.stop()


def test_the_tests_run_an_etcd_past_the_data_inconsistency_advisory() -> None:
    version = etcd_binary_version()
    assert version >= ADVISORY_FIXED_IN, (
        f"{etcd_binary()} is etcd {'.'.join(map(str, version))}, inside the 3.5.0-3.5.2 advisory: "
        "run tests/run.sh, which puts a current etcd on PATH")


def _fake_etcd(folder: Path, version: str) -> Path:
    folder.mkdir(parents=True)
    p = folder / "etcd"
    p.write_text(f"#!/bin/sh\necho 'etcd Version: {version}'\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


def test_the_newest_etcd_on_path_wins_and_isthmus_etcd_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _fake_etcd(tmp_path / "a", "3.4.23")
    new = _fake_etcd(tmp_path / "b", "3.9.1")
    monkeypatch.setenv("PATH", f"{old.parent}{os.pathsep}{new.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("ISTHMUS_ETCD", raising=False)
    assert etcd_binary() == str(new)  # not the first on PATH: the newest
    assert etcd_binary_version() == (3, 9, 1)
    monkeypatch.setenv("ISTHMUS_ETCD", str(old))
    assert etcd_binary() == str(old)
    monkeypatch.setenv("ISTHMUS_ETCD", str(tmp_path / "nowhere"))
    with pytest.raises(FederationError, match="ISTHMUS_ETCD=.*not an etcd binary"):
        etcd_binary()


def test_three_members_elect_one_leader_and_a_killed_one_rejoins(cluster: EtcdCluster) -> None:
    leader = cluster.wait_leader()
    statuses = [cluster.status(i) for i in range(3)]
    assert all(s is not None and s.leader_id == statuses[leader].member_id for s in statuses), statuses  # type: ignore[union-attr]
    assert len({s.member_id for s in statuses if s}) == 3

    cluster.kill(leader)
    assert cluster.running() == [i for i in range(3) if i != leader]
    new = cluster.wait_leader(not_index=leader)
    assert new != leader

    async def write() -> int:
        async with Etcd(cluster.endpoint) as etcd:
            return (await etcd.put(b"/t/after-kill", b"1")).header.revision

    rev = asyncio.run(write())
    cluster.restart(leader)
    deadline = time.monotonic() + 20
    while (s := cluster.status(leader)) is None or s.revision < rev:  # it catches up from the others
        assert time.monotonic() < deadline, s
        time.sleep(0.1)
    assert cluster.leader() is not None


def test_reads_fail_over_without_an_error_when_each_member_is_killed_in_turn(cluster: EtcdCluster) -> None:
    """Reads are retried on another member; a write is retried only when etcd refused it
    unproposed, so a write in flight when the leader dies may fail (and nothing else)."""

    async def run() -> tuple[int, list[str]]:
        reads = 0
        write_errors: list[str] = []
        async with Etcd(cluster.endpoint) as etcd:
            for victim in range(3):
                cluster.kill(victim)
                t_end = time.monotonic() + 2.5
                n = 0
                while time.monotonic() < t_end:
                    await etcd.range(b"/t/k")  # raises on any failure: the test fails
                    reads += 1
                    try:
                        await etcd.put(b"/t/k", str(n).encode())
                    except StoreUnavailable as exc:
                        write_errors.append(str(exc))
                    n += 1
                cluster.restart(victim)
                cluster.wait_leader()
        return reads, write_errors

    reads, write_errors = asyncio.run(run())
    assert reads > 10
    # At most the one write in flight when the leader died, per kill.
    assert len(write_errors) <= 3, write_errors


def test_an_unacknowledged_write_is_not_retried_but_a_read_is(cluster: EtcdCluster) -> None:
    """SIGSTOP the leader: a write sent now is proposed to a leader that never answers,
    so its outcome is unknown; the client must not send it again (at most once) and
    says etcd is unavailable. A read in the same window is retried on the new leader."""
    leader = cluster.wait_leader()

    async def run() -> tuple[BaseException | None, float, bytes]:
        async with Etcd(cluster.endpoint, timeout=8.0) as etcd:
            await etcd.put(b"/t/seed", b"x")
            cluster.pause(leader)
            try:
                t0 = time.monotonic()
                write, read = await asyncio.gather(etcd.put(b"/t/once", b"1"), etcd.range(b"/t/seed"),
                                                   return_exceptions=True)
                elapsed = time.monotonic() - t0
            finally:
                cluster.resume(leader)
            assert not isinstance(read, BaseException), read
            return (write if isinstance(write, BaseException) else None), elapsed, read.kvs[0].value

    error, elapsed, value = asyncio.run(run())
    assert value == b"x"
    assert isinstance(error, StoreUnavailable), f"the write was retried or answered: {error!r}"
    assert "etcd is unavailable" in str(error)
    assert elapsed >= 7.0  # it waited out its deadline rather than trying again elsewhere


def test_quorum_loss_fails_fast_with_a_message_naming_the_quorum(cluster: EtcdCluster) -> None:
    followers = cluster.followers()
    cluster.kill(followers[0])
    cluster.kill(followers[1])

    async def run() -> tuple[BaseException, float]:
        async with Etcd(cluster.endpoint) as etcd:
            deadline = time.monotonic() + 15
            while True:  # until the leader notices it has lost its quorum and steps down
                t0 = time.monotonic()
                try:
                    await etcd.range(b"/t/k")
                except StoreUnavailable as exc:
                    if "no leader" in str(exc) or time.monotonic() > deadline:
                        return exc, time.monotonic() - t0
                await asyncio.sleep(0.2)

    error, elapsed = asyncio.run(run())
    assert "no leader" in str(error) and "quorum" in str(error), error
    assert elapsed < 5.0


# ---------------------------------------------------------------------- federation serve over 3 members


def _services(cluster: str, n: int) -> list[models.ExportedService]:
    return [models.ExportedService(cluster=cluster, namespace="default", name="web",
                                   ports=(models.ServicePort(name="http", port=8080, protocol="HTTP"),),
                                   ready_endpoints=n)]


def _publish(client: object, cluster: str, n: int, deadline: float) -> int:
    """Publish until it is acknowledged (what an agent does); return the failed attempts."""
    failures = 0
    while True:
        try:
            client.publish(cluster, _services(cluster, n), ttl=30)  # type: ignore[attr-defined]
            return failures
        except RemoteError as exc:
            failures += 1
            assert exc.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"), exc
            assert time.monotonic() < deadline, f"publish {n} never acknowledged: {exc}"
            time.sleep(0.2)


def test_serve_with_three_endpoints_keeps_publishing_and_watching_while_each_member_dies(
    cluster: EtcdCluster, tmp_path: Path
) -> None:
    pki: Pki = make_pki(tmp_path)
    fed = start_federation(pki, cluster.endpoint, tmp_path)
    ref = EtcdHistory(cluster.endpoints).start()
    watcher = Watcher([fed.address], pki.admin_dir, name="w1", progress_interval=0.5).start()
    try:
        east = join_cluster(fed, pki, "east", tmp_path)
        from federation.client import FederationClient

        failures = 0
        with FederationClient([fed.address], east.agent_dir) as agent:
            n = 0
            for victim in (*cluster.followers(), cluster.wait_leader()):
                cluster.kill(victim)
                for _ in range(5):
                    n += 1
                    failures += _publish(agent, "east", n, time.monotonic() + 30)
                cluster.restart(victim)
                cluster.wait_leader()
        assert fed.proc.poll() is None, fed.log_text()[-3000:]
        with fed.client(pki.admin_dir) as admin:
            services = admin.list_services("east")
        assert [s.ready_endpoints for s in services] == [n]  # the last acknowledged publish won
        final = etcd_state(cluster.endpoints)
        ref.wait_for(final[0])
        wait_caught_up([watcher], ref.last_change)
        report = check([watcher], ref, final)
        assert report.ok, report.describe()
        assert report.deltas >= n
        # A failed publish is one that was in flight when a leader died: at most a few.
        assert failures <= 5, (failures, fed.log_text()[-3000:])
    finally:
        watcher.stop()
        ref.stop()
        fed.stop()


def test_endpoint_names_that_move_to_other_addresses_are_followed(cluster: EtcdCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several endpoints are resolved once into a static list (gRPC never re-resolves it):
    when etcd is unreachable the client resolves the names again and, if an etcd pod came
    back on another address, moves there. Resolution is the part faked here."""
    import socket

    from federation.server import _etcd

    ports = [int(e.rsplit(":", 1)[1]) for e in cluster.endpoints]
    where = {"addr": "127.0.0.9"}  # nothing listens there: the members "moved" away
    real = socket.getaddrinfo

    def fake(host, port, *args, **kw):  # type: ignore[no-untyped-def]
        if str(host).startswith("etcd-"):
            return real(where["addr"], port, *args, **kw)
        return real(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    monkeypatch.setattr(_etcd, "RERESOLVE_INTERVAL", 0.5)

    async def run() -> tuple[bool, bytes]:
        async with Etcd([f"etcd-{i}:{p}" for i, p in enumerate(ports)], timeout=2.0) as etcd:
            failed = False
            try:
                await etcd.put(b"/t/moved", b"1")
            except StoreUnavailable:
                failed = True
            where["addr"] = "127.0.0.1"  # the members are back, on new addresses
            deadline = time.monotonic() + 15
            while True:
                try:
                    await etcd.put(b"/t/moved", b"2")
                    break
                except StoreUnavailable:
                    assert time.monotonic() < deadline, "the client never followed the names"
                    await asyncio.sleep(0.2)
            return failed, (await etcd.get(b"/t/moved")).value  # type: ignore[union-attr]

    failed, value = asyncio.run(run())
    assert failed and value == b"2"


def test_deploy_pins_the_etcd_release_the_tests_run_and_the_readme_says_so() -> None:
    import re

    from .fixtures import REPO

    manifest = (REPO / "deploy" / "base" / "etcd" / "statefulset.yaml").read_text()
    [tag] = re.findall(r"image: \S+/etcd:v(\d+\.\d+\.\d+)", manifest)
    pinned = tuple(int(x) for x in tag.split("."))
    assert pinned >= ADVISORY_FIXED_IN, f"deploy/ pins etcd {tag}, inside the 3.5.0-3.5.2 advisory"
    assert f"app.kubernetes.io/version: {tag}" in manifest
    readme = (REPO / "README.md").read_text()
    assert f"v{tag} (pinned)" in readme and f"| {tag}, Debian's newest" in readme
    # The tests run the same minor as production (CI installs a current one: tests/run.sh).
    assert etcd_binary_version()[:2] == pinned[:2], (etcd_binary_version(), tag)


def test_a_prefix_larger_than_one_grpc_reply_is_read_in_pages_at_one_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """72 MiB under one prefix (a quarter of a million exports' worth) is more than one
    reply may carry (64 MiB): the hub's list after a restart or a compaction would fail.
    get_prefix reads it in pages, shrinking a page that is still too large, all pinned to
    the first page's revision, so a write in between does not show."""
    from federation.server import EmbeddedEtcd, _etcd

    single = EmbeddedEtcd(tmp_path / "one").start()  # one member: 72 MiB replicated thrice costs CI time

    async def run() -> tuple[int, int, int, list[bytes]]:
        async with Etcd(single.endpoint, timeout=30.0) as etcd:
            big = b"x" * (1200 * 1024)
            for i in range(60):
                await etcd.put(b"/t/big/%03d" % i, big)
            whole = await etcd.get_prefix(b"/t/big/")
            for i in range(23):
                await etcd.put(b"/t/small/%03d" % i, b"v1")
            monkeypatch.setattr(_etcd, "RANGE_PAGE", 5)
            first = await etcd.range(b"/t/small/", _etcd.prefix_end(b"/t/small/"), limit=5)
            await etcd.put(b"/t/small/000", b"v2")  # after the cut: must not show
            await etcd.put(b"/t/small/999", b"new")
            paged = await etcd.get_prefix(b"/t/small/", revision=first.header.revision)
            return len(whole.kvs), sum(len(kv.value) for kv in whole.kvs), len(paged.kvs), [kv.value for kv in paged.kvs]

    try:
        n_big, size, n_small, values = asyncio.run(run())
    finally:
        single.stop()
    assert n_big == 60 and size > 64 * 2**20
    assert n_small == 23 and set(values) == {b"v1"}

"""The watch hub in-process against a real etcd: slow watchers, bounded memory, relists."""

from __future__ import annotations

import asyncio
import json

from federation.proto import federation_pb2 as pb
from federation.server import Etcd, Hub, Keys


def svc_json(name: str, port: int = 80) -> bytes:
    return json.dumps({"cluster": "east", "namespace": "default", "name": name, "ports": [{"port": port}]}).encode()


async def _with_hub(endpoint: str, body, queue_size: int = 4) -> None:  # type: ignore[no-untyped-def]
    async with Etcd(endpoint) as etcd:
        hub = Hub(etcd, Keys("/isthmus/"), queue_size=queue_size)
        task = asyncio.create_task(hub.run())
        try:
            await asyncio.wait_for(hub.ready.wait(), 10)
            await body(etcd, hub)
        finally:
            task.cancel()


def test_slow_watcher_gets_a_fresh_snapshot_and_never_holds_up_a_fast_one(etcd) -> None:  # type: ignore[no-untyped-def]
    async def body(e: Etcd, hub: Hub) -> None:
        fast = hub.watch()
        slow = hub.watch()
        assert (await fast.__anext__()).is_snapshot
        assert (await slow.__anext__()).is_snapshot
        got: list[pb.WatchEvent] = []
        # Lockstep with the fast watcher (write, it reads), so only the slow one falls behind.
        for i in range(20):
            await e.put(b"/isthmus/exports/east/default/s%02d" % i, svc_json(f"s{i:02d}"))
            got.append(await asyncio.wait_for(fast.__anext__(), 10))
        assert [len(ev.changes) for ev in got] == [1] * 20
        assert [ev.revision for ev in got] == sorted(ev.revision for ev in got)
        # The slow watcher's queue never held more than its bound ...
        [w_slow] = [w for w in hub._watchers if w.overflows]
        assert w_slow.queue.qsize() <= hub.queue_size
        assert hub.stats.overflows >= 1
        # ... and when it reads again it gets one snapshot with everything, not a gap.
        ev = await asyncio.wait_for(slow.__anext__(), 5)
        assert ev.is_snapshot and ev.revision == got[-1].revision
        assert len(json.loads(ev.snapshot_json)["services"]) == 20
        await e.put(b"/isthmus/exports/east/default/s00", svc_json("s00", 81))
        ev = await asyncio.wait_for(slow.__anext__(), 5)
        assert not ev.is_snapshot and [c.key for c in ev.changes] == ["east/default/s00"]
        await fast.aclose()
        await slow.aclose()
        assert not hub._watchers

    asyncio.run(_with_hub(etcd.endpoint, body))


def test_non_config_keys_never_reach_watchers(etcd) -> None:  # type: ignore[no-untyped-def]
    async def body(e: Etcd, hub: Hub) -> None:
        w = hub.watch()
        await w.__anext__()
        await e.put(b"/isthmus/tokens/abc", b"{}")
        await e.put(b"/isthmus/status/east/gw", b"{}")
        await e.put(b"/isthmus/policies/AuthorizationPolicy/p", b'{"kind":"AuthorizationPolicy","name":"p"}')
        ev = await asyncio.wait_for(w.__anext__(), 5)
        assert [(c.kind, c.key) for c in ev.changes] == [(pb.POLICY, "AuthorizationPolicy/p")]
        await w.aclose()

    asyncio.run(_with_hub(etcd.endpoint, body))


def test_snapshot_is_valid_model_json(etcd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import trust
    from federation import models

    td = trust.TrustDir(tmp_path / "trust")
    td.init("isthmus.local")
    root_pem = td.bundle_pem().decode()

    async def body(e: Etcd, hub: Hub) -> None:
        await e.put(b"/isthmus/exports/east/default/web", svc_json("web"))
        changed = (await e.put(b"/isthmus/trust/bundle", json.dumps({"pem": root_pem}).encode())).header.revision
        await e.put(b"/isthmus/tokens/abc", b"{}")  # moves etcd's revision, not the config's
        assert await hub.catch_up()
        snap = models.Snapshot.model_validate_json(hub.snapshot_event().snapshot_json)
        assert [s.name for s in snap.services] == ["web"] and snap.bundle_pem == root_pem
        assert snap.revision == hub.config_revision == changed < hub.revision

    asyncio.run(_with_hub(etcd.endpoint, body))


def test_every_revision_on_the_stream_is_a_config_revision(etcd) -> None:  # type: ignore[no-untyped-def]
    """Snapshots, resumes and progress carry the newest config change, not etcd's revision
    (which status reports, tokens and leases move): what a gateway holds is comparable
    with GetStatus' config_revision (issue 12: no APPLIED 17 over LATEST 16)."""

    async def body(e: Etcd, hub: Hub) -> None:
        changed = (await e.put(b"/isthmus/exports/east/default/web", svc_json("web"))).header.revision
        for i in range(3):  # what gateways and agents write all the time
            await e.put(b"/isthmus/status/east/gw-%d" % i, b"{}")
        assert await hub.catch_up() and hub.revision > changed
        fresh = hub.watch(progress_interval=0.2)
        first = await fresh.__anext__()
        assert first.is_snapshot and first.revision == changed == hub.config_revision
        progress = await asyncio.wait_for(fresh.__anext__(), 5)
        assert progress.progress and progress.revision == changed
        await fresh.aclose()
        # Resuming from the revision it holds: nothing changed since (no etcd read needed).
        resumed = hub.watch(changed)
        ev = await resumed.__anext__()
        assert not ev.is_snapshot and ev.revision == changed and not ev.changes
        # The next config change arrives as a delta at its own revision.
        later = (await e.put(b"/isthmus/exports/east/default/api", svc_json("api"))).header.revision
        ev = await asyncio.wait_for(resumed.__anext__(), 5)
        assert ev.revision == later == hub.config_revision and [c.key for c in ev.changes] == ["east/default/api"]
        await resumed.aclose()
        # Resuming from before it: the delta is tagged with the newest config change.
        older = hub.watch(changed - 1)
        ev = await older.__anext__()
        assert ev.revision == later and {c.key for c in ev.changes} >= {"east/default/api"}
        await older.aclose()

    asyncio.run(_with_hub(etcd.endpoint, body))


def test_relist_broadcasts_the_difference_as_one_delta(etcd) -> None:  # type: ignore[no-untyped-def]
    """What the hub does after etcd compacted past its revision: re-list and diff, no gap."""

    async def body(e: Etcd, hub: Hub) -> None:
        await e.put(b"/isthmus/exports/east/default/a", svc_json("a"))
        await e.put(b"/isthmus/exports/east/default/b", svc_json("b"))
        assert await hub.catch_up()
        w = hub.watch()
        await w.__anext__()
        await e.put(b"/isthmus/meta/x", b"")  # etcd moves on, as it does during a real gap
        assert await hub.catch_up()
        # Simulate changes the hub's etcd watch never delivered (a compacted gap).
        old = dict(hub.state)
        hub.state = {k: v for k, v in old.items() if not k.endswith(b"/b")}  # "missed" b's creation
        hub.state[b"/isthmus/exports/east/default/gone"] = (1, svc_json("gone"))  # "missed" a deletion
        await hub._relist()
        ev = await asyncio.wait_for(w.__anext__(), 5)
        assert sorted((c.key, c.deleted) for c in ev.changes) == [
            ("east/default/b", False), ("east/default/gone", True)
        ]  # fmt: skip
        assert hub.stats.relists == 1
        await w.aclose()

    asyncio.run(_with_hub(etcd.endpoint, body))


class _Cable:
    """A TCP forwarder in front of etcd that the test can cut (every connection closed,
    new ones refused) and reconnect: the hub loses etcd while the test, on its own
    connection, keeps writing."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.cut_off = False
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.cut_off:
            w.close()
            return
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers |= {w, uw}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    def cut(self) -> None:
        self.cut_off = True
        for w in self.writers:
            w.close()
        self.writers.clear()

    def reconnect(self) -> None:
        self.cut_off = False

    def close(self) -> None:
        self.cut()
        self.server.close()


def test_real_compaction_while_the_hub_is_away_relists_and_a_live_watcher_misses_nothing(etcd) -> None:  # type: ignore[no-untyped-def]
    """The hub loses etcd; meanwhile a key is created, one changed, one deleted, and etcd
    compacts past the hub's revision. Back, the hub's resume is refused as compacted: it
    re-lists and sends its live watcher exactly the difference, as one delta."""
    key = b"/isthmus/exports/east/default/%s"

    async def main() -> None:
        cable = _Cable(int(etcd.endpoint.rsplit(":", 1)[1]))
        port = await cable.start()
        async with Etcd(etcd.endpoint) as direct, Etcd(f"http://127.0.0.1:{port}") as via_cable:
            hub = Hub(via_cable, Keys("/isthmus/"))
            task = asyncio.create_task(hub.run())
            try:
                await asyncio.wait_for(hub.ready.wait(), 10)
                await direct.put(key % b"a", svc_json("a"))
                await direct.put(key % b"b", svc_json("b"))
                w = hub.watch()
                seen: set[str] = set()
                while seen != {"east/default/a", "east/default/b"}:  # both reached the watcher
                    ev = await asyncio.wait_for(w.__anext__(), 10)
                    if ev.is_snapshot:
                        seen = {f"east/default/{s['name']}" for s in json.loads(ev.snapshot_json)["services"]}
                    else:
                        seen |= {c.key for c in ev.changes}
                before = hub.revision

                cable.cut()
                await direct.put(key % b"c", svc_json("c"))  # created while away
                await direct.put(key % b"b", svc_json("b", 8080))  # changed
                await direct.txn([], [Etcd.op_delete(key % b"a")], [])  # deleted
                last = (await direct.put(b"/isthmus/meta/x", b"")).header.revision
                await direct.compact(last)
                assert hub.revision == before  # the hub saw none of it
                cable.reconnect()

                ev = await asyncio.wait_for(w.__anext__(), 30)
                assert not ev.is_snapshot
                assert sorted((c.key, c.deleted) for c in ev.changes) == [
                    ("east/default/a", True), ("east/default/b", False), ("east/default/c", False)]
                (b,) = [c for c in ev.changes if c.key == "east/default/b"]
                assert json.loads(b.json)["ports"] == [{"port": 8080}]
                assert hub.stats.relists == 1 and hub.revision >= last
                # and the watch goes on: the next write arrives as an ordinary delta
                await direct.put(key % b"d", svc_json("d"))
                ev = await asyncio.wait_for(w.__anext__(), 10)
                assert [c.key for c in ev.changes] == ["east/default/d"]
                await w.aclose()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                cable.close()

    asyncio.run(main())


def test_a_crl_not_signed_by_a_root_of_the_bundle_is_refused_and_logged(etcd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A CRL in etcd that no root of the published bundle signed (a stranger's root with
    our root's name, "un-revoking" east) is refused: east stays revoked, and it is logged."""
    import structlog
    from cryptography.hazmat.primitives import serialization

    import trust
    from federation.models import ClusterRecord

    root = trust.TrustDir(tmp_path / "root")
    root.init("isthmus.local")
    east = root.issue_cluster("east")
    leaf = trust.load_cert(east.issue(trust.workload_id("east.isthmus.local", "shop", "cart"), tmp_path / "leaf").cert)
    root.revoke_cluster("east")
    stranger = trust.TrustDir(tmp_path / "stranger")
    stranger.init("isthmus.local")
    forged = trust.build_crl(stranger.root_cert, stranger.root_key, []).public_bytes(serialization.Encoding.PEM)

    async def body(e: Etcd, hub: Hub) -> None:
        record = ClusterRecord(name="east", trust_domain="east.isthmus.local",
                               ca_cert_pem=(east.path / "ca.crt").read_text())
        await e.put(hub.keys.cluster("east"), record.model_dump_json().encode())
        await e.put(hub.keys.k("trust", "bundle"), json.dumps({"pem": root.bundle_pem().decode()}).encode())
        await e.put(hub.keys.k("trust", "crl"), json.dumps({"pem": root.crl_pem().decode()}).encode())
        assert await hub.catch_up()
        assert hub.revocations().is_revoked(leaf)  # the real CRL counts
        await e.put(hub.keys.k("trust", "crl"), json.dumps({"pem": forged.decode()}).encode())
        assert await hub.catch_up()
        with structlog.testing.capture_logs() as logs:
            assert hub.revocations().is_revoked(leaf)  # the forgery does not
        assert [x["event"] for x in logs] == ["hub.bad_crl"], logs
        assert "does not verify against any root" in logs[0]["error"]

    asyncio.run(_with_hub(etcd.endpoint, body))

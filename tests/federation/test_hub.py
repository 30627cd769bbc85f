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
        await e.put(b"/isthmus/trust/bundle", json.dumps({"pem": root_pem}).encode())
        assert await hub.catch_up()
        snap = models.Snapshot.model_validate_json(hub.snapshot_event().snapshot_json)
        assert [s.name for s in snap.services] == ["web"] and snap.bundle_pem == root_pem
        assert snap.revision == hub.revision

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

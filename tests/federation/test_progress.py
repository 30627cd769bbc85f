"""Watch progress: a quiet watch stream carries progress messages, so a gateway can tell
"nothing changed" from "the stream is dead" and its config staleness stays small."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import trio

from federation.client import SnapshotTracker, decode_event
from federation.proto import federation_pb2 as pb

from .fixtures import Pki, join_cluster
from .test_exports import svc


def test_quiet_watch_sends_progress_and_changes_still_arrive(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    east = join_cluster(fed, pki, "east", tmp_path)
    stop = threading.Event()
    with fed.client(east.gateway_dir) as gw, fed.client(east.agent_dir) as agent:
        try:
            it = gw.watch(stop=stop, progress_interval=0.3)
            tracker = SnapshotTracker()
            first = next(it)
            assert first.snapshot is not None
            before = tracker.apply(first)
            t0 = time.monotonic()
            for _ in range(2):
                m = next(it)
                assert m.progress and not m.changes and m.snapshot is None
                assert m.revision >= first.revision
                assert tracker.apply(m).clusters == before.clusters  # content unchanged
            assert time.monotonic() - t0 < 2.0  # ~0.6 s; generous for a loaded machine
            published = agent.publish("east", [svc("east", "web")])
            m = next(it)
            while m.progress:  # a progress message may have been in flight
                m = next(it)
            assert m.revision == published.revision and [c.key for c in m.changes] == ["east/default/web"]
            m = next(it)
            assert m.progress and m.revision >= published.revision  # never behind a delivered change
        finally:
            stop.set()


def test_progress_is_an_empty_delta_for_clients_that_do_not_know_it() -> None:
    """Backwards compatible: without the field it decodes as a delta with no changes."""
    tracker = SnapshotTracker()
    tracker.apply(decode_event(pb.WatchEvent(revision=5, is_snapshot=True, snapshot_json='{"revision": 5}')))
    old_view = pb.WatchEvent.FromString(pb.WatchEvent(revision=9, progress=True).SerializeToString())
    old_view.ClearField("progress")
    msg = decode_event(old_view)
    assert not msg.progress and msg.changes == () and msg.snapshot is None
    assert tracker.apply(msg).revision == 9


async def test_gateway_staleness_stays_small_while_nothing_changes(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A real Gateway object following a real federation (not listening: only its config side)."""
    from gateway import Gateway, GatewayConfig
    from gateway._control import follow_federation

    east = await trio.to_thread.run_sync(join_cluster, fed, pki, "east", tmp_path)
    d = east.gateway_dir
    cfg = GatewayConfig.model_validate(
        {
            "cluster": "east",
            "tls": {"cert_file": d / "cert.pem", "key_file": d / "key.pem", "bundle_file": d / "bundle.pem"},
            "federation": {"address": fed.address},
            "last_known_good": tmp_path / "lkg.json",
        }
    )
    gw = Gateway(cfg)
    applied: list[int] = []
    update = gw.update

    async def counting_update(snap, source="federation"):  # type: ignore[no-untyped-def]
        ok = await update(snap, source)
        applied.append(snap.revision)
        return ok

    gw.update = counting_update  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: follow_federation(gw, progress_interval=0.25))
        with trio.fail_after(10):
            while not applied or not cfg.last_known_good.exists():  # saved after it applied
                await trio.sleep(0.05)
        lkg_mtime = cfg.last_known_good.stat().st_mtime_ns
        worst = 0.0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:  # nothing changes in the federation meanwhile
            await trio.sleep(0.1)
            worst = max(worst, time.time() - gw.last_confirmed)
        nursery.cancel_scope.cancel()
    assert worst < 1.0, f"staleness grew to {worst:.2f}s on a quiet federation"
    assert len(applied) == 1  # progress confirms; it does not re-apply
    assert cfg.last_known_good.stat().st_mtime_ns == lkg_mtime  # nothing changed: not written again

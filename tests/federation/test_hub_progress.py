"""A progress message never claims a revision whose delta is still queued.

Found by the history checker (tests/ha/test_compaction.py, under CPU contention): the
hub's sender waits for its queue with a timeout and sends a progress message at the
hub's revision when the wait times out.  When a delta lands in the queue just as the
timeout fires, the wait still ends in a timeout; a progress at the newer revision went
out, and the queued delta, now "older" than what was sent, was then skipped — a watcher
(a gateway) missed that change for good.  Here the race is forced: the wait reports a
timeout exactly when the delta is queued.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from federation.server import Etcd, Hub, Keys


def test_a_delta_queued_as_the_progress_wait_times_out_is_sent_not_skipped(etcd, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    real_wait_for = asyncio.wait_for

    async def body() -> tuple[list[object], int]:
        async with Etcd(etcd.endpoint) as e:
            hub = Hub(e, Keys("/isthmus/"))
            task = asyncio.create_task(hub.run())
            try:
                await real_wait_for(hub.ready.wait(), 10)
                w = hub.watch(progress_interval=0.2)
                assert (await w.__anext__()).is_snapshot
                [watcher] = hub._watchers

                fired: list[bool] = []

                async def timeout_as_the_delta_arrives(aw, timeout):  # type: ignore[no-untyped-def]
                    if fired or getattr(aw, "__qualname__", "") != "Queue.get":
                        return await real_wait_for(aw, timeout)
                    fired.append(True)  # once: the next wait is a real one
                    aw.close()
                    while watcher.queue.empty():
                        await asyncio.sleep(0.01)
                    raise asyncio.TimeoutError

                monkeypatch.setattr(asyncio, "wait_for", timeout_as_the_delta_arrives)
                body = json.dumps({"cluster": "east", "namespace": "default", "name": "web", "ports": [{"port": 80}]})
                put = asyncio.create_task(e.put(b"/isthmus/exports/east/default/web", body.encode()))
                got = [await real_wait_for(w.__anext__(), 10)]
                monkeypatch.setattr(asyncio, "wait_for", real_wait_for)
                rev = (await put).header.revision
                while got[-1].progress:  # progress before the change is fine; after it, the change
                    assert got[-1].revision < rev, f"progress at {got[-1].revision} claims the change at {rev}"
                    got.append(await real_wait_for(w.__anext__(), 10))
                await w.aclose()
                return got, rev
            finally:
                task.cancel()

    got, rev = asyncio.run(body())
    last = got[-1]
    assert last.revision == rev and [c.key for c in last.changes] == ["east/default/web"], got  # type: ignore[attr-defined]

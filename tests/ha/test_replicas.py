"""Three federation replicas over a 3-member etcd; the one running the background jobs dies.

Background jobs (the trust sync: mirroring the trust folder's bundle and CRL into etcd
and marking revoked clusters) run on the replica holding the ``election/trust-sync`` key,
bound to a 5 s lease (federation/server/_serve.py, ``Election``).  SIGKILL that replica:
another takes the key within the lease TTL (plus one campaign interval), an offline
revocation made afterwards reaches etcd and the watchers through the new holder, and etcd
lease expiry keeps working: a cluster that stops heartbeating loses its exports, one that
heartbeats through the surviving replicas keeps them.  The watchers, checked against
etcd's history, missed nothing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from federation.client import FederationClient
from federation.server import Etcd, EtcdCluster

from ..federation.fixtures import FederationProcess, Pki, join_cluster
from ..federation.history import EtcdHistory, Watcher, check, etcd_state, wait_caught_up
from .conftest import export_set, start_replicas

pytestmark = pytest.mark.slow

ELECTION_TTL = 5  # Election's default lease (federation/server/_serve.py)
INTERVAL = 0.5  # --trust-sync-interval: how often a replica campaigns


def _holder(etcd: EtcdCluster) -> str:
    async def read() -> str:
        async with Etcd(etcd.endpoints) as e:
            kv = await e.get(b"/isthmus/election/trust-sync")
        return kv.value.decode() if kv is not None else ""

    return asyncio.run(read())


def _pid_of(holder: str) -> int:
    return int(holder.split(":")[1]) if holder.count(":") >= 2 else 0


def test_killing_the_background_job_leader_hands_the_jobs_to_another_replica(
    etcd3: EtcdCluster, pki: Pki, tmp_path: Path
) -> None:
    replicas = start_replicas(pki, etcd3, tmp_path, 3, extra=("--trust-sync-interval", str(INTERVAL)))
    addresses = [f.address for f in replicas]
    ref = EtcdHistory(etcd3.endpoints).start()
    watchers = [Watcher(addresses[i:] + addresses[:i], pki.admin_dir, name=f"w{i}").start() for i in range(3)]
    east = join_cluster(replicas[0], pki, "east", tmp_path)
    west = join_cluster(replicas[0], pki, "west", tmp_path)
    join_cluster(replicas[0], pki, "north", tmp_path)
    stop = threading.Event()
    east_client = FederationClient(addresses, east.agent_dir, timeout=5.0)
    keeper = threading.Thread(target=east_client.keep_published,
                              args=("east", lambda: export_set("east", 1), stop), kwargs={"ttl": 6}, daemon=True)
    keeper.start()
    try:
        deadline = time.monotonic() + 20
        while not (holder := _holder(etcd3)):
            assert time.monotonic() < deadline, "no replica took the trust-sync election"
            time.sleep(0.1)
        [leader] = [f for f in replicas if f.proc.pid == _pid_of(holder)]
        others: list[FederationProcess] = [f for f in replicas if f is not leader]

        t_kill = time.monotonic()
        leader.kill()
        while (now_holder := _holder(etcd3)) in ("", holder):
            assert time.monotonic() - t_kill < 30, "nobody took over the trust-sync election"
            time.sleep(0.1)
        takeover = time.monotonic() - t_kill
        assert _pid_of(now_holder) in {f.proc.pid for f in others}, now_holder
        # The dead holder's lease must lapse first (TTL), then the next campaign wins it.
        assert takeover <= ELECTION_TTL + 2 * INTERVAL + 1.5, takeover

        # Trust sync, now on the new holder: an offline revocation reaches etcd and the record.
        pki.td.revoke_cluster("north")
        crl = pki.td.crl_pem().decode()
        deadline = time.monotonic() + 15
        while True:
            _, state = etcd_state(etcd3.endpoints)
            if state.get(("crl", "crl")) == crl and state.get(("cluster", "north"), {}).get("revoked"):
                break
            assert time.monotonic() < deadline, "the new trust-sync leader did not publish the revocation"
            time.sleep(0.2)

        # Lease expiry: west publishes with a 3 s lease and goes quiet; its exports lapse.
        with FederationClient(addresses, west.agent_dir) as w:
            w.publish("west", export_set("west", 2), ttl=3)
        deadline = time.monotonic() + 20
        while any(k[0] == "service" and k[1].startswith("west/") for k in etcd_state(etcd3.endpoints)[1]):
            assert time.monotonic() < deadline, "west's exports outlived their lease"
            time.sleep(0.3)
        stop.set()
        keeper.join(10)
        final = etcd_state(etcd3.endpoints)
        ref.wait_for(final[0])
        wait_caught_up(watchers, ref.last_change)
    finally:
        stop.set()
        east_client.close()
        for w in watchers:
            w.stop()
        ref.stop()
        for f in replicas:
            f.stop()

    assert ("service", "east/default/web") in final[1]  # heartbeats through the survivors kept it
    report = check(watchers, ref, final)
    assert report.ok, report.describe()
    # The watchers saw west's exports come and go, and north revoked.
    events = {(k, v is None) for _, k, v in ref.events}
    assert (("service", "west/default/web"), True) in events and (("crl", "crl"), False) in events
    print(f"\nreplicas: the trust-sync election moved in {takeover:.1f}s (lease TTL {ELECTION_TTL}s); {report.describe()}")

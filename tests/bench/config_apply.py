"""How long a config change stalls the gateway's event loop.

    python tests/bench/config_apply.py            # 50 clusters x 2,000 services x 200 policies
    python tests/bench/config_apply.py --smoke    # a few seconds, same code paths
    python tests/bench/config_apply.py -n 100 -m 10000 -p 1000 --changes 10

A real, running :class:`gateway.Gateway` (listeners on loopback, real certificates, a
CRL and 50 cluster CAs from :mod:`trust`) applies a sequence of snapshots, each one
service different from the last, while a heartbeat task on the same trio loop ticks
every millisecond.  The loop's stall
for one change is the longest gap between two ticks beyond the tick interval, from just
before the change until it is in force.  Two ways, measured in the same run:

* ``on_loop``: :meth:`Gateway.apply_snapshot`, the whole build on the event loop (how
  every change was applied before :meth:`Gateway.update`);
* ``off_loop``: :meth:`Gateway.update`, routes, policies and revocations built in a
  worker thread and only the swap on the loop;
* ``floor``: as long a run of plain Python in a worker thread, building nothing: what the
  interpreter (one GIL) and the machine allow at best.

Reported: the median and worst stall per change of each, the build time, and the ratios
on_loop / off_loop and off_loop / floor of the worst stalls.  Snapshots are made before timing starts (in a
gateway they arrive already parsed from the federation watch thread).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import structlog  # noqa: E402
import trio  # noqa: E402

import trust  # noqa: E402
from federation.models import (  # noqa: E402
    AuthorizationPolicy,
    ClusterRecord,
    ExportedService,
    Rule,
    RuleFrom,
    RuleTo,
    Selector,
    ServicePort,
    Snapshot,
)
from gateway import Gateway, GatewayConfig  # noqa: E402
from gateway._gateway import quiet_build  # noqa: E402

TICK = 0.001
FED_TD = "isthmus.local"


def make_world(tmp: Path, n_clusters: int) -> tuple[GatewayConfig, list[ClusterRecord], str]:
    """A federation root, ``n_clusters`` cluster CAs, and the first cluster's gateway."""
    root = trust.TrustDir(tmp / "root")
    root.init(FED_TD)
    clusters: list[ClusterRecord] = []
    local_files = None
    for i in range(n_clusters):
        name = f"c{i:03d}"
        ca = root.issue_cluster(name, validity=86400)
        if i == 0:
            local_files = ca.issue(trust.gateway_id(f"{name}.{FED_TD}"), tmp / "gw", validity=3600)
        clusters.append(ClusterRecord(
            name=name, trust_domain=f"{name}.{FED_TD}",
            gateway_addresses=(f"10.0.{i // 250}.{i % 250 + 1}:15443",),
            ca_cert_pem=(ca.path / "ca.crt").read_text()))
    assert local_files is not None
    cfg = GatewayConfig.model_validate({
        "cluster": "c000",
        "inbound": {"host": "127.0.0.1", "port": 0},
        "outbound": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "tls": {"cert_file": str(local_files.cert), "key_file": str(local_files.key),
                "bundle_file": str(local_files.bundle)},
        "last_known_good": str(tmp / "lkg.json"),
        "access_log": False,
    })
    return cfg, clusters, root.crl_pem().decode()


def service(cluster: str, j: int, target_port: int = 8080) -> ExportedService:
    return ExportedService(
        cluster=cluster, namespace=f"ns{j % 20}", name=f"svc-{j:05d}",
        ports=(ServicePort(name="http", port=8080, protocol="HTTP",
                           target=f"10.1.{j // 250 % 250}.{j % 250 + 1}:{target_port}"),
               ServicePort(name="grpc", port=9090, protocol="GRPC")),
        ready_endpoints=3)


def policy(k: int) -> AuthorizationPolicy:
    ns = f"ns{k % 20}"
    return AuthorizationPolicy(
        name=f"policy-{k:04d}", action="DENY" if k % 5 == 0 else "ALLOW",
        selector=Selector(namespace=ns, service=f"svc-{k:05d}" if k % 2 else "*"),
        rules=(Rule(from_=(RuleFrom(principals=(f"spiffe://c{k % 50:03d}.{FED_TD}/ns/{ns}/sa/*",),
                                    namespaces=(ns, "default")),),
                    to=(RuleTo(methods=("GET", "POST"), paths=("/api/*", f"/v{k % 3}/items")),)),))


def base_snapshot(clusters: list[ClusterRecord], crl: str, n_services: int,
                  n_policies: int) -> Snapshot:
    return Snapshot(revision=1, clusters=tuple(clusters),
                    services=tuple(service(clusters[j % len(clusters)].name, j)
                                   for j in range(n_services)),
                    policies=tuple(policy(k) for k in range(n_policies)), crl_pem=crl)


def changed(base: Snapshot, rev: int) -> Snapshot:
    """``base`` with one service of the local cluster moved to another backend port."""
    first = service(base.services[0].cluster, 0, target_port=8000 + rev % 1000)
    return base.model_copy(update={"revision": rev, "services": (first, *base.services[1:])})


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(100))


async def measure(gw: Gateway, base: Snapshot, revisions: range, mode: str,
                  floor_seconds: float = 0.0) -> dict[str, float]:
    stalls: list[float] = []
    builds: list[float] = []
    window: list[float] = []  # gaps seen while a change is being applied
    measuring = False

    async def heartbeat() -> None:
        last = trio.current_time()
        while True:
            await trio.sleep(TICK)
            now = trio.current_time()
            if measuring:
                window.append(now - last - TICK)
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeat)
        await trio.sleep(0.05)
        for rev in revisions:
            snap = changed(base, rev)  # outside the window: it arrives parsed, from a thread
            window.clear()
            measuring = True
            await trio.sleep(TICK * 2)  # a tick inside the window before the change
            t0 = time.perf_counter()
            if mode == "on_loop":
                ok = gw.apply_snapshot(snap)
            elif mode == "off_loop":
                ok = await gw.update(snap)
            else:  # floor: the same time of pure-Python work in a thread, nothing built
                with quiet_build():
                    await trio.to_thread.run_sync(_busy, floor_seconds)
                ok = True
            builds.append(time.perf_counter() - t0)
            assert ok and (mode == "floor" or gw.state.revision == snap.revision), \
                "the change was not applied"
            await trio.sleep(TICK * 3)  # the ticks right after the swap
            measuring = False
            stalls.append(max(window, default=0.0))
        nursery.cancel_scope.cancel()
    return {
        "stall_ms_median": round(statistics.median(stalls) * 1000, 2),
        "stall_ms_max": round(max(stalls) * 1000, 2),
        "apply_ms_median": round(statistics.median(builds) * 1000, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--clusters", type=int, default=50)
    ap.add_argument("-m", "--services", type=int, default=2000, help="services in the federation")
    ap.add_argument("-p", "--policies", type=int, default=200)
    ap.add_argument("--changes", type=int, default=10, help="timed config changes per mode")
    ap.add_argument("--smoke", action="store_true", help="small sizes: checks the code paths in seconds")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args()
    if args.smoke:
        args.clusters, args.services, args.policies, args.changes = 3, 60, 6, 3
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    with tempfile.TemporaryDirectory(prefix="isthmus-bench-") as tmpdir:
        t = time.monotonic()
        cfg, clusters, crl = make_world(Path(tmpdir), args.clusters)
        base = base_snapshot(clusters, crl, args.services, args.policies)
        setup = time.monotonic() - t

        async def run() -> dict[str, object]:
            gw = Gateway(cfg)
            assert gw.apply_snapshot(base)  # the config it starts with (last-known-good)
            async with trio.open_nursery() as nursery:
                await nursery.start(gw.run)  # a running gateway: listeners, timers, admin
                n = args.changes
                on_loop = await measure(gw, base, range(2, 2 + n), "on_loop")
                off_loop = await measure(gw, base, range(2 + n, 2 + 2 * n), "off_loop")
                floor = await measure(gw, base, range(2 + 2 * n, 2 + 3 * n), "floor",
                                      floor_seconds=off_loop["apply_ms_median"] / 1000)
                gw.stop()
            return {"on_loop": on_loop, "off_loop": off_loop, "floor": floor}

        result: dict[str, object] = {
            "clusters": args.clusters, "services": args.services, "policies": args.policies,
            "changes_per_mode": args.changes, "setup_seconds": round(setup, 1),
            "switch_interval_ms": sys.getswitchinterval() * 1000,
        }
        result.update(trio.run(run))
    on, off = result["on_loop"], result["off_loop"]
    assert isinstance(on, dict) and isinstance(off, dict)
    floor = result["floor"]
    assert isinstance(floor, dict)
    result["ratio_stall_on_loop/off_loop"] = round(on["stall_ms_max"] / max(off["stall_ms_max"], 0.01), 1)
    result["ratio_stall_off_loop/floor"] = round(off["stall_ms_max"] / max(floor["stall_ms_max"], 0.01), 1)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.clusters} clusters x {args.services} services x {args.policies} policies, "
          f"{args.changes} changes each way")
    for mode in ("on_loop", "off_loop", "floor"):
        r = result[mode]
        assert isinstance(r, dict)
        print(f"  {mode:9s} loop stall per change: median {r['stall_ms_median']:7.2f} ms, "
              f"worst {r['stall_ms_max']:7.2f} ms   (apply {r['apply_ms_median']:.1f} ms)")
    print(f"  worst stall on_loop / off_loop: {result['ratio_stall_on_loop/off_loop']}x; "
          f"off_loop / floor: {result['ratio_stall_off_loop/floor']}x")


if __name__ == "__main__":
    main()

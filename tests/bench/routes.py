"""Route selection benchmark: the per-request cost of choosing a destination, vs the plain
route-table lookup, all measured in this run.

    python tests/bench/routes.py            # 200,000 selections per figure
    python tests/bench/routes.py --smoke    # 5,000 (seconds); CI runs this (tests/traffic/test_bench_smoke.py)
    python tests/bench/routes.py --json

Figures (µs per request, best of five runs; each includes what the gateway does per
request: the route-table lookup, the request's match view, the selection, and a health
check of the destinations against a pool table):

* baseline:       ``RouteTable.outbound_route`` alone (what a request cost before routes);
* 1 route:        lookup + select, one TrafficRoute in force (a header rule, then 90/10);
* 1,000 routes:   the same with 1,000 routes in force (target: <= 5 µs);
* 10 regex rules: a route whose first 9 rules are RE2 path regexes that do not match
  and whose 10th does; once with one path repeated (the regex memo answers) and once
  with a new path per request (every regex runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from federation.models import ClusterRecord, ExportedService, ServicePort, Snapshot, TrafficRoute  # noqa: E402
from federation.traffic import Out, Request, Target, compile_routes  # noqa: E402
from gateway._routes import build_routes  # noqa: E402

CALLER = "south"
HEADERS = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/api/v1/items?page=2"),
           (b":authority", b"s0.shop.isthmus.local:8080"), (b"user-agent", b"bench/1"), (b"accept", b"*/*"),
           (b"x-request-id", b"0123456789abcdef")]


def snapshot(n_routes: int, regex_rules: bool = False, n_services: int = 1000) -> Snapshot:
    clusters = tuple(ClusterRecord(name=c, trust_domain=f"{c}.isthmus.local", gateway_addresses=(f"10.0.0.{i}:15443",))
                     for i, c in enumerate(("east", "west", "central", CALLER), start=1))
    services = tuple(ExportedService(cluster=c, namespace="shop", name=f"s{i}", ports=(ServicePort(port=8080),))
                     for i in range(n_services) for c in ("east", "west", "central"))
    routes = []
    for i in range(n_routes):
        if regex_rules:
            rules = [{"match": [{"path": {"regex": f"^/v{k}/[a-z]+/[0-9]+$"}}], "destinations": [{"cluster": "central"}]}
                     for k in range(9)]
            rules.append({"match": [{"path": {"regex": "^/api/v[0-9]+/items"}}],
                          "destinations": [{"cluster": "east", "weight": 90}, {"cluster": "west", "weight": 10}]})
        else:
            rules = [{"match": [{"headers": {"x-canary": {"exact": "1"}}}], "destinations": [{"cluster": "west"}]},
                     {"destinations": [{"cluster": "east", "weight": 90}, {"cluster": "west", "weight": 10}],
                      "failover": ["central", "*"]}]
        routes.append(TrafficRoute.model_validate({"name": f"r{i}", "host": {"namespace": "shop", "service": f"s{i}"},
                                                   "rules": rules}))
    return Snapshot(revision=1, clusters=clusters, services=services, routes=tuple(routes))


def pool_health() -> Callable[[Target], Out | None]:
    """What the gateway's Dialer.health costs: one pool-table lookup per gateway address."""
    failing: dict[tuple[str, str, str, str], str] = {}

    def health(t: Target) -> Out | None:
        for a in t.addresses:
            if ("peer", t.cluster, t.trust_domain, a) not in failing:
                return None
        return Out("unreachable")
    return health


def best(fn: Callable[[], object], n: int) -> float:
    fn()
    result = float("inf")
    for _ in range(5):  # best of five: the least disturbed by other processes
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        result = min(result, (time.perf_counter() - t0) / n)
    return result * 1e6


def measure(n: int) -> dict[str, float]:
    health = pool_health()
    authority = "s0.shop.isthmus.local:8080"
    out: dict[str, float] = {}
    table = build_routes(snapshot(0), CALLER)
    out["baseline_lookup_us"] = best(lambda: table.outbound_route(authority), n)

    def noop() -> None:
        pass
    # how fast this machine runs Python right now (shared cores inflate every figure alike)
    out["python_call_us"] = best(noop, n)

    def per_request(routes: object, table: object, paths: Callable[[], str] | None = None) -> Callable[[], object]:
        def one() -> object:
            r = table.outbound_route(authority)  # type: ignore[attr-defined]
            path = paths() if paths is not None else "/api/v1/items?page=2"
            sel = routes.select(r.namespace, r.service, r.port,  # type: ignore[attr-defined]
                                Request("GET", path, raw=HEADERS), health)
            assert sel is not None and sel.target is not None
            return sel
        return one

    for label, snap in (("1_route_us", snapshot(1)), ("1000_routes_us", snapshot(1000))):
        out[label] = best(per_request(compile_routes(snap, CALLER), build_routes(snap, CALLER)), n)
    snap = snapshot(1, regex_rules=True)
    routes, table = compile_routes(snap, CALLER), build_routes(snap, CALLER)
    out["10_regex_rules_repeated_path_us"] = best(per_request(routes, table), n)
    fresh = iter([f"/api/v1/items/{i}" for i in range(6 * n + 10)]).__next__
    out["10_regex_rules_new_path_us"] = best(per_request(routes, table, fresh), n)
    # the cost of handing out a fresh path, to subtract from the line above
    out["new_path_overhead_us"] = best(iter([f"/x/{i}" for i in range(6 * n + 10)]).__next__, n)
    base = out["baseline_lookup_us"]
    out.update({f"ratio_{k.removesuffix('_us')}_vs_baseline": v / base for k, v in list(out.items())
                if k not in ("baseline_lookup_us", "new_path_overhead_us", "python_call_us")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-n", type=int, default=None, help="selections per run")
    a = ap.parse_args()
    n = a.n or (5_000 if a.smoke else 200_000)
    r = measure(n)
    r["selections"] = n
    if a.json:
        print(json.dumps(r))
        return
    base = r["baseline_lookup_us"]
    print(f"route-table lookup (baseline)       {base:7.2f} us/request")
    for key, label in (("1_route", "1 route"), ("1000_routes", "1,000 routes"),
                       ("10_regex_rules_repeated_path", "10 regex rules, repeated path"),
                       ("10_regex_rules_new_path", "10 regex rules, new path each")):
        v = r[f"{key}_us"]
        print(f"{label:35} {v:7.2f} us/request   ratio {v / base:5.1f}x   (+{v - base:.2f} us for selection)")
    print(f"(one empty Python call costs {r['python_call_us'] * 1000:.0f} ns here: "
          f"1,000 routes = {r['1000_routes_us'] / r['python_call_us']:.0f} calls' worth)")


if __name__ == "__main__":
    main()

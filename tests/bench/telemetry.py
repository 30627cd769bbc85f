"""What recording one request's metrics costs the gateway (microseconds, one CPU).

    python tests/bench/telemetry.py             # 7 x 100 000 records per scenario
    python tests/bench/telemetry.py --smoke     # < 5 s, same code paths

Drives :class:`gateway._telemetry.Recorder` (access log off) the way the handlers do:
a record is made, filled and finished.  Scenarios:

* ``http_one_key``: every request has the same labels (the steady state of one edge);
* ``http_500_keys``: 100 callers x 5 response codes, cycled (warm after the first pass);
* ``tcp``: a tunnel opened and closed.

Baselines measured in the same run: ``record_only`` (make, fill and finish a record that
nobody observes) and ``bare_prometheus`` (one ``Counter.inc()`` and one
``Histogram.observe()`` on children fetched up front: the least any Prometheus-backed
recorder pays).  Each scenario prints its cost above ``record_only`` and its ratio to
``bare_prometheus``.  The script runs against whichever ``gateway`` it imports (set
PYTHONPATH to compare two trees).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

# This folder's gateway.py (the gateway benchmark) would shadow the package: drop it from
# the path; then use the tree on PYTHONPATH, or this repository.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if not any(Path(p, "gateway", "__init__.py").is_file() for p in sys.path if p):
    sys.path.insert(0, str(HERE.parents[1]))

from prometheus_client import CollectorRegistry, Counter, Histogram  # noqa: E402

from gateway._routes import OutboundRoute  # noqa: E402
from gateway._telemetry import Exchange, Metrics, Recorder  # noqa: E402

ROUTE = OutboundRoute("default", "web", 8080, "HTTP2", (), "web.default.svc.cluster.local:8080")
WEST_GW = "spiffe://west.isthmus.local/ns/isthmus-system/sa/isthmus-gateway"
CALLERS = [f"spiffe://east.isthmus.local/ns/shop/sa/w{i}" for i in range(100)]
CODES = (200, 201, 404, 500, 503)


def _fill(x: Exchange, caller: str, code: int) -> None:
    x.source_principal, x.source_cluster = caller, "east"
    if hasattr(x, "to_service"):
        x.to_service(ROUTE)
    else:  # a tree from before the full label set
        x.destination_service = ROUTE.destination_service
    x.destination_cluster, x.destination_principal = "west", WEST_GW
    x.response_code = code
    x.bytes_received, x.bytes_sent = 120, 2400


REPEAT = 7


def _time(n: int, one: Callable[[int], None]) -> float:
    """Microseconds per call, the best of :data:`REPEAT` runs (the machine is shared)."""
    best = float("inf")
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        for i in range(n):
            one(i)
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def run(n: int) -> dict[str, float]:
    out: dict[str, float] = {}

    def record_only(i: int) -> None:
        x = Exchange("source", "HTTP/2", lambda x: None)
        _fill(x, CALLERS[0], 200)
        x.finish()

    reg = CollectorRegistry()
    c = Counter("c_total", "c", ("a",), registry=reg).labels("x")
    h = Histogram("h", "h", ("a",), registry=reg).labels("x")

    def bare(i: int) -> None:
        c.inc()
        h.observe(3.0)

    rec = Recorder(Metrics(), access_log_enabled=False)

    def one_key(i: int) -> None:
        x = Exchange("source", "HTTP/2", rec)
        _fill(x, CALLERS[0], 200)
        x.finish()

    def many_keys(i: int) -> None:
        x = Exchange("source", "HTTP/2", rec)
        _fill(x, CALLERS[i % 100], CODES[i // 100 % 5])
        x.finish()

    def tcp(i: int) -> None:
        x = Exchange("source", "HTTP/2", rec)
        _fill(x, CALLERS[0], 200)
        x.tcp = True
        rec.tcp_opened(x)
        x.finish()

    out["record_only_us"] = _time(n, record_only)
    out["bare_prometheus_us"] = _time(n, bare)
    for name, fn in (("http_one_key", one_key), ("http_500_keys", many_keys), ("tcp", tcp)):
        total = _time(n, fn)
        out[f"{name}_us"] = total
        out[f"{name}_metrics_us"] = total - out["record_only_us"]
        out[f"{name}_metrics/bare_prometheus"] = (total - out["record_only_us"]) / out["bare_prometheus_us"]
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--smoke", action="store_true", help="quick run (2 000 records per scenario)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = run(2000 if a.smoke else a.n)
    if a.json:
        print(json.dumps(r, indent=2))
        return
    import gateway

    print(f"gateway from {Path(gateway.__file__).parent}")
    for k, v in r.items():
        print(f"{k:40} {v:8.3f}")


if __name__ == "__main__":
    main()

"""Per-request cost of the resilience state machines (gateway/_resilience.py) when a route
has a timeout, retries with a budget and a circuit breaker in force, none of them triggered.

    python tests/bench/resilience.py            # 200,000 requests per measurement
    python tests/bench/resilience.py --smoke    # 5,000 (< 5 s)
    python tests/bench/resilience.py --json

The baseline is measured in the same run: a bare Python function call of two arguments
in the same loop, so the ratio says how many such calls the guarded path costs (the
issue's target is <= 5 us per request). What one request does: compute its deadline, start
its retry state (a budget deposit), take and release a breaker slot, bound its one try,
write the deadline header, judge the 200 it got (no retry), tell the outlier detector.
CI runs --smoke through tests/gateway/test_resilience.py.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from federation.models import OutlierDetection, Retries, parse_input  # noqa: E402
from gateway._resilience import (  # noqa: E402
    CircuitBreaker,
    Deadline,
    OutlierDetector,
    RetryBudget,
    RetryPolicy,
    RetryState,
    request_timeout,
)


def per_call_ns(fn: Callable[[int], None], n: int) -> float:
    fn(min(n, 1000))
    best = float("inf")
    for _ in range(3):  # best of three: the least disturbed by other processes
        t0 = time.thread_time_ns()  # CPU time: time spent descheduled on a busy machine is not ours
        fn(n)
        best = min(best, (time.thread_time_ns() - t0) / n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-n", type=int, default=None, help="requests per measurement")
    a = ap.parse_args()
    n = a.n or (5_000 if a.smoke else 200_000)

    retries = parse_input(Retries, {"attempts": 3, "per_try_timeout": "500ms",
                                    "retry_on": "connect-failure,refused-stream,reset,503,unavailable"})
    policy = RetryPolicy.from_model(retries)
    budget = RetryBudget.from_model(retries.budget)
    breaker = CircuitBreaker(max_requests=1000, max_pending=100, max_retries=3)
    clock_now = [1000.0]
    outliers = OutlierDetector(lambda: clock_now[0])
    outliers.configure("cart", parse_input(OutlierDetection, {"consecutive_5xx": 5}))
    outliers.add_destinations("cart", ["east", "west"])
    rng = random.Random(1)
    route_timeout, per_try = 2.0, retries.per_try_timeout

    def noop(x: object, y: object) -> None:
        return None

    def baseline(k: int) -> None:
        for i in range(k):
            noop(i, k)

    def guarded(k: int) -> None:
        for i in range(k):
            now = 1000.0 + i * 1e-4
            deadline = Deadline(now, request_timeout(route_timeout, None))
            state = RetryState(policy, budget, breaker, rng, now)
            if not breaker.try_request():
                raise AssertionError("breaker tripped")
            deadline.try_deadline(now, per_try)
            deadline.upstream_headers(now, False)
            if state.decide(now, "east", status=200).retry:
                raise AssertionError("retried a 200")
            breaker.release_request()
            outliers.record("east", "cart", status=200, now=now)

    def part_deadline(k: int) -> None:
        for i in range(k):
            now = 1000.0 + i * 1e-4
            d = Deadline(now, request_timeout(route_timeout, None))
            d.try_deadline(now, per_try)
            d.upstream_headers(now, False)

    def part_budget(k: int) -> None:
        for i in range(k):
            budget.deposit(1000.0 + i * 1e-4)

    def part_breaker(k: int) -> None:
        for _ in range(k):
            breaker.try_request()
            breaker.release_request()

    def part_retry_state(k: int) -> None:
        for i in range(k):
            now = 1000.0 + i * 1e-4
            RetryState(policy, None, None, rng, now).decide(now, "east", status=200)

    def part_outlier(k: int) -> None:
        for i in range(k):
            outliers.record("east", "cart", status=200, now=1000.0 + i * 1e-4)

    base = per_call_ns(baseline, n)
    total = per_call_ns(guarded, n)
    parts = {name: per_call_ns(fn, n) for name, fn in (
        ("deadline", part_deadline), ("budget", part_budget), ("breaker", part_breaker),
        ("retry_state", part_retry_state), ("outlier", part_outlier))}
    result = {"requests": n, "baseline_ns": base, "guarded_ns": total, "ratio_guarded/baseline": total / base,
              "parts_ns": parts, "parts_ratio": {k: v / base for k, v in parts.items()},
              "target_ns": 5000, "within_target": total <= 5000}
    if a.json:
        print(json.dumps(result))
        return
    print(f"baseline: a bare function call        {base:8.0f} ns")
    print(f"timeout + retries + breaker, untriggered {total:8.0f} ns   ratio {total / base:5.1f}x   "
          f"(target <= 5000 ns: {'met' if total <= 5000 else 'MISSED'})")
    for k, v in parts.items():
        print(f"  {k:12s} {v:8.0f} ns   ratio {v / base:5.1f}x")


if __name__ == "__main__":
    main()

"""tests/bench/routes.py --smoke runs every figure and reports ratios against the baseline
measured in the same run (the figures are the benchmark's, not bounds here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_route_selection_benchmark_smoke_mode_runs() -> None:
    out = subprocess.run([sys.executable, str(REPO / "tests/bench/routes.py"), "--smoke", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    for key in ("1_route", "1000_routes", "10_regex_rules_repeated_path", "10_regex_rules_new_path"):
        assert r[f"{key}_us"] > 0 and r[f"ratio_{key}_vs_baseline"] > 0, key
    assert r["baseline_lookup_us"] > 0 and r["selections"] == 5000

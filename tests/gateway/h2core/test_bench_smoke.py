"""tests/bench/h2core.py --smoke runs both cores end to end and reports a ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_core_benchmark_smoke_mode_reports_both_cores() -> None:
    out = subprocess.run([sys.executable, str(REPO / "tests/bench/h2core.py"), "--smoke", "--json"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["core"]["core"] == "nghttp2"
    for name in ("h2", "nghttp2", "nghttp2-trusted"):
        assert r["us_per_request"][name]["median_us"] > 0
    assert r["nghttp2/h2"] > 0

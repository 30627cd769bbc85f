"""The gateway benchmarks' --smoke modes run end to end (h2load, nginx, real processes; a
running gateway applying config changes)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (shutil.which("h2load") and shutil.which("nginx")),
                    reason="needs h2load and nginx (apt-get install nghttp2-client nginx-light)")
def test_benchmark_smoke_mode_completes_without_errors() -> None:
    out = subprocess.run([sys.executable, str(REPO / "tests/bench/gateway.py"), "--smoke", "--json"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    for path in ("direct", "isthmus", "nginx"):
        for name, v in r[path].items():
            assert v["requests"] > 0, (path, name)
            assert v["errors"] == 0, (path, name, v)
            assert v["unfinished"] <= v["in_flight_max"], (path, name, v)
    # Throughput is the benchmark's figure, not a bound here (this machine may be loaded):
    # the smoke run only has to move traffic on every path without an error.
    assert r["isthmus"]["small_saturation"]["rps"] > 0
    assert r["l4_connect_MBps"] > 0
    assert r["grpc_isthmus"]["errors"] == 0 and r["grpc_isthmus"]["rps"] > 0
    assert "isthmus/nginx" in r["ratios"]["small_saturation"]
    # The resilience comparison: the same route without and with its guards, both with and
    # without traffic on every name.
    assert set(r["resilience"]) == {"fed", "routed", "guarded", "mirrored"}
    for name, v in r["resilience"].items():
        assert v["requests"] > 0 and v["errors"] == 0, (name, v)
    assert "guarded_overhead_us_per_request" in r["ratios"]["resilience"]


def test_config_apply_benchmark_smoke_mode_runs() -> None:
    """tests/bench/config_apply.py --smoke applies config changes both ways on a running gateway."""
    out = subprocess.run([sys.executable, str(REPO / "tests/bench/config_apply.py"), "--smoke", "--json"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    for mode in ("on_loop", "off_loop", "floor"):
        assert set(r[mode]) == {"stall_ms_median", "stall_ms_max", "apply_ms_median"}
        assert r[mode]["apply_ms_median"] > 0
    assert r["ratio_stall_on_loop/off_loop"] > 0 and r["ratio_stall_off_loop/floor"] > 0


def test_ext_authz_benchmark_smoke_mode_runs() -> None:
    """tests/bench/ext_authz.py --smoke sends requests with and without a CUSTOM check."""
    out = subprocess.run([sys.executable, str(REPO / "tests/bench/ext_authz.py"), "--smoke", "--json"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["errors"] == 0 and r["requests_per_path"] > 0
    assert r["plain_ms_median"] > 0 and r["checked_ms_median"] > 0
    assert r["ratio_checked/plain_latency"] > 0 and "added_cpu_us" in r

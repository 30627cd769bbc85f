"""`isthmus demo --smoke`, as a user runs it: real processes, real namespaces."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from federation.demo._netns import leftover_namespaces, netns_available


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "federation.cli", "demo", "--smoke", *args],
                          capture_output=True, text=True, timeout=300)


def _own_prefix(stderr: str) -> str:
    """The namespace prefix this demo run chose (it says so while starting)."""
    m = re.search(r"creating network namespaces: (\S+)-east", stderr)
    assert m, stderr
    return m.group(1)


def test_demo_smoke_in_namespaces_twice_in_a_row_leaves_nothing_behind() -> None:
    why = netns_available()
    if why:
        pytest.skip(f"needs network namespaces: {why}")
    for _ in range(2):
        r = _demo()
        assert r.returncode == 0, r.stdout + r.stderr
        assert "smoke: all 12 cross-cluster calls succeeded" in r.stdout
        assert "unreachable, as it should be" in r.stdout
        assert "ok  gRPC       east client → east gw → west gw → service" in r.stdout
        assert "hello east from west" in r.stdout and "hello west from east" in r.stdout
        assert "stopped every process" in r.stderr
        assert leftover_namespaces(_own_prefix(r.stderr)) == []


def test_demo_smoke_on_loopback_says_so() -> None:
    r = _demo("--loopback")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "network namespaces not used" in r.stderr
    assert "2 clusters on loopback ports" in r.stdout
    assert "smoke: all 12 cross-cluster calls succeeded" in r.stdout


def test_leftover_namespaces_helper_sees_none_of_ours() -> None:
    assert leftover_namespaces("isd-nonexistent") == []


def test_demo_runs_until_interrupted_then_cleans_up(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Without --smoke it keeps running; SIGINT (Ctrl-C) stops every process it started."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "federation.cli", "demo", "--loopback"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        assert any("Press Ctrl-C" in line for line in lines), "".join(lines) + p.stderr.read()  # type: ignore[union-attr]
        time.sleep(1.0)
        assert p.poll() is None  # still running
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "stopped every process" in err
    workdir = re.search(r"logs:\s+(\S+)/logs", "".join(lines))
    assert workdir is not None
    import os

    assert not os.path.exists(workdir.group(1))  # temp files removed

"""`isthmus demo --smoke`, as a user runs it: real processes, real namespaces."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from federation._netns import leftover_namespaces, netns_available


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

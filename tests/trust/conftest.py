"""Fixtures: a federation root with east/west/central cluster CAs, in a temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest

import trust

TD = "isthmus.local"


@pytest.fixture
def root(tmp_path: Path) -> trust.TrustDir:
    td = trust.TrustDir(tmp_path / "root")
    td.init(TD)
    return td


@pytest.fixture
def east(root: trust.TrustDir) -> trust.ClusterCA:
    return root.issue_cluster("east")


@pytest.fixture
def west(root: trust.TrustDir) -> trust.ClusterCA:
    return root.issue_cluster("west")


def workload(cluster: str, ns: str = "default", sa: str = "web") -> str:
    return f"spiffe://{cluster}.{TD}/ns/{ns}/sa/{sa}"

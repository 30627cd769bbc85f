"""HA fixtures: a 3-member etcd on loopback, federation replicas over it, export load.

Everything is real: etcd processes (federation.server.EtcdCluster), ``python -m federation
serve`` replicas, clusters joined with tokens, mTLS gRPC.  The watchers of
tests/federation/history.py stand in for gateways where a test says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from federation import models
from federation._errors import RemoteError
from federation.client import FederationClient
from federation.server import EtcdCluster

from ..federation.fixtures import FederationProcess, Pki, join_cluster, make_pki, start_federation


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    c = EtcdCluster(tmp_path / "etcd", members=3).start()
    yield c
    c.stop()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def start_replicas(pki: Pki, etcd: EtcdCluster, tmp_path: Path, n: int, extra: tuple[str, ...] = ()) -> list[FederationProcess]:
    return [start_federation(pki, etcd.endpoint, tmp_path, name=f"fed{i}", extra=extra) for i in range(n)]


def export_set(cluster: str, n: int) -> list[models.ExportedService]:
    """Version ``n`` of a cluster's exports: web carries n; api comes and goes (deletes)."""
    port = (models.ServicePort(name="http", port=8080, protocol="HTTP"),)
    out = [models.ExportedService(cluster=cluster, namespace="default", name="web", ports=port, ready_endpoints=n)]
    if n % 2 == 0:
        out.append(models.ExportedService(cluster=cluster, namespace="default", name="api", ports=port))
    return out


@dataclass
class Publisher:
    """A cluster's agent publishing a new export set every ``period`` seconds; a publish
    that fails (no quorum, a leader change) is retried until acknowledged, as an agent does."""

    cluster: str
    addresses: Sequence[str]
    cert_dir: Path
    period: float = 0.4
    ttl: int = 30
    acks: list[tuple[int, int]] = field(default_factory=list)  # (version, revision)
    failures: list[tuple[float, str]] = field(default_factory=list)  # (when, code)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"publish-{self.cluster}", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        try:
            with FederationClient(list(self.addresses), self.cert_dir, timeout=10.0) as client:
                n = 0
                next_at = time.monotonic()
                while not self._stop.is_set():
                    n += 1
                    while True:
                        try:
                            r = client.publish(self.cluster, export_set(self.cluster, n), ttl=self.ttl)
                            self.acks.append((n, r.revision))
                            break
                        except RemoteError as exc:
                            if exc.code.name not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                                raise
                            self.failures.append((time.monotonic(), exc.code.name))
                            if self._stop.wait(0.2):
                                return
                    # On a fixed schedule (period apart), not period after each ack.
                    next_at = max(next_at + self.period, time.monotonic() - self.period)
                    self._stop.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - the test asserts on it
            self.error = exc


def join_publishers(fed: FederationProcess, pki: Pki, tmp_path: Path, names: Sequence[str],
                    addresses: Sequence[str], period: float = 0.4) -> list[Publisher]:
    out = []
    for name in names:
        joined = join_cluster(fed, pki, name, tmp_path)
        out.append(Publisher(name, addresses, joined.agent_dir, period=period))
    return out


def acked_versions_hold(publishers: Sequence[Publisher], ref: object) -> list[str]:
    """Every acknowledged publish is in etcd's history at its revision (no lost update)."""
    problems = []
    for p in publishers:
        for n, rev in p.acks:
            web = ref.state_at(rev).get(("service", f"{p.cluster}/default/web"))  # type: ignore[attr-defined]
            if web is None or web.get("ready_endpoints") != n:
                problems.append(f"{p.cluster} publish {n} acknowledged at revision {rev}, but etcd has {web}")
    return problems

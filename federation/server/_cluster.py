"""A multi-member etcd cluster on loopback, for tests and ``isthmus demo --etcd-members 3``.

Each member is an :class:`._embedded.EmbeddedEtcd` with its own ports and data dir
(``<data_dir>/m1``, ``m2``, ...), started together with one ``--initial-cluster``.  The
supervisor can SIGKILL a member and restart it on the same ports and data (as a machine
that died and came back), and tells which member leads, from each member's own
``Maintenance.Status`` (etcd's JSON gateway on the client port, so no gRPC here: the
demo starts etcd before it imports grpc).

Production runs 3 or 5 members on three or five machines (``deploy/base/etcd``); this is
the same raft, on one host, to show and test what Isthmus does when etcd loses a member,
its leader, or its quorum.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog

from .._errors import FederationError
from ._embedded import EmbeddedEtcd, free_port

log = structlog.get_logger("federation.etcd")


@dataclass(frozen=True)
class MemberStatus:
    """One member's view (etcd ``StatusResponse``): who it is, whom it follows."""

    member_id: int
    leader_id: int  # 0: it knows no leader
    raft_term: int
    revision: int
    version: str
    db_size: int = 0  # bytes of the backend database file (before defragmentation)


def member_status(endpoint: str, timeout: float = 1.0) -> MemberStatus | None:
    """An etcd member's own ``Maintenance.Status`` (JSON gateway); None when it does not answer."""
    req = urllib.request.Request(f"{endpoint}/v3/maintenance/status", data=b"{}",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = json.loads(r.read())
    except (OSError, ValueError):
        return None
    header = body.get("header") or {}
    try:
        return MemberStatus(
            member_id=int(header.get("member_id", 0)),
            leader_id=int(body.get("leader", 0)),
            raft_term=int(header.get("raft_term", 0)),
            revision=int(header.get("revision", 0)),
            version=str(body.get("version", "")),
            db_size=int(body.get("dbSize", 0)),
        )
    except (TypeError, ValueError):
        return None


class EtcdCluster:
    """Start, break and mend an etcd cluster of ``members`` members on 127.0.0.1."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        members: int = 3,
        auto_compaction: str = "1h",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if members < 1:
            raise FederationError(f"invalid etcd cluster size {members}: at least 1 member (3 or 5 for a quorum that survives a loss)")
        self.data_dir = Path(data_dir)
        self.size = members
        self.auto_compaction = auto_compaction
        self.extra_args = extra_args
        self.members: list[EmbeddedEtcd] = []
        self._plan()

    def _plan(self) -> None:
        ports = [(free_port(), free_port()) for _ in range(self.size)]
        initial = ",".join(f"m{i + 1}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
        token = f"isthmus-{uuid.uuid4().hex[:12]}"
        self.members = [
            EmbeddedEtcd(
                self.data_dir / f"m{i + 1}",
                client_port=client,
                peer_port=peer,
                name=f"m{i + 1}",
                auto_compaction=self.auto_compaction,
                initial_cluster=initial,
                cluster_token=token,
                extra_args=self.extra_args,
            )
            for i, (client, peer) in enumerate(ports)
        ]

    # ------------------------------------------------------------------ addresses
    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def endpoint(self) -> str:
        """Every member's client URL, comma-separated: what ``--etcd`` takes."""
        return ",".join(self.endpoints)

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0) -> EtcdCluster:
        """Start every member and wait until each answers its health check.

        A fresh cluster whose ports were taken before etcd bound them is planned again on
        new ports (twice at most); a cluster with data keeps its ports (its peers' URLs
        are in its data).
        """
        fresh = not any((m.data_dir / "etcd").exists() for m in self.members)
        for attempt in range(3):
            for m in self.members:
                m.spawn()
            try:
                for m in self.members:
                    m.wait_ready(max(1.0, timeout))
                break
            except FederationError:
                self.stop()
                if not fresh or attempt == 2:
                    raise
                log.warning("etcd.cluster.retry", attempt=attempt + 1)
                for m in self.members:
                    _wipe(m.data_dir)
                self._plan()
        log.info("etcd.cluster.started", members=self.size, endpoints=self.endpoint)
        return self

    def stop(self) -> None:
        for i in range(self.size):
            self.resume(i)  # a stopped process would hold its SIGTERM until then
        for m in self.members:
            m.stop()

    def kill(self, index: int) -> None:
        """SIGKILL member ``index`` (0-based)."""
        self.members[index].kill()

    def pause(self, index: int) -> None:
        """SIGSTOP member ``index``: alive to the kernel (its sockets accept), silent to
        its peers and clients, as in a long GC pause or a one-way partition."""
        m = self.members[index]
        if m.running():
            assert m.proc is not None
            os.kill(m.proc.pid, signal.SIGSTOP)

    def resume(self, index: int) -> None:
        m = self.members[index]
        if m.running():
            assert m.proc is not None
            os.kill(m.proc.pid, signal.SIGCONT)

    def restart(self, index: int, wait: bool = True, timeout: float = 30.0) -> None:
        """Start a stopped or killed member again on its ports and data.  ``wait=False``
        when its health cannot come back yet (no quorum without it and others)."""
        m = self.members[index]
        if m.running():
            return
        m.spawn()
        if wait:
            m.wait_ready(timeout)

    def running(self) -> list[int]:
        return [i for i, m in enumerate(self.members) if m.running()]

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ raft state
    def status(self, index: int, timeout: float = 1.0) -> MemberStatus | None:
        """Member ``index``'s own status; None when it does not answer."""
        m = self.members[index]
        return member_status(m.endpoint, timeout) if m.running() else None

    def leader(self) -> int | None:
        """The index of the member a majority of the cluster follows, or None (no quorum,
        an election in progress)."""
        statuses = {i: s for i in range(self.size) if (s := self.status(i)) is not None}
        ids = {s.member_id: i for i, s in statuses.items()}
        votes: dict[int, int] = {}
        for s in statuses.values():
            if s.leader_id:
                votes[s.leader_id] = votes.get(s.leader_id, 0) + 1
        for leader_id, n in votes.items():
            if n > self.size // 2 and leader_id in ids:
                return ids[leader_id]
        return None

    def wait_leader(self, timeout: float = 30.0, not_index: int | None = None) -> int:
        """Wait until a majority follows one leader (other than ``not_index``); its index."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            i = self.leader()
            if i is not None and i != not_index:
                return i
            time.sleep(0.1)
        raise FederationError(f"etcd cluster: no leader within {timeout:.0f}s (members running: {self.running()})")

    def followers(self) -> list[int]:
        leader = self.leader()
        return [i for i in self.running() if i != leader]


def _wipe(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)

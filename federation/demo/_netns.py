"""Network-namespace "clusters" on one machine (root only).

Topology, for clusters c1..cN (stable: tests and ``isthmus demo`` rely on it)::

    root namespace ── veth ── ┐
      198.18.k.1 (federation)  │
                               ├── bridge in <prefix>-wan (the "WAN")
    <prefix>-<c1> ── veth ──── ┤     cluster i's WAN address: 198.18.k.(10+i)
    <prefix>-<c2> ── veth ──── ┘

    inside <prefix>-<ci>: 198.19.i.1/24 on lo, the cluster-internal
    network where its services listen. No namespace has a route to another cluster's
    198.19.i.0/24 and forwarding is off, so a service is reachable from elsewhere only
    through its cluster's gateway, which listens on the WAN address.

198.18.0.0/15 is the RFC 2544 benchmarking range: it never collides with a real network.
k is the first 198.18.k.0/24 free in the root namespace and not reserved by another live
topology (an flock on a lock file per k, held while the topology lives and released by
the kernel if its process dies), so topologies started at the same moment, in one process
or several, never share a WAN or each other's links.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._errors import FederationError

def _lock_dir() -> str:
    return "/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir()


def _reserve_wan_subnet() -> tuple[int, int]:
    """``(k, fd)``: the first k with no 198.18.k.0/24 in the root namespace whose lock
    file we could flock, and the open lock file (closing it frees k). The lock makes the
    choice atomic: two topologies planned at once both see k unused in ``ip addr``, but
    only one gets its lock."""
    r = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True)
    used = {int(m) for m in re.findall(r"inet 198\.18\.(\d+)\.", r.stdout)}
    for k in range(256):
        if k in used:
            continue
        fd = os.open(os.path.join(_lock_dir(), f"isthmus-wan-{k}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return k, fd
    raise NetnsError("every 198.18.k.0/24 is in use: remove leftover demo namespaces (ip netns list)")


class NetnsError(FederationError):
    """Network namespaces could not be set up."""


def netns_available() -> str | None:
    """None when namespaces can be used here, else the reason (for a fallback message)."""
    if os.geteuid() != 0:
        return "not running as root (network namespaces need root)"
    if shutil.which("ip") is None:
        return "the 'ip' command is missing (apt-get install iproute2)"
    probe = f"isthmus-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"'ip netns add' failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise NetnsError(f"network setup failed: {' '.join(argv)}: {r.stderr.strip()}")
    return r


@dataclass
class ClusterNet:
    name: str
    index: int
    namespace: str
    wan_address: str
    internal_address: str  # the first address of the cluster-internal network

    def internal(self, host: int) -> str:
        a, b, c, _ = self.internal_address.split(".")
        return f"{a}.{b}.{c}.{host}"


@dataclass
class Topology:
    prefix: str
    clusters: dict[str, ClusterNet] = field(default_factory=dict)
    up: bool = False
    wan_subnet: int = 0  # the k of 198.18.k.0/24
    _lock_fd: int | None = field(default=None, repr=False)  # holds wan_subnet while we live

    @property
    def root_address(self) -> str:
        """The root namespace's address on the WAN (where the federation listens)."""
        return f"198.18.{self.wan_subnet}.1"

    @property
    def wan_ns(self) -> str:
        return f"{self.prefix}-wan"

    @classmethod
    def plan(cls, prefix: str, names: Sequence[str], indices: Sequence[int] | None = None) -> Topology:
        """Plan clusters ``names``; cluster ``names[k]`` gets address index ``indices[k]``
        (default k+1), so a cluster keeps its addresses whichever others exist."""
        k, fd = _reserve_wan_subnet()
        t = cls(prefix, wan_subnet=k, _lock_fd=fd)
        for n, i in zip(names, indices or range(1, len(names) + 1)):
            t.clusters[n] = t._net(n, i)
        return t

    def _net(self, name: str, i: int) -> ClusterNet:
        return ClusterNet(name, i, f"{self.prefix}-{name}", f"198.18.{self.wan_subnet}.{10 + i}", f"198.19.{i}.1")

    def add(self, name: str, index: int) -> ClusterNet:
        """Add a cluster to a topology that is already up (joining at run time)."""
        c = self.clusters[name] = self._net(name, index)
        try:
            self._setup_cluster(c)
        except BaseException:
            _ip("netns", "del", c.namespace, check=False)
            raise
        return c

    def _veth(self, i: int, side: str) -> str:
        # Interface names are limited to 15 characters; the root namespace's leg must be
        # unique among live topologies, which wan_subnet is.
        return f"ism{self.wan_subnet}{side}{i}"

    def setup(self) -> None:
        """Create every namespace, link and address; undo everything on failure."""
        try:
            self._setup()
            self.up = True
        except BaseException:
            self.teardown()
            raise

    def _setup(self) -> None:
        self._add_ns(self.wan_ns)
        _ip("link", "add", "br0", "type", "bridge", ns=self.wan_ns)
        _ip("link", "set", "br0", "up", ns=self.wan_ns)
        _ip("link", "set", "lo", "up", ns=self.wan_ns)
        # root namespace leg (federation, test driver)
        self._leg(0, None, f"{self.root_address}/24")
        for c in self.clusters.values():
            self._setup_cluster(c)

    def _setup_cluster(self, c: ClusterNet) -> None:
        if True:
            self._add_ns(c.namespace)
            _ip("link", "set", "lo", "up", ns=c.namespace)
            self._leg(c.index, c.namespace, f"{c.wan_address}/24")
            # The cluster-internal network lives on lo (no dummy interfaces in every
            # kernel): every 198.19.i.x is then a local address of this namespace only.
            _ip("addr", "add", f"{c.internal_address}/24", "dev", "lo", ns=c.namespace)

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "del", ns, check=False)  # a leftover from a crashed run
        _ip("netns", "add", ns)

    def _leg(self, i: int, ns: str | None, address: str) -> None:
        outer, inner = self._veth(i, "w"), self._veth(i, "c")
        _ip("link", "del", inner, check=False)
        _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
        _ip("link", "set", outer, "netns", self.wan_ns)
        _ip("link", "set", outer, "master", "br0", ns=self.wan_ns)
        _ip("link", "set", outer, "up", ns=self.wan_ns)
        if ns is not None:
            _ip("link", "set", inner, "netns", ns)
        _ip("addr", "add", address, "dev", inner, ns=ns)
        _ip("link", "set", inner, "up", ns=ns)

    def teardown(self) -> None:
        """Remove every namespace and link this topology made (idempotent)."""
        _ip("link", "del", self._veth(0, "c"), check=False)
        for c in self.clusters.values():
            _ip("netns", "del", c.namespace, check=False)
        _ip("netns", "del", self.wan_ns, check=False)
        self.up = False
        self.release()

    def release(self) -> None:
        """Free the WAN subnet for other topologies (teardown does this)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def exec_argv(self, cluster: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``cluster``'s namespace."""
        return ["ip", "netns", "exec", self.clusters[cluster].namespace, *argv]


def leftover_namespaces(prefix: str) -> list[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in r.stdout.splitlines() if line.startswith(prefix + "-")]

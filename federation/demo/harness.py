"""A whole federation on one machine: the building blocks of ``isthmus demo`` and the
end-to-end tests.

:class:`LocalFederation` starts real processes: etcd (one member, or a cluster of
``etcd_members`` on loopback: :class:`federation.server.EtcdCluster`), the federation service, and per cluster the sample services, ``isthmus export`` (the agent
for clusters without Kubernetes) and ``isthmus gateway run``.  As root each cluster gets
its own network namespace (:mod:`federation.demo._netns`): its services listen on the
cluster-internal network, which no other namespace can route to, and only the gateway's
inbound listener faces the "WAN".  Otherwise everything runs on loopback ports.

Calls are made by :mod:`federation.demo.probe` processes started inside the calling
cluster's namespace, so a call really starts in that cluster.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import trust

from ..server import EmbeddedEtcd, EtcdCluster, free_port
from .. import names
from .._errors import FederationError
from ._netns import Topology, netns_available

CLUSTER_NAMES = ("east", "west", "central", "north", "south")
TRUST_DOMAIN = "isthmus.local"
HTTP_PORT, GRPC_PORT, TCP_PORT = 8080, 9090, 9000
_FEDERATIONS = itertools.count(1)  # numbers each LocalFederation of this process


class DemoError(FederationError):
    """The local federation could not be brought up; the message says what to fix."""


@dataclass
class CallResult:
    kind: str
    source: str
    target: str
    ok: bool
    status: Any
    body: str
    latency_ms: float | None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self.popen = subprocess.Popen(
                self.argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "ISTHMUS_LOG_FORMAT": "json", **(env or {})},
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        p = self.popen
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""


@dataclass
class Cluster:
    name: str
    index: int
    dir: Path
    namespace: str | None
    wan_address: str  # where its gateway's inbound listener faces the other clusters
    internal: str  # where its services and outbound listener live
    ports: dict[str, int]
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def gateway_address(self) -> str:
        return f"{self.wan_address}:{self.ports['inbound']}"

    @property
    def outbound(self) -> str:
        return f"{self.internal}:{self.ports['outbound']}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}"

    @property
    def exports_file(self) -> Path:
        return self.dir / "exports.yaml"


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def isthmus(*args: str) -> list[str]:
    return _py("federation.cli", *args)


class LocalFederation:
    """Bring up, drive and tear down a federation on this machine."""

    def __init__(
        self,
        workdir: Path,
        use_netns: bool | None = None,
        prefix: str | None = None,
        progress: Callable[[str], None] = lambda s: None,
        lease_ttl: int = 10,
        gateway_overrides: dict[str, Any] | None = None,
        etcd_members: int = 1,
    ) -> None:
        self.workdir = Path(workdir)
        self.etcd_members = etcd_members
        self.progress = progress
        self.lease_ttl = lease_ttl
        self.gateway_overrides = gateway_overrides or {}
        why_not = netns_available() if use_netns is not False else "--loopback was given"
        if use_netns and why_not:
            raise DemoError(f"network namespaces unavailable: {why_not}")
        self.use_netns = why_not is None
        self.fallback_reason = why_not
        # Unique among live federations: our pid, and which of this process' federations
        # this is (a second one must not take the first one's namespaces for leftovers).
        self.prefix = prefix or f"isd{os.getpid()}-{next(_FEDERATIONS)}"
        self.topology: Topology | None = None
        self.clusters: dict[str, Cluster] = {}
        self.etcd: EmbeddedEtcd | EtcdCluster | None = None
        self.federation: Proc | None = None
        self.trust = trust.TrustDir(self.workdir / "trust")
        self.admin_dir = self.workdir / "admin"
        self.fed_address = f"127.0.0.1:{free_port()}"  # in netns mode: set when the WAN is up
        # The federation's topology page (federation/server/_web.py), on loopback.
        self.web_address = f"127.0.0.1:{free_port()}"

    # ------------------------------------------------------------------ lifecycle
    def start(self, clusters: Sequence[str]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.progress("creating the federation root (trust domain isthmus.local)")
        self.trust.init(TRUST_DOMAIN)
        self.trust.issue_admin("demo", self.admin_dir, validity=7 * 86400)
        if self.use_netns:
            self.progress(f"creating network namespaces: {', '.join(f'{self.prefix}-{c}' for c in clusters)} and a WAN")
            self.topology = Topology.plan(self.prefix, list(clusters), [self._index(c) for c in clusters])
            self.topology.setup()
            self.fed_address = f"{self.topology.root_address}:7443"
        self.start_etcd()
        self.start_federation()
        for c in clusters:
            self.add_cluster(c)

    def close(self) -> None:
        for c in self.clusters.values():
            for p in c.procs.values():
                p.stop(timeout=5)
        if self.federation is not None:
            self.federation.stop(timeout=5)
        if self.etcd is not None:
            self.etcd.stop()
        if self.topology is not None:
            self.topology.teardown()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ control plane
    def start_etcd(self) -> None:
        from ..server import etcd_binary_version

        version = ".".join(map(str, etcd_binary_version()))
        if self.etcd_members > 1:
            self.progress(f"starting etcd {version}: a cluster of {self.etcd_members} members on loopback")
        else:
            self.progress(f"starting etcd {version}")
        if self.etcd is None:
            if self.etcd_members > 1:
                self.etcd = EtcdCluster(self.workdir / "etcd", self.etcd_members)
            else:
                self.etcd = EmbeddedEtcd(self.workdir / "etcd")
        self.etcd.start()

    def stop_etcd(self) -> None:
        assert self.etcd is not None
        self.etcd.stop()

    def start_federation(self, wait: bool = True) -> None:
        assert self.etcd is not None
        host, port = self.fed_address.rsplit(":", 1)
        self.progress(f"starting the federation service on {self.fed_address}")
        self.federation = Proc(
            "federation",
            isthmus("federation", "serve", "--trust-dir", str(self.trust.path), "--listen", self.fed_address,
                    "--etcd", self.etcd.endpoint, "--data-dir", str(self.workdir / "federation"),
                    "--advertise", host, "--trust-sync-interval", "1", "--web-listen", self.web_address),
            self.workdir / "logs" / "federation.log",
        ).start()
        if wait:
            self._wait(lambda: self._fed_healthy(), 30, "the federation service", self.federation)

    @property
    def web_url(self) -> str:
        """The topology page (its JSON: ``web_url + "api/v1/topology"``)."""
        return f"http://{self.web_address}/"

    def stop_federation(self) -> None:
        if self.federation is not None:
            self.federation.stop()

    def admin(self) -> Any:
        from ..client import FederationClient

        return FederationClient([self.fed_address], self.admin_dir)

    def _fed_healthy(self) -> bool:
        with self.admin() as c:
            return bool(c.health(timeout=1.0))

    # ------------------------------------------------------------------ clusters
    def _cluster_argv(self, c: Cluster, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", c.namespace, *argv] if c.namespace else argv

    @staticmethod
    def _index(name: str) -> int:
        if name not in CLUSTER_NAMES:
            raise DemoError(f"unknown demo cluster {name!r}: choose from {', '.join(CLUSTER_NAMES)}")
        return CLUSTER_NAMES.index(name) + 1

    def add_cluster(self, name: str, services: Sequence[dict[str, Any]] | None = None) -> Cluster:
        index = self._index(name)
        if self.use_netns:
            assert self.topology is not None
            net = self.topology.clusters.get(name) or self.topology.add(name, index)
            c = Cluster(name, index, self.workdir / name, net.namespace, net.wan_address, net.internal_address,
                        {"inbound": names.GATEWAY_INBOUND_PORT, "outbound": names.GATEWAY_OUTBOUND_PORT,
                         "admin": names.GATEWAY_ADMIN_PORT,
                         "http": HTTP_PORT, "grpc": GRPC_PORT, "tcp": TCP_PORT})
        else:
            c = Cluster(name, index, self.workdir / name, None, "127.0.0.1", "127.0.0.1",
                        {k: free_port() for k in ("inbound", "outbound", "admin", "http", "grpc", "tcp")})
            c.ports.update({f"tcp-to-{o}": free_port() for o in CLUSTER_NAMES if o != name})
        self.clusters[name] = c
        self.progress(f"[{name}] joining the federation (token, CSR, pinned root)")
        self.join(c)
        self.progress(f"[{name}] starting sample HTTP, gRPC and TCP services on {c.internal}")
        c.procs["samples"] = Proc(
            "samples",
            self._cluster_argv(c, _py("federation.demo.samples", "--cluster", name,
                                      "--http", f"{c.internal}:{c.ports['http']}",
                                      "--grpc", f"{c.internal}:{c.ports['grpc']}",
                                      "--tcp", f"{c.internal}:{c.ports['tcp']}")),
            c.dir / "logs" / "samples.log",
        ).start()
        self.write_exports(name, services if services is not None else self.default_exports(c))
        self.start_exporter(name)
        self.write_gateway_config(c)
        self.start_gateway(name)
        return c

    def join(self, c: Cluster) -> None:
        with self.admin() as admin:
            tok = admin.create_token(ttl=600, cluster=c.name)
        argv = self._cluster_argv(c, isthmus(
            "federation", "join", c.name, "--federation", self.fed_address, "--token", tok.token,
            "--ca-pin", tok.ca_pin, "--out-dir", str(c.dir / "join"), "--gateway-address", c.gateway_address,
            "--label", f"network={c.namespace or 'loopback'}", "-o", "json"))
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise DemoError(f"[{c.name}] join failed: {r.stderr.strip() or r.stdout.strip()}")

    def default_exports(self, c: Cluster) -> list[dict[str, Any]]:
        return [
            {"namespace": "default", "name": "web",
             "ports": [{"name": "http", "port": HTTP_PORT, "protocol": "HTTP", "target": f"{c.internal}:{c.ports['http']}"}]},
            {"namespace": "default", "name": "greeter",
             "ports": [{"name": "grpc", "port": GRPC_PORT, "protocol": "GRPC", "target": f"{c.internal}:{c.ports['grpc']}"}]},
            {"namespace": "default", "name": "echo",
             "ports": [{"name": "tcp", "port": TCP_PORT, "protocol": "TCP", "target": f"{c.internal}:{c.ports['tcp']}"}]},
        ]

    def write_exports(self, name: str, services: Sequence[dict[str, Any]]) -> None:
        c = self.clusters[name]
        trust.atomic_write(c.exports_file, yaml.safe_dump({"services": list(services)}).encode())

    def start_exporter(self, name: str) -> None:
        c = self.clusters[name]
        c.procs["exporter"] = Proc(
            "exporter",
            self._cluster_argv(c, isthmus("export", "--cluster", name, "-f", str(c.exports_file),
                                          "--federation", self.fed_address, "--cert-dir", str(c.dir / "join" / "agent"),
                                          "--lease-ttl", str(self.lease_ttl))),
            c.dir / "logs" / "exporter.log",
        ).start()

    def tcp_port_for(self, src: str, dst: str) -> int:
        """The outbound port in ``src`` that tunnels to ``dst``'s echo service (every demo
        cluster name is mapped up front, so a cluster joining later is reachable too)."""
        if self.use_netns:
            return 19000 + self._index(dst)
        return self.clusters[src].ports[f"tcp-to-{dst}"]

    def write_gateway_config(self, c: Cluster) -> None:
        g = c.dir / "join" / "gateway"
        tcp_ports = [
            {"host": c.internal, "port": self.tcp_port_for(c.name, other),
             "target": f"{names.outbound_host('echo', 'default', other)}:{TCP_PORT}"}
            for other in CLUSTER_NAMES if other != c.name
        ]
        cfg: dict[str, Any] = {
            "cluster": c.name,
            "inbound": {"host": c.wan_address, "port": c.ports["inbound"]},
            "outbound": {"host": c.internal, "port": c.ports["outbound"]},
            "admin": {"host": "127.0.0.1", "port": c.ports["admin"]},
            "tls": {"cert_file": str(g / "cert.pem"), "key_file": str(g / "key.pem"), "bundle_file": str(g / "bundle.pem")},
            "outbound_allow_plain": True,
            "tcp_ports": tcp_ports,
            "federation": {"address": self.fed_address},
            "last_known_good": str(c.dir / "last-known-good.json"),
            **self.gateway_overrides,
        }
        trust.atomic_write(c.dir / "gateway.yaml", yaml.safe_dump(cfg).encode())

    def start_gateway(self, name: str, wait: bool = True) -> None:
        c = self.clusters[name]
        self.progress(f"[{name}] starting the gateway: inbound {c.gateway_address}, outbound {c.outbound}")
        c.procs["gateway"] = Proc(
            "gateway", self._cluster_argv(c, isthmus("gateway", "run", "--config", str(c.dir / "gateway.yaml"))),
            c.dir / "logs" / "gateway.log",
        ).start()
        if wait:
            self._wait(lambda: self.gateway_ready(name), 30, f"{name}'s gateway", c.procs["gateway"])

    def stop_gateway(self, name: str) -> None:
        self.clusters[name].procs["gateway"].stop()

    def gateway_ready(self, name: str) -> bool:
        r = self.http(name, f"{self.clusters[name].admin_url}/readyz", timeout=1.0)
        return r.ok

    def gateway_config(self, name: str) -> dict[str, Any]:
        r = self.http(name, f"{self.clusters[name].admin_url}/config", timeout=2.0)
        if not r.ok:
            raise DemoError(f"{name}'s gateway admin did not answer: {r.status} {r.body}")
        return json.loads(r.body)

    def metrics(self, name: str) -> str:
        r = self.http(name, f"{self.clusters[name].admin_url}/metrics", timeout=2.0)
        return r.body if r.ok else ""

    # ------------------------------------------------------------------ calls
    def _probe(self, src: str, args: list[str], kind: str, target: str, timeout: float) -> CallResult:
        c = self.clusters[src]
        argv = self._cluster_argv(c, _py("federation.demo.probe", *args))
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 15)
            doc = json.loads(r.stdout.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as exc:
            return CallResult(kind, src, target, False, "probe-failed", str(exc), None)
        return CallResult(kind, src, target, bool(doc["ok"]), doc["status"], doc["body"], doc.get("latency_ms"),
                          doc.get("headers") or {})

    def http(self, src: str, url: str, host: str | None = None, http2: bool = False, timeout: float = 5.0,
             method: str = "GET", data: str | None = None, cert_dir: Path | None = None,
             headers: dict[str, str] | None = None) -> CallResult:
        args = ["http", url, "--timeout", str(timeout), "--method", method]
        if host:
            args += ["--host", host]
        if cert_dir is not None:
            args += ["--cert-dir", str(cert_dir)]
        for k, v in (headers or {}).items():
            args += ["--header", f"{k}:{v}"]
        if http2:
            args.append("--http2")
        if data is not None:
            args += ["--data", data]
        return self._probe(src, args, "http2" if http2 else "http", host or url, timeout)

    def call_http(self, src: str, dst: str, http2: bool = False, path: str = "/") -> CallResult:
        """src's workload → src's gateway → dst's gateway → dst's web service."""
        host = f"{names.outbound_host('web', 'default', dst)}:{HTTP_PORT}"
        return self.http(src, f"http://{self.clusters[src].outbound}{path}", host=host, http2=http2)

    def call_grpc(self, src: str, dst: str | None, stream: int = 0) -> CallResult:
        authority = f"{names.outbound_host('greeter', 'default', dst or None)}:{GRPC_PORT}"
        args = ["grpc", self.clusters[src].outbound, "--authority", authority, "--name", src]
        if stream:
            args += ["--stream", str(stream)]
        return self._probe(src, args, "grpc", authority, 5.0)

    def call_tcp(self, src: str, dst: str, data: str = "ping") -> CallResult:
        target = f"{self.clusters[src].internal}:{self.tcp_port_for(src, dst)}"
        return self._probe(src, ["tcp", target, "--data", data], "tcp",
                           f"{names.outbound_host('echo', 'default', dst)}:{TCP_PORT}", 5.0)

    def call_direct(self, src: str, dst: str) -> CallResult:
        """src's workload straight to dst's web service, bypassing the gateways."""
        d = self.clusters[dst]
        return self.http(src, f"http://{d.internal}:{d.ports['http']}/", timeout=2.0)

    def wait_for(self, call: Callable[[], CallResult], timeout: float = 30.0, want_ok: bool = True) -> CallResult:
        deadline = time.monotonic() + timeout
        while True:
            r = call()
            if r.ok == want_ok or time.monotonic() > deadline:
                return r
            time.sleep(0.3)

    # ------------------------------------------------------------------ helpers
    def _wait(self, cond: Callable[[], bool], timeout: float, what: str, proc: Proc | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise DemoError(f"{what} exited during start-up; its log ({proc.log_path}) ends with:\n{proc.tail()}")
            try:
                if cond():
                    return
            except Exception:
                pass
            time.sleep(0.2)
        tail = f"; its log ({proc.log_path}) ends with:\n{proc.tail()}" if proc else ""
        raise DemoError(f"{what} was not ready after {timeout:.0f}s{tail}")

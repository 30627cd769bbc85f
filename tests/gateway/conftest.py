"""Fixtures for the gateway tests: a real PKI (trust), real backends, two real gateways.

Gateways run in-process on the test's trio loop (fast); ``test_subprocess.py`` runs
``isthmus gateway run`` as real processes.  Everything talks over loopback sockets with
real TLS handshakes.

HTTP/2 cores: a module marked ``both_cores`` runs each of its tests twice, once per core
(ids ``[nghttp2]`` and ``[h2]``), through ``ISTHMUS_HTTP2_CORE`` (the ``http2_core``
fixture sets it before any gateway is built).  Other tests run on whatever core the
environment selects (nghttp2 where libnghttp2 loads).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import structlog
import trio

import trust
from federation.models import ClusterRecord, ExportedService, ServicePort, Snapshot
from gateway import Gateway, GatewayConfig
from gateway.h2core import CoreLoadError, load_library

from .backends import H2Backend, start_grpc_server, tcp_echo

FED_TD = "isthmus.local"
HTTP2_CORES = ("nghttp2", "h2")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if ("http2_core" in metafunc.fixturenames
            and metafunc.definition.get_closest_marker("both_cores") is not None):
        metafunc.parametrize("http2_core", HTTP2_CORES, indirect=True)


@pytest.fixture(autouse=True)
def http2_core(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The HTTP/2 core gateways built in this test run on (see the module docstring)."""
    core = getattr(request, "param", None)
    if core is None:
        return os.environ.get("ISTHMUS_HTTP2_CORE", "")
    if core == "nghttp2":
        try:
            load_library()
        except CoreLoadError as exc:
            pytest.skip(f"nghttp2 core unavailable: {exc.reason}")
    monkeypatch.setenv("ISTHMUS_HTTP2_CORE", core)
    return str(core)


@dataclass
class Pki:
    root: trust.TrustDir
    dir: Path
    gw: dict[str, trust.IssuedFiles] = field(default_factory=dict)
    cas: dict[str, trust.ClusterCA] = field(default_factory=dict)

    def td(self, cluster: str) -> str:
        return f"{cluster}.{FED_TD}"

    def issue(self, cluster: str, ns: str, sa: str, name: str) -> trust.IssuedFiles:
        return self.cas[cluster].issue(trust.workload_id(self.td(cluster), ns, sa),
                                       self.dir / name, validity=3600)

    def ca_pem(self, cluster: str) -> str:
        return (self.cas[cluster].path / "ca.crt").read_text()


def make_pki(d: Path, clusters: Iterable[str], revoked: Iterable[str] = ()) -> Pki:
    """A federation root in ``d`` with a CA and a gateway certificate for each cluster;
    the ``revoked`` ones' CAs then revoked."""
    root = trust.TrustDir(d / "root")
    root.init(FED_TD)
    p = Pki(root, d)
    for c in clusters:
        p.cas[c] = root.issue_cluster(c, validity=86400)
        p.gw[c] = p.cas[c].issue(trust.gateway_id(p.td(c)), d / f"gw-{c}", validity=3600)
    for c in revoked:
        root.revoke_cluster(c)
    return p


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ("east", "west", "rogue"), revoked=("rogue",))


def gateway_config(pki: Pki, cluster: str, tmp: Path, **extra: object) -> GatewayConfig:
    files = pki.gw[cluster]
    data: dict[str, object] = {
        "cluster": cluster,
        "inbound": {"host": "127.0.0.1", "port": 0},
        "outbound": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "tls": {"cert_file": str(files.cert), "key_file": str(files.key),
                "bundle_file": str(files.bundle), "crl_file": str(pki.root.crl_path)},
        "outbound_allow_plain": True,
        "last_known_good": str(tmp / f"{cluster}-lkg.json"),
        "access_log": True,
    }
    data.update(extra)
    return GatewayConfig.model_validate(data)


@dataclass
class Mesh:
    pki: Pki
    east: Gateway
    west: Gateway
    web: H2Backend
    web_tls: H2Backend
    grpc_port: int
    echo_port: int
    tmp: Path

    @property
    def east_out(self) -> int:
        return self.east.ports["outbound"]

    def snapshot(self, revision: int = 1, extra_services: tuple[ExportedService, ...] = ()) -> Snapshot:
        return make_snapshot(self.pki, {"east": self.east.ports["inbound"],
                                        "west": self.west.ports["inbound"]},
                             self.web.port, self.web_tls.port, self.grpc_port, self.echo_port,
                             revision, extra_services)


def make_snapshot(pki: Pki, inbound: dict[str, int], web: int, web_tls: int, grpc_port: int,
                  echo: int, revision: int = 1,
                  extra_services: tuple[ExportedService, ...] = ()) -> Snapshot:
    clusters = [ClusterRecord(name=c, trust_domain=pki.td(c),
                              gateway_addresses=(f"127.0.0.1:{port}",), ca_cert_pem=pki.ca_pem(c))
                for c, port in inbound.items()]
    clusters.append(ClusterRecord(name="rogue", trust_domain=pki.td("rogue"),
                                  gateway_addresses=("127.0.0.1:9",), revoked=True,
                                  ca_cert_pem=pki.ca_pem("rogue")))
    w = "west"
    services = [
        ExportedService(cluster=w, namespace="default", name="echo", ports=(
            ServicePort(name="grpc", port=50051, protocol="GRPC", target=f"127.0.0.1:{grpc_port}"),)),
        ExportedService(cluster=w, namespace="default", name="web", ports=(
            ServicePort(name="http", port=8080, protocol="HTTP2", target=f"127.0.0.1:{web}"),)),
        ExportedService(cluster=w, namespace="default", name="secure", ports=(
            ServicePort(name="https", port=8443, protocol="HTTP2", target=f"127.0.0.1:{web_tls}",
                        target_tls="mtls"),)),
        ExportedService(cluster=w, namespace="default", name="tcpecho", ports=(
            ServicePort(name="tcp", port=7, protocol="TCP", target=f"127.0.0.1:{echo}"),)),
        ExportedService(cluster=w, namespace="default", name="private", export_to=("south",),
                        ports=(ServicePort(port=80, protocol="HTTP2", target=f"127.0.0.1:{web}"),)),
        *extra_services,
    ]
    return Snapshot(revision=revision, clusters=tuple(clusters), services=tuple(services),
                    crl_pem=pki.root.crl_pem().decode())


@pytest.fixture
async def mesh(pki: Pki, nursery: trio.Nursery, tmp_path: Path) -> Mesh:
    web = await nursery.start(H2Backend().serve)
    svc = pki.issue("west", "default", "secure", "svc-west")
    tls_ctx = trust.server_context(svc.cert, svc.key, svc.bundle, alpn=("h2",))
    web_tls = await nursery.start(H2Backend(tls_ctx).serve)
    echo_port = await nursery.start(tcp_echo)
    grpc_server, grpc_port = start_grpc_server()
    west = Gateway(gateway_config(pki, "west", tmp_path))
    east = Gateway(gateway_config(pki, "east", tmp_path))
    await nursery.start(west.run)
    await nursery.start(east.run)
    m = Mesh(pki, east, west, web, web_tls, grpc_port, echo_port, tmp_path)
    snap = m.snapshot()
    west.apply_snapshot(snap)
    east.apply_snapshot(snap)
    yield m
    east.stop()
    west.stop()
    grpc_server.stop(0)


@pytest.fixture
def logs():
    with structlog.testing.capture_logs() as captured:
        yield captured

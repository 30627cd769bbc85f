"""Services exported with protocol HTTP may speak HTTP/1.1 only: the inbound gateway
re-originates with HTTP/1.1 (keep-alive pooled), whatever the caller spoke."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from federation.models import ExportedService, ServicePort

from .conftest import Mesh

pytestmark = pytest.mark.both_cores  # HTTP/2 data path: run on each core


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: set = set()

    def log_message(self, *args) -> None:
        pass

    def _reply(self, body: bytes, status: int = 200, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        _Handler.connections.add(self.client_address)
        if self.path.startswith("/big"):
            self._reply(b"y" * (5 << 20), ctype="application/octet-stream")
            return
        self._reply(json.dumps({"path": self.path, "host": self.headers["host"],
                                "identity": self.headers.get("isthmus-source-identity"),
                                "version": self.request_version}).encode())

    def do_POST(self) -> None:
        n = int(self.headers.get("content-length", 0))
        body = self.rfile.read(n)
        self._reply(json.dumps({"len": len(body)}).encode(), status=201)


@pytest.fixture
def h1_service(mesh: Mesh):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Handler.connections = set()
    svc = ExportedService(cluster="west", namespace="default", name="legacy", ports=(
        ServicePort(port=80, protocol="HTTP", target=f"127.0.0.1:{server.server_address[1]}"),))
    snap = mesh.snapshot(revision=3, extra_services=(svc,))
    mesh.west.apply_snapshot(snap)
    mesh.east.apply_snapshot(snap)
    yield server
    server.shutdown()


@pytest.mark.parametrize("http2", [True, False])
async def test_http1_service_through_both_gateways(mesh: Mesh, h1_service, http2: bool) -> None:
    host = "legacy.default.west.isthmus.local"
    async with httpx.AsyncClient(http2=http2, http1=not http2) as c:
        for i in range(5):
            r = await c.get(f"http://127.0.0.1:{mesh.east_out}/hello?i={i}", headers={"host": host})
            assert r.status_code == 200, r.text
            assert r.json()["path"] == f"/hello?i={i}"
            assert r.json()["host"] == "legacy.default.svc.cluster.local:80"
            assert r.json()["version"] == "HTTP/1.1"
        p = await c.post(f"http://127.0.0.1:{mesh.east_out}/echo", headers={"host": host},
                         content=b"z" * 300_000)
        assert p.status_code == 201 and p.json()["len"] == 300_000
        big = await c.get(f"http://127.0.0.1:{mesh.east_out}/big", headers={"host": host})
        assert len(big.content) == 5 << 20
    # Keep-alive: the gateway reused its connection(s) to the service.
    assert len(_Handler.connections) < 5


async def test_http1_service_down_is_503(mesh: Mesh) -> None:
    svc = ExportedService(cluster="west", namespace="default", name="gone", ports=(
        ServicePort(port=80, protocol="HTTP", target="127.0.0.1:1"),))
    snap = mesh.snapshot(revision=4, extra_services=(svc,))
    mesh.west.apply_snapshot(snap)
    mesh.east.apply_snapshot(snap)
    async with httpx.AsyncClient(http2=True, http1=False) as c:
        r = await c.get(f"http://127.0.0.1:{mesh.east_out}/", headers={"host": "gone.default.west.isthmus.local"})
    assert r.status_code == 503

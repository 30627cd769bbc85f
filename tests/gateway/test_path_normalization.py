"""Paths are normalized before authorization and forwarded normalized: against nginx (a
backend that normalizes paths itself), with ALLOW ``/api/*`` and DENY ``/admin*``, no
spelling of ``/admin`` ever returns the admin content, whichever way it is sent."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import trio

import trust
from federation.models import AuthorizationPolicy, ExportedService, Rule, RuleTo, Selector, ServicePort

from .conftest import Mesh
from .h2client import h2_request

SECRET = b"ADMIN-SECRET"
NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location /admin {{ return 200 "ADMIN-SECRET uri=$uri\\n"; }}
    location /api/ {{ return 200 "api uri=$uri\\n"; }}
    location / {{ return 200 "other uri=$uri\\n"; }}
  }}
}}
"""
OUT_NAME = b"nginx.default.west.isthmus.local"
IN_NAME = b"nginx.default.svc.cluster.local:80"
SEL = Selector(namespace="default", service="nginx")
POLICIES = (
    AuthorizationPolicy(name="allow-api", selector=SEL,
                        rules=(Rule(to=(RuleTo(paths=("/api/*",)),)),)),
    AuthorizationPolicy(name="deny-admin", selector=SEL, action="DENY",
                        rules=(Rule(to=(RuleTo(paths=("/admin*",)),)),)),
)
# Each reaches nginx's /admin when sent to nginx directly (checked below).
BYPASSES = [
    b"/admin", b"/api/../admin", b"/api/%2e%2e/admin", b"/api/%2E%2e/admin", b"/api/.%2e/admin",
    b"//admin", b"/%61dmin", b"/%61%64%6D%69%6e", b"/./admin", b"/%2Fadmin", b"/%2fadmin",
    b"/api/..%2Fadmin", b"/api/..%2fadmin", b"/api/%2e%2e%2fadmin",
    b"/api/./../admin", b"/api/%2e%2e/admin?x=1", b"/api/%2e%2e/admin/", b"///admin",
    b"/api/..//admin", b"/.//admin", b"/api/%2e./admin", b"/%2e/admin",
]
# Not bypasses against nginx, but other spellings a gateway must not get wrong.
OTHERS = [
    b"/api\\..\\admin", b"/api/..\\admin", b"/api/%2e%2e%5cadmin", b"/api/%2e%2e%5Cadmin",
    b"/api/%00/../admin", b"/admin%00", b"/api/%252e%252e/admin", b"/api//../admin",
    b"/api/..;/admin", b"/%41dmin", b"/api/%2e%2e%2F%61dmin", b"/api/../../admin",
]


@pytest.fixture
async def nginx(mesh: Mesh, tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp_path, port=port))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with trio.fail_after(10):
            while True:
                try:
                    (await trio.open_tcp_stream("127.0.0.1", port)).socket.close()
                    break
                except OSError:
                    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                    await trio.sleep(0.05)
        svc = ExportedService(cluster="west", namespace="default", name="nginx", ports=(
            ServicePort(port=80, protocol="HTTP", target=f"127.0.0.1:{port}"),))
        snap = mesh.snapshot(revision=7, extra_services=(svc,)).model_copy(
            update={"policies": POLICIES})
        mesh.west.apply_snapshot(snap)
        mesh.east.apply_snapshot(snap)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


async def h1_raw(port: int, method: bytes, target: bytes, host: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request with the target exactly as given; (status, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(method + b" " + target + b" HTTP/1.1\r\nhost: " + host +
                              b"\r\nconnection: close\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(stream)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, body


def _gw_ctx(mesh: Mesh):
    f = mesh.pki.gw["east"]
    return trust.client_context(f.bundle, f.cert, f.key)


async def _inbound(mesh: Mesh, path: bytes, method: bytes = b"GET") -> tuple[int, bytes]:
    """As east's gateway would send it: raw HTTP/2 to west's inbound."""
    resp, body = await h2_request(mesh.west.ports["inbound"], [
        (b":method", method), (b":scheme", b"https"), (b":path", path),
        (b":authority", IN_NAME),
        (b"isthmus-source-identity", b"spiffe://east.isthmus.local/ns/default/sa/client")],
        ssl_context=_gw_ctx(mesh))
    return int(resp[b":status"]), body


async def _outbound_h2(mesh: Mesh, path: bytes) -> tuple[int, bytes]:
    resp, body = await h2_request(mesh.east_out, [
        (b":method", b"GET"), (b":scheme", b"http"), (b":path", path), (b":authority", OUT_NAME)])
    return int(resp[b":status"]), body


async def test_each_variant_reaches_admin_on_nginx_directly(nginx: int) -> None:
    """The backend really normalizes: every variant below is a bypass unless the gateway
    normalizes too (otherwise this suite would prove nothing)."""
    for path in BYPASSES:
        status, body = await h1_raw(nginx, b"GET", path, b"x")
        assert status == 200 and body.startswith(SECRET), (path, status, body)


@pytest.mark.parametrize("path", BYPASSES + OTHERS, ids=lambda p: p.decode("latin-1"))
async def test_no_variant_returns_the_denied_content(mesh: Mesh, nginx: int, path: bytes) -> None:
    results = {
        "inbound h2": await _inbound(mesh, path),
        "outbound h2": await _outbound_h2(mesh, path),
        "outbound h1": await h1_raw(mesh.east_out, b"GET", path, OUT_NAME),
    }
    for how, (status, body) in results.items():
        assert SECRET not in body, (how, path, status, body)
        if path in BYPASSES:
            assert status in (400, 403), (how, path, status, body)


async def test_allowed_paths_are_served_and_forwarded_normalized(mesh: Mesh, nginx: int) -> None:
    for path, uri in [(b"/api/x", b"/api/x"), (b"/api/./x/../y", b"/api/y"),
                      (b"/api/%7euser", b"/api/~user"), (b"/%61pi/x", b"/api/x")]:
        for status, body in [await _inbound(mesh, path), await _outbound_h2(mesh, path),
                             await h1_raw(mesh.east_out, b"GET", path, OUT_NAME)]:
            assert (status, body) == (200, b"api uri=" + uri + b"\n"), path


async def test_absolute_form_is_made_origin_form_or_refused(mesh: Mesh, nginx: int) -> None:
    # HTTP/1.1 absolute-form at the outbound: its authority routes, its path is normalized.
    status, body = await h1_raw(mesh.east_out, b"GET", b"http://" + OUT_NAME + b"/api/../admin",
                                b"elsewhere")
    assert (status, SECRET in body) == (403, False)
    status, body = await h1_raw(mesh.east_out, b"GET", b"http://" + OUT_NAME + b"/api/z", b"x")
    assert (status, body) == (200, b"api uri=/api/z\n")
    status, body = await h1_raw(mesh.east_out, b"GET", b"http://x/admin", OUT_NAME)
    assert status == 404 and SECRET not in body  # x is not an imported name
    # HTTP/2 :path in absolute-form: refused wherever it arrives.
    for status, body in [await _inbound(mesh, b"http://x/admin"),
                         await _inbound(mesh, b"http://" + IN_NAME + b"/admin"),
                         await _outbound_h2(mesh, b"http://x/admin")]:
        assert status == 400 and SECRET not in body


async def test_methods_must_be_upper_case(mesh: Mesh, nginx: int) -> None:
    assert (await _inbound(mesh, b"/api/x", b"get"))[0] == 400
    assert (await _inbound(mesh, b"/api/x", b"Get"))[0] == 400
    assert (await h1_raw(mesh.east_out, b"get", b"/api/x", OUT_NAME))[0] == 400
    assert (await _inbound(mesh, b"/api/x", b"GET"))[0] == 200


async def test_merge_slashes_option(mesh: Mesh, nginx: int) -> None:
    """Off by default (``//api/x`` is not under ``/api/``); on, it is."""
    assert (await _inbound(mesh, b"//api/x"))[0] == 403
    cfg = mesh.west.cfg.path_normalization.model_copy(update={"merge_slashes": True})
    from gateway._normalize import PathOptions
    mesh.west.handlers.paths = PathOptions(cfg.merge_slashes, cfg.escaped_slashes)
    assert await _inbound(mesh, b"//api//x") == (200, b"api uri=/api/x\n")

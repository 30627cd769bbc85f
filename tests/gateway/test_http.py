"""httpx over HTTP/1.1 and HTTP/2 through both gateways (east outbound -> west inbound)."""

from __future__ import annotations

import ssl

import httpx
import pytest
import trio

import trust
from gateway import Gateway

from .conftest import Mesh, gateway_config

pytestmark = pytest.mark.both_cores  # HTTP/2 data path: run on each core

WEB = "web.default.west.isthmus.local:8080"
WEB_FED = "web.default.isthmus.local:8080"


async def test_http2_prior_knowledge_reaches_service_through_both_gateways(mesh: Mesh) -> None:
    async with httpx.AsyncClient(http1=False, http2=True) as client:
        r = await client.get(f"http://127.0.0.1:{mesh.east_out}/echo?x=1", headers={"host": WEB})
    assert r.status_code == 200, r.text
    assert r.http_version == "HTTP/2"
    body = r.json()
    assert body["path"] == "/echo?x=1"
    assert body["authority"] == "web.default.svc.cluster.local:8080"
    # Plain caller: no identity is asserted, a trace is started.
    assert "isthmus-source-identity" not in body["headers"]
    assert body["headers"]["traceparent"].startswith("00-")


async def test_http11_plain_reaches_service_through_both_gateways(mesh: Mesh) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.post(f"http://127.0.0.1:{mesh.east_out}/echo", headers={"host": WEB},
                              content=b"a" * 100_000)
        r2 = await client.get(f"http://127.0.0.1:{mesh.east_out}/echo", headers={"host": WEB})
    assert r.status_code == 200, r.text
    assert r.http_version == "HTTP/1.1"
    assert r.json()["body_len"] == 100_000
    assert r.json()["method"] == "POST"
    assert r2.status_code == 200  # keep-alive: second request on the same connection


def _workload_ctx(mesh: Mesh, name: str = "client") -> ssl.SSLContext:
    f = mesh.pki.issue("east", "default", name, f"wl-east-{name}")
    return trust.client_context(f.bundle, f.cert, f.key, alpn=("h2", "http/1.1"))


@pytest.mark.parametrize("http2", [True, False])
async def test_mtls_workload_identity_is_asserted_to_the_service(mesh: Mesh, http2: bool) -> None:
    ctx = _workload_ctx(mesh)
    async with httpx.AsyncClient(http2=http2, http1=not http2, verify=ctx) as client:
        r = await client.get(f"https://127.0.0.1:{mesh.east_out}/echo", headers={"host": WEB_FED})
    assert r.status_code == 200, r.text
    assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    h = r.json()["headers"]
    assert h["isthmus-source-identity"] == "spiffe://east.isthmus.local/ns/default/sa/client"


async def test_mtls_re_origination_to_service(mesh: Mesh) -> None:
    """target_tls=mtls: the west gateway calls the service with its own certificate."""
    async with httpx.AsyncClient(http2=True, http1=False) as client:
        r = await client.get(f"http://127.0.0.1:{mesh.east_out}/echo",
                             headers={"host": "secure.default.west.isthmus.local:8443"})
    assert r.status_code == 200, r.text
    assert mesh.web_tls.requests == 1


async def test_workload_from_another_cluster_is_refused_on_outbound(mesh: Mesh) -> None:
    f = mesh.pki.issue("west", "default", "intruder", "wl-west-intruder")
    ctx = trust.client_context(f.bundle, f.cert, f.key, alpn=("h2",))
    async with httpx.AsyncClient(http2=True, verify=ctx) as client:
        with pytest.raises(httpx.HTTPError):
            await client.get(f"https://127.0.0.1:{mesh.east_out}/echo", headers={"host": WEB})


async def test_plain_outbound_refused_unless_allowed(pki, nursery, tmp_path) -> None:
    from gateway import Gateway

    from .conftest import gateway_config

    gw = Gateway(gateway_config(pki, "east", tmp_path, outbound_allow_plain=False))
    await nursery.start(gw.run)
    async with httpx.AsyncClient(http2=True, http1=False) as client:
        with pytest.raises(httpx.HTTPError):
            await client.get(f"http://127.0.0.1:{gw.ports['outbound']}/", headers={"host": WEB})
    gw.stop()


async def test_unknown_imported_name_is_404(mesh: Mesh) -> None:
    async with httpx.AsyncClient(http2=True, http1=False) as client:
        r = await client.get(f"http://127.0.0.1:{mesh.east_out}/",
                             headers={"host": "nope.default.west.isthmus.local"})
    assert r.status_code == 404


async def test_backend_status_and_default_port(mesh: Mesh) -> None:
    async with httpx.AsyncClient(http2=True, http1=False) as client:
        # No port: the service's only port is meant.
        r = await client.get(f"http://127.0.0.1:{mesh.east_out}/status/418",
                             headers={"host": "web.default.west.isthmus.local"})
    assert r.status_code == 418


async def test_dead_gateway_address_fails_over_to_the_next(mesh: Mesh, nursery: trio.Nursery) -> None:
    """A cluster registered with two gateway addresses, the first dead: after one failed
    dial (503, fast), requests go to the live address while the dead one backs off.
    The backoff is 30 s here (default 0.1 s): on a loaded machine a request can take
    longer than 0.1 s, and the dead address would be tried again, by design."""
    east = Gateway(gateway_config(mesh.pki, "east", mesh.tmp, limits={"reconnect_backoff_initial": 30}))
    await nursery.start(east.run)
    snap = mesh.snapshot(revision=9)
    clusters = tuple(
        c.model_copy(update={"gateway_addresses": ("127.0.0.1:1", *c.gateway_addresses)})
        if c.name == "west" else c for c in snap.clusters)
    east.apply_snapshot(snap.model_copy(update={"clusters": clusters}))
    codes = []
    async with httpx.AsyncClient(http2=True, http1=False, timeout=30) as client:
        for _ in range(4):
            r = await client.get(f"http://127.0.0.1:{east.ports['outbound']}/echo", headers={"host": WEB})
            codes.append(r.status_code)
    east.stop()
    assert codes[0] in (200, 503) and codes[1:] == [200, 200, 200], codes

"""README promises of the gateway that once had no test (each test kills a mutation that
survived the suite): every ``isthmus-*`` header from a workload is stripped; streams
opened and reset in one read start no work; the abuse cooldown spares peer gateways; a
CRL counts only when a trusted root signed it."""

from __future__ import annotations

import pytest
import json

import h2.config
import h2.connection
import httpx
import trio
from cryptography.hazmat.primitives import serialization
from h2.events import RequestReceived, StreamReset
from hyperframe.frame import RstStreamFrame

import trust
from gateway._frames import FrameGuard
from gateway._config import parse_config

from .conftest import FED_TD, Mesh
from .h2client import ConnectionRefusedByPeer, h2_request
from .test_abuse import ATTACKER_IP, FLOODS, INBOUND_WEB, Raw, req, start, wait_abuse

pytestmark = pytest.mark.both_cores  # HTTP/2 data path: run on each core

WEB_OUT = "web.default.west.isthmus.local:8080"
FORGED = {
    "ISTHMUS-Source-Identity": "spiffe://west.isthmus.local/ns/default/sa/admin",
    "Isthmus-Policy": "allow-all",
    "isthmus-peer-cluster": "west",
    "IsThMuS-X-Anything": "1",
}


def _isthmus_headers(body: bytes) -> dict[str, str]:
    return {k: v for k, v in json.loads(body)["headers"].items() if k.lower().startswith("isthmus-")}


async def test_outbound_strips_every_isthmus_header_over_http1_in_any_letter_case(mesh: Mesh) -> None:
    async with httpx.AsyncClient(http1=True, http2=False, timeout=5) as c:
        r = await c.get(f"http://127.0.0.1:{mesh.east_out}/echo",
                        headers={"host": WEB_OUT, "x-kept": "yes", **FORGED})
    assert r.status_code == 200, r.text
    got = r.json()["headers"]
    assert got.get("x-kept") == "yes"  # other headers do cross
    assert _isthmus_headers(r.content) == {}, got  # a plain-text caller: nothing asserted at all


async def test_outbound_strips_every_isthmus_header_over_http2(mesh: Mesh) -> None:
    h = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/echo"), (b":authority", WEB_OUT.encode()),
         (b"x-kept", b"yes"), *((k.lower().encode(), v.encode()) for k, v in FORGED.items())]
    resp, body = await h2_request(mesh.east_out, h)
    assert resp[b":status"] == b"200"
    assert json.loads(body)["headers"].get("x-kept") == "yes"
    assert _isthmus_headers(body) == {}


async def test_an_mtls_workload_gets_only_the_identity_its_gateway_asserts(mesh: Mesh) -> None:
    cart = mesh.pki.issue("east", "shop", "cart", "promise-cart")
    ctx = trust.client_context(cart.bundle, cart.cert, cart.key)
    async with httpx.AsyncClient(http2=True, verify=ctx, timeout=5) as c:
        r = await c.get(f"https://127.0.0.1:{mesh.east_out}/echo",
                        headers={"host": WEB_OUT, **{k.lower(): v for k, v in FORGED.items()}})
    assert r.status_code == 200, r.text
    assert _isthmus_headers(r.content) == {"isthmus-source-identity": "spiffe://east.isthmus.local/ns/shop/sa/cart"}


# -- streams opened and reset in the same read ---------------------------------------------

def _server_with_guard() -> tuple[h2.connection.H2Connection, FrameGuard]:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    conn.data_to_send()
    guard = FrameGuard(parse_config({}).limits, lambda: 0.0)
    guard.install(conn)
    return conn, guard


def test_a_stream_opened_and_reset_in_one_read_never_surfaces_as_a_request() -> None:
    conn, _ = _server_with_guard()
    raw = Raw(None)  # type: ignore[arg-type]  (only its frame builders)
    hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    events = conn.receive_data(hello + raw.headers(1, req()) + RstStreamFrame(1, error_code=8).serialize()
                               + raw.headers(3, req()))
    assert [e.stream_id for e in events if isinstance(e, RequestReceived)] == [3]
    assert [e.stream_id for e in events if isinstance(e, StreamReset)] == [1]
    # opened in one read and reset in the next: that request had started, and stays
    events = conn.receive_data(raw.headers(5, req()))
    assert [e.stream_id for e in events if isinstance(e, RequestReceived)] == [5]
    events = conn.receive_data(RstStreamFrame(5, error_code=8).serialize())
    assert [e.stream_id for e in events if isinstance(e, StreamReset)] == [5]


async def test_streams_opened_and_reset_in_one_read_reach_no_service(mesh: Mesh, nursery: trio.Nursery) -> None:
    """Forty GETs each reset in the same write (one read at the gateway): none reaches
    west or its service; the request after them does."""
    gw = await start(mesh, nursery)
    raw = await Raw.open(gw.ports["outbound"], source="127.0.0.1")
    before = mesh.web.requests
    burst = b"".join(raw.headers(sid, req()) + RstStreamFrame(sid, error_code=8).serialize()
                     for sid in range(1, 81, 2))
    await raw.send(burst + raw.headers(81, req()))
    hs, body = await raw.response(81)
    assert hs[b":status"] == b"200", body
    await trio.sleep(0.2)  # anything relayed would have reached the backend by now
    assert mesh.web.requests == before + 1
    await raw.aclose()


# -- abuse cooldown: workloads only ---------------------------------------------------------

async def test_a_peer_gateway_closed_for_abuse_may_reconnect_at_once(mesh: Mesh, nursery: trio.Nursery, logs: list) -> None:
    """A peer gateway's address carries every caller of its cluster: it gets no cooldown
    (a workload's address does: test_abuse.py)."""
    west = await start(mesh, nursery, cluster="west", max_control_frames_per_second=100, abuse_cooldown=60)
    ctx = trust.client_context(mesh.pki.gw["east"].bundle, mesh.pki.gw["east"].cert, mesh.pki.gw["east"].key)
    raw = await Raw.open(west.ports["inbound"], ctx, source=ATTACKER_IP)
    await raw.send(FLOODS["ping"] * 300)
    assert (await raw.until_goaway()).error_code == 11  # ENHANCE_YOUR_CALM
    await wait_abuse(west, "inbound", "control_frame_flood")
    await raw.aclose()
    again = await Raw.open(west.ports["inbound"], ctx, source=ATTACKER_IP)  # same address, at once
    await again.send(again.headers(1, req(INBOUND_WEB, scheme=b"https")))
    hs, _ = await again.response(1)
    assert hs[b":status"] == b"200"
    assert not west.shield.banned
    await again.aclose()


# -- the CRL must be signed by a trusted root ------------------------------------------------

def _crl_pem(issuer: trust.TrustDir, revoked: list) -> str:
    crl = trust.build_crl(issuer.root_cert, issuer.root_key,
                          [(c.serial_number, c.not_valid_before_utc) for c in revoked])
    return crl.public_bytes(serialization.Encoding.PEM).decode()


async def test_a_crl_not_signed_by_a_trusted_root_is_refused_and_logged(mesh: Mesh, logs: list, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A stranger's root with our root's very name "revokes" east's CA.
    stranger = trust.TrustDir(tmp_path / "stranger")
    stranger.init(FED_TD)
    assert stranger.root_cert.subject == mesh.pki.root.root_cert.subject
    east_ca = mesh.pki.cas["east"].cert
    snap = mesh.snapshot(revision=5)
    mesh.west.apply_snapshot(snap.model_copy(update={"crl_pem": _crl_pem(stranger, [east_ca])}))
    bad = [e for e in logs if e["event"] == "config.bad_crl"]
    assert bad and "does not verify against any root" in bad[-1]["error"], logs
    ctx = trust.client_context(mesh.pki.gw["east"].bundle, mesh.pki.gw["east"].cert, mesh.pki.gw["east"].key)
    resp, _ = await h2_request(mesh.west.ports["inbound"], [
        (b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/echo"), (b":authority", INBOUND_WEB)],
        ssl_context=ctx)
    assert resp[b":status"] == b"200"  # east is not revoked by a forgery
    # the control: the same list signed by our root does revoke east
    mesh.west.apply_snapshot(snap.model_copy(update={"revision": 6, "crl_pem": _crl_pem(mesh.pki.root, [east_ca])}))
    try:
        await h2_request(mesh.west.ports["inbound"], [
            (b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/echo"), (b":authority", INBOUND_WEB)],
            ssl_context=ctx)
        raise AssertionError("a revoked cluster's gateway was served")
    except ConnectionRefusedByPeer:
        pass


async def test_a_peer_may_not_assert_a_trust_domain_sorting_before_its_own(mesh: Mesh, logs: list) -> None:
    """east's gateway asserting an identity of any other trust domain is refused, whether
    that domain sorts after east's (west) or before it (central, a)."""
    ctx = trust.client_context(mesh.pki.gw["east"].bundle, mesh.pki.gw["east"].cert, mesh.pki.gw["east"].key)
    for td in ("central.isthmus.local", "a.isthmus.local", "west.isthmus.local"):
        resp, body = await h2_request(mesh.west.ports["inbound"], [
            (b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/echo"), (b":authority", INBOUND_WEB),
            (b"isthmus-source-identity", f"spiffe://{td}/ns/default/sa/x".encode())], ssl_context=ctx)
        assert resp[b":status"] == b"403", (td, body)
    assert mesh.web.requests == 0
    assert len([e for e in logs if e["event"] == "inbound.impersonation_refused"]) == 3

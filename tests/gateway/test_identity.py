"""Exactly one caller identity reaches a service, and CONNECT opens tunnels to TCP ports
only.  The outbound strips every identity a workload sends (any letter case, headers and
trailers, ``x-forwarded-client-cert`` too) and adds exactly one; the inbound refuses a
peer that asserts two, strips identity trailers, and sets ``x-forwarded-client-cert``
from the identity it verified."""

from __future__ import annotations

import json

import h2.config
import h2.connection
import h2.events
import trio

import trust
from gateway._context import RequestContext
from gateway._proxy import Forward, outbound
from gateway._telemetry import Exchange

from .conftest import Mesh
from .h2client import h2_request

WEB_OUT = b"web.default.west.isthmus.local:8080"
WEB_IN = b"web.default.svc.cluster.local:8080"
TCP_IN = b"tcpecho.default.svc.cluster.local:7"
EAST_WL = "spiffe://east.isthmus.local/ns/default/sa/client"
WEST_ADMIN = b"spiffe://west.isthmus.local/ns/default/sa/admin"
WEST_GW = "spiffe://west.isthmus.local/ns/isthmus-system/sa/isthmus-gateway"


def _gw_ctx(mesh: Mesh):
    f = mesh.pki.gw["east"]
    return trust.client_context(f.bundle, f.cert, f.key)


def _wl_ctx(mesh: Mesh, alpn: str):
    f = mesh.pki.issue("east", "default", "client", f"wl-east-id-{alpn}")
    return trust.client_context(f.bundle, f.cert, f.key, alpn=(alpn,))


def _identities(echo: dict) -> list[str]:
    return [v for k, v in echo["header_list"] if k.lower() == "isthmus-source-identity"]


async def h2_exchange(stream: trio.abc.Stream, headers, body: bytes = b"",
                      trailers=None) -> tuple[dict, bytes]:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=not body and not trailers)
    if body:
        conn.send_data(1, body, end_stream=not trailers)
    if trailers:
        conn.send_headers(1, trailers, end_stream=True)
    await stream.send_all(conn.data_to_send())
    resp: dict = {}
    data = b""
    with trio.fail_after(5):
        while True:
            chunk = await stream.receive_some(65536)
            assert chunk, "connection closed"
            for e in conn.receive_data(chunk):
                if isinstance(e, h2.events.ResponseReceived):
                    resp = dict(e.headers)
                elif isinstance(e, h2.events.DataReceived):
                    data += e.data
                    conn.acknowledge_received_data(e.flow_controlled_length, 1)
                elif isinstance(e, h2.events.StreamEnded):
                    await trio.aclose_forcefully(stream)
                    return resp, data
            await stream.send_all(conn.data_to_send())


async def _tls(port: int, ctx) -> trio.SSLStream:
    tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx,
                         server_hostname="gateway")
    await tls.do_handshake()
    return tls


async def test_two_identity_headers_from_a_peer_are_refused(mesh: Mesh, logs) -> None:
    resp, body = await h2_request(mesh.west.ports["inbound"], [
        (b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/echo"),
        (b":authority", WEB_IN), (b"isthmus-source-identity", WEST_ADMIN),
        (b"isthmus-source-identity", EAST_WL.encode())], ssl_context=_gw_ctx(mesh))
    assert resp[b":status"] == b"403", body
    assert mesh.web.requests == 0
    assert any(e["event"] == "inbound.identity_refused" for e in logs)


async def test_upper_case_identity_from_a_peer_is_refused(mesh: Mesh) -> None:
    tls = await _tls(mesh.west.ports["inbound"], _gw_ctx(mesh))
    resp, _ = await h2_exchange(tls, [
        (b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/echo"),
        (b":authority", WEB_IN), (b"Isthmus-Source-Identity", WEST_ADMIN)])
    assert resp[b":status"] in (b"400", b"403")
    assert mesh.web.requests == 0


async def test_identity_in_peer_trailers_is_stripped(mesh: Mesh) -> None:
    tls = await _tls(mesh.west.ports["inbound"], _gw_ctx(mesh))
    resp, body = await h2_exchange(tls, [
        (b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/echo"),
        (b":authority", WEB_IN), (b"isthmus-source-identity", EAST_WL.encode())],
        body=b"hello", trailers=[(b"isthmus-source-identity", WEST_ADMIN), (b"x-ok", b"1"),
                                 (b"x-forwarded-client-cert", b"By=evil")])
    assert resp[b":status"] == b"200"
    echo = json.loads(body)
    assert echo["trailers"] == [["x-ok", "1"]]
    assert _identities(echo) == [EAST_WL]


async def test_outbound_strips_every_copy_and_adds_exactly_one_h1(mesh: Mesh) -> None:
    tls = await _tls(mesh.east_out, _wl_ctx(mesh, "http/1.1"))
    await tls.send_all(
        b"GET /echo HTTP/1.1\r\nhost: " + WEB_OUT + b"\r\nconnection: close\r\n"
        b"isthmus-source-identity: " + WEST_ADMIN + b"\r\n"
        b"ISTHMUS-SOURCE-IDENTITY: " + WEST_ADMIN + b"\r\n"
        b"Isthmus-Source-Identity: " + WEST_ADMIN + b"\r\n"
        b"X-Forwarded-Client-Cert: By=spiffe://west.isthmus.local/x;URI=" + WEST_ADMIN + b"\r\n"
        b"isthmus-anything: x\r\n\r\n")
    data = b""
    with trio.fail_after(5):
        while chunk := await tls.receive_some(65536):
            data += chunk
    await trio.aclose_forcefully(tls)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data
    echo = json.loads(body)
    assert _identities(echo) == [EAST_WL]
    names = [k.lower() for k, _ in echo["header_list"]]
    assert "isthmus-anything" not in names
    # The only xfcc is west's, from the identity it verified: the workload's never got there.
    assert [v for k, v in echo["header_list"] if k == "x-forwarded-client-cert"] == [
        f"By={WEST_GW};URI={EAST_WL}"]


async def test_outbound_strips_identity_in_workload_h2_headers_and_trailers(mesh: Mesh) -> None:
    tls = await _tls(mesh.east_out, _wl_ctx(mesh, "h2"))
    resp, body = await h2_exchange(tls, [
        (b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/echo"),
        (b":authority", WEB_OUT), (b"isthmus-source-identity", WEST_ADMIN),
        (b"isthmus-source-identity", WEST_ADMIN), (b"x-forwarded-client-cert", b"By=evil")],
        body=b"x", trailers=[(b"isthmus-source-identity", WEST_ADMIN), (b"x-t", b"kept"),
                             (b"x-forwarded-client-cert", b"By=evil")])
    assert resp[b":status"] == b"200"
    echo = json.loads(body)
    assert _identities(echo) == [EAST_WL]
    assert echo["trailers"] == [["x-t", "kept"]]
    assert "By=evil" not in json.dumps(echo)


async def test_outbound_decision_never_forwards_xfcc_or_identity(mesh: Mesh) -> None:
    """What east sends to its peer, checked on the pure decision itself."""
    headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
               (b":authority", WEB_OUT), (b"x-forwarded-client-cert", b"By=evil"),
               (b"isthmus-source-identity", WEST_ADMIN)]
    ctx = RequestContext.parse(headers, Exchange("source", "HTTP/2", mesh.east.recorder))
    d = outbound(headers, mesh.east.state.routes, EAST_WL, ctx)
    assert isinstance(d, Forward)
    names = [k for k, _ in d.headers]
    assert b"x-forwarded-client-cert" not in names
    assert [v for k, v in d.headers if k == b"isthmus-source-identity"] == [EAST_WL.encode()]


async def test_plain_workload_has_no_identity_and_no_xfcc(mesh: Mesh) -> None:
    resp, body = await h2_request(mesh.east_out, [
        (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/echo"),
        (b":authority", WEB_OUT), (b"x-forwarded-client-cert", b"By=evil"),
        (b"isthmus-source-identity", WEST_ADMIN)])
    assert resp[b":status"] == b"200"
    echo = json.loads(body)
    assert _identities(echo) == []
    assert "x-forwarded-client-cert" not in echo["headers"]


async def test_connect_to_an_http_port_is_405_at_outbound_and_inbound(mesh: Mesh) -> None:
    out, _ = await h2_request(mesh.east_out, [(b":method", b"CONNECT"), (b":authority", WEB_OUT)])
    inb, body = await h2_request(mesh.west.ports["inbound"], [
        (b":method", b"CONNECT"), (b":authority", WEB_IN)], ssl_context=_gw_ctx(mesh))
    assert (out[b":status"], inb[b":status"]) == (b"405", b"405"), body
    assert b"TCP ports only" in body
    assert mesh.web.connections == 0  # no tunnel was ever opened to the HTTP service
    # A TCP port still tunnels.
    tls = await _tls(mesh.west.ports["inbound"], _gw_ctx(mesh))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(1, [(b":method", b"CONNECT"), (b":authority", TCP_IN)])
    await tls.send_all(conn.data_to_send())
    got = b""
    status = b""
    with trio.fail_after(5):
        while got != b"ping":
            for e in conn.receive_data(await tls.receive_some(65536)):
                if isinstance(e, h2.events.ResponseReceived):
                    status = dict(e.headers)[b":status"]
                    conn.send_data(1, b"ping")
                elif isinstance(e, h2.events.DataReceived):
                    got += e.data
            await tls.send_all(conn.data_to_send())
    await trio.aclose_forcefully(tls)
    assert status == b"200"

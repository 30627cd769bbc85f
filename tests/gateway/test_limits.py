"""Limits and seams: idle timeout, concurrent streams, header list size, the authorize and
connection-guard hooks, certificate renewal without dropping connections, TLS resumption."""

from __future__ import annotations

import shutil

import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import pytest
import trio

import trust
from gateway import Decision, Gateway

from .conftest import Mesh, gateway_config
from .h2client import h2_request

pytestmark = pytest.mark.both_cores  # HTTP/2 data path: run on each core

WEB = "web.default.west.isthmus.local:8080"


async def _h2_open(port: int):
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    await stream.send_all(conn.data_to_send())
    return stream, conn


async def test_idle_connection_is_closed_with_goaway(mesh: Mesh, nursery: trio.Nursery) -> None:
    gw = Gateway(gateway_config(mesh.pki, "east", mesh.tmp, limits={"idle_timeout": 0.3}))
    await nursery.start(gw.run)
    gw.apply_snapshot(mesh.snapshot())
    stream, conn = await _h2_open(gw.ports["outbound"])
    terminated = False
    with trio.fail_after(3):
        while not terminated:
            data = await stream.receive_some(65536)
            if not data:
                break
            terminated = any(isinstance(e, h2.events.ConnectionTerminated) for e in conn.receive_data(data))
    assert terminated
    await stream.aclose()
    gw.stop()


async def test_max_concurrent_streams_is_advertised_and_enforced(mesh: Mesh, nursery: trio.Nursery) -> None:
    gw = Gateway(gateway_config(mesh.pki, "east", mesh.tmp, limits={"max_concurrent_streams": 2}))
    await nursery.start(gw.run)
    gw.apply_snapshot(mesh.snapshot())
    stream, conn = await _h2_open(gw.ports["outbound"])
    # A client that ignores the limit: three streams before reading the server's SETTINGS.
    hdrs = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/echo"), (b":authority", WEB.encode())]
    ids = []
    for _ in range(3):
        ids.append(conn.get_next_available_stream_id())
        conn.send_headers(ids[-1], hdrs, end_stream=True)
    await stream.send_all(conn.data_to_send())
    resets: dict[int, h2.errors.ErrorCodes] = {}
    statuses: dict[int, bytes] = {}
    ended: set[int] = set()
    with trio.fail_after(10):
        while len(resets) + len(ended) < 3:
            data = await stream.receive_some(65536)
            assert data, "the gateway closed the connection"
            for e in conn.receive_data(data):
                assert not isinstance(e, h2.events.ConnectionTerminated), e  # only the stream is refused
                if isinstance(e, h2.events.StreamReset):
                    resets[e.stream_id] = e.error_code
                elif isinstance(e, h2.events.ResponseReceived):
                    statuses[e.stream_id] = dict(e.headers)[b":status"]
                elif isinstance(e, h2.events.StreamEnded):
                    ended.add(e.stream_id)
            await stream.send_all(conn.data_to_send())
    assert conn.remote_settings.max_concurrent_streams == 2
    # the stream over the limit is refused (safe to retry), the others are served
    assert resets == {ids[2]: h2.errors.ErrorCodes.REFUSED_STREAM}, resets
    assert ended == set(ids[:2]) and statuses == {ids[0]: b"200", ids[1]: b"200"}, (ended, statuses)
    # and the connection still carries a new stream
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, hdrs, end_stream=True)
    await stream.send_all(conn.data_to_send())
    with trio.fail_after(10):
        while sid not in ended:
            for e in conn.receive_data(await stream.receive_some(65536)):
                assert not isinstance(e, (h2.events.ConnectionTerminated, h2.events.StreamReset)), e
                if isinstance(e, h2.events.StreamEnded):
                    ended.add(e.stream_id)
            await stream.send_all(conn.data_to_send())
    await stream.aclose()
    gw.stop()


async def test_oversized_header_list_is_refused(mesh: Mesh) -> None:
    """On either core: the connection is closed with the same reason, the workload's IP
    sits out the abuse cooldown (1 s by default), and afterwards it is served again."""
    async with httpx.AsyncClient(http2=True, http1=False) as c:
        with pytest.raises(httpx.HTTPError):
            await c.get(f"http://127.0.0.1:{mesh.east_out}/echo",
                        headers={"host": WEB, "x-big": "a" * 70_000})
    def closed() -> float:
        return mesh.east.metrics.registry.get_sample_value(
            "isthmus_abuse_connections_closed_total",
            {"listener": "outbound", "reason": "header_block_too_large"}) or 0.0

    with trio.fail_after(10):
        while not closed():
            await trio.sleep(0.01)
    assert closed() == 1
    with trio.fail_after(10):
        while True:
            try:
                async with httpx.AsyncClient(http2=True, http1=False) as c:
                    r = await c.get(f"http://127.0.0.1:{mesh.east_out}/echo", headers={"host": WEB})
                break
            except httpx.HTTPError:
                await trio.sleep(0.2)  # still in the cooldown
    assert r.status_code == 200  # the next connection after the cooldown is fine


async def test_authorize_hook_sees_request_and_can_deny(mesh: Mesh, nursery: trio.Nursery) -> None:
    seen = []

    def authorize(attrs) -> Decision:
        seen.append(attrs)
        return Decision(attrs.path != "/forbidden", "path not allowed")

    west = Gateway(gateway_config(mesh.pki, "west", mesh.tmp), authorize=authorize)
    await nursery.start(west.run)
    west.apply_snapshot(mesh.snapshot())
    f = mesh.pki.gw["east"]
    ctx = trust.client_context(f.bundle, f.cert, f.key)
    def req(path: bytes):
        return [(b":method", b"GET"), (b":scheme", b"https"), (b":path", path),
                (b":authority", b"web.default.svc.cluster.local:8080"),
                (b"isthmus-source-identity", b"spiffe://east.isthmus.local/ns/shop/sa/cart")]
    ok, _ = await h2_request(west.ports["inbound"], req(b"/echo"), ssl_context=ctx)
    no, body = await h2_request(west.ports["inbound"], req(b"/forbidden"), ssl_context=ctx)
    assert ok[b":status"] == b"200" and no[b":status"] == b"403"
    assert b"path not allowed" in body
    a = seen[0]
    assert (a.peer_cluster, a.namespace, a.service, a.port) == ("east", "default", "web", 8080)
    assert a.source_principal == "spiffe://east.isthmus.local/ns/shop/sa/cart"
    west.stop()


async def test_connection_guard_refuses_connections(mesh: Mesh, nursery: trio.Nursery) -> None:
    infos = []

    def guard(info) -> bool:
        infos.append(info)
        return False

    gw = Gateway(gateway_config(mesh.pki, "east", mesh.tmp), guard=guard)
    await nursery.start(gw.run)
    gw.apply_snapshot(mesh.snapshot())
    async with httpx.AsyncClient(http2=True, http1=False) as c:
        with pytest.raises(httpx.HTTPError):
            await c.get(f"http://127.0.0.1:{gw.ports['outbound']}/echo", headers={"host": WEB})
    assert infos and infos[0].listener == "outbound"
    gw.stop()


async def test_renewed_certificate_applies_to_new_connections_only(mesh: Mesh) -> None:
    async with httpx.AsyncClient(http2=True, http1=False) as c:
        assert (await c.get(f"http://127.0.0.1:{mesh.east_out}/echo", headers={"host": WEB})).status_code == 200
        old_serial = mesh.west.tls.inbound.leaf().serial_number
        # Renew west's gateway certificate in place (what the agent does before expiry).
        files = mesh.pki.gw["west"]
        fresh = mesh.pki.cas["west"].issue(trust.gateway_id("west.isthmus.local"),
                                           mesh.tmp / "renewed", validity=3600)
        shutil.copy(fresh.cert, files.cert)
        shutil.copy(fresh.key, files.key)
        mesh.west.tls.inbound.reload()
        assert mesh.west.tls.inbound.leaf().serial_number != old_serial
        # The pooled east->west connection (old certificate) keeps serving...
        assert (await c.get(f"http://127.0.0.1:{mesh.east_out}/echo", headers={"host": WEB})).status_code == 200
        assert mesh.web.requests == 2
    # ...and a new connection gets the renewed certificate.
    f = mesh.pki.gw["east"]
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", mesh.west.ports["inbound"]),
                            trust.client_context(f.bundle, f.cert, f.key), server_hostname="west")
    await stream.do_handshake()
    from cryptography import x509
    served = x509.load_der_x509_certificate(stream.getpeercert(binary_form=True))
    assert served.serial_number == trust.load_cert(files.cert).serial_number != old_serial
    await trio.aclose_forcefully(stream)


async def test_peer_connections_reconnect_and_resume_tls(mesh: Mesh, logs) -> None:
    async with httpx.AsyncClient(http2=True, http1=False) as c:
        for _ in range(3):
            assert (await c.get(f"http://127.0.0.1:{mesh.east_out}/echo", headers={"host": WEB})).status_code == 200
        # Drop the pooled connection(s) from west's side.
        for ep in list(mesh.west.endpoints):
            ep.conn.close_connection()
            ep.closed = True
            ep.mark()
        await trio.sleep(0.1)
        for _ in range(3):
            r = await c.get(f"http://127.0.0.1:{mesh.east_out}/echo", headers={"host": WEB})
            assert r.status_code == 200
    connected = [e for e in logs if e["event"] == "pool.connected" and e.get("peer") == "west"]
    assert len(connected) == 2
    assert connected[1]["resumed"] is True


async def test_renewed_client_certificate_moves_new_requests_to_new_connections(mesh: Mesh, logs) -> None:
    async with httpx.AsyncClient(http2=True, http1=False) as c:
        assert (await c.get(f"http://127.0.0.1:{mesh.east_out}/echo", headers={"host": WEB})).status_code == 200
        files = mesh.pki.gw["east"]
        fresh = mesh.pki.cas["east"].issue(trust.gateway_id("east.isthmus.local"),
                                           mesh.tmp / "renewed-east", validity=3600)
        shutil.copy(fresh.cert, files.cert)
        shutil.copy(fresh.key, files.key)
        mesh.east.tls.client.reload()
        for _ in range(3):
            r = await c.get(f"http://127.0.0.1:{mesh.east_out}/echo", headers={"host": WEB})
            assert r.status_code == 200
    connected = [e for e in logs if e["event"] == "pool.connected" and e.get("peer") == "west"]
    assert len(connected) == 2  # the old connection drained, one new one carries the rest


async def test_handshake_timeout_closes_silent_connections(mesh: Mesh, nursery: trio.Nursery) -> None:
    gw = Gateway(gateway_config(mesh.pki, "east", mesh.tmp, limits={"handshake_timeout": 0.2}))
    await nursery.start(gw.run)
    for port in (gw.ports["inbound"], gw.ports["outbound"]):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(2):
            assert await stream.receive_some(100) == b""  # closed by the gateway
        await stream.aclose()
    gw.stop()

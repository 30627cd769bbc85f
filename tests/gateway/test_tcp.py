"""Opaque TCP: an outbound port mapped to a remote service, tunnelled as HTTP/2 CONNECT."""

from __future__ import annotations

import pytest
import os

import trio

from gateway import Gateway

from .conftest import Mesh, gateway_config

pytestmark = pytest.mark.both_cores  # HTTP/2 data path: run on each core


async def test_tcp_echo_through_connect(mesh: Mesh, nursery: trio.Nursery) -> None:
    cfg = gateway_config(mesh.pki, "east", mesh.tmp, tcp_ports=[
        {"host": "127.0.0.1", "port": 0, "target": "tcpecho.default.west.isthmus.local:7"}])
    gw = Gateway(cfg)
    await nursery.start(gw.run)
    gw.apply_snapshot(mesh.snapshot())
    port = gw.ports["tcp:tcpecho.default.west.isthmus.local:7"]
    payload = os.urandom(3 * 1024 * 1024)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    got = bytearray()

    async def sender():
        for i in range(0, len(payload), 65536):
            await stream.send_all(payload[i:i + 65536])
        await stream.send_eof()

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(sender)
            while data := await stream.receive_some(65536):
                got += data
    await stream.aclose()
    assert bytes(got) == payload
    gw.stop()


async def test_h2_connect_from_workload_reaches_tcp_service(mesh: Mesh) -> None:
    import h2.config
    import h2.connection
    import h2.events

    stream = await trio.open_tcp_stream("127.0.0.1", mesh.east_out)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"tcpecho.default.west.isthmus.local:7")])
    await stream.send_all(conn.data_to_send())
    status = None
    echoed = b""
    with trio.fail_after(5):
        while status is None:
            for e in conn.receive_data(await stream.receive_some(65536)):
                if isinstance(e, h2.events.ResponseReceived):
                    status = dict(e.headers)[b":status"]
        conn.send_data(sid, b"ping")
        await stream.send_all(conn.data_to_send())
        while echoed != b"ping":
            for e in conn.receive_data(await stream.receive_some(65536)):
                if isinstance(e, h2.events.DataReceived):
                    echoed += e.data
                    conn.acknowledge_received_data(e.flow_controlled_length, sid)
            await stream.send_all(conn.data_to_send())
    assert status == b"200"
    await stream.aclose()

"""A minimal raw HTTP/2 client for tests that must craft what real clients won't
(forged identity headers, foreign gateway certificates)."""

from __future__ import annotations

import ssl

import h2.config
import h2.connection
import h2.events
import trio


class ConnectionRefusedByPeer(Exception):
    pass


async def h2_request(port: int, headers: list[tuple[bytes, bytes]], body: bytes = b"",
                     ssl_context: ssl.SSLContext | None = None, timeout: float = 5):
    """One request; returns (response headers dict, body bytes)."""
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_hostname="gateway")
            await stream.do_handshake()
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                     header_encoding=None))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers, end_stream=not body)
        if body:
            conn.send_data(sid, body, end_stream=True)
        await stream.send_all(conn.data_to_send())
        resp: dict[bytes, bytes] = {}
        data = bytearray()
        with trio.fail_after(timeout):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except (trio.BrokenResourceError, ssl.SSLError) as exc:
                    raise ConnectionRefusedByPeer(str(exc)) from None
                if not chunk:
                    raise ConnectionRefusedByPeer("connection closed without a response")
                for e in conn.receive_data(chunk):
                    if isinstance(e, h2.events.ResponseReceived):
                        resp.update(e.headers)
                    elif isinstance(e, h2.events.DataReceived):
                        data += e.data
                        conn.acknowledge_received_data(e.flow_controlled_length, sid)
                    elif isinstance(e, h2.events.StreamEnded):
                        return resp, bytes(data)
                    elif isinstance(e, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                        raise ConnectionRefusedByPeer(repr(e))
                await stream.send_all(conn.data_to_send())
    finally:
        await trio.aclose_forcefully(stream)

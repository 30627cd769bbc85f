"""HTTP/2 flow control end to end: a slow reader slows the writer; memory stays bounded."""

from __future__ import annotations

import pytest
import h2.config
import h2.connection
import h2.events
import trio

from .conftest import Mesh

pytestmark = pytest.mark.both_cores  # HTTP/2 data path: run on each core

SIZE = 100 * 1024 * 1024


async def test_100mib_body_through_both_gateways_with_slow_reader_stays_bounded(mesh: Mesh) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", mesh.east_out)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"),
                            (b":path", f"/big?n={SIZE}".encode()),
                            (b":authority", b"web.default.west.isthmus.local:8080")], end_stream=True)
    await stream.send_all(conn.data_to_send())
    received = 0
    peak = 0
    ended = False
    slow_until = trio.current_time() + 1.5
    slow_received = 0

    def sample() -> None:
        nonlocal peak
        peak = max(peak, mesh.east.buffered_bytes() + mesh.west.buffered_bytes())

    with trio.fail_after(120):
        while not ended:
            slow = trio.current_time() < slow_until
            data = await stream.receive_some(16384 if slow else 1 << 20)
            assert data, "connection closed early"
            for e in conn.receive_data(data):
                if isinstance(e, h2.events.DataReceived):
                    received += len(e.data)
                    if slow:
                        slow_received += len(e.data)
                    conn.acknowledge_received_data(e.flow_controlled_length, sid)
                elif isinstance(e, h2.events.StreamEnded):
                    ended = True
                elif isinstance(e, h2.events.StreamReset):
                    raise AssertionError(f"stream reset: {e}")
            await stream.send_all(conn.data_to_send())
            sample()
            if slow:
                await trio.sleep(0.01)  # a slow reader: ~1.6 MB/s
    await stream.aclose()
    assert received == SIZE
    # While the reader was slow, the gateways held no more than a few stream windows,
    # not the megabytes the backend could have pushed.
    print("peak", peak, "slow", slow_received)
    assert peak < 8 * 1024 * 1024, peak
    assert slow_received < 6 * 1024 * 1024, slow_received


async def test_slow_upload_is_paced_by_the_service(mesh: Mesh) -> None:
    """10 MiB POST: the client's window is only refilled as bytes move onward."""
    import httpx

    async def body():
        for _ in range(160):
            yield b"u" * 65536

    async with httpx.AsyncClient(http2=True, http1=False) as client:
        r = await client.post(f"http://127.0.0.1:{mesh.east_out}/echo", content=body(),
                              headers={"host": "web.default.west.isthmus.local:8080"})
    assert r.status_code == 200
    assert r.json()["body_len"] == 160 * 65536

"""Flow control on the nghttp2 core (and the same on h2): a body larger than the window
moves only as the receiver acknowledges it, in both directions."""

from __future__ import annotations

import h2.events as ev
import pytest
from h2.errors import ErrorCodes

from .cores import FrameFactory, FrameReader, ng_core, request
from .replay import MAKERS


def server_with_window(core: str, window: int):
    """A server core whose client granted ``window`` bytes per stream (65535 for the
    connection), with one request open on stream 1."""
    f = FrameFactory()
    conn = MAKERS[core](False)
    conn.data_to_send()
    conn.receive_data(f.preface({4: window}) + f.settings(ack=True)
                      + f.headers(1, request(), end=True) + f.headers(3, request(), end=True))
    conn.data_to_send()
    return conn, f


@pytest.mark.parametrize("core", ["h2", "nghttp2"])
def test_response_body_larger_than_the_window_moves_only_as_the_peer_opens_it(core: str) -> None:
    conn, f = server_with_window(core, 1000)
    conn.send_headers(1, [(b":status", b"200")])
    assert conn.local_flow_control_window(1) == 1000
    conn.send_data(1, b"a" * 1000)
    assert conn.local_flow_control_window(1) == 0
    sent = [fr for fr in FrameReader().feed(conn.data_to_send()) if fr[0] == "DATA"]
    assert sum(len(fr[2]) for fr in sent) == 1000
    got = conn.receive_data(f.window_update(1, 300))
    assert [(type(e), e.stream_id, e.delta) for e in got] == [(ev.WindowUpdated, 1, 300)]
    assert conn.local_flow_control_window(1) == 300
    conn.send_data(1, b"b" * 300, end_stream=True)
    sent = [fr for fr in FrameReader().feed(conn.data_to_send()) if fr[0] == "DATA"]
    assert b"".join(fr[2] for fr in sent) == b"b" * 300 and sent[-1][3]


@pytest.mark.parametrize("core", ["h2", "nghttp2"])
def test_the_connection_window_bounds_all_streams_together(core: str) -> None:
    conn, f = server_with_window(core, 1 << 20)
    for sid in (1, 3):
        conn.send_headers(sid, [(b":status", b"200")])
    conn.send_data(1, b"x" * 16384)
    conn.send_data(1, b"x" * 16384)
    conn.send_data(1, b"x" * 16384)
    assert conn.local_flow_control_window(3) == 65535 - 3 * 16384
    conn.send_data(3, b"y" * (65535 - 3 * 16384))
    assert conn.local_flow_control_window(1) == 0 == conn.local_flow_control_window(3)
    assert conn.outbound_flow_control_window == 0
    conn.receive_data(f.window_update(0, 5000))
    assert conn.local_flow_control_window(3) == 5000


@pytest.mark.parametrize("core", ["h2", "nghttp2"])
def test_request_body_window_returns_only_when_acknowledged(core: str) -> None:
    f = FrameFactory()
    conn = MAKERS[core](False, settings={4: 20000, 3: 10, 2: 0}, window=65535)
    conn.data_to_send()
    conn.receive_data(f.preface() + f.settings(ack=True) + f.headers(1, request(b"/", b"POST")))
    got = conn.receive_data(f.data(1, b"z" * 16000))
    assert sum(len(e.data) for e in got if type(e) is ev.DataReceived) == 16000
    credit = FrameReader()
    credit.feed(conn.data_to_send())
    assert credit.credit == {}  # nothing acknowledged: no window back
    conn.acknowledge_received_data(16000, 1)
    credit.feed(conn.data_to_send())
    assert credit.credit.get(1) == 16000  # more than half the stream window: returned
    assert conn.remote_flow_control_window(1) == 20000


def test_peer_overrunning_our_window_gets_its_stream_reset() -> None:
    f = FrameFactory()
    conn = ng_core(False, settings={4: 1000, 3: 10, 2: 0}, window=65535)
    conn.data_to_send()
    got = conn.receive_data(f.preface() + f.settings(ack=True) + f.headers(1, request(b"/", b"POST"))
                            + f.data(1, b"z" * 1000) + f.data(1, b"!"))
    resets = [e for e in got if type(e) is ev.StreamReset]
    assert [(e.stream_id, e.error_code, e.remote_reset) for e in resets] == [
        (1, ErrorCodes.FLOW_CONTROL_ERROR, False)]
    assert ("RST_STREAM", 1, ErrorCodes.FLOW_CONTROL_ERROR) in FrameReader().feed(
        conn.data_to_send())


def test_data_beyond_the_window_is_held_and_trailers_wait_behind_it() -> None:
    conn, f = server_with_window("nghttp2", 1000)
    conn.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    conn.send_data(1, b"m" * 2500)
    conn.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    reader = FrameReader()
    first = [fr for fr in reader.feed(conn.data_to_send()) if fr[1] == 1]
    assert [fr[0] for fr in first] == ["HEADERS", "DATA"] and len(first[1][2]) == 1000
    assert conn.bytes_to_send == 1500  # held by flow control, counted as queued
    conn.receive_data(f.window_update(1, 1000))
    mid = [fr for fr in reader.feed(conn.data_to_send()) if fr[1] == 1]
    assert [fr[0] for fr in mid] == ["DATA"] and len(mid[0][2]) == 1000
    conn.receive_data(f.window_update(1, 5000))
    last = [fr for fr in reader.feed(conn.data_to_send()) if fr[1] == 1]
    assert [fr[0] for fr in last] == ["DATA", "HEADERS"]
    assert len(last[0][2]) == 500 and not last[0][3]
    assert last[1] == ("HEADERS", 1, ((b"grpc-status", b"0"),), True)
    assert conn.bytes_to_send == 0


def test_two_cores_relay_a_body_ten_times_their_window() -> None:
    """In-memory client and server on nghttp2; the server acknowledges what it read,
    so the upload completes only through WINDOW_UPDATEs."""
    client = ng_core(True, settings={2: 0}, window=65535)
    server = ng_core(False, settings={4: 16384, 3: 10, 2: 0}, window=65535)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, request(b"/up", b"POST"))
    body = bytes(range(256)) * 2560  # 640 KiB, ten times the connection window
    sent = got = 0
    received = bytearray()
    rounds = 0
    while got < len(body):
        rounds += 1
        assert rounds < 500
        win = client.local_flow_control_window(sid)
        n = min(win, client.max_outbound_frame_size, len(body) - sent)
        if n:
            client.send_data(sid, body[sent:sent + n], end_stream=sent + n == len(body))
            sent += n
        for e in server.receive_data(client.data_to_send()):
            if type(e) is ev.DataReceived:
                received += e.data
                got += len(e.data)
                server.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        client.receive_data(server.data_to_send())
    assert bytes(received) == body and rounds > 10

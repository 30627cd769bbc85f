"""The nghttp2 core's own surface: requests and responses both ways, trailers, settings,
pings, resets, GOAWAY, stream bookkeeping."""

from __future__ import annotations

import h2.events as ev
import h2.exceptions
import pytest
from h2.errors import ErrorCodes

from gateway.h2core import NgHttp2Connection

from .cores import FrameFactory, FrameReader, h2_core, ng_core, request


def pump(a, b):
    """Exchange bytes until both sides are quiet; return (events of a, events of b)."""
    ea, eb = [], []
    for _ in range(20):
        da, db = a.data_to_send(), b.data_to_send()
        if not da and not db:
            break
        if da:
            eb += b.receive_data(da)
        if db:
            ea += a.receive_data(db)
    return ea, eb


@pytest.mark.parametrize("peer", ["h2", "nghttp2"])
def test_server_core_answers_a_request_with_headers_data_and_trailers(peer: str) -> None:
    server = ng_core(False)
    client = h2_core(True) if peer == "h2" else ng_core(True)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, request(b"/svc/Method", b"POST",
                                     [(b"content-type", b"application/grpc"), (b"te", b"trailers")]))
    client.send_data(sid, b"\x00\x00\x00\x00\x03abc", end_stream=True)
    _, got = pump(client, server)
    types = [type(e) for e in got]
    assert ev.RequestReceived in types and ev.StreamEnded in types
    req = next(e for e in got if type(e) is ev.RequestReceived)
    assert dict(req.headers)[b":path"] == b"/svc/Method"
    body = b"".join(e.data for e in got if type(e) is ev.DataReceived)
    assert body == b"\x00\x00\x00\x00\x03abc"
    server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    server.send_data(sid, b"\x00\x00\x00\x00\x02ok")
    server.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    back, _ = pump(client, server)
    names = [type(e).__name__ for e in back if type(e) not in
             (ev.RemoteSettingsChanged, ev.SettingsAcknowledged, ev.WindowUpdated)]
    assert names == ["ResponseReceived", "DataReceived", "TrailersReceived", "StreamEnded"]
    assert next(e for e in back if type(e) is ev.TrailersReceived).headers == [
        (b"grpc-status", b"0")]
    assert server.open_inbound_streams == 0


def test_client_core_streams_request_body_and_sees_informational_response() -> None:
    client = ng_core(True)
    server = h2_core(False)
    sid = client.get_next_available_stream_id()
    assert sid == 1
    client.send_headers(sid, request(b"/up", b"POST", [(b"expect", b"100-continue")]))
    assert client.local_flow_control_window(sid) == 65535
    client.send_data(sid, b"a" * 1000)
    client.send_data(sid, memoryview(b"b" * 1000)[500:], end_stream=True)
    with pytest.raises(h2.exceptions.StreamClosedError):
        client.send_data(sid, b"late")
    _, got = pump(client, server)
    assert b"".join(e.data for e in got if type(e) is ev.DataReceived) == b"a" * 1000 + b"b" * 500
    server.send_headers(sid, [(b":status", b"100")])
    server.send_headers(sid, [(b":status", b"200")], end_stream=True)
    back, _ = pump(client, server)
    kinds = [type(e) for e in back]
    assert kinds.index(ev.InformationalResponseReceived) < kinds.index(ev.ResponseReceived)
    assert client.get_next_available_stream_id() == 3


def test_reset_from_peer_is_a_stream_reset_and_local_reset_is_silent() -> None:
    server, f = ng_core(False), FrameFactory()
    got = server.receive_data(f.preface() + f.headers(1, request()) + f.headers(3, request())
                              + f.rst(1, ErrorCodes.CANCEL))
    resets = [e for e in got if type(e) is ev.StreamReset]
    assert [(e.stream_id, e.error_code, e.remote_reset) for e in resets] == [
        (1, ErrorCodes.CANCEL, True)]
    server.reset_stream(3, ErrorCodes.REFUSED_STREAM)
    frames = FrameReader().feed(server.data_to_send())
    assert ("RST_STREAM", 3, ErrorCodes.REFUSED_STREAM) in frames
    assert server.receive_data(f.ping()) and server.open_inbound_streams == 0
    with pytest.raises(h2.exceptions.StreamClosedError):
        server.reset_stream(3)


def test_ping_settings_and_goaway_events() -> None:
    server, f = ng_core(False), FrameFactory()
    got = server.receive_data(f.preface({4: 100_000}) + f.ping(b"abcdefgh")
                              + f.settings(ack=True))
    assert [type(e) for e in got] == [ev.RemoteSettingsChanged, ev.PingReceived,
                                      ev.SettingsAcknowledged]
    assert got[1].ping_data == b"abcdefgh"
    assert got[0].changed_settings[4].new_value == 100_000
    assert server.remote_settings.initial_window_size == 100_000
    frames = FrameReader().feed(server.data_to_send())
    assert ("PING", True, b"abcdefgh") in frames and ("SETTINGS_ACK",) in frames
    server.ping(b"87654321")
    assert ("PING", False, b"87654321") in FrameReader().feed(server.data_to_send())
    got = server.receive_data(f.goaway(0, ErrorCodes.NO_ERROR))
    assert [(type(e), e.error_code) for e in got] == [(ev.ConnectionTerminated, 0)]


def test_close_connection_sends_goaway_with_code_and_debug_data() -> None:
    server, f = ng_core(False), FrameFactory()
    server.receive_data(f.preface() + f.headers(1, request(), end=True))
    server.data_to_send()
    server.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, b"bye")
    frames = FrameReader().feed(server.data_to_send())
    assert frames == [("GOAWAY", 1, ErrorCodes.ENHANCE_YOUR_CALM)]


def test_never_indexed_headers_keep_their_flag_across_the_core() -> None:
    from hpack import NeverIndexedHeaderTuple
    client, server = ng_core(True), ng_core(False)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, request(extra=[NeverIndexedHeaderTuple(b"authorization", b"s3")]),
                        end_stream=True)
    _, got = pump(client, server)
    req = next(e for e in got if type(e) is ev.RequestReceived)
    auth = [h for h in req.headers if h[0] == b"authorization"]
    assert auth == [(b"authorization", b"s3")] and type(auth[0]) is NeverIndexedHeaderTuple


def test_server_cannot_open_streams() -> None:
    with pytest.raises(h2.exceptions.ProtocolError):
        NgHttp2Connection(False).get_next_available_stream_id()


def test_a_failing_callback_ends_only_that_connection_with_internal_error(capfd) -> None:
    from gateway.h2core import CoreInternalError
    server, f = ng_core(False), FrameFactory()
    server._st.frames = None  # break the frame counter the frame callback updates
    with pytest.raises(CoreInternalError) as info:
        server.receive_data(f.preface())
    assert info.value.error_code == ErrorCodes.INTERNAL_ERROR
    assert isinstance(info.value.__cause__, TypeError)
    frames = FrameReader().feed(server.data_to_send())
    assert frames[-1][0] == "GOAWAY" and frames[-1][2] == ErrorCodes.INTERNAL_ERROR
    assert "Traceback" not in capfd.readouterr().err
    other = ng_core(False)  # other connections are unaffected
    assert other.receive_data(f.preface())


def test_a_dropped_connection_is_freed_at_once_and_counts_frames() -> None:
    import weakref
    server, f = ng_core(False), FrameFactory()
    server.receive_data(f.preface() + f.ping() + f.ping() + f.headers(1, request(), end=True))
    assert server.frames_received[6] == 2 and server.frames_received[1] == 1
    ref = weakref.ref(server)
    del server  # no reference cycle through the C callbacks: freed without the GC
    assert ref() is None


def test_invalid_configuration_is_refused_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="invalid connection_window"):
        NgHttp2Connection(False, connection_window=2**31)
    with pytest.raises(ValueError, match="invalid HTTP/2 settings"):
        NgHttp2Connection(False, settings={4: 2**31}).initiate_connection()
    with pytest.raises(ValueError, match="invalid flow control increment"):
        ng_core(False).increment_flow_control_window(0)


@pytest.mark.parametrize("trusted", [False, True])
def test_from_limits_configures_a_connection_as_the_gateway_does(trusted: bool) -> None:
    from gateway import Limits
    from gateway.h2core import from_limits
    limits = Limits()
    server = from_limits(False, limits, trusted)
    first = server.data_to_send()
    frames = FrameReader().feed(first)
    assert frames[0] == ("SETTINGS", {3: limits.max_concurrent_streams,
                                      4: limits.initial_stream_window,
                                      6: limits.max_header_list_size, 2: 0,
                                      **({5: limits.peer_max_frame_size} if trusted else {})})
    assert server.inbound_flow_control_window == limits.initial_connection_window
    client = from_limits(True, limits, trusted)
    client.receive_data(first)
    pump(client, server)
    assert server.remote_settings.max_frame_size == (limits.peer_max_frame_size if trusted
                                                     else 16384)
    # Large DATA frames to a peer that allows them (trusted links only).
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, request(b"/", b"POST"))
    client.send_data(sid, b"d" * 100_000, end_stream=True)
    sizes = [len(fr[2]) for fr in FrameReader(expect_preface=False).feed(client.data_to_send())
             if fr[0] == "DATA"]
    assert max(sizes) == (100_000 if trusted else 16384)

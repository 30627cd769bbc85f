"""nghttp2's own abuse protections, as the loaded library exports them, and the one
limit we keep in the core (the received header list size)."""

from __future__ import annotations

import h2.exceptions
import pytest
from h2.errors import ErrorCodes

from gateway.h2core import SessionFlooded, load_library

from .cores import FrameFactory, FrameReader, ng_core, request

LIB = load_library()


def needs(name: str):
    return pytest.mark.skipif(not LIB.protections.get(name),
                              reason=f"libnghttp2 {LIB.version} lacks {name}")


def flooded(conn, data: bytes) -> SessionFlooded:
    with pytest.raises(SessionFlooded) as info:
        conn.receive_data(data)
    return info.value


@needs("stream_reset_rate_limit")
def test_rapid_reset_above_the_rate_limit_ends_the_connection() -> None:
    """CVE-2023-44487: open and reset streams faster than the token bucket refills."""
    conn = ng_core(False, reset_rate_limit=(20, 1))
    f = FrameFactory()
    data = f.preface() + f.settings(ack=True)
    for i in range(40):
        sid = 2 * i + 1
        data += f.headers(sid, request()) + f.rst(sid, ErrorCodes.CANCEL)
    exc = flooded(conn, data)
    assert exc.reason == "rapid_reset"
    goaways = [fr for fr in FrameReader().feed(conn.data_to_send()) if fr[0] == "GOAWAY"]
    assert goaways and goaways[0][2] == ErrorCodes.INTERNAL_ERROR


@needs("stream_reset_rate_limit")
def test_resets_within_the_rate_limit_are_ordinary_stream_resets() -> None:
    conn = ng_core(False, reset_rate_limit=(100, 10))
    f = FrameFactory()
    data = f.preface() + f.settings(ack=True)
    for i in range(40):
        data += f.headers(2 * i + 1, request()) + f.rst(2 * i + 1, ErrorCodes.CANCEL)
    events = conn.receive_data(data)
    assert sum(type(e).__name__ == "StreamReset" for e in events) == 40


@needs("max_continuations")
def test_a_header_block_in_too_many_continuation_frames_ends_the_connection() -> None:
    """CVE-2024-28182: CONTINUATION frames without end."""
    conn = ng_core(False, max_continuations=4)
    f = FrameFactory()
    block = f.preface() + f.settings(ack=True) + f.headers(
        1, request(extra=[(b"x-a", b"v" * 200)]), end=True, split=20)
    exc = flooded(conn, block)
    assert exc.reason == "header_block_too_large"
    assert exc.error_code == ErrorCodes.ENHANCE_YOUR_CALM


@needs("max_outbound_ack")
def test_pings_whose_acks_pile_up_unread_end_the_connection() -> None:
    conn = ng_core(False, max_outbound_ack=50)
    f = FrameFactory()
    exc = flooded(conn, f.preface() + f.settings(ack=True) + f.ping() * 200)
    assert exc.reason == "control_frame_flood"
    frames = FrameReader().feed(conn.data_to_send())
    assert frames[-1][0] == "GOAWAY" and frames[-1][2] == ErrorCodes.ENHANCE_YOUR_CALM


@needs("max_settings")
def test_a_settings_frame_with_too_many_entries_ends_the_connection() -> None:
    conn = ng_core(False, max_settings=4)
    f = FrameFactory()
    many = {1: 4096, 3: 100, 4: 65535, 5: 16384, 6: 8192, 8: 0}
    exc = flooded(conn, f.preface(many))
    assert exc.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_a_header_list_over_the_limit_ends_the_connection_as_on_h2() -> None:
    conn = ng_core(False, max_header_list_size=2000)
    f = FrameFactory()
    exc = flooded(conn, f.preface() + f.settings(ack=True)
                  + f.headers(1, request(extra=[(b"x-big", b"v" * 3000)]), end=True))
    assert exc.reason == "header_block_too_large"
    frames = FrameReader().feed(conn.data_to_send())
    assert [fr[2] for fr in frames if fr[0] == "GOAWAY"] == [ErrorCodes.ENHANCE_YOUR_CALM]
    with pytest.raises(SessionFlooded):  # the session stays ended
        conn.receive_data(f.ping())


def test_a_header_list_within_the_limit_passes() -> None:
    conn = ng_core(False, max_header_list_size=8000)
    f = FrameFactory()
    events = conn.receive_data(f.preface() + f.settings(ack=True)
                               + f.headers(1, request(extra=[(b"x-big", b"v" * 3000)]), end=True))
    assert any(type(e).__name__ == "RequestReceived" for e in events)


def test_streams_over_max_concurrent_streams_are_refused() -> None:
    """Before the client acknowledged our SETTINGS, an extra stream is refused alone;
    after, nghttp2 treats it as the connection error RFC 9113 §5.1.2 allows."""
    conn = ng_core(False, settings={3: 2, 4: 65535, 2: 0})
    f = FrameFactory()
    events = conn.receive_data(f.preface() + f.headers(1, request()) + f.headers(3, request())
                               + f.headers(5, request()))
    assert [e.stream_id for e in events if type(e).__name__ == "RequestReceived"] == [1, 3]
    assert ("RST_STREAM", 5, ErrorCodes.REFUSED_STREAM) in FrameReader().feed(conn.data_to_send())
    with pytest.raises(h2.exceptions.ProtocolError) as info:
        conn.receive_data(f.settings(ack=True) + f.headers(7, request()))
    assert info.value.error_code == ErrorCodes.PROTOCOL_ERROR


@needs("stream_reset_rate_limit")
def test_the_library_limits_rapid_reset_by_default() -> None:
    """The installed build carries the CVE-2023-44487 fix with upstream's defaults
    (a burst of 1000 resets, then 33 per second) even when no option is set."""
    conn = ng_core(False)
    f = FrameFactory()
    data = f.preface() + f.settings(ack=True)
    for i in range(1200):
        data += f.headers(2 * i + 1, request()) + f.rst(2 * i + 1, ErrorCodes.CANCEL)
    exc = flooded(conn, data)
    assert exc.reason == "rapid_reset"

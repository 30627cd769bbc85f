"""Frame-level garbage gets GOAWAY with the error code RFC 9113 names, on both cores.

Each case is a client's bytes after a valid preface (or instead of one).  Where h2 and
nghttp2 disagree the RFC decides, and the test pins both answers so a change in either
library shows up here.
"""

from __future__ import annotations

import h2.exceptions
import pytest
from h2.errors import ErrorCodes as E

from .cores import FrameFactory, FrameReader, request
from .replay import MAKERS

F = FrameFactory()
P = F.preface() + F.settings(ack=True)


def raw(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") \
        + payload


def hdr(sid: int, end: bool = True) -> bytes:
    return FrameFactory().headers(sid, request(), end=end)


# name -> (bytes, code RFC 9113 requires, h2's code where it differs)
CASES = {
    "frame larger than SETTINGS_MAX_FRAME_SIZE":
        (P + hdr(1, end=False) + raw(0, 0, 1, b"x" * 20000), E.FRAME_SIZE_ERROR, None),
    "DATA on stream 0": (P + raw(0, 0, 0, b"abc"), E.PROTOCOL_ERROR, None),
    "HEADERS on stream 0": (P + raw(1, 4, 0, b"\x82"), E.PROTOCOL_ERROR, None),
    "SETTINGS length not a multiple of 6": (P + raw(4, 0, 0, b"\0" * 5), E.FRAME_SIZE_ERROR, None),
    "SETTINGS on a stream": (P + raw(4, 0, 1, b""), E.PROTOCOL_ERROR, None),
    "SETTINGS_ENABLE_PUSH=2": (P + F.settings({2: 2}), E.PROTOCOL_ERROR, None),
    "SETTINGS_INITIAL_WINDOW_SIZE=2^31":
        (P + raw(4, 0, 0, b"\x00\x04\x80\x00\x00\x00"), E.FLOW_CONTROL_ERROR, None),
    "SETTINGS_MAX_FRAME_SIZE=100": (P + raw(4, 0, 0, b"\x00\x05\x00\x00\x00\x64"),
                                    E.PROTOCOL_ERROR, None),
    "SETTINGS ACK with a payload": (P + raw(4, 1, 0, b"\0" * 6), E.FRAME_SIZE_ERROR,
                                    E.PROTOCOL_ERROR),
    "PING of 7 bytes": (P + raw(6, 0, 0, b"\0" * 7), E.FRAME_SIZE_ERROR, None),
    "PING on a stream": (P + raw(6, 0, 1, b"\0" * 8), E.PROTOCOL_ERROR, None),
    "connection window above 2^31-1": (P + F.window_update(0, 2**31 - 1),
                                       E.FLOW_CONTROL_ERROR, None),
    "WINDOW_UPDATE of 3 bytes": (P + raw(8, 0, 0, b"\0" * 3), E.FRAME_SIZE_ERROR, None),
    "WINDOW_UPDATE of 0 on the connection": (P + F.window_update(0, 0), E.PROTOCOL_ERROR, None),
    "undecodable HPACK block": (P + raw(1, 5, 1, b"\xff\xff\xff\xff\xff"), E.COMPRESSION_ERROR,
                                E.PROTOCOL_ERROR),
    "CONTINUATION without HEADERS": (P + raw(9, 4, 1, b"\x82"), E.PROTOCOL_ERROR, None),
    "DATA inside a header block": (P + raw(1, 0, 1, b"\x82") + raw(0, 0, 1, b"x"),
                                   E.PROTOCOL_ERROR, None),
    "client opens an even stream": (P + hdr(2), E.PROTOCOL_ERROR, None),
    "RST_STREAM on an idle stream": (P + F.rst(7), E.PROTOCOL_ERROR, None),
    "RST_STREAM of 3 bytes": (P + hdr(1, end=False) + raw(3, 0, 1, b"\0\0\0"),
                              E.FRAME_SIZE_ERROR, None),
    "PRIORITY of 4 bytes": (P + raw(2, 0, 1, b"\0" * 4), E.FRAME_SIZE_ERROR, None),
    "PUSH_PROMISE from a client": (P + hdr(1, end=False) + raw(5, 4, 1, b"\0\0\0\x02\x82"),
                                   E.PROTOCOL_ERROR, None),
    "GOAWAY on a stream": (P + raw(7, 0, 1, b"\0" * 8), E.PROTOCOL_ERROR, None),
    "DATA on an idle stream": (P + raw(0, 0, 3, b"x"), E.PROTOCOL_ERROR, None),
    "WINDOW_UPDATE on an idle stream": (P + F.window_update(9, 10), E.PROTOCOL_ERROR, None),
    "stream depends on itself": (P + F.priority(1, 1), E.PROTOCOL_ERROR, None),
}


def goaway_after(core: str, data: bytes) -> tuple[int | None, int | None]:
    """(code of the ProtocolError raised, code of the GOAWAY queued)."""
    conn = MAKERS[core](False)
    conn.data_to_send()
    raised = None
    try:
        conn.receive_data(data)
    except h2.exceptions.ProtocolError as exc:
        raised = int(exc.error_code)
    goaways = [fr for fr in FrameReader().feed(conn.data_to_send()) if fr[0] == "GOAWAY"]
    return raised, (goaways[-1][2] if goaways else None)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("core", ["h2", "nghttp2"])
def test_garbage_frames_get_goaway_with_the_rfc_error_code(core: str, case: str) -> None:
    data, rfc, h2_code = CASES[case]
    want = rfc if core == "nghttp2" or h2_code is None else h2_code
    assert goaway_after(core, data) == (want, want)


def test_a_client_that_is_not_speaking_http2_is_refused() -> None:
    junk = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 30
    # nghttp2 says why in a GOAWAY; h2 raises without one (RFC 9113 §3.4 allows both).
    assert goaway_after("nghttp2", junk) == (E.PROTOCOL_ERROR, E.PROTOCOL_ERROR)
    assert goaway_after("h2", junk) == (E.PROTOCOL_ERROR, None)


def test_where_the_cores_choose_differently_within_the_rfc() -> None:
    # DATA after END_STREAM: RFC 9113 §5.1 asks for a stream error; h2 resets the
    # stream, nghttp2 closes the connection (stricter).
    late = P + hdr(1) + raw(0, 0, 1, b"x")
    assert goaway_after("nghttp2", late) == (E.STREAM_CLOSED, E.STREAM_CLOSED)
    h2_conn = MAKERS["h2"](False)
    h2_conn.data_to_send()
    h2_conn.receive_data(late)
    assert ("RST_STREAM", 1, E.STREAM_CLOSED) in FrameReader().feed(h2_conn.data_to_send())
    # A new stream numbered below one already open: h2 fails the connection as §5.1.1
    # says; nghttp2 ignores the header block (it does not remember every closed stream).
    f2 = FrameFactory()
    backwards = P + f2.headers(5, request(), end=True) + f2.headers(3, request(), end=True)
    assert goaway_after("h2", backwards) == (E.PROTOCOL_ERROR, E.PROTOCOL_ERROR)
    ng = MAKERS["nghttp2"](False)
    events = ng.receive_data(backwards)
    assert [e.stream_id for e in events if type(e).__name__ == "RequestReceived"] == [5]

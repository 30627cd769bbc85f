"""Sans-IO tests of the abuse rules (gateway/_frames.py, gateway/_abuse.py): a real server
connection of each HTTP/2 core (h2, and nghttp2 as the gateway builds it) with a
FrameGuard installed, fed bytes built with hyperframe/hpack, and an injected clock.  The
rules and their figures are the same on both cores."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame,
                              PriorityFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame)

from gateway import GatewayConfig
from gateway._abuse import MemoryWatch, Shield
from gateway._frames import FrameGuard
from gateway._config import Limits
from gateway.h2core import from_limits

CORES = ["h2", "nghttp2"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REQ = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=CORES)
def core(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def server(core: str = "h2", **limits: object) -> tuple[Any, FrameGuard, Clock]:
    lim = Limits(**limits)
    if core == "nghttp2":
        conn = from_limits(False, lim, trusted=False)
    else:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                     header_encoding=None))
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: lim.max_concurrent_streams})
        conn.initiate_connection()
    conn.data_to_send()
    clock = Clock()
    guard = FrameGuard(lim, clock)
    guard.install(conn)
    conn.receive_data(PREFACE + SettingsFrame(0).serialize())
    return conn, guard, clock


def headers(sid: int, enc: hpack.Encoder, end_stream: bool = True) -> bytes:
    f = HeadersFrame(sid, enc.encode(REQ))
    f.flags.add("END_HEADERS")
    if end_stream:
        f.flags.add("END_STREAM")
    return f.serialize()


def rst(sid: int) -> bytes:
    return RstStreamFrame(sid, error_code=ErrorCodes.CANCEL).serialize()


def frames(data: bytes) -> list:
    out, i = [], 0
    while i + 9 <= len(data):
        f, length = Frame.parse_frame_header(memoryview(data[i:i + 9]))
        f.parse_body(memoryview(data[i + 9:i + 9 + length]))
        out.append(f)
        i += 9 + length
    return out


def goaway_code(conn: h2.connection.H2Connection) -> int | None:
    for f in frames(conn.data_to_send()):
        if isinstance(f, GoAwayFrame):
            return f.error_code
    return None


def test_rapid_reset_closes_at_the_envoy_threshold(core: str) -> None:
    conn, guard, clock = server(core, premature_reset_total_stream_count=100)
    enc = hpack.Encoder()
    sid = 1
    for _ in range(99):
        conn.receive_data(headers(sid, enc) + rst(sid))
        sid += 2
    assert guard.violation is None and guard.premature == 99
    with pytest.raises(h2.exceptions.DenialOfServiceError):
        conn.receive_data(headers(sid, enc) + rst(sid))
    assert guard.violation.reason == "rapid_reset"
    assert goaway_code(conn) == ErrorCodes.ENHANCE_YOUR_CALM


def test_resets_of_mature_streams_and_mostly_completed_connections_are_fine(core: str) -> None:
    conn, guard, clock = server(core, premature_reset_total_stream_count=100)
    enc = hpack.Encoder()
    sid = 1
    # 300 streams; 40% cancelled at once (a client hedging), the rest run their course.
    for i in range(300):
        conn.receive_data(headers(sid, enc, end_stream=False))
        if i % 5 < 2:
            conn.receive_data(rst(sid))
        else:
            conn.send_headers(sid, [(b":status", b"200")], end_stream=True)
            conn.receive_data(DataFrame(sid, b"", flags=["END_STREAM"]).serialize())
        sid += 2
    # Cancelled after the minimum lifetime: not premature.
    opened = []
    for _ in range(300):
        conn.receive_data(headers(sid, enc, end_stream=False))
        opened.append(sid)
        sid += 2
    clock.t += 2
    for s in opened:
        conn.receive_data(rst(s))
    assert guard.violation is None
    assert guard.opened == 600 and guard.premature == 120


@pytest.mark.parametrize("frame", [
    PingFrame(0, opaque_data=b"12345678"),
    SettingsFrame(0),
    PriorityFrame(1, depends_on=0, stream_weight=16),
    DataFrame(1, b""),  # empty DATA without END_STREAM
], ids=["ping", "settings", "priority", "empty-data"])
def test_control_frame_flood_is_capped_per_second(frame, core: str) -> None:
    conn, guard, clock = server(core, max_control_frames_per_second=50)
    enc = hpack.Encoder()
    conn.receive_data(headers(1, enc, end_stream=False))
    wire = frame.serialize()
    conn.receive_data(wire * 49)
    clock.t += 1.0  # a new window: the count starts again
    conn.receive_data(wire * 50)
    assert guard.violation is None
    with pytest.raises(h2.exceptions.DenialOfServiceError):
        conn.receive_data(wire)
    assert guard.violation.reason == "control_frame_flood"
    assert goaway_code(conn) == ErrorCodes.ENHANCE_YOUR_CALM


def test_window_update_flood_has_its_own_budget(core: str) -> None:
    conn, guard, clock = server(core, max_window_updates_per_second=100,
                                max_control_frames_per_second=10)
    wire = WindowUpdateFrame(0, window_increment=1).serialize()
    conn.receive_data(wire * 100)
    with pytest.raises(h2.exceptions.DenialOfServiceError):
        conn.receive_data(wire)
    assert guard.violation.reason == "window_update_flood"


def test_extra_stream_is_refused_alone(core: str) -> None:
    conn, guard, clock = server(core, max_concurrent_streams=2)
    enc = hpack.Encoder()
    ev = conn.receive_data(headers(1, enc, False) + headers(3, enc, False) + headers(5, enc, False))
    assert [e.stream_id for e in ev if isinstance(e, h2.events.RequestReceived)] == [1, 3]
    resets = [f for f in frames(conn.data_to_send()) if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in resets] == [(5, ErrorCodes.REFUSED_STREAM)]
    assert guard.refused == 1 and guard.violation is None
    # Streams 1 and 3 live on; once one ends, a new stream is accepted.
    conn.send_headers(1, [(b":status", b"200")], end_stream=True)
    conn.receive_data(DataFrame(1, b"", flags=["END_STREAM"]).serialize())
    ev = conn.receive_data(headers(7, enc))
    assert any(isinstance(e, h2.events.RequestReceived) and e.stream_id == 7 for e in ev)


def test_oversized_header_block_is_refused_before_h2_buffers_it_all(core: str) -> None:
    conn, guard, clock = server(core, max_header_list_size=4096)
    block = hpack.Encoder().encode(REQ + [(b"x-%d" % i, b"v" * 90) for i in range(120)],
                                   huffman=False)
    conn.receive_data(HeadersFrame(1, block[:1000]).serialize())
    assert guard.deadline == clock.t + 10  # a header block is in progress
    with pytest.raises(h2.exceptions.DenialOfServiceError) as info:
        for i in range(1000, len(block), 1000):
            conn.receive_data(ContinuationFrame(1, block[i:i + 1000]).serialize())
    # The guard's cap on the block, or (nghttp2, which decodes as it goes) the core's on
    # the decoded list, whichever is reached first: the same reason and GOAWAY.
    assert info.value.reason == "header_block_too_large"
    assert goaway_code(conn) == ErrorCodes.ENHANCE_YOUR_CALM


def test_headers_deadline_follows_the_connection_state(core: str) -> None:
    conn, guard, clock = server(core, request_headers_timeout=5)
    assert guard.deadline == 105.0  # first request headers due
    enc = hpack.Encoder()
    conn.receive_data(headers(1, enc))
    assert guard.deadline == float("inf")
    clock.t = 200.0
    block = HeadersFrame(3, enc.encode(REQ))
    wire = block.serialize()
    conn.receive_data(wire[:12])  # a partial HEADERS frame counts as a block in progress
    assert guard.deadline == 205.0
    conn.receive_data(wire[12:] + ContinuationFrame(3, b"", flags=["END_HEADERS"]).serialize())
    assert guard.deadline == float("inf")
    assert guard.headers_timed_out().reason == "headers_timeout"


def test_extra_stream_after_settings_ack_is_refused_alone(core: str) -> None:
    """Once the client acknowledged MAX_CONCURRENT_STREAMS, nghttp2 alone would end the
    connection for an extra stream (h2 too): the guard's rule refuses that stream only."""
    conn, guard, clock = server(core, max_concurrent_streams=2)
    sent = frames(conn.data_to_send() if core == "h2" else b"")
    enc = hpack.Encoder()
    conn.receive_data(SettingsFrame(0, flags=["ACK"]).serialize())
    ev = conn.receive_data(headers(1, enc, False) + headers(3, enc, False) + headers(5, enc, False))
    assert [e.stream_id for e in ev if isinstance(e, h2.events.RequestReceived)] == [1, 3]
    out = frames(conn.data_to_send())
    assert [(f.stream_id, f.error_code) for f in out if isinstance(f, RstStreamFrame)] == [
        (5, ErrorCodes.REFUSED_STREAM)]
    assert not [f for f in sent + out if isinstance(f, GoAwayFrame)]
    assert guard.refused == 1 and guard.violation is None


def test_nghttp2_advertises_the_limit_it_refuses_at() -> None:
    """nghttp2 is told no limit (so it never ends the connection for one); the SETTINGS
    frame on the wire carries the real one."""
    lim = Limits(max_concurrent_streams=7)
    conn = from_limits(False, lim, trusted=False)
    settings = [f for f in frames(conn.data_to_send()) if isinstance(f, SettingsFrame)]
    assert settings[0].settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == 7


def test_frames_split_across_reads_count_as_whole_frames(core: str) -> None:
    """Frame headers and payloads cut at every byte still count as whole frames."""
    conn, guard, clock = server(core, max_control_frames_per_second=21)  # + client SETTINGS
    enc = hpack.Encoder()
    wire = headers(1, enc, end_stream=False) + PingFrame(0, opaque_data=b"12345678").serialize() * 20
    for i in range(len(wire)):
        conn.receive_data(wire[i:i + 1])
    assert guard.violation is None and guard.deadline == float("inf")
    with pytest.raises(h2.exceptions.DenialOfServiceError):
        conn.receive_data(b"\x00\x00\x00\xfa\x00\x00\x00\x00\x00")  # an unknown type counts
    assert guard.violation.reason == "control_frame_flood"
    assert goaway_code(conn) == ErrorCodes.ENHANCE_YOUR_CALM


def test_memory_watch_and_shield_counts() -> None:
    rss = [100]
    watch = MemoryWatch(150, sample=lambda: rss[0])
    assert not watch.check()
    rss[0] = 200
    assert watch.check() and watch.overloaded
    assert not MemoryWatch(0, sample=lambda: 10**12).check()  # 0: no ceiling

    class Counter:
        def __init__(self) -> None:
            self.n: dict[str, int] = {}

        def labels(self, limit: str) -> "Counter":
            self.last = limit
            return self

        def inc(self) -> None:
            self.n[self.last] = self.n.get(self.last, 0) + 1

    c = Counter()
    shield = Shield(GatewayConfig().limits.model_copy(update={"max_connections_per_ip": 2,
                                                               "max_memory_bytes": 0}), c)
    assert shield.accept("10.0.0.1") and shield.accept("10.0.0.1")
    assert not shield.accept("10.0.0.1") and shield.accept("10.0.0.2")
    shield.release("10.0.0.1")
    assert shield.accept("10.0.0.1")
    assert c.n == {"connections_per_ip": 1}


def test_limits_are_validated_with_field_paths() -> None:
    from gateway import ConfigError, parse_config

    with pytest.raises(ConfigError, match="limits.max_control_frames_per_second"):
        parse_config({"limits": {"max_control_frames_per_second": 0}})
    cfg = parse_config({"limits": {"premature_reset_total_stream_count": 200,
                                   "max_memory_bytes": 512 << 20}})
    assert cfg.limits.premature_reset_total_stream_count == 200

"""Hypothesis-generated frame sequences (built with hyperframe and hpack, the libraries
h2 itself uses) fed to both server cores.

Valid sequences — requests with bodies, trailers, CONTINUATION, padding, resets, window
updates, pings, settings and priority, cut at arbitrary byte boundaries — must give the
same events and frames on both cores.  Arbitrary frames must never raise anything but
a ProtocolError, and a ProtocolError always leaves a GOAWAY to send.
"""

from __future__ import annotations

import h2.exceptions
import hyperframe.frame as hf
from hypothesis import HealthCheck, given, settings, strategies as st

from .cores import PREFACE, FrameFactory, FrameReader, request
from .replay import MAKERS, replay
from .test_differential import assert_equivalent

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
VALUE = st.binary(min_size=0, max_size=40).map(
    lambda b: bytes(0x21 + (c % 94) for c in b))  # visible ASCII, no edge whitespace
EXTRA = st.lists(st.tuples(TOKEN.map(lambda t: b"x-" + t.encode()), VALUE), max_size=6)


@st.composite
def valid_session(draw: st.DrawFn) -> list[bytes]:
    """A client's bytes: preface, then actions that keep every stream in a legal state."""
    f = FrameFactory()
    out = [f.preface({4: draw(st.integers(65535, 1 << 20))}), f.settings(ack=True)]
    next_sid = 1
    open_: dict[int, int] = {}  # client-open stream -> bytes sent on it
    used: list[int] = []
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["open", "open", "data", "data", "trailers", "rst",
                                     "window", "ping", "settings", "priority"]))
        if kind == "open" and next_sid < 200:
            sid, next_sid = next_sid, next_sid + 2
            method = draw(st.sampled_from([b"GET", b"POST"]))
            size = draw(st.integers(0, 70_000))
            end = draw(st.booleans())
            headers = request(b"/size/%d" % size, method, draw(EXTRA))
            out.append(f.headers(sid, headers, end=end, split=draw(st.sampled_from([0, 20]))))
            used.append(sid)
            if not end:
                open_[sid] = 0
        elif kind == "data" and open_:
            sid = draw(st.sampled_from(sorted(open_)))
            n = draw(st.integers(0, min(16000, 60_000 - open_[sid])))
            pad = draw(st.sampled_from([0, 0, 7]))
            end = draw(st.booleans())
            out.append(f.data(sid, draw(st.binary(min_size=n, max_size=n)), end=end, pad=pad))
            open_[sid] += n
            if end:
                del open_[sid]
        elif kind == "trailers" and open_:
            sid = draw(st.sampled_from(sorted(open_)))
            out.append(f.headers(sid, [(b"x-checksum", draw(VALUE) or b"0")], end=True))
            del open_[sid]
        elif kind == "rst" and used:
            sid = draw(st.sampled_from(used))
            if sid in open_ or draw(st.booleans()):
                out.append(f.rst(sid, draw(st.sampled_from([0, 2, 8]))))
                open_.pop(sid, None)
        elif kind == "window":
            sid = draw(st.sampled_from([0] + sorted(open_)))
            out.append(f.window_update(sid, draw(st.integers(1, 100_000))))
        elif kind == "ping":
            out.append(f.ping(draw(st.binary(min_size=8, max_size=8))))
        elif kind == "settings":
            values = draw(st.dictionaries(
                st.sampled_from([1, 3, 4, 5, 6]), st.integers(0, 1 << 20), max_size=3))
            if 5 in values:
                values[5] = max(16384, values[5])
            out.append(f.settings(values))
        elif kind == "priority":
            sid = draw(st.integers(1, 60).map(lambda x: 2 * x + 1))
            dep = draw(st.integers(0, 5).map(lambda x: 2 * x + 1))
            if dep != sid:
                out.append(f.priority(sid, dep, draw(st.integers(0, 255))))
    if draw(st.booleans()):
        out.append(f.goaway(0))  # a client names server-initiated streams: none
    return out


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    out, i = [], 0
    for s in sizes:
        if i >= len(data):
            break
        out.append(data[i:i + s])
        i += s
    if i < len(data):
        out.append(data[i:])
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_session(), st.lists(st.integers(1, 3000), max_size=30))
def test_generated_valid_sequences_are_equivalent_on_both_cores(frames: list[bytes],
                                                               sizes: list[int]) -> None:
    reads = cut(b"".join(frames), sizes)
    assert_equivalent(replay("h2", reads), replay("nghttp2", reads))


FRAME = st.one_of(
    st.builds(lambda sid, data, flags: _raw(0, flags, sid, data),
              st.integers(0, 9), st.binary(max_size=40), st.integers(0, 255)),
    st.builds(lambda t, flags, sid, data: _raw(t, flags, sid, data),
              st.integers(0, 12), st.integers(0, 255), st.integers(0, 9),
              st.binary(max_size=30)),
)


def _raw(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") \
        + payload


@settings(max_examples=300, deadline=None)
@given(st.lists(FRAME, min_size=1, max_size=8), st.booleans())
def test_arbitrary_frames_end_in_goaway_or_are_accepted_on_both_cores(
        frames: list[bytes], with_request: bool) -> None:
    f = FrameFactory()
    head = f.preface() + (f.headers(1, request()) if with_request else b"")
    for core in MAKERS:
        conn = MAKERS[core](False)
        conn.data_to_send()
        try:
            conn.receive_data(head + b"".join(frames))
        except h2.exceptions.ProtocolError as exc:
            out = FrameReader().feed(conn.data_to_send())
            goaways = [fr for fr in out if fr[0] == "GOAWAY"]
            assert goaways, (core, exc)
            assert goaways[-1][2] == int(exc.error_code), (core, exc, goaways)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_garbage_after_the_preface_never_escapes_as_another_exception(junk: bytes) -> None:
    for core in MAKERS:
        conn = MAKERS[core](False)
        try:
            conn.receive_data(PREFACE + hf.SettingsFrame(0).serialize() + junk)
        except h2.exceptions.ProtocolError:
            assert any(fr[0] == "GOAWAY" for fr in FrameReader().feed(conn.data_to_send()))

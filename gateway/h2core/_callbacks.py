"""The C callbacks of one nghttp2 session and the state they share with the connection.

Every callback is a Python function libffi calls from inside ``mem_recv``/``mem_send``;
each crossing costs far more than the Python it runs, so there are as few as the API
allows: per received header block one ``on_begin_headers``, one ``on_header`` per field
(nghttp2 has no call that hands over a whole block) and one ``on_frame_recv``; per DATA
chunk one ``on_data_chunk_recv``; per DATA frame sent one read callback; per stream one
``on_stream_close``.  The closures hold only a :class:`CallbackState`, never the
connection, so a dropped connection is freed at once (no reference cycle).
"""

from __future__ import annotations

from typing import Any

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    PingAckReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    SettingsAcknowledged,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.settings import ChangedSetting, SettingCodes
from hpack import NeverIndexedHeaderTuple

from . import _ffi
from ._errors import SessionFlooded
from ._ffi import Library

try:  # cffi's C module: calling it directly skips a Python wrapper on every header
    from _cffi_backend import unpack as _unpack
except ImportError:  # pragma: no cover - other cffi backends
    _unpack = None

Headers = list[tuple[bytes, bytes]]

# h2's events are built without their __init__ (attributes set directly): the same on
# h2 releases whose events are plain classes and on those where they are dataclasses.
_NEW = object.__new__
# RFC 9113 §6.5.2 initial values, for RemoteSettingsChanged.original_value.
SETTING_DEFAULTS = {
    SettingCodes.HEADER_TABLE_SIZE: 4096,
    SettingCodes.ENABLE_PUSH: 1,
    SettingCodes.MAX_CONCURRENT_STREAMS: None,
    SettingCodes.INITIAL_WINDOW_SIZE: 65535,
    SettingCodes.MAX_FRAME_SIZE: 16384,
    SettingCodes.MAX_HEADER_LIST_SIZE: None,
    SettingCodes.ENABLE_CONNECT_PROTOCOL: 0,
}


class CallbackState:
    """What the C callbacks share with the connection (kept apart to avoid a cycle)."""

    __slots__ = ("events", "hdrs", "hsize", "hlimit", "cat", "client", "open", "ended",
                 "local_reset", "reported", "expect_final", "out", "goaway_recv",
                 "remote", "pending_local", "frame_max", "fail", "error", "frames", "held",
                 "stream_cap", "refused")

    def __init__(self, client: bool, hlimit: int) -> None:
        self.events: list[Any] = []
        self.hdrs: Headers = []
        self.hsize = 0
        self.hlimit = hlimit
        self.cat = 0
        self.client = client
        self.open: set[int] = set()  # streams nghttp2 has not closed yet
        self.ended: set[int] = set()  # streams we sent END_STREAM on
        self.local_reset: set[int] = set()
        self.reported: set[int] = set()  # StreamReset already emitted
        self.expect_final: set[int] = set()  # client streams that got a 1xx only
        # stream id -> [chunks, end_stream, trailers nva or None] for the data provider
        self.out: dict[int, list[Any]] = {}
        self.goaway_recv = False
        self.remote: dict[int, int | None] = dict(SETTING_DEFAULTS)
        self.pending_local: list[dict[int, int]] = []
        self.frame_max = 16384
        self.fail: SessionFlooded | None = None  # set by a callback that failed on purpose
        self.error: BaseException | None = None  # a callback's unexpected exception
        self.frames = [0] * 10  # frames received by type (abuse counters)
        self.held = 0  # DATA bytes given to send_data and not yet serialised
        # Server sessions: requests beyond this many open streams are refused one by one
        # (REFUSED_STREAM) instead of nghttp2's connection error; 0 leaves it to nghttp2.
        self.stream_cap = 0
        self.refused = 0  # streams refused for stream_cap


def drop_out(st: CallbackState, sid: int) -> None:
    item = st.out.pop(sid, None)
    if item is not None:
        st.held -= sum(len(c) for c in item[0])



def make_callbacks(L: Library, st: CallbackState) -> dict[str, Any]:
    """The C callbacks of one connection, as closures over its :class:`CallbackState`."""
    ffi, lib = L.ffi, L.lib
    unpack = _unpack or ffi.unpack
    memmove = ffi.memmove
    FAIL = _ffi.NGHTTP2_ERR_CALLBACK_FAILURE

    def onerror(exc_type: Any, exc: BaseException, tb: Any) -> None:
        if st.error is None:
            st.error = exc

    def cb(ctype: str, fn: Any) -> Any:
        return ffi.callback(ctype, fn, error=FAIL, onerror=onerror)

    def on_begin_headers(session: Any, frame: Any, ud: Any) -> int:
        st.hdrs = []
        st.hsize = 0
        cat = st.cat = frame.headers.cat
        if cat == 0:  # a request opens the stream
            sid = frame.hd.stream_id
            if st.stream_cap and len(st.open) >= st.stream_cap:
                # Over our advertised MAX_CONCURRENT_STREAMS: refuse this stream alone.
                # nghttp2 still decodes the block (HPACK state stays in step, and the
                # header-list cap still applies); its events are dropped.
                lib.nghttp2_submit_rst_stream(session, 0, sid, ErrorCodes.REFUSED_STREAM)
                st.local_reset.add(sid)
                st.refused += 1
                st.cat = -1
                return 0
            st.open.add(sid)
        return 0

    def on_header(session: Any, frame: Any, name: Any, nlen: int, value: Any, vlen: int,
                  flags: int, ud: Any) -> int:
        if flags & 1:
            st.hdrs.append(NeverIndexedHeaderTuple(unpack(name, nlen), unpack(value, vlen)))
        else:
            st.hdrs.append((unpack(name, nlen), unpack(value, vlen)))
        size = st.hsize = st.hsize + nlen + vlen + 32
        if size > st.hlimit:
            st.fail = SessionFlooded("header_block_too_large",
                                     f"header list larger than {st.hlimit} bytes")
            return FAIL
        return 0

    def on_chunk(session: Any, flags: int, sid: int, data: Any, n: int, ud: Any) -> int:
        e = _NEW(DataReceived)
        e.stream_id = sid
        e.data = unpack(data, n)
        e.flow_controlled_length = n
        e.stream_ended = None
        st.events.append(e)
        return 0

    def on_frame(session: Any, frame: Any, ud: Any) -> int:
        hd = frame.hd
        t = hd.type
        if t < 10:
            st.frames[t] += 1
        events = st.events
        if t == 1:  # HEADERS
            sid = hd.stream_id
            cat = st.cat
            if cat < 0:
                return 0  # a refused stream
            hdrs = st.hdrs
            if cat == 0:
                e = _NEW(RequestReceived)
            elif cat == 3 and not (st.client and sid in st.expect_final):
                e = _NEW(TrailersReceived)
            elif _informational(hdrs):
                e = _NEW(InformationalResponseReceived)
                st.expect_final.add(sid)
            else:
                e = _NEW(ResponseReceived)
                st.expect_final.discard(sid)
            e.stream_id = sid
            e.headers = hdrs
            e.priority_updated = None
            if hd.flags & 0x20:
                e.priority_updated = _priority(sid, frame.headers.pri_spec)
            events.append(e)
            if hd.flags & 1:
                end = _NEW(StreamEnded)
                end.stream_id = sid
                e.stream_ended = end
                events.append(end)
            elif type(e) is not InformationalResponseReceived:
                e.stream_ended = None
            return 0
        if t == 0:  # DATA: chunks were reported already
            if hd.flags & 1:
                sid = hd.stream_id
                end = _NEW(StreamEnded)
                end.stream_id = sid
                if events:
                    last = events[-1]
                    if type(last) is DataReceived and last.stream_id == sid:
                        last.stream_ended = end
                events.append(end)
            return 0
        if t == 3:  # RST_STREAM
            sid = hd.stream_id
            if sid not in st.open:
                return 0  # already closed: nothing to tell (h2 is silent too)
            e = _NEW(StreamReset)
            e.stream_id = sid
            e.error_code = _error_code(frame.rst_stream.error_code)
            e.remote_reset = True
            st.reported.add(sid)
            events.append(e)
        elif t == 8:  # WINDOW_UPDATE
            e = _NEW(WindowUpdated)
            e.stream_id = hd.stream_id
            e.delta = frame.window_update.window_size_increment
            events.append(e)
        elif t == 4:  # SETTINGS
            if hd.flags & 1:
                e = SettingsAcknowledged()
                acked = st.pending_local.pop(0) if st.pending_local else {}
                for k, v in acked.items():
                    code = _setting_code(k)
                    e.changed_settings[code] = ChangedSetting(code, None, v)
            else:
                e = RemoteSettingsChanged()
                iv = frame.settings.iv
                for i in range(frame.settings.niv):
                    code = _setting_code(iv[i].settings_id)
                    new = int(iv[i].value)
                    e.changed_settings[code] = ChangedSetting(code, st.remote.get(code), new)
                    st.remote[code] = new
                st.frame_max = int(lib.nghttp2_session_get_remote_settings(
                    session, SettingCodes.MAX_FRAME_SIZE))
            events.append(e)
        elif t == 6:  # PING
            data = bytes(ffi.buffer(frame.ping.opaque_data, 8))
            if hd.flags & 1:
                e = _NEW(PingAckReceived)
            else:
                e = _NEW(PingReceived)
            e.ping_data = data
            events.append(e)
        elif t == 7:  # GOAWAY
            g = frame.goaway
            e = ConnectionTerminated()
            e.error_code = _error_code(g.error_code)
            e.last_stream_id = g.last_stream_id
            e.additional_data = (unpack(ffi.cast("char *", g.opaque_data),
                                        g.opaque_data_len) if g.opaque_data_len else None)
            st.goaway_recv = True
            events.append(e)
        elif t == 2:  # PRIORITY
            events.append(_priority(hd.stream_id, frame.priority.pri_spec))
        return 0

    def on_close(session: Any, sid: int, code: int, ud: Any) -> int:
        st.open.discard(sid)
        st.ended.discard(sid)
        drop_out(st, sid)
        st.expect_final.discard(sid)
        if sid in st.reported:
            st.reported.discard(sid)
        elif sid in st.local_reset:
            st.local_reset.discard(sid)
        elif code and not st.goaway_recv:
            # nghttp2 reset the stream itself (malformed message, flow control).
            e = _NEW(StreamReset)
            e.stream_id = sid
            e.error_code = _error_code(code)
            e.remote_reset = False
            st.events.append(e)
        return 0

    def on_read(session: Any, sid: int, buf: Any, length: int, flags: Any, src: Any,
                ud: Any) -> int:
        item = st.out.get(sid)
        if item is None:
            flags[0] = 3  # EOF | NO_END_STREAM
            return 0
        chunks = item[0]
        n = 0
        while chunks and n < length:
            c = chunks[0]
            cl = len(c)
            room = length - n
            if cl <= room:
                memmove(buf + n, c, cl)
                n += cl
                chunks.pop(0)
            else:
                view = c if type(c) is memoryview else memoryview(c)
                memmove(buf + n, view[:room], room)
                chunks[0] = view[room:]
                n = length
        st.held -= n
        if not chunks:
            del st.out[sid]
            trailers = item[2]
            if trailers is not None:
                flags[0] = 3
                nva, count, _keep = trailers
                lib.nghttp2_submit_headers(session, 1, sid, ffi.NULL, nva, count, ffi.NULL)
            elif item[1]:
                flags[0] = 1  # EOF: END_STREAM goes on this frame
            else:
                flags[0] = 3
        return n

    def on_length(session: Any, ftype: int, sid: int, conn_win: int, stream_win: int,
                  frame_max: int, ud: Any) -> int:
        n = frame_max if frame_max < conn_win else conn_win
        return n if n < stream_win else stream_win

    return {
        "begin": cb("nghttp2_on_begin_headers_callback", on_begin_headers),
        "header": cb("nghttp2_on_header_callback", on_header),
        "chunk": cb("nghttp2_on_data_chunk_recv_callback", on_chunk),
        "frame": cb("nghttp2_on_frame_recv_callback", on_frame),
        "close": cb("nghttp2_on_stream_close_callback", on_close),
        "read": cb("nghttp2_data_source_read_callback", on_read),
        "length": cb("nghttp2_data_source_read_length_callback", on_length),
    }


def _informational(hdrs: Headers) -> bool:
    for k, v in hdrs:
        if k == b":status":
            return v[:1] == b"1"
    return False


def _priority(sid: int, spec: Any) -> PriorityUpdated:
    e = PriorityUpdated()
    e.stream_id = sid
    e.weight = int(spec.weight)
    e.depends_on = int(spec.stream_id)
    e.exclusive = bool(spec.exclusive)
    return e


def _error_code(code: int) -> ErrorCodes | int:
    try:
        return ErrorCodes(code)
    except ValueError:
        return code


def _setting_code(code: int) -> SettingCodes | int:
    try:
        return SettingCodes(code)
    except ValueError:
        return code

"""A sans-IO HTTP/2 connection on libnghttp2 with the surface of ``h2.H2Connection``.

Theory of operation
-------------------
:class:`NgHttp2Connection` drives one ``nghttp2_session`` (client or server) in memory:
:meth:`receive_data` hands bytes to ``nghttp2_session_mem_recv`` and returns the events
its callbacks produced; the ``send_*`` methods queue frames with ``nghttp2_submit_*``;
:meth:`data_to_send` drains ``nghttp2_session_mem_send``.  Nothing here touches a socket.

The events are ``h2.events`` instances and the errors ``h2.exceptions`` subclasses, so the
relay dispatches on the same types whichever core runs it (h2 stays installed: it is the
fallback core and the test oracle).  Where the cores differ, nghttp2 is the reference:

* Flow control is manual (``NGHTTP2_OPT_NO_AUTO_WINDOW_UPDATE``): the window of received
  DATA returns only when :meth:`acknowledge_received_data` is called.  nghttp2 consumes
  padding itself, so ``DataReceived.flow_controlled_length`` is the data length.  DATA
  is reported as nghttp2 parses it: a frame split across reads yields several events.
* Outbound DATA is copied into nghttp2 by one data provider per connection; each
  :meth:`send_data` submits its chunk and serialises it at once, so the send windows
  read by :meth:`local_flow_control_window` are exact between calls (h2's are too).
  Data beyond the window is not an error here: nghttp2 holds it until the peer opens
  the window (trailers then wait behind it).
* Frame-level errors end the session inside nghttp2, which queues GOAWAY with the error
  code RFC 9113 names; :meth:`receive_data` then raises :class:`SessionTerminated` (an
  ``h2.exceptions.ProtocolError``) carrying that code, as h2 raises after queueing its
  GOAWAY.  Floods nghttp2 detects (ack queue, CONTINUATION count, rapid reset) and our
  own header-list limit raise :class:`SessionFlooded` (a ``DenialOfServiceError``).
* HTTP messaging rules are checked by nghttp2 (unless ``validate=False``): a malformed
  request or response resets that stream (``StreamReset`` with ``remote_reset=False``)
  instead of failing the connection.

Output is serialised eagerly after every receive and every send of headers or data
(lazily after acknowledgements, resets and pings), so :attr:`bytes_to_send` is what the
relay's output ceiling should look at, and nghttp2's own GOAWAYs are seen as they leave.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from itertools import chain
from typing import Any

import h2.exceptions
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

from .._errors import GatewayError
from . import _ffi
from ._ffi import Library

try:  # cffi's C module: calling it directly skips a Python wrapper on every header
    from _cffi_backend import cast as _cast, from_buffer as _from_buffer, unpack as _unpack
except ImportError:  # pragma: no cover - other cffi backends
    _cast = _from_buffer = _unpack = None


def _ffi_from_buffer(ffi: Any) -> Any:
    return lambda ctype, buf, writable: ffi.from_buffer(ctype, buf, writable)

Headers = list[tuple[bytes, bytes]]

_NEW = object.__new__
_GOAWAY = 7
# RFC 9113 §6.5.2 initial values, for RemoteSettingsChanged.original_value.
_SETTING_DEFAULTS = {
    SettingCodes.HEADER_TABLE_SIZE: 4096,
    SettingCodes.ENABLE_PUSH: 1,
    SettingCodes.MAX_CONCURRENT_STREAMS: None,
    SettingCodes.INITIAL_WINDOW_SIZE: 65535,
    SettingCodes.MAX_FRAME_SIZE: 16384,
    SettingCodes.MAX_HEADER_LIST_SIZE: None,
    SettingCodes.ENABLE_CONNECT_PROTOCOL: 0,
}


class SessionTerminated(GatewayError, h2.exceptions.ProtocolError):
    """nghttp2 ended the session (GOAWAY queued); ``error_code`` is the GOAWAY's code."""

    def __init__(self, error_code: int, detail: str) -> None:
        super().__init__(f"nghttp2 GOAWAY({_code_name(error_code)}): {detail}")
        self.error_code = error_code
        self.detail = detail


class SessionFlooded(SessionTerminated, h2.exceptions.DenialOfServiceError):
    """The peer broke a flood limit; ``reason`` uses the abuse reasons of the gateway."""

    def __init__(self, reason: str, detail: str,
                 error_code: int = ErrorCodes.ENHANCE_YOUR_CALM) -> None:
        super().__init__(error_code, f"{reason}: {detail}")
        self.reason = reason


class SessionInitError(GatewayError):
    """nghttp2 refused to create or configure a session (a library that loads but
    misbehaves): the connection is refused; enough of these should mean falling back."""


class CoreInternalError(SessionTerminated):
    """A callback of ours failed (a bug): the session is ended with INTERNAL_ERROR."""


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"


class _State:
    """What the C callbacks share with the connection (kept apart to avoid a cycle)."""

    __slots__ = ("events", "hdrs", "hsize", "hlimit", "cat", "client", "open", "ended",
                 "local_reset", "reported", "expect_final", "out", "goaway_recv",
                 "remote", "pending_local", "frame_max", "fail", "error", "frames", "held")

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
        self.remote: dict[int, int | None] = dict(_SETTING_DEFAULTS)
        self.pending_local: list[dict[int, int]] = []
        self.frame_max = 16384
        self.fail: SessionFlooded | None = None  # set by a callback that failed on purpose
        self.error: BaseException | None = None  # a callback's unexpected exception
        self.frames = [0] * 10  # frames received by type (abuse counters)
        self.held = 0  # DATA bytes given to send_data and not yet serialised


class SettingsView:
    """Read-only view of one side's settings (h2's ``Settings`` attribute names)."""

    __slots__ = ("_get", "_s")

    def __init__(self, get: Any, session: Any) -> None:
        self._get = get
        self._s = session

    def __getitem__(self, code: int) -> int:
        return int(self._get(self._s, int(code)))

    header_table_size = property(lambda self: self[SettingCodes.HEADER_TABLE_SIZE])
    enable_push = property(lambda self: self[SettingCodes.ENABLE_PUSH])
    initial_window_size = property(lambda self: self[SettingCodes.INITIAL_WINDOW_SIZE])
    max_frame_size = property(lambda self: self[SettingCodes.MAX_FRAME_SIZE])
    max_concurrent_streams = property(lambda self: self[SettingCodes.MAX_CONCURRENT_STREAMS])
    max_header_list_size = property(lambda self: self[SettingCodes.MAX_HEADER_LIST_SIZE])
    enable_connect_protocol = property(
        lambda self: self[SettingCodes.ENABLE_CONNECT_PROTOCOL])


class NgHttp2Connection:
    """One HTTP/2 connection (either side) on libnghttp2; see the module docstring.

    ``settings`` are sent by :meth:`initiate_connection`; ``connection_window`` sets our
    connection-level receive window (nghttp2 and h2 start at 65535);
    ``max_header_list_size`` bounds each received header block (nghttp2 advertises the
    setting but does not enforce it) and defaults to the advertised setting.  The flood
    knobs map onto nghttp2 options where the loaded library has them
    (:attr:`Library.protections`); ``reset_rate_limit=(burst, per_second)`` applies to
    server sessions only.
    """

    __slots__ = ("_L", "_lib", "_ffi", "_s", "_st", "_cbs", "_prd", "_pp", "_dirty",
                 "_out_len", "_closing", "_terminated", "client_side", "_settings",
                 "local_settings", "remote_settings", "_nv_pad", "_buf", "_window", "_fast",
                 "__weakref__")

    def __init__(self, client: bool, *, settings: dict[int, int] | None = None,
                 connection_window: int | None = None,
                 max_header_list_size: int | None = None, validate: bool = True,
                 large_frames: bool = False,
                 reset_rate_limit: tuple[int, int] | None = None,
                 max_continuations: int | None = None,
                 max_outbound_ack: int | None = None, max_settings: int | None = None,
                 library: Library | None = None) -> None:
        if connection_window is not None and not 65535 <= connection_window <= 2**31 - 1:
            raise ValueError(f"invalid connection_window {connection_window}: it must be "
                             "between 65535 and 2^31-1")
        L = library or _ffi.load()
        self._L = L
        ffi, lib = L.ffi, L.lib
        self._ffi, self._lib = ffi, lib
        self.client_side = client
        self._settings = dict(settings or {})
        hlimit = max_header_list_size or self._settings.get(
            SettingCodes.MAX_HEADER_LIST_SIZE, 0) or (1 << 62)
        st = self._st = _State(client, hlimit)
        self._dirty = False
        self._out_len = 0
        self._buf: list[bytes] = []
        self._window = connection_window
        self._closing = False
        self._terminated: SessionTerminated | None = None
        self._nv_pad = ffi.sizeof("nghttp2_nv") - struct.calcsize("PPNNB")
        self._fast = (_from_buffer or _ffi_from_buffer(ffi), _cast or ffi.cast,
                      ffi.typeof("char[]"), ffi.typeof("uintptr_t"),
                      ffi.typeof("nghttp2_nv[]"))
        self._cbs = _make_callbacks(L, st)

        cbs_pp = ffi.new("nghttp2_session_callbacks **")
        _check(lib.nghttp2_session_callbacks_new(cbs_pp), "callbacks_new")
        cbs = ffi.gc(cbs_pp[0], lib.nghttp2_session_callbacks_del)
        c = self._cbs
        lib.nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, c["frame"])
        lib.nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, c["chunk"])
        lib.nghttp2_session_callbacks_set_on_stream_close_callback(cbs, c["close"])
        lib.nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, c["begin"])
        lib.nghttp2_session_callbacks_set_on_header_callback(cbs, c["header"])
        if large_frames:
            lib.nghttp2_session_callbacks_set_data_source_read_length_callback(
                cbs, c["length"])

        opt_pp = ffi.new("nghttp2_option **")
        _check(lib.nghttp2_option_new(opt_pp), "option_new")
        opt = ffi.gc(opt_pp[0], lib.nghttp2_option_del)
        lib.nghttp2_option_set_no_auto_window_update(opt, 1)
        lib.nghttp2_option_set_max_reserved_remote_streams(opt, 0)  # we never accept push
        if not validate:
            lib.nghttp2_option_set_no_http_messaging(opt, 1)
        for name, value in (("max_outbound_ack", max_outbound_ack),
                            ("max_settings", max_settings),
                            ("max_continuations", max_continuations)):
            setter = L.setter(name)
            if value is not None and setter is not None:
                setter(opt, value)
        setter = L.setter("stream_reset_rate_limit")
        if reset_rate_limit is not None and setter is not None and not client:
            setter(opt, *reset_rate_limit)

        sp = ffi.new("nghttp2_session **")
        new = lib.nghttp2_session_client_new2 if client else lib.nghttp2_session_server_new2
        _check(new(sp, cbs, ffi.NULL, opt), "session_new")
        self._s = ffi.gc(sp[0], lib.nghttp2_session_del)
        self._pp = ffi.new("const char **")
        prd = self._prd = ffi.new("nghttp2_data_provider *")
        prd.read_callback = c["read"]
        self.local_settings = SettingsView(lib.nghttp2_session_get_local_settings, self._s)
        self.remote_settings = SettingsView(lib.nghttp2_session_get_remote_settings, self._s)

    # -- connection ---------------------------------------------------------------------
    def initiate_connection(self) -> None:
        """Queue our SETTINGS (a client's preface goes with them) and widen the
        connection window to ``connection_window``."""
        self._submit_settings(self._settings)
        if self._window is not None and self._window > 65535:
            _check(self._lib.nghttp2_session_set_local_window_size(self._s, 0, 0,
                                                                   self._window),
                   "set_local_window_size")
        self._flush()

    def update_settings(self, new_settings: dict[int, int]) -> None:
        self._submit_settings(new_settings)
        self._dirty = True

    def _submit_settings(self, values: dict[int, int]) -> None:
        iv = self._ffi.new("nghttp2_settings_entry[]", len(values))
        try:
            for i, (k, v) in enumerate(values.items()):
                iv[i].settings_id = int(k)
                iv[i].value = int(v)
        except OverflowError:
            raise ValueError(f"invalid HTTP/2 settings {values}: a value does not fit "
                             "32 bits") from None
        rv = self._lib.nghttp2_submit_settings(self._s, 0, iv, len(values))
        if rv != 0:
            raise ValueError(f"invalid HTTP/2 settings {values}: "
                             f"{self._ffi.string(self._lib.nghttp2_strerror(rv)).decode()}")
        self._st.pending_local.append(dict(values))

    def ping(self, opaque_data: bytes) -> None:
        if len(opaque_data) != 8:
            raise ValueError("invalid PING payload: it must be 8 bytes")
        _check(self._lib.nghttp2_submit_ping(self._s, 0, opaque_data), "submit_ping")
        self._dirty = True

    def close_connection(self, error_code: int = 0, additional_data: bytes | None = None,
                         last_stream_id: int | None = None) -> None:
        """Queue GOAWAY; streams above ``last_stream_id`` (default: the last one we
        processed) are refused."""
        lib = self._lib
        if last_stream_id is None:
            last_stream_id = lib.nghttp2_session_get_last_proc_stream_id(self._s)
        data = additional_data or b""
        self._closing = True
        lib.nghttp2_submit_goaway(self._s, 0, last_stream_id, int(error_code),
                                  data if data else self._ffi.NULL, len(data))
        self._flush()

    def get_next_available_stream_id(self) -> int:
        if not self.client_side:
            raise h2.exceptions.ProtocolError("a server does not open streams (no push)")
        sid = int(self._lib.nghttp2_session_get_next_stream_id(self._s))
        if sid > 2**31 - 1:
            raise h2.exceptions.NoAvailableStreamIDError("stream IDs exhausted")
        return sid

    # -- sending ------------------------------------------------------------------------
    def send_headers(self, stream_id: int, headers: Iterable[tuple[bytes, bytes]],
                     end_stream: bool = False, priority_weight: int | None = None,
                     priority_depends_on: int | None = None,
                     priority_exclusive: bool | None = None) -> None:
        st = self._st
        if stream_id in st.ended:
            raise h2.exceptions.StreamClosedError(stream_id)
        nva, n, keep = self._nva(headers)
        lib = self._lib
        flags = 1 if end_stream else 0
        if stream_id in st.open:
            pending = st.out.get(stream_id)
            if pending is not None and end_stream:
                # Trailers must follow the data nghttp2 still holds (window closed).
                pending[2] = (nva, n, keep)
                st.ended.add(stream_id)
                return
            rv = lib.nghttp2_submit_headers(self._s, flags, stream_id, self._ffi.NULL,
                                            nva, n, self._ffi.NULL)
        elif self.client_side and stream_id == lib.nghttp2_session_get_next_stream_id(
                self._s):
            rv = lib.nghttp2_submit_headers(self._s, flags, -1, self._ffi.NULL, nva, n,
                                            self._ffi.NULL)
            if rv > 0:
                st.open.add(rv)
        else:
            raise h2.exceptions.StreamClosedError(stream_id)
        if rv < 0:
            raise h2.exceptions.ProtocolError(f"cannot send headers on stream "
                                              f"{stream_id}: {self._strerror(rv)}")
        if end_stream:
            st.ended.add(stream_id)
        self._dirty = True

    def send_data(self, stream_id: int, data: bytes | memoryview,
                  end_stream: bool = False, pad_length: int | None = None) -> None:
        st = self._st
        if stream_id in st.ended or stream_id not in st.open:
            raise h2.exceptions.StreamClosedError(stream_id)
        if end_stream:
            st.ended.add(stream_id)
        n = len(data)
        st.held += n
        pending = st.out.get(stream_id)
        if pending is not None:  # not serialised yet, or held by flow control
            if n:
                pending[0].append(data)
            pending[1] = pending[1] or end_stream
            return
        if not n and not end_stream:
            return
        st.out[stream_id] = [[data] if n else [], end_stream, None]
        submit = self._lib.nghttp2_submit_data
        rv = submit(self._s, 1, stream_id, self._prd)
        if rv == _ffi.NGHTTP2_ERR_STREAM_CLOSED and self._dirty:
            # A client stream exists in nghttp2 once its HEADERS are serialised.
            self._flush()
            rv = submit(self._s, 1, stream_id, self._prd)
        if rv != 0:
            st.out.pop(stream_id, None)
            st.held -= n
            raise h2.exceptions.StreamClosedError(stream_id)
        self._dirty = True

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        st = self._st
        if stream_id not in st.open:
            raise h2.exceptions.StreamClosedError(stream_id)
        st.local_reset.add(stream_id)
        _drop_out(st, stream_id)
        self._lib.nghttp2_submit_rst_stream(self._s, 0, stream_id, int(error_code))
        self._dirty = True

    def _nva(self, headers: Iterable[tuple[bytes, bytes]]) -> tuple[Any, int, Any]:
        """An ``nghttp2_nv`` array over one buffer holding every name and value.

        One ``struct.pack`` writes all the entries (pointer, pointer, length, length,
        flags) instead of five cffi attribute stores per header; nghttp2 copies the
        strings at submit time, so the buffers need only outlive the call.
        """
        hs = headers if type(headers) is list else list(headers)
        try:
            blob = b"".join(chain.from_iterable(hs))
        except TypeError:
            hs = [(_b(k), _b(v)) for k, v in hs]
            blob = b"".join(chain.from_iterable(hs))
        from_buffer, cast, char_arr, uintptr, nv_arr = self._fast
        keep = from_buffer(char_arr, blob, False)
        off = int(cast(uintptr, keep))
        fields: list[int] = []
        add = fields.extend
        for h in hs:
            k, v = h
            kl = len(k)
            vl = len(v)
            add((off, off + kl, kl, vl, 1 if type(h) is NeverIndexedHeaderTuple else 0))
            off += kl + vl
        n = len(hs)
        packer = _NV_STRUCTS.get(n)
        if packer is None:
            packer = _NV_STRUCTS[n] = struct.Struct(("PPNNB" + "x" * self._nv_pad) * n)
        packed = packer.pack(*fields)
        return from_buffer(nv_arr, packed, False), n, (keep, packed)

    # -- flow control -------------------------------------------------------------------
    def local_flow_control_window(self, stream_id: int) -> int:
        """How much DATA we may send on ``stream_id`` now (stream and connection)."""
        if self._dirty:
            self._flush()
        lib = self._lib
        w = lib.nghttp2_session_get_stream_remote_window_size(self._s, stream_id)
        if w < 0:
            raise h2.exceptions.StreamClosedError(stream_id)
        c = lib.nghttp2_session_get_remote_window_size(self._s)
        return w if w < c else c

    def remote_flow_control_window(self, stream_id: int) -> int:
        """How much DATA the peer may still send us on ``stream_id``."""
        w = self._lib.nghttp2_session_get_stream_local_window_size(self._s, stream_id)
        if w < 0:
            raise h2.exceptions.StreamClosedError(stream_id)
        return int(w)

    @property
    def outbound_flow_control_window(self) -> int:
        return int(self._lib.nghttp2_session_get_remote_window_size(self._s))

    @property
    def inbound_flow_control_window(self) -> int:
        return int(self._lib.nghttp2_session_get_local_window_size(self._s))

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        """Return ``acknowledged_size`` bytes of window to the peer (stream and
        connection; connection only once the stream is gone)."""
        if acknowledged_size:
            lib = self._lib
            if stream_id:
                lib.nghttp2_session_consume(self._s, stream_id, acknowledged_size)
            else:
                lib.nghttp2_session_consume_connection(self._s, acknowledged_size)
            self._dirty = True

    def increment_flow_control_window(self, increment: int,
                                      stream_id: int | None = None) -> None:
        """Grant the peer ``increment`` more bytes (WINDOW_UPDATE); with manual flow
        control nghttp2 first counts it against data received and not yet acknowledged."""
        if not 1 <= increment <= 2**31 - 1:
            raise ValueError(f"invalid flow control increment {increment}: it must be "
                             "between 1 and 2^31-1")
        _check(self._lib.nghttp2_submit_window_update(self._s, 0, stream_id or 0,
                                                      increment), "window_update")
        self._dirty = True

    @property
    def max_outbound_frame_size(self) -> int:
        return self._st.frame_max

    @property
    def max_inbound_frame_size(self) -> int:
        return self.local_settings.max_frame_size

    @property
    def open_inbound_streams(self) -> int:
        odd = 0 if self.client_side else 1
        return sum(1 for s in self._st.open if s & 1 == odd)

    @property
    def open_outbound_streams(self) -> int:
        odd = 1 if self.client_side else 0
        return sum(1 for s in self._st.open if s & 1 == odd)

    @property
    def frames_received(self) -> list[int]:
        """Frames received per type (DATA..CONTINUATION), for abuse accounting."""
        return self._st.frames

    # -- receiving ----------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Any]:
        """Feed bytes from the peer; return the events they completed.

        Raises :class:`SessionTerminated` (or :class:`SessionFlooded`) once nghttp2 ended
        the session; the GOAWAY is then in :meth:`data_to_send`.
        """
        if self._terminated is not None:
            raise self._terminated
        st = self._st
        events = st.events = []
        if type(data) is not bytes:
            data = bytes(data)
        rv = self._lib.nghttp2_session_mem_recv(self._s, data, len(data))
        if rv < 0:
            self._fatal(rv)
        self._flush()
        if self._terminated is not None:
            raise self._terminated
        return events

    def _fatal(self, rv: int) -> None:
        st = self._st
        if st.fail is not None:
            exc: SessionTerminated = st.fail
        elif st.error is not None:
            exc = CoreInternalError(ErrorCodes.INTERNAL_ERROR,
                                    f"{type(st.error).__name__}: {st.error}")
            exc.__cause__ = st.error
        elif rv == _ffi.NGHTTP2_ERR_BAD_CLIENT_MAGIC:
            exc = SessionTerminated(ErrorCodes.PROTOCOL_ERROR, "invalid HTTP/2 preface")
        elif rv == _ffi.NGHTTP2_ERR_FLOODED:
            exc = SessionFlooded("control_frame_flood",
                                 "too many PING/SETTINGS acknowledgements left unread")
        elif rv == _ffi.NGHTTP2_ERR_TOO_MANY_CONTINUATIONS:
            exc = SessionFlooded("header_block_too_large", "too many CONTINUATION frames")
        else:
            exc = SessionTerminated(ErrorCodes.INTERNAL_ERROR, self._strerror(rv))
        self._terminated = exc
        self._lib.nghttp2_session_terminate_session(self._s, exc.error_code)
        self._flush()
        raise exc

    # -- output -------------------------------------------------------------------------
    def _flush(self) -> None:
        """Serialise every queued frame into our buffer."""
        self._dirty = False
        send = self._lib.nghttp2_session_mem_send
        unpack = self._ffi.unpack
        s, pp = self._s, self._pp
        buf = self._buf
        total = 0
        while True:
            n = send(s, pp)
            if n <= 0:
                break
            chunk = unpack(pp[0], n)
            if chunk[3] == _GOAWAY:
                self._saw_goaway(chunk)
            buf.append(chunk)
            total += n
        self._out_len += total
        if n < 0 and self._terminated is None:
            st = self._st
            if st.error is not None:
                exc = CoreInternalError(ErrorCodes.INTERNAL_ERROR,
                                        f"{type(st.error).__name__}: {st.error}")
                exc.__cause__ = st.error
            else:
                exc = SessionTerminated(ErrorCodes.INTERNAL_ERROR, self._strerror(n))
            self._terminated = exc

    def _saw_goaway(self, frame: bytes) -> None:
        if self._closing or self._terminated is not None:
            return
        code = int.from_bytes(frame[13:17], "big")
        detail = frame[17:].decode("utf-8", "replace") or "no detail"
        if code == ErrorCodes.NO_ERROR:
            return
        if code == ErrorCodes.ENHANCE_YOUR_CALM:
            self._terminated = SessionFlooded("control_frame_flood", detail)
        elif (code == ErrorCodes.INTERNAL_ERROR and detail == "no detail"
              and not self.client_side):
            # The only GOAWAY nghttp2 sends bare with INTERNAL_ERROR on a server is its
            # stream reset rate limit (CVE-2023-44487).
            self._terminated = SessionFlooded(
                "rapid_reset", "stream resets above the rate limit",
                ErrorCodes.INTERNAL_ERROR)
        else:
            self._terminated = SessionTerminated(code, detail)

    def data_to_send(self, amount: int | None = None) -> bytes:
        self._flush()
        buf = self._buf
        if not buf:
            return b""
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        if amount is not None and amount < len(data):
            self._buf = [data[amount:]]
            self._out_len = len(data) - amount
            return data[:amount]
        self._buf = []
        self._out_len = 0
        return data

    def clear_outbound_data_buffer(self) -> None:
        self._buf = []
        self._out_len = 0

    @property
    def bytes_to_send(self) -> int:
        """Bytes queued for the peer: serialised and not yet taken by
        :meth:`data_to_send`, plus DATA handed to :meth:`send_data` and not serialised."""
        return self._out_len + self._st.held

    def _strerror(self, rv: int) -> str:
        return self._ffi.string(self._lib.nghttp2_strerror(rv)).decode("ascii", "replace")


def _drop_out(st: _State, sid: int) -> None:
    item = st.out.pop(sid, None)
    if item is not None:
        st.held -= sum(len(c) for c in item[0])


def _b(s: bytes | str) -> bytes:
    return s.encode("utf-8") if isinstance(s, str) else bytes(s)


def _check(rv: int, what: str) -> None:
    if rv != 0:
        raise SessionInitError(f"nghttp2 {what} failed: error {rv}")


_NV_STRUCTS: dict[int, struct.Struct] = {}


# -- callbacks ------------------------------------------------------------------------------
def _make_callbacks(L: Library, st: _State) -> dict[str, Any]:
    """The C callbacks of one connection, as closures over its :class:`_State`."""
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
            st.open.add(frame.hd.stream_id)
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
        _drop_out(st, sid)
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

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
* Outbound DATA is copied into nghttp2 by one data provider per connection, which
  reads the chunks :meth:`send_data` queued for each stream.  Sends are queued in
  nghttp2 and serialised together (one ``mem_send`` drain for a whole batch of
  answers); :meth:`local_flow_control_window` serialises what is queued first, so the
  windows it reports are exact, as h2's are.  Data beyond the window is not an error
  here: nghttp2 holds it until the peer opens the window (trailers wait behind it).
* Frame-level errors end the session inside nghttp2, which queues GOAWAY with the error
  code RFC 9113 names; :meth:`receive_data` then raises :class:`SessionTerminated` (an
  ``h2.exceptions.ProtocolError``) carrying that code, as h2 raises after queueing its
  GOAWAY.  Floods nghttp2 detects (ack queue, CONTINUATION count, rapid reset) and our
  own header-list limit raise :class:`SessionFlooded` (a ``DenialOfServiceError``).
* HTTP messaging rules are checked by nghttp2 (unless ``validate=False``): a malformed
  request or response resets that stream (``StreamReset`` with ``remote_reset=False``)
  instead of failing the connection.

Output is serialised at the end of every :meth:`receive_data` (so nghttp2's own
GOAWAYs are seen as they leave), when a window is asked for, and by
:meth:`data_to_send`.  nghttp2's ``max_outbound_ack`` therefore bounds the PING/SETTINGS
acknowledgements one read can queue; across reads the relay's output ceiling does.  :attr:`bytes_to_send` counts what is
serialised plus DATA still held: that is what the relay's output ceiling should watch.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from itertools import chain
from typing import Any

import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import NeverIndexedHeaderTuple

from . import _ffi
from ._callbacks import CallbackState, drop_out, make_callbacks
from ._errors import CoreInternalError, SessionFlooded, SessionInitError, SessionTerminated
from ._ffi import Library

try:  # cffi's C module: calling it directly skips a Python wrapper per call
    from _cffi_backend import cast as _cast, from_buffer as _from_buffer
except ImportError:  # pragma: no cover - other cffi backends
    _cast = _from_buffer = None

_GOAWAY = 7


def _ffi_from_buffer(ffi: Any) -> Any:
    return lambda ctype, buf, writable: ffi.from_buffer(ctype, buf, writable)


class SettingsView:
    """Read-only view of one side's settings (h2's ``Settings`` attribute names)."""

    __slots__ = ("_get", "_s")

    def __init__(self, get: Any, session: Any) -> None:
        self._get = get
        self._s = session

    def __getitem__(self, code: int) -> int:
        return int(self._get(self._s, int(code)))

    # Plain ints, not SettingCodes: the pool reads max_concurrent_streams per request.
    header_table_size = property(lambda self: self._get(self._s, 1))
    enable_push = property(lambda self: self._get(self._s, 2))
    max_concurrent_streams = property(lambda self: self._get(self._s, 3))
    initial_window_size = property(lambda self: self._get(self._s, 4))
    max_frame_size = property(lambda self: self._get(self._s, 5))
    max_header_list_size = property(lambda self: self._get(self._s, 6))
    enable_connect_protocol = property(lambda self: self._get(self._s, 8))


class NgHttp2Connection:
    """One HTTP/2 connection (either side) on libnghttp2; see the module docstring.

    ``settings`` are sent by :meth:`initiate_connection`; ``connection_window`` sets our
    connection-level receive window (nghttp2 and h2 start at 65535);
    ``max_header_list_size`` bounds each received header block (nghttp2 advertises the
    setting but does not enforce it) and defaults to the advertised setting.  The flood
    knobs map onto nghttp2 options where the loaded library has them
    (:attr:`Library.protections`); ``reset_rate_limit=(burst, per_second)`` applies to
    server sessions only.

    ``refuse_streams_over`` (server sessions): advertise that MAX_CONCURRENT_STREAMS but
    refuse each request beyond it alone with REFUSED_STREAM, as RFC 9113 §5.1.2 allows,
    where nghttp2 would end the whole connection once the client acknowledged the
    setting.  nghttp2 itself is told no limit; the value is written into the SETTINGS
    frame as it leaves (see :meth:`initiate_connection`).

    ``guard`` (optional) sees every read: ``guard.before_receive(conn, data)`` before
    nghttp2 parses it and ``guard.after_receive(conn, events) -> events`` after; either
    may end the session with :meth:`terminate` and raise (the gateway's
    :class:`gateway._frames.FrameGuard` keeps the abuse rules nghttp2 lacks this way).
    """

    __slots__ = ("_L", "_lib", "_ffi", "_s", "_st", "_cbs", "_prd", "_pp", "_dirty",
                 "_out_len", "_closing", "_terminated", "client_side", "_settings",
                 "local_settings", "remote_settings", "_nv_pad", "_buf", "_window", "_fast",
                 "_cap", "guard", "__weakref__")

    def __init__(self, client: bool, *, settings: dict[int, int] | None = None,
                 connection_window: int | None = None,
                 max_header_list_size: int | None = None, validate: bool = True,
                 large_frames: bool = False,
                 reset_rate_limit: tuple[int, int] | None = None,
                 max_continuations: int | None = None,
                 max_outbound_ack: int | None = None, max_settings: int | None = None,
                 refuse_streams_over: int | None = None,
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
        st = self._st = CallbackState(client, hlimit)
        self._dirty = False
        self._out_len = 0
        self._buf: list[bytes] = []
        self._window = connection_window
        self._closing = False
        self._terminated: h2.exceptions.ProtocolError | None = None
        self.guard: Any = None
        self._cap = 0
        if refuse_streams_over is not None and not client:
            self._cap = st.stream_cap = int(refuse_streams_over)
        self._nv_pad = ffi.sizeof("nghttp2_nv") - struct.calcsize("PPNNB")
        self._fast = (_from_buffer or _ffi_from_buffer(ffi), _cast or ffi.cast,
                      ffi.typeof("char[]"), ffi.typeof("uintptr_t"),
                      ffi.typeof("nghttp2_nv[]"))
        self._cbs = make_callbacks(L, st)

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
        values = self._settings
        cap = self._cap
        if cap:
            values = {**values, SettingCodes.MAX_CONCURRENT_STREAMS: _NO_STREAM_LIMIT}
        self._submit_settings(values)
        if self._window is not None and self._window > 65535:
            _check(self._lib.nghttp2_session_set_local_window_size(self._s, 0, 0,
                                                                   self._window),
                   "set_local_window_size")
        self._flush()
        if cap:
            self._advertise_cap(cap)

    def _advertise_cap(self, cap: int) -> None:
        """Write ``cap`` over the MAX_CONCURRENT_STREAMS entry of our first SETTINGS
        frame (a server's first frame): the peer is told the real limit."""
        for i, chunk in enumerate(self._buf):
            if len(chunk) >= 9 and chunk[3] == 4 and not chunk[4] & 1:
                frame = bytearray(chunk)
                for off in range(9, 9 + int.from_bytes(chunk[:3], "big"), 6):
                    if frame[off:off + 2] == b"\x00\x03":
                        frame[off + 2:off + 6] = cap.to_bytes(4, "big")
                        self._buf[i] = bytes(frame)
                        return
        raise SessionInitError("nghttp2 sent no SETTINGS frame with MAX_CONCURRENT_STREAMS")
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
        drop_out(st, stream_id)
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
        guard = self.guard
        if guard is not None:
            guard.before_receive(self, data)
        rv = self._lib.nghttp2_session_mem_recv(self._s, data, len(data))
        if rv < 0:
            self._fatal(rv)
        self._flush()
        if self._terminated is not None:
            raise self._terminated
        if guard is not None:
            return guard.after_receive(self, events)  # type: ignore[no-any-return]
        return events

    def terminate(self, error_code: int, exc: h2.exceptions.ProtocolError) -> None:
        """End the session (GOAWAY with ``error_code``, queued now) because of ``exc``,
        which this and every later :meth:`receive_data` raise."""
        if self._terminated is None:
            self._terminated = exc
            self._lib.nghttp2_session_terminate_session(self._s, int(error_code))
            self._flush()

    @property
    def streams_refused(self) -> int:
        """Requests refused alone for ``refuse_streams_over`` so far."""
        return self._st.refused

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
        self.terminate(exc.error_code, exc)
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


# nghttp2's stream reset rate limit, lifted on the gateway's server sessions: on peer
# links the resets are many workloads' relayed over one shared connection (the calling
# gateway limits each workload's); on workload links the gateway's FrameGuard applies
# its own rule (Envoy's premature-reset ratio), with the figures of the h2 core.
_UNLIMITED_RESETS = (2**62, 2**62)
# What nghttp2 is told for MAX_CONCURRENT_STREAMS when we refuse extra streams ourselves.
_NO_STREAM_LIMIT = 2**31 - 1


def from_limits(client: bool, limits: Any, trusted: bool,
                library: Library | None = None) -> NgHttp2Connection:
    """A connection configured as the gateway configures its h2 ones.

    ``limits`` is a :class:`gateway.Limits`; ``trusted`` (gateway-to-gateway and
    gateway-to-service) lets peers send frames of ``peer_max_frame_size`` and send
    DATA frames as large as the peer allows.  nghttp2's HTTP messaging checks are off:
    every request the gateway relays passes its own checks (:mod:`gateway._sanitize`:
    headers, trailers, body length against content-length), which answer a bad one
    with 400 on its stream, where nghttp2 would reset it bare.  Server sessions refuse streams over
    ``max_concurrent_streams`` one by one and have nghttp2's reset rate limit lifted
    (see ``_UNLIMITED_RESETS``).
    """
    frame = limits.peer_max_frame_size if trusted else limits.max_frame_size
    conn = NgHttp2Connection(
        client,
        settings={SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                  SettingCodes.INITIAL_WINDOW_SIZE: limits.initial_stream_window,
                  SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
                  SettingCodes.MAX_FRAME_SIZE: frame,
                  SettingCodes.ENABLE_PUSH: 0},
        connection_window=limits.initial_connection_window,
        max_header_list_size=limits.max_header_list_size,
        large_frames=trusted,
        validate=False,
        reset_rate_limit=None if client else _UNLIMITED_RESETS,
        refuse_streams_over=None if client else limits.max_concurrent_streams,
        library=library)
    conn.initiate_connection()
    return conn


def _b(s: bytes | str) -> bytes:
    return s.encode("utf-8") if isinstance(s, str) else bytes(s)


def _check(rv: int, what: str) -> None:
    if rv != 0:
        raise SessionInitError(f"nghttp2 {what} failed: error {rv}")


_NV_STRUCTS: dict[int, struct.Struct] = {}



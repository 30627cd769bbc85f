"""HTTP/2 abuse rules for one server-side connection (sans-IO), on either core.

Theory of operation
-------------------
:class:`FrameGuard` is sans-IO.  It counts what the client sends and, over a limit,
raises :class:`AbuseDetected` — an h2 ``DenialOfServiceError`` — from inside the
connection's ``receive_data``, after ``GOAWAY(ENHANCE_YOUR_CALM)`` was queued; the relay
then fails every stream of the connection, exactly as for any other protocol error.
:meth:`FrameGuard.install` attaches it to one connection of either core:

* **h2**: it wraps two methods of the connection *instance*: ``_receive_frame`` (called
  once per complete frame, including frames h2 answers on its own and never reports as
  events) and ``receive_data`` (to look at the header block h2 is still assembling);
  h2 queues the GOAWAY itself when the error leaves ``_receive_frame``.
* **nghttp2** (:class:`gateway.h2core.NgHttp2Connection`): no patching.  The core calls
  the guard's :meth:`~FrameGuard.before_receive` with each read before nghttp2 parses
  it — a walk over the frame headers counts frames by type and follows the header block
  in progress — and :meth:`~FrameGuard.after_receive` with the events it produced (the
  stream rules); the guard ends the session with ``conn.terminate``.  What nghttp2
  enforces itself is left to it: the decoded header-list size (the core's own cap), the
  CONTINUATION count, HPACK table sizes and indices, the SETTINGS entry count, and the
  queue of unread PING/SETTINGS acknowledgements.  It has no per-second budget for
  control frames or WINDOW_UPDATE, no rule on the share of streams reset early (its
  token bucket is another rule, answered with INTERNAL_ERROR), and refuses an extra
  stream with a connection error once SETTINGS are acknowledged; those rules are kept
  here (the core refuses extra streams alone, ``refuse_streams_over``), with the same
  figures as on h2.

The rules:

* rapid reset (CVE-2023-44487), Envoy's rule: once ``premature_reset_total_stream_count``
  streams were opened, close the connection when at least half of them were reset by the
  client within ``premature_reset_min_stream_lifetime`` of opening (streams we refused
  for exceeding MAX_CONCURRENT_STREAMS count as such resets);
* control-frame floods: SETTINGS, PING, PRIORITY, GOAWAY, unknown frame types and empty
  DATA frames share a per-second budget; WINDOW_UPDATE has its own, larger one;
* MAX_CONCURRENT_STREAMS: h2 would answer an extra stream with a connection error; we let
  h2 accept it (so HPACK state stays in step) and reset just that stream with
  REFUSED_STREAM;
* header blocks: a HEADERS+CONTINUATION block larger than ``max_header_list_size`` is
  refused before h2 finishes buffering it (h2's own caps — 64 CONTINUATION frames, the
  decoded header list size, the HPACK table size — end in GOAWAY via ProtocolError too);
* slowloris: :attr:`FrameGuard.deadline` is when the connection must have completed its
  first request headers, or the header block in progress; the trio shell closes the
  connection when it passes.

The trio side (per-IP caps, memory shedding, closing the connection) is
:mod:`gateway._abuse`.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Callable
from typing import Any

import h2.exceptions
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import RequestReceived, StreamReset
from h2.settings import SettingCodes

INF = float("inf")
_DATA, _HEADERS, _PRIORITY, _RST, _SETTINGS, _PUSH, _PING, _GOAWAY, _WINDOW, _CONT = range(10)
# h2 itself need never refuse a stream: we do, one stream at a time.
_H2_STREAM_CAP = 2**31 - 1
# Open-stream timestamps kept for the rapid-reset rule before old ones are pruned.
_OPEN_TIMES_PRUNE = 4096
_PREFACE_LEN = 24  # the client connection preface, before the first frame
_END_STREAM, _END_HEADERS = 0x1, 0x4
_FRAME_HEAD = struct.Struct(">IBI")  # length << 8 | type, flags, stream id


class AbuseDetected(h2.exceptions.DenialOfServiceError):
    """A client broke an abuse limit; h2 answers with GOAWAY(ENHANCE_YOUR_CALM)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class FrameGuard:
    """Per-connection abuse counters for one server-side h2 connection (sans-IO)."""

    def __init__(self, limits: Any, clock: Callable[[], float],
                 on_refused: Callable[[], None] | None = None) -> None:
        self.limits = limits
        self.clock = clock
        self.on_refused = on_refused
        self.headers_timeout = float(limits.request_headers_timeout)
        self.max_streams = int(limits.max_concurrent_streams)
        self.reset_total = int(limits.premature_reset_total_stream_count)
        self.reset_lifetime = float(limits.premature_reset_min_stream_lifetime)
        self.control_cap = int(limits.max_control_frames_per_second)
        self.window_cap = int(limits.max_window_updates_per_second)
        self.block_cap = int(limits.max_header_list_size)
        self.opened = 0
        self.premature = 0
        self.refused = 0
        self.control = 0
        self.windows = 0
        self.window_start = clock()
        self.open_times: dict[int, float] = {}
        self.last_sid = 0
        self.conn_start = self.window_start
        self.got_headers = False
        self.block_start: float | None = None
        self.deadline = self.conn_start + self.headers_timeout
        self.violation: AbuseDetected | None = None
        self.conn: H2Connection | None = None
        self.batch_resets: set[int] | None = None  # RST_STREAMs of the read in progress
        # Off for peer gateways (inbound): their resets are many workloads' resets relayed
        # over one shared connection, and the peer's outbound listener already applies this
        # rule to each workload connection. Closing the shared connection would let one
        # abusive workload in a cluster cut off every other caller in it.
        self.close_on_rapid_reset = True
        # nghttp2 core: where the frame walk is (see before_receive).
        self._skip = _PREFACE_LEN  # bytes of the current frame's payload (or preface) left
        self._head = b""  # a frame header split across reads
        self._cur_type = -1  # type of the frame whose payload is being received
        self._open_block = False  # HEADERS/CONTINUATION seen without END_HEADERS
        self._block_size = 0
        self._refused_seen = 0

    # -- wiring ---------------------------------------------------------------------------
    def install(self, conn: Any) -> None:
        """Attach to ``conn`` (after ``initiate_connection``: the peer was told our real
        limit): h2 connections are wrapped, nghttp2 ones call the guard themselves."""
        if not isinstance(conn, H2Connection):
            self.conn = conn
            conn.guard = self
            return
        self.conn = conn
        conn.local_settings._settings[SettingCodes.MAX_CONCURRENT_STREAMS] = (
            collections.deque([_H2_STREAM_CAP]))
        inner_frame = conn._receive_frame
        inner_data = conn.receive_data

        def receive_frame(frame: Any) -> list[Any]:
            return self._frame(frame, inner_frame)

        def receive_data(data: Any) -> list[Any]:
            self.batch_resets = None
            events = inner_data(data)
            self._after_data(conn)
            if self.batch_resets:
                # Opened and reset in the same read: never start work for such a stream
                # (no upstream stream, so the reset is not relayed to a peer gateway,
                # whose own rapid-reset rule would otherwise punish our shared connection).
                gone = self.batch_resets
                events = [e for e in events
                          if not (type(e) is RequestReceived and e.stream_id in gone)]
            return events

        conn._receive_frame = receive_frame  # type: ignore[method-assign]
        conn.receive_data = receive_data  # type: ignore[method-assign]

    def _fail(self, reason: str, detail: str) -> AbuseDetected:
        self.violation = AbuseDetected(reason, detail)
        return self.violation

    # -- per frame ------------------------------------------------------------------------
    def _frame(self, frame: Any, inner: Callable[[Any], list[Any]]) -> list[Any]:
        t = frame.type
        if t == _HEADERS:
            sid = frame.stream_id
            if sid > self.last_sid and sid & 1:
                return self._new_stream(frame, sid, inner)
            return inner(frame)
        if t == _DATA:
            if not frame.data and "END_STREAM" not in frame.flags:
                self._count_control("empty DATA frame")
            return inner(frame)
        if t == _RST:
            if self.batch_resets is None:
                self.batch_resets = set()
            self.batch_resets.add(frame.stream_id)
            t0 = self.open_times.pop(frame.stream_id, None)
            if t0 is not None and self.clock() - t0 < self.reset_lifetime:
                self.premature += 1
                self._check_resets()
            return inner(frame)
        if t == _WINDOW:
            now = self.clock()
            if now - self.window_start >= 1.0:
                self.window_start, self.control, self.windows = now, 0, 0
            self.windows += 1
            if self.windows > self.window_cap:
                raise self._fail("window_update_flood",
                                 f"more than {self.window_cap} WINDOW_UPDATE frames in a second")
            return inner(frame)
        # SETTINGS, PING, PRIORITY, GOAWAY, PUSH_PROMISE and unknown types.
        self._count_control(type(frame).__name__)
        return inner(frame)

    def _count_control(self, what: str) -> None:
        now = self.clock()
        if now - self.window_start >= 1.0:
            self.window_start, self.control, self.windows = now, 0, 0
        self.control += 1
        if self.control > self.control_cap:
            raise self._fail("control_frame_flood",
                             f"more than {self.control_cap} control frames in a second "
                             f"(last: {what})")

    def _new_stream(self, frame: Any, sid: int, inner: Callable[[Any], list[Any]]) -> list[Any]:
        self.last_sid = sid
        self.opened += 1
        now = self.clock()
        if not self.got_headers:
            self.got_headers = True
            self._update_deadline()
        times = self.open_times
        times[sid] = now
        if len(times) > _OPEN_TIMES_PRUNE:
            # Only recent streams can still be reset prematurely; drop the oldest ones.
            horizon = now - self.reset_lifetime
            for old in list(times):
                if times[old] >= horizon or len(times) <= _OPEN_TIMES_PRUNE // 2:
                    break
                del times[old]
        events = inner(frame)
        conn = self.conn
        if conn is not None and conn.open_inbound_streams > self.max_streams:
            # Over the advertised MAX_CONCURRENT_STREAMS: refuse this stream only.
            conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            events = [e for e in events if getattr(e, "stream_id", None) != sid]
            self.refused += 1
            self.premature += 1
            times.pop(sid, None)
            if self.on_refused is not None:
                self.on_refused()
            self._check_resets()
        return events

    def _check_resets(self) -> None:
        if not self.close_on_rapid_reset:
            return
        if self.opened >= self.reset_total and self.premature * 2 >= self.opened:
            raise self._fail("rapid_reset",
                             f"{self.premature} of {self.opened} streams reset or refused "
                             f"within {self.reset_lifetime:g}s of opening")

    # -- per read ---------------------------------------------------------------------------
    def _after_data(self, conn: H2Connection) -> None:
        buf = conn.incoming_buffer
        pending = buf._headers_buffer
        partial = buf._data
        in_block = bool(pending) or (len(partial) >= 9 and partial[3] in (_HEADERS, _CONT))
        if in_block:
            if self.block_start is None:
                self.block_start = self.clock()
                self._update_deadline()
            size = sum(len(f.data) for f in pending)
            if size > self.block_cap:
                exc = self._fail("header_block_too_large",
                                 f"header block of {size} bytes exceeds max_header_list_size "
                                 f"{self.block_cap}")
                conn._terminate_connection(ErrorCodes.ENHANCE_YOUR_CALM)
                raise exc
        elif self.block_start is not None:
            self.block_start = None
            self._update_deadline()

    def _update_deadline(self) -> None:
        if self.block_start is not None:
            self.deadline = self.block_start + self.headers_timeout
        elif not self.got_headers:
            self.deadline = self.conn_start + self.headers_timeout
        else:
            self.deadline = INF

    # -- nghttp2 core -----------------------------------------------------------------------
    def _abort(self, conn: Any, exc: AbuseDetected) -> AbuseDetected:
        conn.terminate(ErrorCodes.ENHANCE_YOUR_CALM, exc)
        return exc

    def before_receive(self, conn: Any, data: bytes) -> None:
        """Walk the frame headers of one read (before nghttp2 parses it): frame budgets,
        the header block in progress, the first request's headers."""
        n = len(data)
        pos = 0
        skip = self._skip
        if self._head:  # a frame header split across reads (skip is 0 then)
            data = self._head + data
            n = len(data)
            self._head = b""
        unpack = _FRAME_HEAD.unpack_from
        control = windows = 0
        what = ""
        while True:
            if skip:
                k = n - pos
                if skip >= k:
                    skip -= k
                    break
                pos += skip
                skip = 0
            if n - pos < 9:
                self._head = data[pos:]
                self._cur_type = -1
                break
            word, flags, sid = unpack(data, pos)
            pos += 9
            length, t = word >> 8, word & 0xFF
            skip = length
            self._cur_type = t
            if t == _HEADERS or t == _CONT or t == _PUSH:
                if t == _HEADERS:
                    sid &= 0x7FFFFFFF
                    if sid > self.last_sid and sid & 1:
                        self.last_sid = sid
                        if not self.got_headers:
                            self.got_headers = True
                            self._update_deadline()
                    self._block_size = length
                else:
                    self._block_size += length
                self._open_block = not flags & _END_HEADERS
                if self._block_size > self.block_cap:
                    self._skip = skip
                    raise self._abort(conn, self._fail(
                        "header_block_too_large",
                        f"header block of {self._block_size} bytes exceeds "
                        f"max_header_list_size {self.block_cap}"))
                if t == _PUSH:
                    control += 1
                    what = "PUSH_PROMISE"
            elif t == _WINDOW:
                windows += 1
            elif t == _DATA:
                if not length and not flags & _END_STREAM:
                    control += 1
                    what = "empty DATA frame"
            elif t != _RST:
                control += 1
                what = _FRAME_NAMES.get(t, "unknown frame type")
        self._skip = skip
        if control or windows:
            self._count_frames(conn, control, windows, what)
        in_block = self._open_block or (skip > 0 and self._cur_type in (_HEADERS, _CONT))
        if in_block:
            if self.block_start is None:
                self.block_start = self.clock()
                self._update_deadline()
        elif self.block_start is not None:
            self.block_start = None
            self._update_deadline()

    def _count_frames(self, conn: Any, control: int, windows: int, what: str) -> None:
        now = self.clock()
        if now - self.window_start >= 1.0:
            self.window_start, self.control, self.windows = now, 0, 0
        self.control += control
        self.windows += windows
        if self.windows > self.window_cap:
            raise self._abort(conn, self._fail(
                "window_update_flood",
                f"more than {self.window_cap} WINDOW_UPDATE frames in a second"))
        if self.control > self.control_cap:
            raise self._abort(conn, self._fail(
                "control_frame_flood",
                f"more than {self.control_cap} control frames in a second (last: {what})"))

    def after_receive(self, conn: Any, events: list[Any]) -> list[Any]:
        """The stream rules over one read's events: rapid reset, refused streams, and
        requests reset in the read that opened them (dropped: no upstream work)."""
        gone: set[int] | None = None
        times = self.open_times
        for e in events:
            t = type(e)
            if t is RequestReceived:
                sid = e.stream_id
                self.opened += 1
                now = self.clock()
                times[sid] = now
                if len(times) > _OPEN_TIMES_PRUNE:
                    self._prune(now)
            elif t is StreamReset and e.remote_reset:
                if gone is None:
                    gone = set()
                gone.add(e.stream_id)
                t0 = times.pop(e.stream_id, None)
                if t0 is not None and self.clock() - t0 < self.reset_lifetime:
                    self.premature += 1
                    self._check_resets_ng(conn)
        refused = conn.streams_refused - self._refused_seen
        if refused:
            self._refused_seen += refused
            self.refused += refused
            self.opened += refused
            self.premature += refused
            if self.on_refused is not None:
                for _ in range(refused):
                    self.on_refused()
            self._check_resets_ng(conn)
        if gone:
            events = [e for e in events
                      if not (type(e) is RequestReceived and e.stream_id in gone)]
        return events

    def _check_resets_ng(self, conn: Any) -> None:
        try:
            self._check_resets()
        except AbuseDetected as exc:
            raise self._abort(conn, exc) from None

    def _prune(self, now: float) -> None:
        times = self.open_times
        horizon = now - self.reset_lifetime
        for old in list(times):
            if times[old] >= horizon or len(times) <= _OPEN_TIMES_PRUNE // 2:
                break
            del times[old]

    def headers_timed_out(self) -> AbuseDetected:
        what = "its first request headers" if not self.got_headers else "a header block"
        return self._fail("headers_timeout",
                          f"no complete {what} within {self.headers_timeout:g}s")


_FRAME_NAMES = {_PRIORITY: "PriorityFrame", _SETTINGS: "SettingsFrame", _PING: "PingFrame",
                _GOAWAY: "GoAwayFrame"}

__all__ = ["AbuseDetected", "FrameGuard"]

"""HTTP/2 abuse rules for one server-side connection (sans-IO).

Theory of operation
-------------------
:class:`FrameGuard` is sans-IO.  :meth:`FrameGuard.install` wraps two methods of one
server-side ``h2`` connection *instance*: ``_receive_frame`` (called once per complete
frame, including frames h2 answers on its own and never reports as events) and
``receive_data`` (to look at the header block h2 is still assembling).  It counts what the
client sends and, over a limit, raises :class:`AbuseDetected` — an h2
``DenialOfServiceError`` — from inside ``receive_data``; h2 then queues
``GOAWAY(ENHANCE_YOUR_CALM)`` itself and the relay fails every stream of the connection,
exactly as for any other protocol error.  The rules:

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
from collections.abc import Callable
from typing import Any

import h2.exceptions
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import RequestReceived
from h2.settings import SettingCodes

INF = float("inf")
_DATA, _HEADERS, _PRIORITY, _RST, _SETTINGS, _PUSH, _PING, _GOAWAY, _WINDOW, _CONT = range(10)
# h2 itself need never refuse a stream: we do, one stream at a time.
_H2_STREAM_CAP = 2**31 - 1
# Open-stream timestamps kept for the rapid-reset rule before old ones are pruned.
_OPEN_TIMES_PRUNE = 4096


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

    # -- wiring ---------------------------------------------------------------------------
    def install(self, conn: H2Connection) -> None:
        """Wrap ``conn`` (after ``initiate_connection``: the peer was told our real limit)."""
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

    def headers_timed_out(self) -> AbuseDetected:
        what = "its first request headers" if not self.got_headers else "a header block"
        return self._fail("headers_timeout",
                          f"no complete {what} within {self.headers_timeout:g}s")


__all__ = ["AbuseDetected", "FrameGuard"]

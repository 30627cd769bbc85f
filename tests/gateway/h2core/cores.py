"""Both HTTP/2 cores built the same way, a frame factory and normalisers for comparing them.

The h2 core here is h2 with its public configuration (inbound validation on), the
oracle; the nghttp2 core is :class:`gateway.h2core.NgHttp2Connection`.  Events and
emitted frames are reduced to plain tuples that must be equal whichever core produced
them: DATA is coalesced per stream (nghttp2 reports data as it parses, h2 per frame),
padding and WINDOW_UPDATE timing are left out (each library has its own threshold; the
credit they return is compared separately), and SETTINGS compare as effective values.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events as ev
import hpack
import hyperframe.frame as hf
from h2.settings import SettingCodes

from gateway.h2core import NgHttp2Connection

SETTINGS = {
    SettingCodes.MAX_CONCURRENT_STREAMS: 100,
    SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20,
    SettingCodes.MAX_HEADER_LIST_SIZE: 60 * 1024,
    SettingCodes.MAX_FRAME_SIZE: 16384,
    SettingCodes.ENABLE_PUSH: 0,
}
CONN_WINDOW = 16 << 20
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULTS = {1: 4096, 2: 1, 3: None, 4: 65535, 5: 16384, 6: None, 8: 0}


def h2_core(client: bool, settings: dict[int, int] | None = None,
            window: int = CONN_WINDOW) -> h2.connection.H2Connection:
    s = dict(SETTINGS if settings is None else settings)
    cfg = h2.config.H2Configuration(client_side=client, header_encoding=None,
                                    validate_inbound_headers=True,
                                    normalize_inbound_headers=False)
    conn = h2.connection.H2Connection(config=cfg)
    conn.local_settings = h2.settings.Settings(client=client, initial_values=s)
    conn.initiate_connection()
    if window > 65535:
        conn.increment_flow_control_window(window - 65535)
    return conn


def ng_core(client: bool, settings: dict[int, int] | None = None,
            window: int = CONN_WINDOW, **kw: Any) -> NgHttp2Connection:
    s = dict(SETTINGS if settings is None else settings)
    conn = NgHttp2Connection(client, settings=s, connection_window=window, **kw)
    conn.initiate_connection()
    return conn


def both(client: bool, **kw: Any) -> dict[str, Any]:
    return {"h2": h2_core(client, **kw), "nghttp2": ng_core(client, **kw)}


# -- normalising ---------------------------------------------------------------------------
def norm_events(events: list[Any]) -> list[tuple]:
    """Events as tuples; consecutive DATA of one stream merged, empty DATA dropped."""
    out: list[tuple] = []
    for e in events:
        t = type(e)
        if t is ev.DataReceived:
            if not e.data:
                continue
            if out and out[-1][0] == "data" and out[-1][1] == e.stream_id:
                out[-1] = ("data", e.stream_id, out[-1][2] + bytes(e.data))
            else:
                out.append(("data", e.stream_id, bytes(e.data)))
        elif t in (ev.RequestReceived, ev.ResponseReceived, ev.TrailersReceived,
                   ev.InformationalResponseReceived):
            out.append((t.__name__, e.stream_id, tuple((bytes(k), bytes(v)) for k, v in e.headers),
                        bool(getattr(e, "stream_ended", None))))
        elif t is ev.StreamEnded:
            out.append(("ended", e.stream_id))
        elif t is ev.StreamReset:
            out.append(("reset", e.stream_id, int(e.error_code), e.remote_reset))
        elif t is ev.WindowUpdated:
            out.append(("window", e.stream_id, e.delta))
        elif t is ev.RemoteSettingsChanged:
            out.append(("settings", {int(k): v.new_value for k, v in e.changed_settings.items()}))
        elif t is ev.SettingsAcknowledged:
            out.append(("settings_ack",))
        elif t is ev.PingReceived:
            out.append(("ping", e.ping_data))
        elif t is ev.PingAckReceived:
            out.append(("ping_ack", e.ping_data))
        elif t is ev.ConnectionTerminated:
            out.append(("goaway", int(e.error_code), e.last_stream_id))
        elif t is ev.PriorityUpdated:
            out.append(("priority", e.stream_id, e.weight, e.depends_on, e.exclusive))
        elif t is ev.UnknownFrameReceived:
            continue  # nghttp2 drops unknown frame types silently, as RFC 9113 §4.1 asks
        else:
            out.append((t.__name__,))
    return out


def norm_settings_events(items: list[tuple]) -> list[tuple]:
    """h2 reports every setting of a SETTINGS frame; keep only values that differ from
    the defaults, which is what both cores effectively applied."""
    out = []
    for item in items:
        if item[0] == "settings":
            item = ("settings", {k: v for k, v in item[1].items() if DEFAULTS.get(k) != v})
        out.append(item)
    return out


class FrameReader:
    """Parses one direction of a connection into normalised frames (stateful HPACK)."""

    def __init__(self, expect_preface: bool = False) -> None:
        self.buf = b""
        self.preface = expect_preface
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = 1 << 24
        self.decoder.max_allowed_table_size = 1 << 24  # whatever the client allowed
        self.block: tuple[int, bytes, bool] | None = None
        self.credit: dict[int, int] = {}

    def feed(self, data: bytes) -> list[tuple]:
        self.buf += data
        if self.preface:
            if len(self.buf) < len(PREFACE):
                return []
            assert self.buf.startswith(PREFACE), self.buf[:24]
            self.buf = self.buf[len(PREFACE):]
            self.preface = False
        out: list[tuple] = []
        while len(self.buf) >= 9:
            f, length = hf.Frame.parse_frame_header(memoryview(self.buf[:9]))
            if len(self.buf) < 9 + length:
                break
            f.parse_body(memoryview(self.buf[9:9 + length]))
            self.buf = self.buf[9 + length:]
            out.extend(self._frame(f))
        return out

    def _frame(self, f: Any) -> list[tuple]:
        t = type(f)
        if t in (hf.HeadersFrame, hf.ContinuationFrame):
            if t is hf.HeadersFrame:
                self.block = (f.stream_id, f.data, "END_STREAM" in f.flags)
            else:
                assert self.block is not None
                self.block = (self.block[0], self.block[1] + f.data, self.block[2])
            if "END_HEADERS" not in f.flags:
                return []
            sid, block, end = self.block
            self.block = None
            hs = tuple((bytes(k), bytes(v)) for k, v in self.decoder.decode(block, raw=True))
            return [("HEADERS", sid, hs, end)]
        if t is hf.DataFrame:
            return [("DATA", f.stream_id, bytes(f.data), "END_STREAM" in f.flags)]
        if t is hf.WindowUpdateFrame:
            self.credit[f.stream_id] = self.credit.get(f.stream_id, 0) + f.window_increment
            return []
        if t is hf.SettingsFrame:
            if "ACK" in f.flags:
                return [("SETTINGS_ACK",)]
            eff = {k: v for k, v in f.settings.items() if DEFAULTS.get(k) != v}
            return [("SETTINGS", eff)]
        if t is hf.RstStreamFrame:
            return [("RST_STREAM", f.stream_id, f.error_code)]
        if t is hf.GoAwayFrame:
            return [("GOAWAY", f.last_stream_id, f.error_code)]
        if t is hf.PingFrame:
            return [("PING", "ACK" in f.flags, bytes(f.opaque_data))]
        if t is hf.PriorityFrame:
            return [("PRIORITY", f.stream_id)]
        return [(t.__name__, f.stream_id)]


def coalesce(frames: list[tuple]) -> list[tuple]:
    """Consecutive DATA frames of one stream as one (frame sizes are each library's)."""
    out: list[tuple] = []
    for fr in frames:
        if fr[0] == "DATA" and out and out[-1][0] == "DATA" and out[-1][1] == fr[1] \
                and not out[-1][3]:
            out[-1] = ("DATA", fr[1], out[-1][2] + fr[2], fr[3])
        elif fr[0] == "DATA" and not fr[2] and not fr[3]:
            continue
        else:
            out.append(fr)
    return out


# -- building frames -------------------------------------------------------------------------
class FrameFactory:
    """Serialised frames for a client talking to a server core (HPACK state kept)."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()

    def preface(self, settings: dict[int, int] | None = None) -> bytes:
        return PREFACE + self.settings(settings or {})

    def settings(self, values: dict[int, int] | None = None, ack: bool = False) -> bytes:
        f = hf.SettingsFrame(0)
        if ack:
            f.flags.add("ACK")
        else:
            f.settings = dict(values or {})
        return f.serialize()

    def headers(self, sid: int, headers: list[tuple[bytes, bytes]], end: bool = False,
                split: int = 0) -> bytes:
        block = self.encoder.encode(headers)
        if split and len(block) > split:
            first, rest = block[:split], block[split:]
            f = hf.HeadersFrame(sid, first)
            if end:
                f.flags.add("END_STREAM")
            out = f.serialize()
            while rest:
                part, rest = rest[:split], rest[split:]
                c = hf.ContinuationFrame(sid, part)
                if not rest:
                    c.flags.add("END_HEADERS")
                out += c.serialize()
            return out
        f = hf.HeadersFrame(sid, block)
        f.flags.add("END_HEADERS")
        if end:
            f.flags.add("END_STREAM")
        return f.serialize()

    def data(self, sid: int, data: bytes, end: bool = False, pad: int = 0) -> bytes:
        f = hf.DataFrame(sid, data)
        if end:
            f.flags.add("END_STREAM")
        if pad:
            f.flags.add("PADDED")
            f.pad_length = pad
        return f.serialize()

    def window_update(self, sid: int, inc: int) -> bytes:
        return hf.WindowUpdateFrame(sid, inc).serialize()

    def rst(self, sid: int, code: int = 8) -> bytes:
        return hf.RstStreamFrame(sid, code).serialize()

    def ping(self, data: bytes = b"12345678", ack: bool = False) -> bytes:
        f = hf.PingFrame(0, data)
        if ack:
            f.flags.add("ACK")
        return f.serialize()

    def goaway(self, last: int = 0, code: int = 0) -> bytes:
        return hf.GoAwayFrame(0, last, code).serialize()

    def priority(self, sid: int, depends_on: int = 0, weight: int = 15) -> bytes:
        return hf.PriorityFrame(sid, depends_on, weight).serialize()


def request(path: bytes = b"/", method: bytes = b"GET",
            extra: list[tuple[bytes, bytes]] | None = None) -> list[tuple[bytes, bytes]]:
    return [(b":method", method), (b":scheme", b"http"), (b":path", path),
            (b":authority", b"example.test")] + list(extra or [])

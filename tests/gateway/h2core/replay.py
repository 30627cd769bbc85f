"""Replaying recorded client bytes into a server core, answering with the Responder, and
reducing what came out to something comparable across cores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import h2.exceptions

from .cores import CONN_WINDOW, FrameReader, coalesce, h2_core, ng_core, norm_events, \
    norm_settings_events
from .responder import Responder

MAKERS = {"h2": h2_core, "nghttp2": ng_core}


@dataclass
class Replay:
    events: list[tuple]
    streams: dict[int, list[tuple]]  # stream id -> its frames, DATA coalesced
    control: list[tuple]  # frames on stream 0, in order
    credit: dict[int, int]  # WINDOW_UPDATE increments we granted, per stream
    received: dict[int, int] = field(default_factory=dict)  # DATA bytes per stream
    error: int | None = None  # GOAWAY code when receive_data raised


def per_stream(frames: list[tuple]) -> tuple[dict[int, list[tuple]], list[tuple]]:
    streams: dict[int, list[tuple]] = {}
    control: list[tuple] = []
    for fr in frames:
        sid = fr[1] if fr[0] in ("HEADERS", "DATA", "RST_STREAM", "PRIORITY") else 0
        if sid:
            streams.setdefault(sid, []).append(fr)
        else:
            control.append(fr)
    return {k: coalesce(v) for k, v in streams.items()}, control


def replay(core: str, reads: list[bytes], **kw: Any) -> Replay:
    conn = MAKERS[core](False, **kw)
    resp = Responder(conn)
    reader = FrameReader()
    frames = reader.feed(conn.data_to_send())
    events: list[Any] = []
    error = None
    for data in reads:
        try:
            got = conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            error = int(exc.error_code)
            frames += reader.feed(conn.data_to_send())
            break
        events += got
        resp.handle(got)
        out = reader.feed(conn.data_to_send())
        if not resp.closed:
            # h2 drops everything queued once it sees the peer's GOAWAY; nghttp2 still
            # sends what it owes (SETTINGS ACK): compare up to the GOAWAY only.
            frames += out
    streams, control = per_stream(frames)
    norm = norm_settings_events(norm_events(events))
    received: dict[int, int] = {}
    for e in norm:
        if e[0] == "data":
            received[e[1]] = received.get(e[1], 0) + len(e[2])
    credit = dict(reader.credit)
    credit[0] = credit.get(0, 0) - (CONN_WINDOW - 65535)
    return Replay(norm, streams, control, credit, received, error)


def rechunk(reads: list[bytes], size: int) -> list[bytes]:
    data = b"".join(reads)
    return [data[i:i + size] for i in range(0, len(data), size)]

"""One request handler for either core: the same calls in the same order on both.

It acknowledges request DATA at once, answers each request when its stream ends —
``/size/N`` gets N bytes, ``application/grpc`` gets one message and trailers — and
streams response bodies only as far as the send window allows, resuming on
WindowUpdated/RemoteSettingsChanged.  Used by the capture server (on h2) and by the
differential replays (on both cores).
"""

from __future__ import annotations

from typing import Any

import h2.events as ev
import h2.exceptions

GRPC_MESSAGE = b"\x00\x00\x00\x00\x02ok"


def body_for(path: bytes) -> bytes:
    if path.startswith(b"/size/"):
        n = int(path[6:].split(b"?")[0] or 0)
        return bytes(range(256)) * (n // 256) + bytes(range(n % 256))
    return b"hello\n"


class Responder:
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.requests: dict[int, dict[bytes, bytes]] = {}
        self.pending: dict[int, list[Any]] = {}  # sid -> [memoryview body, trailers]
        self.answered = 0
        self.received = 0
        self.closed = False  # the peer sent GOAWAY: like the relay, stop sending

    def handle(self, events: list[Any]) -> None:
        conn = self.conn
        if any(type(e) is ev.ConnectionTerminated for e in events):
            self.closed = True  # (h2 refuses to send at all once it has seen GOAWAY)
        for e in events:
            t = type(e)
            if t is ev.RequestReceived:
                self.requests[e.stream_id] = {bytes(k): bytes(v) for k, v in e.headers}
            elif t is ev.DataReceived:
                self.received += len(e.data)
                if e.flow_controlled_length:
                    conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif t is ev.StreamEnded and not self.closed:
                try:
                    self._answer(e.stream_id)
                except h2.exceptions.ProtocolError:
                    # Reset later in the same read (both cores closed it already),
                    # as the relay's flush treats it.
                    self.pending.pop(e.stream_id, None)
            elif t is ev.ConnectionTerminated:
                self.closed = True
                self.pending.clear()
            elif t is ev.StreamReset:
                self.pending.pop(e.stream_id, None)
                self.requests.pop(e.stream_id, None)
        self.pump()

    def _answer(self, sid: int) -> None:
        req = self.requests.pop(sid, None)
        if req is None:
            return
        self.answered += 1
        if req.get(b"content-type", b"").startswith(b"application/grpc"):
            self.conn.send_headers(sid, [(b":status", b"200"),
                                         (b"content-type", b"application/grpc")])
            self.pending[sid] = [memoryview(GRPC_MESSAGE), [(b"grpc-status", b"0")]]
        else:
            body = body_for(req.get(b":path", b"/"))
            self.conn.send_headers(sid, [(b":status", b"200"),
                                         (b"content-length", str(len(body)).encode()),
                                         (b"content-type", b"application/octet-stream")],
                                   end_stream=not body)
            if body:
                self.pending[sid] = [memoryview(body), None]

    def pump(self) -> None:
        conn = self.conn
        for sid in list(self.pending):
            body, trailers = self.pending[sid]
            try:
                while body:
                    n = min(len(body), conn.local_flow_control_window(sid),
                            conn.max_outbound_frame_size)
                    if n <= 0:
                        break
                    chunk, body = body[:n], body[n:]
                    conn.send_data(sid, chunk, end_stream=not body and trailers is None)
                self.pending[sid][0] = body
                if not body:
                    del self.pending[sid]
                    if trailers is not None:
                        conn.send_headers(sid, trailers, end_stream=True)
            except h2.exceptions.ProtocolError:
                self.pending.pop(sid, None)

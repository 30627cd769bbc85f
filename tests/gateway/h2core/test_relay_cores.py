"""The gateway's sans-IO relay, unchanged, on either core: a client and a server (h2,
the same on both runs) talk through a downstream and an upstream endpoint whose
connections are h2 in one run and nghttp2 in the other.  What the client and the server
see must be the same: the relay's decisions do not depend on the core."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events as ev
import pytest
from h2.errors import ErrorCodes

from gateway._context import RequestContext
from gateway._relay import H2Endpoint, H2Half
from gateway._telemetry import Exchange

from .cores import h2_core, ng_core, norm_events

CORES = {"h2": h2_core, "nghttp2": ng_core}
GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"svc")]


class Rig:
    """client <-> [down endpoint | relay | up endpoint] <-> server, in memory."""

    def __init__(self, core: str, client_window: int = 65535) -> None:
        make = CORES[core]
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.client.local_settings.initial_window_size = client_window
        self.server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.down = H2Endpoint(make(False))
        self.up = H2Endpoint(make(True, settings={2: 0, 4: 1 << 20}))
        self.down.on_request = self.on_request
        self.client_events: list = []
        self.server_events: list = []
        self.client_reads = True
        self.pump()

    def on_request(self, half: H2Half, headers, end: bool) -> None:
        ctx = half.ctx = RequestContext(Exchange("source", "HTTP/2", lambda x: None))
        ctx.grpc = any(k == b"content-type" and v.startswith(b"application/grpc")
                       for k, v in headers)
        up = H2Half(None, down=False)
        half.peer, up.peer = up, half
        up.write_headers(headers, end)
        up.attach(self.up)

    def pump(self) -> None:
        for _ in range(200):
            moved = False
            if b := self.client.data_to_send():
                self.down.receive(b)
                moved = True
            if b := self.up.take_output():
                self.server_events += self.server.receive_data(b)
                moved = True
            if b := self.server.data_to_send():
                self.up.receive(b)
                moved = True
            if self.client_reads and (b := self.down.take_output()):
                self.client_events += self.client.receive_data(b)
                moved = True
            if not moved:
                return

    def request(self, headers=GET, end: bool = True) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, headers, end_stream=end)
        self.pump()
        return sid

    def server_request(self) -> int:
        return [e for e in self.server_events if type(e) is ev.RequestReceived][-1].stream_id

    def seen(self) -> tuple[dict, dict]:
        """What the two outer peers observed, stream by stream (the order across streams
        is each library's scheduling; window timing is left out)."""
        def keep(events: list) -> dict:
            per: dict[int, list] = {}
            for e in norm_events([e for e in events if type(e) is not ev.WindowUpdated]):
                if e[0] in ("settings", "settings_ack"):
                    continue
                sid = e[1] if isinstance(e[1], int) and e[0] not in ("goaway", "ping") else 0
                got = per.setdefault(sid, [])
                if e[0] == "data" and got and got[-1][0] == "data":
                    got[-1] = ("data", sid, got[-1][2] + e[2])
                else:
                    got.append(e)
            return per
        return keep(self.client_events), keep(self.server_events)


def grpc_exchange(r: Rig) -> None:
    sid = r.request([(b":method", b"POST")] + GET[1:]
                    + [(b"content-type", b"application/grpc"), (b"te", b"trailers")],
                    end=False)
    r.client.send_data(sid, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    r.pump()
    up = r.server_request()
    r.server.send_headers(up, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    r.server.send_data(up, b"\x00\x00\x00\x00\x01a")
    r.server.send_headers(up, [(b"grpc-status", b"0")], end_stream=True)
    r.pump()
    assert not r.down.halves and not r.up.halves


def slow_client(r: Rig) -> None:
    sid = r.request()
    up = r.server_request()
    r.server.send_headers(up, [(b":status", b"200")])
    r.pump()
    r.client_reads = True
    for _ in range(100):
        n = min(16384, r.server.local_flow_control_window(up))
        if n <= 0:
            break
        r.server.send_data(up, b"x" * n)
        r.pump()
    got = sum(len(e.data) for e in r.client_events if type(e) is ev.DataReceived)
    assert got == 65535  # the client's window, not a byte more
    assert r.server.local_flow_control_window(up) == 0  # the relay did not ack the rest
    r.client.acknowledge_received_data(got, sid)
    r.pump()
    assert sum(len(e.data) for e in r.client_events if type(e) is ev.DataReceived) > got


def big_upload(r: Rig) -> None:
    sid = r.request([(b":method", b"POST")] + GET[1:], end=False)
    body = bytes(range(256)) * 4096  # 1 MiB through windows of 64 KiB
    sent = 0
    for _ in range(2000):
        if sent == len(body):
            break
        n = min(r.client.local_flow_control_window(sid), 16384, len(body) - sent)
        if n:
            r.client.send_data(sid, body[sent:sent + n], end_stream=sent + n == len(body))
            sent += n
        r.pump()
        for e in r.server_events:
            if type(e) is ev.DataReceived and not getattr(e, "acked", False):
                e.acked = True
                r.server.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        r.pump()
    data = b"".join(e.data for e in r.server_events if type(e) is ev.DataReceived)
    assert sent == len(body) and data == body


def upstream_reset_before_response(r: Rig) -> None:
    r.request()
    r.server.reset_stream(r.server_request(), ErrorCodes.INTERNAL_ERROR)
    r.pump()
    resp = [e for e in r.client_events if type(e) is ev.ResponseReceived]
    assert dict(resp[0].headers)[b":status"] == b"503"


def client_reset_mid_response(r: Rig) -> None:
    sid = r.request()
    up = r.server_request()
    r.server.send_headers(up, [(b":status", b"200")])
    r.server.send_data(up, b"partial")
    r.pump()
    r.client.reset_stream(sid, ErrorCodes.CANCEL)
    r.pump()
    resets = [e for e in r.server_events if type(e) is ev.StreamReset]
    assert [(e.stream_id, e.error_code) for e in resets] == [(up, ErrorCodes.CANCEL)]


def upstream_goaway(r: Rig) -> None:
    r.request()
    r.request()
    r.server.close_connection(ErrorCodes.NO_ERROR, last_stream_id=0)
    r.pump()
    statuses = [dict(e.headers)[b":status"] for e in r.client_events
                if type(e) is ev.ResponseReceived]
    assert statuses == [b"503", b"503"]


SCENARIOS = [grpc_exchange, slow_client, big_upload, upstream_reset_before_response,
             client_reset_mid_response, upstream_goaway]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_the_relay_makes_the_same_decisions_on_both_cores(scenario) -> None:
    runs = {}
    for core in CORES:
        rig = Rig(core)
        scenario(rig)
        runs[core] = rig.seen()
    assert runs["h2"] == runs["nghttp2"]

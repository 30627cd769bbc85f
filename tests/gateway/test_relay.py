"""The sans-IO relay, driven with bytes from real h2 peers and no sockets: flow control
end to end, trailers, resets, failures before and after response headers."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hypothesis import example, given
from hypothesis import strategies as st

import gateway
from gateway._config import Limits
from gateway._context import RequestContext
from gateway._half import link
from gateway._h2 import ConnectionFactory
from gateway._proxy import traceparent
from gateway._relay import H2Endpoint, new_upstream
from gateway._telemetry import Exchange

from gateway.h2core import select_core

L = Limits()
pytestmark = pytest.mark.both_cores


class Rig:
    """client <-> [down endpoint | relay | up endpoint] <-> server, all in memory."""

    def __init__(self, window: int = 65535) -> None:
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.client.local_settings.initial_window_size = window
        self.client.initiate_connection()
        self.server.initiate_connection()
        make = ConnectionFactory(select_core(), L)  # the core of this run (both_cores)
        self.down = H2Endpoint(make(False, False))
        self.up = H2Endpoint(make(True, True))
        self.down.on_request = self.on_request
        self.server_events: list = []
        self.client_events: list = []
        self.exchanges: list[Exchange] = []
        self.attach = True
        self.pending_up = None
        self.client_reads = True
        self.pump()

    def on_request(self, half, headers, end) -> None:
        x = Exchange("source", "HTTP/2", lambda x: None)
        half.ctx = RequestContext.parse(headers, x)
        self.exchanges.append(x)
        up = new_upstream()
        link(half, up)
        up.write_headers(headers, end)
        if self.attach:
            up.attach(self.up)
        else:
            self.pending_up = up

    def pump(self) -> None:
        for _ in range(100):
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

    def request(self, headers=None, end=True) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, headers or [(b":method", b"GET"), (b":scheme", b"http"),
                                                  (b":path", b"/"), (b":authority", b"svc")], end_stream=end)
        self.pump()
        return sid


def _of(events, kind):
    return [e for e in events if isinstance(e, kind)]


def test_request_response_and_trailers_are_relayed() -> None:
    r = Rig()
    r.request([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/x"), (b":authority", b"svc"),
               (b"content-type", b"application/grpc")])
    req = _of(r.server_events, h2.events.RequestReceived)[0]
    assert dict(req.headers)[b":path"] == b"/x"
    assert _of(r.server_events, h2.events.StreamEnded)
    r.server.send_headers(req.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    r.server.send_data(req.stream_id, b"\x00\x00\x00\x00\x01a")
    r.server.send_headers(req.stream_id, [(b"grpc-status", b"0")], end_stream=True)
    r.pump()
    assert dict(_of(r.client_events, h2.events.TrailersReceived)[0].headers)[b"grpc-status"] == b"0"
    x = r.exchanges[0]
    assert x.done and x.response_code == 200 and x.grpc_status == "0" and x.bytes_sent == 6
    assert not r.down.halves and not r.up.halves  # both streams forgotten


def test_slow_client_closes_the_servers_window() -> None:
    """Bytes reach the client only as its window allows; the server's window is returned
    only for bytes actually written onward, so the relay holds at most one window."""
    r = Rig(window=65535)
    sid = r.request()
    up_sid = _of(r.server_events, h2.events.RequestReceived)[0].stream_id
    r.server.send_headers(up_sid, [(b":status", b"200")])
    r.pump()
    sent = 0
    for _ in range(200):  # offer 16 KiB at a time while the client acknowledges nothing
        n = min(16384, r.server.local_flow_control_window(up_sid))
        if n <= 0:
            break
        r.server.send_data(up_sid, b"x" * n)
        sent += n
        r.client_reads = True
        r.pump()
    received = sum(len(e.data) for e in _of(r.client_events, h2.events.DataReceived))
    # The client (never acknowledging) got exactly its 64 KiB window...
    assert received == 65535
    # ...and the server could send its stream window plus at most what the relay forwarded
    # (h2 batches WINDOW_UPDATEs until half a window is consumed), no more.
    assert L.initial_stream_window <= sent <= 65535 + L.initial_stream_window
    assert r.server.local_flow_control_window(up_sid) == 0
    queued = sum(len(i[1]) for h in r.down.halves.values() for i in h.q if i[0] == 1)
    assert queued == sent - received
    # The client now consumes: the rest flows.
    r.client.acknowledge_received_data(received, sid)
    r.pump()
    assert sum(len(e.data) for e in _of(r.client_events, h2.events.DataReceived)) > received


def test_upstream_reset_before_response_becomes_503() -> None:
    r = Rig()
    r.request()
    up_sid = _of(r.server_events, h2.events.RequestReceived)[0].stream_id
    r.server.reset_stream(up_sid, ErrorCodes.INTERNAL_ERROR)
    r.pump()
    resp = _of(r.client_events, h2.events.ResponseReceived)[0]
    assert dict(resp.headers)[b":status"] == b"503"
    assert r.exchanges[0].response_flags == "UR"


def test_upstream_reset_after_response_headers_resets_downstream() -> None:
    r = Rig()
    r.request()
    up_sid = _of(r.server_events, h2.events.RequestReceived)[0].stream_id
    r.server.send_headers(up_sid, [(b":status", b"200")])
    r.pump()
    r.server.reset_stream(up_sid, ErrorCodes.INTERNAL_ERROR)
    r.pump()
    assert _of(r.client_events, h2.events.StreamReset)


def test_grpc_upstream_connection_failure_is_trailers_only_unavailable() -> None:
    r = Rig()
    r.attach = False
    r.request([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/s/M"), (b":authority", b"svc"),
               (b"content-type", b"application/grpc")])
    r.pending_up.remote_reset(ErrorCodes.REFUSED_STREAM, "UF")  # what the pool does when a dial fails
    r.pump()
    resp = _of(r.client_events, h2.events.ResponseReceived)[0]
    h = dict(resp.headers)
    assert h[b":status"] == b"200" and h[b"grpc-status"] == b"14"
    assert resp.stream_ended is not None  # trailers-only
    assert r.exchanges[0].response_flags == "UF"


def test_client_reset_propagates_upstream() -> None:
    r = Rig()
    sid = r.request(end=False)
    r.client.reset_stream(sid, ErrorCodes.CANCEL)
    r.pump()
    assert _of(r.server_events, h2.events.StreamReset)


@given(st.binary(max_size=80))
def test_traceparent_always_yields_a_valid_header(incoming: bytes) -> None:
    value, trace = traceparent(incoming)
    parts = value.split(b"-")
    assert len(parts) == 4 and parts[0] == b"00" and len(parts[1]) == 32 and len(parts[2]) == 16
    assert parts[1].decode() == trace and trace != "0" * 32


@given(st.text(max_size=60) | st.from_regex(r"\A[A-Za-z.\[\]:]{0,20}:[0-9²١]{0,6}\Z"))
@example("a:²")
@example("a:١٢")
@example("[::1]:8080")
@example("Host.:80")
@example("host:")
def test_split_authority_never_raises_and_splits_at_a_decimal_port(value: str) -> None:
    host, port = gateway.split_authority(value)
    head, sep, tail = value.rpartition(":")
    if sep and tail and tail.isascii() and tail.isdigit():
        assert port == int(tail) and host == head.lower().rstrip(".")
    else:  # no port: the whole value is the host
        assert port is None and host == value.lower().rstrip(".")

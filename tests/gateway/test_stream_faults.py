"""A stream's fault stays in that stream: a victim workload keeps a TCP tunnel and an
HTTP/2 stream open through east's pooled connection to west while an attacker workload
sends, through the same outbound, every request known to have torn that connection
down; the victim keeps working, the attacker gets an error on its own stream only."""

from __future__ import annotations

import json
import threading
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import h2.config
import h2.connection
import h2.events
import pytest
import trio

import trust
from federation.models import AuthorizationPolicy, ExportedService, Rule, RuleTo, Selector, ServicePort

from .conftest import Mesh
from .h2client import ConnectionRefusedByPeer, h2_request

pytestmark = pytest.mark.both_cores  # HTTP/2 data path: run on each core

WEB = b"web.default.west.isthmus.local:8080"
LEGACY = b"legacy.default.west.isthmus.local"
TCP = b"tcpecho.default.west.isthmus.local:7"
DENY_ADMIN = AuthorizationPolicy(name="deny-admin", selector=Selector(namespace="default",
                                                                      service="web"),
                                 action="DENY", rules=(Rule(to=(RuleTo(paths=("/admin*",)),)),))


class _H1(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET


@pytest.fixture
def stage(mesh: Mesh):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _H1)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    legacy = ExportedService(cluster="west", namespace="default", name="legacy", ports=(
        ServicePort(port=80, protocol="HTTP", target=f"127.0.0.1:{server.server_address[1]}"),))
    snap = mesh.snapshot(revision=3, extra_services=(legacy,)).model_copy(
        update={"policies": (DENY_ADMIN,)})
    mesh.west.apply_snapshot(snap)
    mesh.east.apply_snapshot(snap)
    yield mesh
    server.shutdown()


class Victim:
    """One workload connection holding a CONNECT tunnel and a POST whose body is still
    being sent, both relayed over east's pooled connection to west."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None))
        self.tunnel = self.post = 0
        self.echoed = bytearray()
        self.response: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.ended = False
        self.sent = 0

    @classmethod
    async def open(cls, port: int) -> Victim:
        v = cls(await trio.open_tcp_stream("127.0.0.1", port))
        v.conn.initiate_connection()
        v.tunnel = v.conn.get_next_available_stream_id()
        v.conn.send_headers(v.tunnel, [(b":method", b"CONNECT"), (b":authority", TCP)])
        v.post = v.conn.get_next_available_stream_id()
        v.conn.send_headers(v.post, [(b":method", b"POST"), (b":scheme", b"http"),
                                     (b":path", b"/echo"), (b":authority", WEB)])
        await v.flush()
        await v.until(lambda: v.response.get(v.tunnel) == b"200")
        return v

    async def flush(self) -> None:
        await self.stream.send_all(self.conn.data_to_send())

    async def until(self, done: Callable[[], bool]) -> None:
        with trio.fail_after(10):
            while not done():
                data = await self.stream.receive_some(65536)
                assert data, "the victim's connection was closed"
                for e in self.conn.receive_data(data):
                    if isinstance(e, h2.events.ResponseReceived):
                        self.response[e.stream_id] = dict(e.headers)[b":status"]
                    elif isinstance(e, h2.events.DataReceived):
                        self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                        (self.echoed if e.stream_id == self.tunnel else self.body).extend(e.data)
                    elif isinstance(e, h2.events.StreamEnded) and e.stream_id == self.post:
                        self.ended = True
                    elif isinstance(e, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                        raise AssertionError(f"the victim lost a stream: {e!r}")
                await self.flush()

    async def still_works(self, i: int) -> None:
        """A round trip through the tunnel and one more piece of the POST body."""
        ping = f"ping-{i};".encode()
        before = len(self.echoed)
        self.conn.send_data(self.tunnel, ping)
        self.conn.send_data(self.post, b"x" * 1000)
        self.sent += 1000
        await self.flush()
        await self.until(lambda: bytes(self.echoed[before:]) == ping)

    async def finish(self) -> dict:
        self.conn.end_stream(self.post)
        await self.flush()
        await self.until(lambda: self.ended)
        assert self.response[self.post] == b"200"
        return json.loads(self.body)


def peer_connections(mesh: Mesh) -> list:
    return [ep for ep in mesh.east.endpoints if isinstance(ep.info, tuple) and ep.info[0] == "peer"]


async def h1_raw(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh HTTP/1.1 connection; everything read until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    try:
        await stream.send_all(data)
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                out += chunk
                if out.endswith(b"\r\n\r\n") and b"content-length: 0" in out.lower():
                    break
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(stream)
    return out


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


async def h2_status(port: int, headers: list[tuple[bytes, bytes]], body: bytes = b"",
                    ssl_context=None, raw: bool = False) -> int:
    """The status the attacker gets; 0 if its own stream or connection was reset instead."""
    try:
        if raw:
            return await _h2_unvalidated(port, headers, body)
        resp, _ = await h2_request(port, headers, body=body, ssl_context=ssl_context)
    except ConnectionRefusedByPeer:
        return 0
    return int(resp[b":status"])


async def _h2_unvalidated(port: int, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    """Like h2_request, but lets the caller send what h2 itself would refuse to send."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False))
    try:
        conn.initiate_connection()
        conn.send_headers(1, headers, end_stream=not body)
        if body:
            conn.send_data(1, body, end_stream=True)
        await stream.send_all(conn.data_to_send())
        with trio.fail_after(5):
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return 0
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    return 0
                for e in events:
                    if isinstance(e, h2.events.ResponseReceived):
                        return int(dict(e.headers)[b":status"])
                    if isinstance(e, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                        return 0
                await stream.send_all(conn.data_to_send())
    except trio.BrokenResourceError:
        return 0
    finally:
        await trio.aclose_forcefully(stream)


def req(method: bytes, path: bytes, authority: bytes = WEB, *extra: tuple[bytes, bytes]):
    return [(b":method", method), (b":scheme", b"http"), (b":path", path),
            (b":authority", authority), *extra]


def _padded(authority: bytes, limit: int, margin: int) -> list[tuple[bytes, bytes]]:
    """A request whose header list is ``margin`` bytes under ``limit`` (RFC 9113 §6.5.2)."""
    base = req(b"GET", b"/echo", authority)
    size = sum(len(k) + len(v) + 32 for k, v in base)
    pads, left = [], limit - margin - size
    i = 0
    while left > 32 + 8 + 1:
        n = min(4000, left - 32 - 8)
        pads.append((f"x-pad-{i:02d}".encode(), b"p" * n))
        left -= n + 32 + 8
        i += 1
    return base + pads


def attacks(mesh: Mesh) -> list[tuple[str, Callable[[], Awaitable[int]], tuple[int, ...]]]:
    out = mesh.east_out
    limit = mesh.east.limits.max_header_list_size
    chunked = b"3\r\nabc\r\n0\r\n\r\n"
    host = b"host: " + WEB + b"\r\nconnection: close\r\n"
    return [
        # (a) Content-Length together with Transfer-Encoding: chunked
        ("a: CL + TE (h1)", lambda: _h1(out, b"POST /echo HTTP/1.1\r\n" + host +
                                       b"content-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
                                       + chunked), (400,)),
        # (b) a Content-Length larger than the chunked body
        ("b: CL > chunked body (h1)", lambda: _h1(out, b"POST /echo HTTP/1.1\r\n" + host +
                                                  b"content-length: 100\r\ntransfer-encoding: "
                                                  b"chunked\r\n\r\n" + chunked), (400,)),
        ("b: CL > body (h2)", lambda: h2_status(out, req(b"POST", b"/echo", WEB,
                                                         (b"content-length", b"100")),
                                                body=b"short", raw=True), (0, 400, 502)),
        ("b: CL < body (h2)", lambda: h2_status(out, req(b"POST", b"/echo", WEB,
                                                         (b"content-length", b"2")),
                                                body=b"much longer", raw=True), (0, 400, 502)),
        # (c) HEAD to a path a policy denies (west's 403 must carry no body)
        ("c: HEAD denied (h2)", lambda: h2_status(out, req(b"HEAD", b"/admin")), (403,)),
        ("c: HEAD denied (h1)", lambda: _h1(out, b"HEAD /admin HTTP/1.1\r\n" + host +
                                            b"\r\n", head=True), (403,)),
        ("c: HEAD to the h1 service", lambda: h2_status(out, req(b"HEAD", b"/x", LEGACY)),
         (200,)),
        ("c: HEAD unknown name", lambda: h2_status(out, req(b"HEAD", b"/", b"nope.isthmus.local")),
         (404,)),
        # (d) a space in :path, to an HTTP/1.1 export
        ("d: SP in :path to h1 export", lambda: h2_status(out, req(b"GET", b"/a b", LEGACY),
                                                          raw=True), (400,)),
        ("d: CTL in :path", lambda: h2_status(out, req(b"GET", b"/a\x01b", LEGACY), raw=True),
         (400,)),
        ("d: lower-case method", lambda: h2_status(out, req(b"get", b"/x", LEGACY), raw=True),
         (400,)),
        ("d: non-ASCII method", lambda: h2_status(out, req(b"G\xffT", b"/x", LEGACY),
                                                  raw=True), (400,)),
        ("d: absolute :path", lambda: h2_status(out, req(b"GET", b"http://x/admin", LEGACY),
                                                raw=True), (0, 400)),
        # (e) a header list just under the outbound's limit
        ("e: headers at the limit", lambda: h2_status(out, _padded(WEB, limit, 40)), (431,)),
        ("e: headers at the limit (h1)", lambda: _h1(out, b"".join(
            [b"GET /echo HTTP/1.1\r\n"] + [k + b": " + v + b"\r\n" for k, v in
                                           _padded(WEB, limit, 40) if k[:1] != b":"]
            + [host, b"\r\n"])), (431,)),
        # more of the same class: what HTTP/2 forbids, sent by workloads
        ("upper-case name", lambda: h2_status(out, req(b"GET", b"/echo", WEB, (b"X-Up", b"1")),
                                              raw=True), (0, 400)),
        ("connection header", lambda: h2_status(out, req(b"GET", b"/echo", WEB,
                                                         (b"connection", b"close")), raw=True),
         (0, 400)),
        ("te: gzip", lambda: h2_status(out, req(b"GET", b"/echo", WEB, (b"te", b"gzip")),
                                       raw=True), (0, 400)),
        ("CRLF in a value", lambda: h2_status(out, req(b"GET", b"/echo", WEB,
                                                       (b"x-a", b"1\r\nx-b: 2")), raw=True),
         (0, 400)),
        ("bad content-length", lambda: h2_status(out, req(b"POST", b"/echo", WEB,
                                                          (b"content-length", b"1x")),
                                                 body=b"1x", raw=True), (0, 400)),
        ("bad chunk mid-body (h1)", lambda: _h1(out, b"POST /echo HTTP/1.1\r\n" + host +
                                                b"transfer-encoding: chunked\r\n\r\n"
                                                b"3\r\nabc\r\nzz\r\n"), (400, 0)),
        ("CONNECT to an HTTP port", lambda: h2_status(out, [(b":method", b"CONNECT"),
                                                            (b":authority", WEB)]), (405,)),
        ("duplicate :path", lambda: h2_status(out, req(b"GET", b"/echo", WEB) +
                                              [(b":path", b"/x")], raw=True), (0, 400)),
    ]


async def _h1(port: int, data: bytes, head: bool = False) -> int:
    raw = await h1_raw(port, data)
    if head:  # a HEAD answer must end at its headers: nothing may follow
        assert raw.endswith(b"\r\n\r\n"), raw
    return _status(raw)


async def test_victim_keeps_working_while_attackers_send_each_trigger(stage: Mesh) -> None:
    mesh = stage
    victim = await Victim.open(mesh.east_out)
    await victim.still_works(0)
    peers = peer_connections(mesh)
    assert len(peers) == 1
    results = {}
    for i, (name, attack, expected) in enumerate(attacks(mesh), 1):
        results[name] = status = await attack()
        assert status in expected, (name, status)
        await victim.still_works(i)
        assert peer_connections(mesh) == peers and not peers[0].closed, name
    echoed = await victim.finish()
    assert echoed["body_len"] == victim.sent
    assert peer_connections(mesh) == peers
    assert mesh.west.listeners.downstream["inbound"] == 1


def _gw_ctx(mesh: Mesh):
    f = mesh.pki.gw["east"]
    return trust.client_context(f.bundle, f.cert, f.key)


async def test_a_peer_stream_error_resets_only_that_stream(stage: Mesh) -> None:
    """West's inbound, from a (compromised or buggy) peer on one connection: each bad
    stream gets its error, the next good stream on the same connection is served."""
    mesh = stage
    import ssl
    tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", mesh.west.ports["inbound"]),
                         _gw_ctx(mesh), server_hostname="west")
    await tls.do_handshake()
    assert isinstance(tls.transport_stream, trio.SocketStream) and ssl
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False))
    conn.initiate_connection()
    legacy = b"legacy.default.svc.cluster.local:80"
    web = b"web.default.svc.cluster.local:8080"
    bad = [
        req(b"GET", b"/a b", legacy),                       # (d) would crash h11.Request
        req(b"GET", b"/x", legacy, (b"Upper", b"1")),
        req(b"GET", b"/x", legacy, (b"transfer-encoding", b"chunked")),
        req(b"GET", b"/x", legacy, (b"x", b"a\nb")),
        req(b"get", b"/x", web),
        req(b"GET", b"/%00", web),
        req(b"GET", b"http://x/admin", web),
        req(b"HEAD", b"/admin", web),                       # (c): 403 without a body
        [(b":method", b"CONNECT"), (b":authority", web)],   # not a TCP port
        req(b"GET", b"/x", web, (b"isthmus-source-identity", b"spiffe://east.isthmus.local/a"),
            (b"isthmus-source-identity", b"spiffe://east.isthmus.local/b")),
    ]
    statuses: dict[int, bytes] = {}
    bodies: dict[int, bytes] = {}
    ended: set[int] = set()
    for h in bad + [req(b"GET", b"/echo", web)]:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, h, end_stream=True)
    await tls.send_all(conn.data_to_send())
    last = sid
    with trio.fail_after(10):
        while last not in ended:
            data = await tls.receive_some(65536)
            assert data, "west closed the connection"
            for e in conn.receive_data(data):
                if isinstance(e, h2.events.ResponseReceived):
                    statuses[e.stream_id] = dict(e.headers)[b":status"]
                elif isinstance(e, h2.events.DataReceived):
                    bodies[e.stream_id] = bodies.get(e.stream_id, b"") + e.data
                    conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                elif isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended.add(e.stream_id)
                elif isinstance(e, h2.events.ConnectionTerminated):
                    raise AssertionError(f"west closed the connection: {e!r}")
            await tls.send_all(conn.data_to_send())
    await trio.aclose_forcefully(tls)
    got = [statuses.get(s) for s in range(1, last + 1, 2)]
    assert got == [b"400"] * 7 + [b"403", b"405", b"403", b"200"], got
    assert not bodies.get(15)  # HEAD: no body

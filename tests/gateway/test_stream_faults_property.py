"""Property: random and malformed HTTP/1.1 and HTTP/2 requests from workloads at east's
outbound never close the shared connection to west and never crash either gateway.

Hypothesis runs in a worker thread and sends each example through ``trio.from_thread``
to the gateways on the test's loop, so failures shrink as usual.  Bounded for CI:
a few hundred examples, each on its own short-lived workload connection.
"""

from __future__ import annotations

import pytest
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import Mesh
from .test_stream_faults import LEGACY, TCP, WEB, Victim, peer_connections, stage  # noqa: F401

pytestmark = pytest.mark.both_cores  # HTTP/2 data path: run on each core

NAMES = [WEB, LEGACY, TCP, b"nope.default.west.isthmus.local", b"WEB.default.west.isthmus.local:8080", b""]
METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"CONNECT", b"get", b"G T", b"\xff", b""]
PATH_TOKENS = [b"/", b"a", b"..", b".", b"%2e", b"%2f", b"%00", b"%", b"%zz", b"\\", b" ", b"\t",
               b"?", b"#", b"admin", b"%61", b"\x01", b"\x7f", b"\xc3\xa9", b"http://x", b"*"]
HEADER_NAMES = [b"content-length", b"transfer-encoding", b"te", b"connection", b"keep-alive",
                b"upgrade", b"host", b"isthmus-source-identity", b"Isthmus-Source-Identity",
                b"x-forwarded-client-cert", b"X-Upper", b"x-ok", b"trailer", b"expect",
                b"grpc-timeout", b"content-type", b"bad name", b""]
HEADER_VALUES = [b"0", b"5", b"100", b"-1", b"1x", b"chunked", b"gzip", b"trailers", b"close",
                 b"h2c", b"spiffe://west.isthmus.local/ns/x/sa/y", b"a\r\nb", b"a\x00b", b"",
                 b" padded ", b"application/grpc", b"100-continue", b"v" * 3000]

paths = st.lists(st.sampled_from(PATH_TOKENS), max_size=8).map(lambda ts: b"/" + b"".join(ts))
headers = st.lists(st.tuples(st.sampled_from(HEADER_NAMES), st.sampled_from(HEADER_VALUES)),
                   max_size=6)
bodies = st.one_of(st.just(b""), st.binary(max_size=64),
                   st.sampled_from([b"3\r\nabc\r\n0\r\n\r\n", b"zz\r\n", b"5\r\nab"]))


@st.composite
def h1_requests(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(min_size=1, max_size=200))  # anything at all
    method = draw(st.sampled_from(METHODS))
    target = draw(st.one_of(paths, st.sampled_from([b"http://" + WEB + b"/x", b"*", TCP])))
    lines = [method + b" " + target + b" HTTP/1.1", b"host: " + draw(st.sampled_from(NAMES))]
    lines += [k + b": " + v for k, v in draw(headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + draw(bodies)


@st.composite
def h2_requests(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes]], bytes, bool, list]:
    pseudo = [(b":method", draw(st.sampled_from(METHODS))), (b":scheme", b"http"),
              (b":path", draw(paths)), (b":authority", draw(st.sampled_from(NAMES)))]
    pseudo = draw(st.permutations(pseudo))[: draw(st.integers(1, 4))]
    hs = pseudo + draw(headers)
    if draw(st.booleans()):
        hs = draw(st.permutations(hs))
    trailers = draw(st.lists(st.tuples(st.sampled_from(HEADER_NAMES),
                                       st.sampled_from(HEADER_VALUES[:6])), max_size=2))
    return hs, draw(bodies), draw(st.booleans()), trailers


async def send_h1(port: int, data: bytes) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(data)
        with trio.move_on_after(0.5):
            got = b""
            while chunk := await stream.receive_some(65536):
                got += chunk
                if b"\r\n\r\n" in got:
                    return
    except (trio.BrokenResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def send_h2(port: int, case: tuple[list[tuple[bytes, bytes]], bytes, bool, list]) -> None:
    hs, body, end_with_headers, trailers = case
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False))
    try:
        conn.initiate_connection()
        conn.send_headers(1, hs, end_stream=end_with_headers and not body and not trailers)
        if body:
            conn.send_data(1, body, end_stream=not trailers)
        if trailers:
            conn.send_headers(1, trailers, end_stream=True)
        elif not body and not end_with_headers:
            conn.end_stream(1)
        await stream.send_all(conn.data_to_send())
        with trio.move_on_after(0.5):
            while data := await stream.receive_some(65536):
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    return
                if any(isinstance(e, (h2.events.ResponseReceived, h2.events.StreamReset,
                                      h2.events.ConnectionTerminated)) for e in events):
                    return
                await stream.send_all(conn.data_to_send())
    except (trio.BrokenResourceError, OSError, h2.exceptions.ProtocolError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def test_malformed_requests_never_close_the_shared_connection(stage: Mesh, logs) -> None:
    mesh = stage
    victim = await Victim.open(mesh.east_out)
    peers = peer_connections(mesh)
    assert len(peers) == 1
    port = mesh.east_out
    token = trio.lowlevel.current_trio_token()
    count = {"n": 0}

    def check() -> None:
        assert peer_connections(mesh) == peers and not peers[0].closed
        crashed = [e for e in logs if e["event"] == "connection.crashed"]
        assert not crashed, crashed

    @settings(max_examples=600, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(h1_requests().map(lambda r: ("h1", r)), h2_requests().map(lambda r: ("h2", r))))
    def prop(case: tuple[str, object]) -> None:
        kind, req = case
        count["n"] += 1
        trio.from_thread.run(send_h1 if kind == "h1" else send_h2, port, req,  # type: ignore[arg-type]
                             trio_token=token)
        trio.from_thread.run_sync(check, trio_token=token)

    await trio.to_thread.run_sync(prop)
    assert count["n"] >= 600
    await victim.still_works(1)
    check()
    assert mesh.west.listeners.downstream["inbound"] == 1

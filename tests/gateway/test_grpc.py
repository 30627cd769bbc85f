"""A grpcio client calling a grpcio server through two gateways: every RPC shape,
trailers, status codes, deadlines, and transport failures mapped to gRPC statuses."""

from __future__ import annotations

import pytest
import time

import grpc
import trio

from .backends import SERVICE
from .conftest import Mesh

pytestmark = pytest.mark.both_cores  # HTTP/2 data path: run on each core

ECHO = "echo.default.west.isthmus.local:50051"


def _channel(mesh: Mesh, authority: str = ECHO) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{mesh.east_out}",
                                 options=[("grpc.default_authority", authority)])


def _m(name: str) -> str:
    return f"/{SERVICE}/{name}"


async def _run(fn):
    return await trio.to_thread.run_sync(fn)


async def test_grpc_unary_with_trailers(mesh: Mesh) -> None:
    def call():
        with _channel(mesh) as ch:
            resp, c = ch.unary_unary(_m("Unary")).with_call(b"hello", timeout=10)
            return resp, dict(c.trailing_metadata()), c.code()
    resp, trailers, code = await _run(call)
    assert resp == b"hello"
    assert trailers["x-trailer"] == "yes"
    assert code == grpc.StatusCode.OK


async def test_grpc_error_status_crosses_both_gateways(mesh: Mesh) -> None:
    def call():
        with _channel(mesh) as ch:
            try:
                ch.unary_unary(_m("Unary"))(b"fail", timeout=10)
            except grpc.RpcError as e:
                return e.code(), e.details()
    code, details = await _run(call)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details == "asked to fail"


async def test_grpc_server_streaming(mesh: Mesh) -> None:
    def call():
        with _channel(mesh) as ch:
            return list(ch.unary_stream(_m("ServerStream"))(b"500", timeout=10))
    out = await _run(call)
    assert out == [str(i).encode() for i in range(500)]


async def test_grpc_client_streaming(mesh: Mesh) -> None:
    def call():
        with _channel(mesh) as ch:
            return ch.stream_unary(_m("ClientStream"))(iter([b"x" * 1000] * 300), timeout=10)
    assert await _run(call) == b"300:300000"


async def test_grpc_bidi_streaming_interleaves(mesh: Mesh) -> None:
    def call():
        import queue
        q: queue.Queue = queue.Queue()
        out = []

        def gen():
            while (item := q.get()) is not None:
                yield item

        with _channel(mesh) as ch:
            responses = ch.stream_stream(_m("Bidi"))(gen(), timeout=10)
            for i in range(20):
                q.put(f"m{i}".encode())
                # Each answer arrives before the next message is sent: truly interleaved.
                out.append(next(responses))
            q.put(None)
            assert list(responses) == []
        return out
    assert await _run(call) == [f"M{i}".encode() for i in range(20)]


async def test_grpc_source_identity_and_trace_reach_the_service(mesh: Mesh) -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    def call():
        with _channel(mesh) as ch:
            who = ch.unary_unary(_m("Unary"))(b"who", timeout=10)
            trace = ch.unary_unary(_m("Unary"))(b"trace", timeout=10, metadata=(("traceparent", tp),))
            return who, trace
    who, trace = await _run(call)
    assert who == b""  # plain caller: no identity asserted, and none can be forged
    # The trace continues (same trace id), with a new parent span per hop.
    assert trace.decode().startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert trace.decode() != tp


async def test_grpc_deadline_exceeded(mesh: Mesh) -> None:
    def call():
        with _channel(mesh) as ch:
            t0 = time.monotonic()
            try:
                ch.unary_unary(_m("Unary"))(b"sleep:2", timeout=0.3)
            except grpc.RpcError as e:
                return e.code(), time.monotonic() - t0
    code, elapsed = await _run(call)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.5


async def test_grpc_timeout_enforced_by_the_gateway(mesh: Mesh) -> None:
    """A client that sends grpc-timeout but does not enforce it itself still gets status 4."""
    import h2.config
    import h2.connection
    import h2.events

    stream = await trio.open_tcp_stream("127.0.0.1", mesh.east_out)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", _m("Unary").encode()),
                            (b":authority", ECHO.encode()), (b"content-type", b"application/grpc"),
                            (b"te", b"trailers"), (b"grpc-timeout", b"200m")])
    msg = b"sleep:1.5"
    conn.send_data(sid, b"\x00" + len(msg).to_bytes(4, "big") + msg, end_stream=True)
    await stream.send_all(conn.data_to_send())
    t0 = trio.current_time()
    status = None
    with trio.fail_after(5):
        while status is None:
            for e in conn.receive_data(await stream.receive_some(65536)):
                if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    status = dict(e.headers).get(b"grpc-status", status)
            await stream.send_all(conn.data_to_send())
    assert status == b"4"
    assert trio.current_time() - t0 < 1.0
    await stream.aclose()


async def test_grpc_upstream_unreachable_is_unavailable(mesh: Mesh) -> None:
    from federation.models import ExportedService, ServicePort

    dead = ExportedService(cluster="west", namespace="default", name="dead", ports=(
        ServicePort(port=50051, protocol="GRPC", target="127.0.0.1:1"),))
    snap = mesh.snapshot(revision=2, extra_services=(dead,))
    mesh.west.apply_snapshot(snap)
    mesh.east.apply_snapshot(snap)

    def call():
        with _channel(mesh, "dead.default.west.isthmus.local:50051") as ch:
            try:
                ch.unary_unary(_m("Unary"))(b"x", timeout=5)
            except grpc.RpcError as e:
                return e.code()
    assert await _run(call) == grpc.StatusCode.UNAVAILABLE


async def test_grpc_unknown_name_is_unimplemented(mesh: Mesh) -> None:
    def call():
        with _channel(mesh, "nope.default.west.isthmus.local:50051") as ch:
            try:
                ch.unary_unary(_m("Unary"))(b"x", timeout=5)
            except grpc.RpcError as e:
                return e.code()
    assert await _run(call) == grpc.StatusCode.UNIMPLEMENTED

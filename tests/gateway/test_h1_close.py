"""HTTP/1.1 exchanges that fail half-way release everything they hold: a service that
closes before answering leaves no socket in CLOSE-WAIT, and a workload whose request body
breaks mid-way gets 400 while its stream to the peer gateway is aborted (not left open)."""

from __future__ import annotations

import trio

from federation.models import ExportedService, ServicePort

from .conftest import Mesh
from .h2client import h2_request
from .test_stream_faults import h1_raw, peer_connections

RUDE = b"rude.default.west.isthmus.local"
CLOSE_WAIT = "08"  # include/net/tcp_states.h


def close_wait_to(port: int) -> int:
    """Sockets on this host in CLOSE-WAIT whose remote end is 127.0.0.1:``port``."""
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == CLOSE_WAIT and int(remote.split(":")[1], 16) == port:
                n += 1
    return n


async def rude_backend(task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Reads the request head, then closes without a word."""
    async def handler(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(2):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    data += chunk
        except trio.BrokenResourceError:
            pass
        await stream.aclose()  # a FIN: the gateway's end is in CLOSE-WAIT until it closes

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def test_backend_closing_before_answering_leaves_no_close_wait(
        mesh: Mesh, nursery: trio.Nursery) -> None:
    port = await nursery.start(rude_backend)
    svc = ExportedService(cluster="west", namespace="default", name="rude", ports=(
        ServicePort(port=80, protocol="HTTP", target=f"127.0.0.1:{port}"),))
    snap = mesh.snapshot(revision=3, extra_services=(svc,))
    mesh.west.apply_snapshot(snap)
    mesh.east.apply_snapshot(snap)
    statuses: list[bytes] = []

    async def one(i: int) -> None:
        resp, _ = await h2_request(mesh.east_out, [
            (b":method", b"GET"), (b":scheme", b"http"), (b":path", f"/{i}".encode()),
            (b":authority", RUDE)], timeout=10)
        statuses.append(resp[b":status"])

    for batch in range(15):
        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(one, batch * 20 + i)
    assert len(statuses) == 300 and set(statuses) == {b"503"}, set(statuses)
    await trio.sleep(0.5)
    assert close_wait_to(port) == 0


async def test_broken_request_body_is_400_and_aborts_the_peer_stream(mesh: Mesh) -> None:
    # The victim-less variant of the shared-connection test: nothing stays open upstream.
    await h2_request(mesh.east_out, [(b":method", b"GET"), (b":scheme", b"http"),
                                     (b":path", b"/echo"),
                                     (b":authority", b"web.default.west.isthmus.local:8080")])
    peers = peer_connections(mesh)
    assert len(peers) == 1
    raw = await h1_raw(mesh.east_out, b"POST /echo HTTP/1.1\r\nhost: web.default.west.isthmus"
                       b".local:8080\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
    assert raw.startswith(b"HTTP/1.1 400"), raw
    with trio.fail_after(2):
        while peers[0].halves:
            await trio.sleep(0.02)
    assert not peers[0].closed

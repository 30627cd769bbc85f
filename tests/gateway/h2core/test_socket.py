"""A tiny trio server on the nghttp2 core over real sockets, answering real clients:
h2load (many multiplexed requests), curl (a large download and upload), grpcio, httpx."""

from __future__ import annotations

import hashlib
import shutil
from typing import Any

import h2.exceptions
import pytest
import trio

from .cores import ng_core
from .responder import Responder, body_for


class Server:
    def __init__(self) -> None:
        self.port = 0
        self.answered = 0
        self.received = 0
        self.errors: list[str] = []

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._conn, listeners)

    async def _conn(self, stream: trio.SocketStream) -> None:
        conn = ng_core(False)
        resp = Responder(conn)
        try:
            await stream.send_all(conn.data_to_send())
            while data := await stream.receive_some(65536):
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self.errors.append(str(exc))
                    await stream.send_all(conn.data_to_send())
                    return
                resp.handle(events)
                if out := conn.data_to_send():
                    await stream.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.answered += resp.answered
            self.received += resp.received
            await stream.aclose()


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    srv = Server()
    await nursery.start(srv.serve)
    return srv


needs_h2load = pytest.mark.skipif(not shutil.which("h2load"), reason="needs h2load")
needs_curl = pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")


@needs_h2load
async def test_h2load_gets_every_answer_from_the_nghttp2_core(server: Server) -> None:
    out = await trio.run_process(
        ["h2load", "-n", "2000", "-c", "4", "-m", "16", f"http://127.0.0.1:{server.port}/size/300"],
        capture_stdout=True, capture_stderr=True)
    text = out.stdout.decode()
    assert "2000 succeeded, 0 failed, 0 errored" in text, text
    assert "status codes: 2000 2xx" in text, text
    assert server.errors == []


@needs_curl
async def test_curl_downloads_and_uploads_through_flow_control(server: Server) -> None:
    base = f"http://127.0.0.1:{server.port}"
    size = 3_000_000  # far beyond curl's and our windows: only WINDOW_UPDATEs move it
    out = await trio.run_process(
        ["curl", "-sS", "--http2-prior-knowledge", f"{base}/size/{size}"],
        capture_stdout=True, capture_stderr=True)
    assert hashlib.sha256(out.stdout).digest() == hashlib.sha256(body_for(b"/size/%d" % size)).digest()
    upload = b"u" * 2_500_000
    out = await trio.run_process(
        ["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
         "--data-binary", "@-", f"{base}/size/1"], stdin=upload, capture_stdout=True,
        capture_stderr=True)
    assert out.stdout == b"200", out.stderr
    await trio.sleep(0.05)
    assert server.received == len(upload) and server.errors == []


async def test_grpcio_and_httpx_clients(server: Server) -> None:
    def clients() -> None:
        import grpc
        import httpx
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            assert ch.unary_unary("/t.S/M")(b"x" * 100_000, timeout=10) == b"ok"
            assert list(ch.stream_stream("/t.S/N")(iter([b"a"] * 50), timeout=10)) == [b"ok"]
        with httpx.Client(http1=False, http2=True, timeout=10) as c:
            r = c.get(f"http://127.0.0.1:{server.port}/size/500000")
            assert r.http_version == "HTTP/2" and r.content == body_for(b"/size/500000")
    await trio.to_thread.run_sync(clients)
    assert server.errors == []

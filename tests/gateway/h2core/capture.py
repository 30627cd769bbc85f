"""Captures what real HTTP/2 clients send: a socket server on the h2 core records every
read of every connection, answering with :class:`Responder` so clients finish normally.

The recordings are replayed into both cores by the differential tests; the clients
(httpx, curl, h2load, grpcio) are real processes or libraries talking over loopback.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import h2.exceptions

from .cores import h2_core
from .responder import Responder


class CaptureServer:
    """Plain-TCP (h2c, prior knowledge) server; ``connections`` holds each one's reads."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections: list[list[bytes]] = []
        self._threads: list[threading.Thread] = []
        self._stop = False
        self._accept = threading.Thread(target=self._run, daemon=True)
        self._accept.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            reads: list[bytes] = []
            self.connections.append(reads)
            t = threading.Thread(target=self._serve, args=(s, reads), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, s: socket.socket, reads: list[bytes]) -> None:
        conn = h2_core(False)
        resp = Responder(conn)
        s.settimeout(20)
        try:
            s.sendall(conn.data_to_send())
            while True:
                data = s.recv(65536)
                if not data:
                    return
                reads.append(data)
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    s.sendall(conn.data_to_send())
                    return
                resp.handle(events)
                out = conn.data_to_send()
                if out:
                    s.sendall(out)
        except OSError:
            return
        finally:
            s.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> CaptureServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def capture(run: Callable[[int], Any]) -> list[list[bytes]]:
    """Run ``run(port)`` (a client) against a fresh capture server; its connections."""
    with CaptureServer() as srv:
        run(srv.port)
        for t in list(srv._threads):
            t.join(10)
        return [c for c in srv.connections if c]


# -- the clients ------------------------------------------------------------------------------
def httpx_client(port: int) -> None:
    import httpx
    with httpx.Client(http1=False, http2=True, timeout=10) as c:
        base = f"http://127.0.0.1:{port}"
        assert c.get(f"{base}/size/10").content == bytes(range(10))
        r = c.post(f"{base}/size/5", content=b"x" * 300_000,
                   headers={"x-custom": "value", "cookie": "a=1; b=2"})
        assert r.status_code == 200 and r.http_version == "HTTP/2"
        assert len(c.get(f"{base}/size/200000").content) == 200_000


def curl_client(port: int) -> None:
    # One URL per process: curl 7.88 fails to reuse a prior-knowledge h2c connection
    # ("Error in the HTTP2 framing layer") whichever server it talks to.
    base = f"http://127.0.0.1:{port}"
    for args in (["-H", "x-trace: 1", f"{base}/size/1"], [f"{base}/size/70000"],
                 ["--data-binary", "@-", f"{base}/size/3"]):
        out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null",
                              "-w", "%{http_code}", *args], input=b"y" * 100_000,
                             capture_output=True, timeout=30)
        assert out.stdout == b"200", out.stderr


def h2load_client(port: int) -> None:
    out = subprocess.run(["h2load", "-n", "40", "-c", "1", "-m", "8",
                          f"http://127.0.0.1:{port}/size/100"],
                         capture_output=True, text=True, timeout=60)
    assert "40 succeeded" in out.stdout, out.stdout + out.stderr


def grpc_client(port: int) -> None:
    import grpc
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        unary = ch.unary_unary("/test.Echo/Call")
        assert unary(b"hello", timeout=10) == b"ok"
        stream = ch.stream_stream("/test.Echo/Stream")
        replies = list(stream(iter([b"a", b"b" * 1000, b"c"]), timeout=10))
        assert replies == [b"ok"]


CLIENTS: dict[str, Callable[[int], Any]] = {
    "httpx": httpx_client, "curl": curl_client, "h2load": h2load_client, "grpcio": grpc_client,
}


def available(name: str) -> bool:
    return name not in ("curl", "h2load") or shutil.which(name) is not None

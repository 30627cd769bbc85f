"""Sample services for the demo and the end-to-end tests.

Each answers with the name of the cluster it runs in, so a caller can see which cluster
served it:

- HTTP/1.1 on ``--http``: ``GET /`` → ``hello from <cluster>``; ``POST /echo`` echoes
  the body; every response carries ``x-served-by: <cluster>`` and echoes the
  ``isthmus-source-identity`` and ``traceparent`` headers it received (as
  ``x-seen-source-identity`` / ``x-seen-traceparent``) so tests can check what crossed.
- gRPC on ``--grpc``: ``/isthmus.demo.v1.Hello/Say`` (unary, UTF-8 bytes in and out:
  ``hello <name> from <cluster>``) and ``/isthmus.demo.v1.Hello/Chat`` (bidi stream
  echoing each message with the cluster name).  Messages are raw bytes, no proto needed.
- TCP echo on ``--tcp``.

Run: ``python -m federation.demo.samples --cluster east --http 127.0.0.1:8080 --grpc 127.0.0.1:9090``.
"""

from __future__ import annotations

import argparse
import signal
import socketserver
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

GRPC_SAY = "/isthmus.demo.v1.Hello/Say"
GRPC_CHAT = "/isthmus.demo.v1.Hello/Chat"


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def make_http_server(cluster: str, addr: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("content-type", "text/plain; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.send_header("x-served-by", cluster)
            for h in ("isthmus-source-identity", "traceparent"):
                if self.headers.get(h):
                    self.send_header(f"x-seen-{h.removeprefix('isthmus-')}", self.headers[h])
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.startswith("/bytes/"):
                n = int(self.path.rsplit("/", 1)[1])
                self._reply(200, b"x" * n)
                return
            self._reply(200, f"hello from {cluster}\n".encode())

        def do_POST(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(n) if n else b""
            self._reply(200, body)

    srv = ThreadingHTTPServer(_split(addr), Handler)
    srv.daemon_threads = True
    return srv


def make_grpc_server(cluster: str, addr: str) -> grpc.Server:
    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        name = request.decode(errors="replace") or "world"
        return f"hello {name} from {cluster}".encode()

    def chat(requests, context):  # type: ignore[no-untyped-def]
        for r in requests:
            yield r + f" [{cluster}]".encode()

    handler = grpc.method_handlers_generic_handler(
        "isthmus.demo.v1.Hello",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    host, port = _split(addr)
    server.add_insecure_port(f"{host}:{port}")
    return server


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def make_tcp_server(addr: str) -> socketserver.ThreadingTCPServer:
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    srv = socketserver.ThreadingTCPServer(_split(addr), _Echo)
    srv.daemon_threads = True
    return srv


def grpc_say(target: str, name: str, timeout: float = 5.0, authority: str | None = None) -> str:
    opts = [("grpc.default_authority", authority)] if authority else []
    with grpc.insecure_channel(target, options=opts) as ch:
        return ch.unary_unary(GRPC_SAY)(name.encode(), timeout=timeout).decode()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m federation.demo.samples", description=__doc__.split("\n\n")[0])
    p.add_argument("--cluster", required=True)
    p.add_argument("--http")
    p.add_argument("--grpc")
    p.add_argument("--tcp")
    a = p.parse_args(argv)
    stop = threading.Event()
    servers: list[object] = []
    if a.http:
        h = make_http_server(a.cluster, a.http)
        threading.Thread(target=h.serve_forever, daemon=True).start()
        servers.append(h)
    if a.tcp:
        t = make_tcp_server(a.tcp)
        threading.Thread(target=t.serve_forever, daemon=True).start()
        servers.append(t)
    g = None
    if a.grpc:
        g = make_grpc_server(a.cluster, a.grpc)
        g.start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    if g is not None:
        g.stop(0)
    for s in servers:
        s.shutdown()  # type: ignore[attr-defined]
    sys.exit(0)


if __name__ == "__main__":
    main()

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

Test knobs (for the resilience tests; without them nothing changes).  Each is read per
request from an ``x-sample-<knob>`` header (gRPC: metadata) or, for HTTP, a ``<knob>``
query parameter, so one test can steer every request on its own:

- ``fail=N``: N % of requests (a float) fail: HTTP 503 (``status=CODE`` for another code),
  gRPC UNAVAILABLE (``code=NAME`` for another status);
- ``delay=D``: answer after D (``200ms``, ``1s``; a bare number is milliseconds);
- ``close=N``: N % of requests get the connection closed without an answer (HTTP only);
- ``hang=N``: N % of requests get no answer until the caller gives up;
- ``only=east,west``: apply the other knobs only in these clusters (one cluster can fail
  while the others serve the same request stream).

Run: ``python -m federation.demo.samples --cluster east --http 127.0.0.1:8080 --grpc 127.0.0.1:9090``.
"""

from __future__ import annotations

import argparse
import random
import select
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import grpc

from ..models import GRPC_STATUS_CODES, parse_duration

GRPC_SAY = "/isthmus.demo.v1.Hello/Say"
GRPC_CHAT = "/isthmus.demo.v1.Hello/Chat"


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


KNOBS = ("fail", "status", "code", "delay", "close", "hang", "only")
HANG_MAX = 300.0  # a hung request's thread ends by then even if the caller never closes


def _percent(value: str | None) -> float:
    try:
        return min(100.0, max(0.0, float(value))) if value else 0.0
    except ValueError:
        return 0.0


def _seconds(value: str | None) -> float:
    if not value:
        return 0.0
    try:
        return float(value) / 1000 if value.replace(".", "", 1).isdigit() else parse_duration(value)
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class Knobs:
    """One request's test knobs (see the module docstring); malformed values count as unset."""

    fail: float = 0.0
    status: int = 503
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    delay: float = 0.0
    close: float = 0.0
    hang: float = 0.0

    @classmethod
    def read(cls, cluster: str, get: Callable[[str], str | None]) -> Knobs:
        only = get("only")
        if only and cluster not in {c.strip() for c in only.split(",")}:
            return NO_KNOBS
        status = get("status") or ""
        code = (get("code") or "").strip().upper().replace("-", "_")
        return cls(fail=_percent(get("fail")),
                   status=int(status) if status.isdigit() and 100 <= int(status) <= 599 else 503,
                   code=getattr(grpc.StatusCode, code) if code in GRPC_STATUS_CODES and code != "OK"
                   else grpc.StatusCode.UNAVAILABLE,
                   delay=_seconds(get("delay")), close=_percent(get("close")), hang=_percent(get("hang")))

    @staticmethod
    def draw(percent: float) -> bool:
        return percent > 0 and random.random() * 100 < percent


NO_KNOBS = Knobs()


def make_http_server(cluster: str, addr: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: without TCP_NODELAY the body waits for the
        # caller's delayed ACK (~40 ms a response), which the timing tests would measure.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _knobs(self) -> tuple[str, Knobs]:
            """The path without its query, and this request's knobs (headers win)."""
            url = urlsplit(self.path)
            query = parse_qs(url.query)

            def get(name: str) -> str | None:
                return self.headers.get(f"x-sample-{name}") or (query.get(name) or [None])[0]

            return url.path, Knobs.read(cluster, get) if "x-sample-" in str(self.headers).lower() \
                or any(k in query for k in KNOBS) else NO_KNOBS

        def _turn(self, knobs: Knobs) -> bool:
            """Apply the knobs; True when the request was answered (or dropped) by them."""
            if knobs is NO_KNOBS:
                return False
            if knobs.delay:
                time.sleep(knobs.delay)
            if Knobs.draw(knobs.hang):
                self._hang()
                return True
            if Knobs.draw(knobs.close):
                self.close_connection = True
                self.connection.close()
                return True
            if Knobs.draw(knobs.fail):
                self._reply(knobs.status, f"injected failure from {cluster}\n".encode())
                return True
            return False

        def _hang(self) -> None:
            """No answer until the caller closes the connection (at most HANG_MAX seconds)."""
            self.close_connection = True
            until = time.monotonic() + HANG_MAX
            while time.monotonic() < until:
                if select.select([self.connection], [], [], 0.5)[0]:
                    try:
                        if not self.connection.recv(1, socket.MSG_PEEK):
                            return  # closed by the caller
                    except OSError:
                        return
                    time.sleep(0.05)  # it sent more (a pipelined request): keep not answering

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
            path, knobs = self._knobs()
            if self._turn(knobs):
                return
            if path.startswith("/bytes/"):
                n = int(path.rsplit("/", 1)[1])
                self._reply(200, b"x" * n)
                return
            self._reply(200, f"hello from {cluster}\n".encode())

        def do_POST(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(n) if n else b""
            if self._turn(self._knobs()[1]):
                return
            self._reply(200, body)

    srv = ThreadingHTTPServer(_split(addr), Handler)
    srv.daemon_threads = True
    return srv


def _grpc_knobs(cluster: str, context: grpc.ServicerContext) -> None:
    """Apply the request's knobs from its metadata (``close`` is HTTP only); aborts the call
    when one fails it."""
    md = {k: v for k, v in context.invocation_metadata() if k.startswith("x-sample-")}
    if not md:
        return
    knobs = Knobs.read(cluster, lambda name: md.get(f"x-sample-{name}"))  # type: ignore[arg-type]
    if knobs.delay:
        time.sleep(knobs.delay)
    if Knobs.draw(knobs.hang):
        until = time.monotonic() + HANG_MAX
        while context.is_active() and time.monotonic() < until:
            time.sleep(0.05)
        context.abort(grpc.StatusCode.CANCELLED, "hung until the caller gave up")
    if Knobs.draw(knobs.fail):
        context.abort(knobs.code, f"injected failure from {cluster}")


def make_grpc_server(cluster: str, addr: str) -> grpc.Server:
    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        _grpc_knobs(cluster, context)
        name = request.decode(errors="replace") or "world"
        return f"hello {name} from {cluster}".encode()

    def chat(requests, context):  # type: ignore[no-untyped-def]
        _grpc_knobs(cluster, context)
        for r in requests:
            yield r + f" [{cluster}]".encode()

    handler = grpc.method_handlers_generic_handler(
        "isthmus.demo.v1.Hello",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )
    # Enough workers for the tests' concurrent slow and hanging calls.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
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

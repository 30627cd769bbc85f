"""Test backends: a small HTTP/2 (h2c + TLS) server on trio, a TCP echo server, a grpcio server.

The h2 server honours flow control (``/big`` streams only as the client's window allows)
so that memory tests measure the gateway, not the backend.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import h2.config
import h2.connection
import h2.events
import trio

CHUNK = 16384


class H2Backend:
    """GET /echo -> JSON of the request (every header in order, trailers too); POST /echo ->
    JSON with body length and sha256;
    GET /big?n=N -> N bytes; GET /status/CODE -> that status."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.port = 0
        self.requests = 0
        self.connections = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._conn, listeners)

    async def _conn(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        if self.ssl_context is not None:
            stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
            try:
                await stream.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError):
                return
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                     header_encoding=None))
        conn.initiate_connection()
        reqs: dict[int, dict] = {}
        big: dict[int, int] = {}
        try:
            await stream.send_all(conn.data_to_send())
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        self.requests += 1
                        reqs[ev.stream_id] = {"headers": dict(ev.headers), "body": hashlib.sha256(), "n": 0,
                                              "list": ev.headers, "trailers": []}
                    elif isinstance(ev, h2.events.TrailersReceived):
                        r = reqs.get(ev.stream_id)
                        if r is not None:
                            r["trailers"] = ev.headers
                    elif isinstance(ev, h2.events.DataReceived):
                        r = reqs.get(ev.stream_id)
                        if r is not None:
                            r["body"].update(ev.data)
                            r["n"] += len(ev.data)
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        r = reqs.pop(ev.stream_id, None)
                        if r is not None:
                            self._respond(conn, ev.stream_id, r, big)
                    elif isinstance(ev, h2.events.StreamReset):
                        reqs.pop(ev.stream_id, None)
                        big.pop(ev.stream_id, None)
                self._pump(conn, big)
                await stream.send_all(conn.data_to_send())
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            return
        except h2.exceptions.ProtocolError:
            return

    def _respond(self, conn, sid, r, big) -> None:
        h = r["headers"]
        path = h.get(b":path", b"/").decode()
        if path.startswith("/big"):
            n = int(path.split("n=")[1])
            conn.send_headers(sid, [(b":status", b"200"), (b"content-length", str(n).encode())])
            big[sid] = n
            return
        if path.startswith("/status/"):
            conn.send_headers(sid, [(b":status", path.split("/")[2].encode())], end_stream=True)
            return
        body = json.dumps({
            "method": h.get(b":method", b"").decode(),
            "path": path,
            "authority": h.get(b":authority", b"").decode(),
            "headers": {k.decode(): v.decode() for k, v in h.items()},
            "header_list": [[k.decode(), v.decode()] for k, v in r["list"]],
            "trailers": [[k.decode(), v.decode()] for k, v in r["trailers"]],
            "body_len": r["n"],
            "body_sha256": r["body"].hexdigest(),
        }).encode()
        conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())])
        conn.send_data(sid, body, end_stream=True)

    def _pump(self, conn, big) -> None:
        for sid in list(big):
            n = big[sid]
            try:
                while n > 0:
                    w = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, n)
                    if w <= 0:
                        break
                    n -= w
                    conn.send_data(sid, b"x" * w, end_stream=(n == 0))
            except h2.exceptions.ProtocolError:
                n = 0
            if n == 0:
                del big[sid]
            else:
                big[sid] = n


async def tcp_echo(task_status=trio.TASK_STATUS_IGNORED) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


# ------------------------------------------------------------------------ grpc

SERVICE = "isthmus.test.Echo"


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    md = dict(context.invocation_metadata())
    if request == b"who":
        return md.get("isthmus-source-identity", "").encode()
    if request == b"trace":
        return md.get("traceparent", "").encode()
    if request.startswith(b"sleep:"):
        time.sleep(float(request[6:]))
        return b"slept"
    if request == b"fail":
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")
    context.set_trailing_metadata((("x-trailer", "yes"),))
    return request


def _server_stream(request: bytes, context) -> Iterator[bytes]:
    n = int(request)
    for i in range(n):
        yield str(i).encode()


def _client_stream(requests: Iterator[bytes], context) -> bytes:
    total = 0
    count = 0
    for r in requests:
        total += len(r)
        count += 1
    return f"{count}:{total}".encode()


def _bidi(requests: Iterator[bytes], context) -> Iterator[bytes]:
    for r in requests:
        yield r.upper()


def start_grpc_server(credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, int]:
    handlers = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handlers,))
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


__all__ = ["H2Backend", "SERVICE", "start_grpc_server", "tcp_echo", "threading"]

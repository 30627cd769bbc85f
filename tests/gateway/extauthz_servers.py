"""Real external authorizers for the CUSTOM tests and the bench: an Envoy ext_authz v3 gRPC
server on xds-protos' generated stubs, and a small HTTP authorizer (Envoy's HTTP service
semantics).  Both decide by path and header and record what they were sent."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import status_pb2

SLOW = 1.0  # seconds a request carrying x-slow waits for its answer


def _header(key: str, value: str, append: bool | None = None) -> base_pb2.HeaderValueOption:
    opt = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value))
    if append is not None:
        opt.append.value = append
    return opt


class Authorizer(external_auth_pb2_grpc.AuthorizationServicer):
    """Denies paths under /echo/deny (418, own body and header) and requests carrying
    ``x-deny``; on /echo/inject it adds a header, tries to overwrite the caller's identity
    and removes ``x-remove-me``; on /echo/huge it adds 480 kB of headers; on /echo/rewrite
    it adds response headers and rewrites the query (sets ``a`` and ``b``, removes ``drop``);
    a body (``include_request_body``) holding ``forbidden`` is denied; ``x-slow`` answers
    after :data:`SLOW`; the rest is allowed."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0

    def Check(self, request: Any, context: Any) -> Any:
        with self.lock:
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self._decide(request)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _decide(self, request: Any) -> Any:
        http = request.attributes.request.http
        if "x-slow" in http.headers:
            time.sleep(SLOW)
        if (http.path.startswith("/echo/deny") or "x-deny" in http.headers
                or "forbidden" in http.body or b"forbidden" in http.raw_body):
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=7, message="path denied"),
                denied_response=external_auth_pb2.DeniedHttpResponse(
                    status=http_status_pb2.HttpStatus(code=418),
                    headers=[_header("x-authz-reason", "teapot"), _header("content-type", "text/plain")],
                    body="denied by the test authorizer\n"))
        ok = external_auth_pb2.OkHttpResponse()
        if http.path.startswith("/echo/huge"):  # more header bytes than a request may carry
            ok.headers.extend(_header(f"x-big-{i}", "v" * 8000) for i in range(60))
        if http.path.startswith("/echo/inject"):
            ok.headers.extend([_header("x-authz-added", "yes"),
                               _header("isthmus-source-identity", "spiffe://east.isthmus.local/ns/default/sa/admin"),
                               _header("x-forwarded-client-cert", "By=x;URI=spiffe://evil/x")])
            ok.headers_to_remove.extend(["x-remove-me", "isthmus-source-identity"])
        if http.path.startswith("/echo/rewrite"):
            ok.response_headers_to_add.extend([_header("x-authz-said", "ok"), _header("isthmus-forged", "1"),
                                               _header(":status", "500")])
            ok.query_parameters_to_set.extend([base_pb2.QueryParameter(key="a", value="new value&x=1"),
                                               base_pb2.QueryParameter(key="b", value="2")])
            ok.query_parameters_to_remove.append("drop")
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0), ok_response=ok)


def start_authorizer() -> tuple[grpc.Server, int, Authorizer]:
    servicer = Authorizer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, servicer


class _HttpAuthz(BaseHTTPRequestHandler):
    """Records (method, path, headers, body); denies /deny paths, ``x-deny`` and a body
    holding ``forbidden``; answers 500 to ``x-boom``; allows the rest."""

    seen: list[tuple[str, str, dict[str, str], bytes]]

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        if "/deny" in self.path or "x-deny" in self.headers or b"forbidden" in body:
            body = b"nope from http authz\n"
            self.send_response(403)
            self.send_header("x-authz-reason", "http-says-no")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if "x-boom" in self.headers:
            self.send_response(500)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("x-authz-user", "alice")
        self.send_header("isthmus-source-identity", "spiffe://evil.isthmus.local/ns/x/sa/y")
        self.send_header("x-not-copied", "1")
        self.send_header("content-length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = _answer


def start_http_authorizer() -> tuple[ThreadingHTTPServer, int, list[tuple[str, str, dict[str, str], bytes]]]:
    seen: list[tuple[str, str, dict[str, str], bytes]] = []
    handler = type("H", (_HttpAuthz,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1], seen

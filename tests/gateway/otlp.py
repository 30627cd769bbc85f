"""A real OTLP/gRPC trace receiver for tests: opentelemetry-proto's TraceService on grpcio.

It keeps every span it receives (with its resource's ``service.name``) and lets a test
wait for a count without sleeping.  ``delay`` makes it a slow collector.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind: 2 SERVER, 3 CLIENT
    attributes: dict[str, Any]
    status_code: int  # 0 UNSET, 1 OK, 2 ERROR
    start: int
    end: int


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


class _Service(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the proto's name
        if self.receiver.delay:
            self.receiver.stopped.wait(self.receiver.delay)
        spans = []
        for rs in request.resource_spans:
            res = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(Span(res.get("service.name", ""), s.trace_id.hex(), s.span_id.hex(),
                                      s.parent_span_id.hex(), s.name, s.kind,
                                      {a.key: _value(a.value) for a in s.attributes}, s.status.code,
                                      s.start_time_unix_nano, s.end_time_unix_nano))
        self.receiver.add(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class Receiver:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay  # seconds each Export call takes (a slow collector)
        self.stopped = threading.Event()
        self.spans: list[Span] = []
        self.cond = threading.Condition()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Service(self), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, spans: list[Span]) -> None:
        with self.cond:
            self.spans.extend(spans)
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Span]:
        """The spans received once there are ``n`` (or what there is at ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.spans) < n and (left := deadline - time.monotonic()) > 0:
                self.cond.wait(left)
            return list(self.spans)

    def clear(self) -> None:
        with self.cond:
            self.spans.clear()

    def stop(self) -> None:
        self.stopped.set()
        self.server.stop(0)


class HttpReceiver(Receiver):
    """The same receiver over OTLP/HTTP (protobuf bodies POSTed to /v1/traces)."""

    def __init__(self) -> None:  # noqa: D107 - no gRPC server: an http.server thread
        import http.server

        self.delay = 0.0
        self.stopped = threading.Event()
        self.spans = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                req = trace_service_pb2.ExportTraceServiceRequest()
                req.ParseFromString(body)
                ok = self.path == "/v1/traces"
                if ok:
                    _Service(receiver).Export(req, None)
                self.send_response(200 if ok else 404)
                self.send_header("content-type", "application/x-protobuf")
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()

"""Metrics (Istio-compatible names and labels) and the per-request access log.

Metric names and label sets are stable API: Kiali and stock Istio Grafana dashboards
read them.  Label values are bounded: principals (service accounts), clusters, service
names, status codes and flags — never IPs or paths.  Each gateway owns its own
:class:`prometheus_client.CollectorRegistry`, so several gateways can share a process
(tests) without colliding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ._half import Headers

REQUEST_LABELS = ("reporter", "source_cluster", "destination_cluster", "source_principal",
                  "destination_principal", "destination_service", "request_protocol",
                  "response_code", "grpc_response_status", "response_flags")
TCP_LABELS = ("reporter", "source_cluster", "destination_cluster", "source_principal",
              "destination_principal", "destination_service", "response_flags")
# Istio's default buckets (milliseconds).
DURATION_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                    60000, 300000, 600000, 1800000, 3600000)

access_log = structlog.get_logger("isthmus.access")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("istio_requests_total", "Requests handled", REQUEST_LABELS,
                                registry=r)
        self.duration = Histogram("istio_request_duration_milliseconds",
                                  "Request duration in milliseconds", REQUEST_LABELS,
                                  buckets=DURATION_BUCKETS, registry=r)
        self.tcp_sent = Counter("istio_tcp_sent_bytes_total",
                                "Bytes sent to the downstream of TCP connections", TCP_LABELS,
                                registry=r)
        self.tcp_received = Counter("istio_tcp_received_bytes_total",
                                    "Bytes received from the downstream of TCP connections",
                                    TCP_LABELS, registry=r)
        self.tcp_opened = Counter("istio_tcp_connections_opened_total",
                                  "TCP connections opened", TCP_LABELS, registry=r)
        self.tcp_closed = Counter("istio_tcp_connections_closed_total",
                                  "TCP connections closed", TCP_LABELS, registry=r)
        self.config_revision = Gauge("isthmus_config_revision",
                                     "Federation revision of the config in force", registry=r)
        self.config_staleness = Gauge("isthmus_config_staleness_seconds",
                                      "Seconds since the config was last confirmed current",
                                      registry=r)
        self.config_rejected = Counter("isthmus_config_rejected",
                                       "Config snapshots the gateway could not build (the "
                                       "config in force stayed)", registry=r)
        self.policy_revision = Gauge("isthmus_policy_revision",
                                     "Federation revision of the policies enforced", registry=r)
        self.policy_errors = Gauge("isthmus_policy_errors",
                                   "Policies in force that could not be compiled (enforced "
                                   "as DENY-all, or dropped if AUDIT)", registry=r)
        self.cert_expiry = Gauge("isthmus_certificate_expiry_timestamp_seconds",
                                 "Expiry (unix time) of the gateway's certificate", registry=r)
        self.pool_connections = Gauge("isthmus_pool_connections",
                                      "Open gateway-to-gateway and upstream connections",
                                      ("destination_cluster",), registry=r)
        self.downstream_connections = Gauge("isthmus_downstream_connections",
                                            "Open downstream connections", ("listener",),
                                            registry=r)
        self.overload = Counter("isthmus_overload_rejections_total",
                                "Connections or streams refused by limits", ("limit",),
                                registry=r)
        self.abuse_closed = Counter("isthmus_abuse_connections_closed_total",
                                    "Downstream connections closed for breaking an abuse "
                                    "limit (rapid reset, floods, slow headers, ...)",
                                    ("listener", "reason"), registry=r)
        # labels() is slow-ish; cache children per label tuple (the tuples are bounded).
        self._req_children: dict[tuple[str, ...], tuple[Any, Any]] = {}

    def observe_request(self, labels: tuple[str, ...], duration_ms: float) -> None:
        children = self._req_children.get(labels)
        if children is None:
            children = (self.requests.labels(*labels), self.duration.labels(*labels))
            self._req_children[labels] = children
        children[0].inc()
        children[1].observe(duration_ms)


def _get(headers: Headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


class Exchange:
    """The record of one request, for metrics and the access log.

    It records; it decides nothing.  What to answer, when to reset and when a deadline
    passed are the request's :class:`~gateway._context.RequestContext`'s decisions.
    """

    __slots__ = ("t0", "start_time", "method", "path", "authority", "protocol", "grpc",
                 "response_code", "grpc_status", "response_flags", "bytes_received",
                 "bytes_sent", "upstream_cluster", "upstream_host", "x_forwarded_for",
                 "user_agent", "request_id", "trace_id", "peer_principal", "source_principal",
                 "destination_principal", "source_cluster", "destination_cluster",
                 "destination_service", "reporter", "done", "on_done", "tcp",
                 "audit_policy", "response_code_details")

    def __init__(self, reporter: str, protocol: str, on_done: Callable[[Exchange], None]) -> None:
        self.t0 = time.perf_counter()
        self.start_time = time.time()
        self.reporter = reporter
        self.protocol = protocol
        self.on_done = on_done
        self.method = self.path = self.authority = ""
        self.grpc = False
        self.response_code = 0
        self.grpc_status = ""
        self.response_flags = ""
        self.bytes_received = self.bytes_sent = 0
        self.upstream_cluster = self.upstream_host = ""
        self.x_forwarded_for = self.user_agent = self.request_id = self.trace_id = ""
        self.peer_principal = self.source_principal = self.destination_principal = ""
        self.source_cluster = self.destination_cluster = ""
        self.destination_service = "unknown"
        self.done = False
        self.tcp = False
        self.audit_policy = ""  # an AUDIT AuthorizationPolicy matched this request
        self.response_code_details = ""

    def on_response_headers(self, headers: Headers, end: bool) -> None:
        status = _get(headers, b":status")
        if status is not None:
            code = int(status)
            if code >= 200 or not self.response_code:
                self.response_code = code
        if self.grpc:
            gs = _get(headers, b"grpc-status")
            if gs is not None:
                self.grpc_status = gs.decode()

    def on_trailers(self, trailers: Headers) -> None:
        gs = _get(trailers, b"grpc-status")
        if gs is not None:
            self.grpc_status = gs.decode()

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.on_done(self)

    def duration_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0

    def labels(self) -> tuple[str, ...]:
        return (self.reporter, self.source_cluster or "unknown",
                self.destination_cluster or "unknown", self.source_principal or "unknown",
                self.destination_principal or "unknown", self.destination_service,
                "grpc" if self.grpc else "http", str(self.response_code or 0),
                self.grpc_status or ("" if not self.grpc else "2"),
                self.response_flags or "-")

    def tcp_labels(self) -> tuple[str, ...]:
        return (self.reporter, self.source_cluster or "unknown",
                self.destination_cluster or "unknown", self.source_principal or "unknown",
                self.destination_principal or "unknown", self.destination_service,
                self.response_flags or "-")

    def log_fields(self, duration_ms: float) -> dict[str, Any]:
        return {
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.start_time))
            + f".{int(self.start_time % 1 * 1000):03d}Z",
            "method": self.method or None,
            "path": self.path or None,
            "protocol": self.protocol,
            "response_code": self.response_code,
            "response_flags": self.response_flags or "-",
            "grpc_status": self.grpc_status or None,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "duration": int(duration_ms),
            "upstream_cluster": self.upstream_cluster or None,
            "upstream_host": self.upstream_host or None,
            "authority": self.authority or None,
            "x_forwarded_for": self.x_forwarded_for or None,
            "user_agent": self.user_agent or None,
            "request_id": self.request_id or None,
            "trace_id": self.trace_id or None,
            "peer_principal": self.peer_principal or None,
            "source_principal": self.source_principal or None,
            "destination_principal": self.destination_principal or None,
            "source_cluster": self.source_cluster or None,
            "destination_cluster": self.destination_cluster or None,
            "destination_service": self.destination_service,
            "reporter": self.reporter,
            "audit_policy": self.audit_policy or None,
            "response_code_details": self.response_code_details or None,
        }


class Recorder:
    """Turns finished exchanges into metrics and access-log lines."""

    def __init__(self, metrics: Metrics, access_log_enabled: bool = True) -> None:
        self.metrics = metrics
        self.log_enabled = access_log_enabled

    def __call__(self, x: Exchange) -> None:
        d = x.duration_ms()
        if x.tcp:
            labels = x.tcp_labels()
            m = self.metrics
            m.tcp_sent.labels(*labels).inc(x.bytes_sent)
            m.tcp_received.labels(*labels).inc(x.bytes_received)
            m.tcp_closed.labels(*labels).inc()
        else:
            self.metrics.observe_request(x.labels(), d)
        if self.log_enabled:
            access_log.info("access", **x.log_fields(d))

    def tcp_opened(self, x: Exchange) -> None:
        self.metrics.tcp_opened.labels(*x.tcp_labels()).inc()

"""Metrics and the per-request access log.

The record of one request (:class:`Exchange`) is filled by the handlers and the halves
as the request goes; when it finishes, the :class:`Recorder` turns it into metrics and
one access-log line.  Istio's standard metrics (names, labels, bounds, cost) are
:mod:`gateway._istio`'s; the ``isthmus_*`` metrics, in base units, are here.  Each
gateway owns its own :class:`prometheus_client.CollectorRegistry`, so several gateways
can share a process (tests) without colliding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from ._flags import add_flag
from ._half import Headers
from ._istio import MAX_IDENTITIES, UNKNOWN, IstioMetrics, grpc_status
from ._propagation import Hop
from ._summaries import EdgeCollector

if TYPE_CHECKING:
    from ._tracing import Tracing

access_log = structlog.get_logger("isthmus.access")


class Metrics:
    def __init__(self, cluster: str = "", max_identities: int = MAX_IDENTITIES) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.istio = IstioMetrics(max_identities)
        r.register(self.istio)
        self.gateway = Info("isthmus_gateway", "The gateway: the cluster it serves (join other "
                            "isthmus_* series on job and instance to name their cluster)",
                            registry=r)
        if cluster:
            self.gateway.info({"cluster": cluster})
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
        self.ext_authz = Counter("isthmus_ext_authz", "CUSTOM authorization checks by provider and "
                                 "result (allowed, denied, error, timeout)", ("provider", "result"),
                                 registry=r)
        self.overload = Counter("isthmus_overload_rejections_total",
                                "Connections or streams refused by limits", ("limit",),
                                registry=r)
        self.route_requests = Counter("isthmus_route_destination_requests_total",
                                      "Requests (and TCP connections) a TrafficRoute sent to each "
                                      "destination (watch a canary with it)",
                                      ("route", "cluster", "service"), registry=r)
        self.abuse_closed = Counter("isthmus_abuse_connections_closed_total",
                                    "Downstream connections closed for breaking an abuse "
                                    "limit (rapid reset, floods, slow headers, ...)",
                                    ("listener", "reason"), registry=r)
        self.http2_core = Gauge("isthmus_http2_core",
                                "The HTTP/2 core new connections run on (1), by core",
                                ("core",), registry=r)
        # labels() is slow-ish; cache children per label tuple (the tuples are bounded).
        self._route_children: dict[tuple[str, str, str], Any] = {}

    def observe_route(self, labels: tuple[str, str, str]) -> None:
        child = self._route_children.get(labels)
        if child is None:
            child = self._route_children[labels] = self.route_requests.labels(*labels)
        child.inc()


class Service(Protocol):
    """What the record keeps of a route's destination (OutboundRoute, LocalTarget)."""

    @property
    def namespace(self) -> str: ...
    @property
    def service(self) -> str: ...
    @property
    def destination_service(self) -> str: ...


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

    __slots__ = ("trace", "policy", "authz", "t0", "start_time", "method", "path", "authority", "protocol", "grpc",
                 "response_code", "grpc_status", "response_flags", "bytes_received",
                 "bytes_sent", "upstream_cluster", "upstream_host", "x_forwarded_for",
                 "user_agent", "request_id", "trace_id", "peer_principal", "source_principal",
                 "destination_principal", "source_cluster", "destination_cluster",
                 "destination_service", "destination_namespace", "destination_name",
                 "reporter", "done", "on_done", "tcp",
                 "audit_policy", "response_code_details", "route_name", "route_rule", "attempts")

    def __init__(self, reporter: str, protocol: str, on_done: Callable[[Exchange], None]) -> None:
        self.t0 = time.perf_counter()
        self.start_time = time.time()
        self.reporter = reporter
        self.protocol = protocol
        self.on_done = on_done
        self.trace: Hop | None = None  # this gateway's span of the request (gateway/_propagation.py)
        self.policy = self.authz = ""  # the policy that allowed or denied, and which ("allow"/"deny")
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
        self.destination_service = UNKNOWN
        self.destination_namespace = self.destination_name = ""
        self.done = False
        self.tcp = False
        self.audit_policy = ""  # an AUDIT AuthorizationPolicy matched this request
        self.response_code_details = ""
        self.route_name = ""  # the TrafficRoute that chose the destination
        self.route_rule: int | None = None  # and its rule's index
        self.attempts = 0  # tries under a rule's retries or a TrafficPolicy (0: not counted)

    def on_response_headers(self, headers: Headers, end: bool) -> None:
        status = _get(headers, b":status")
        if status is not None:
            code = int(status)
            if code >= 200 or not self.response_code:
                self.response_code = code
        if self.grpc:
            gs = _get(headers, b"grpc-status")
            if gs is not None:
                self.grpc_status = grpc_status(gs)

    def on_trailers(self, trailers: Headers) -> None:
        gs = _get(trailers, b"grpc-status")
        if gs is not None:
            self.grpc_status = grpc_status(gs)

    def add_flag(self, flags: str) -> None:
        """Record ``flags`` too (every flag that applies is kept: see gateway/_flags.py)."""
        self.response_flags = add_flag(self.response_flags, flags)

    def to_service(self, route: Service) -> None:
        """The request goes to ``route``'s service."""
        self.destination_service = route.destination_service
        self.destination_namespace = route.namespace
        self.destination_name = route.service

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.on_done(self)

    def duration_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0

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
            "route_name": self.route_name or None,
            "route_rule": self.route_rule,
            "attempts": self.attempts or None,
        }


class Recorder:
    """Turns finished exchanges into metrics and access-log lines."""

    def __init__(self, metrics: Metrics, access_log_enabled: bool = True,
                 tracing: Tracing | None = None) -> None:
        self.metrics = metrics
        self.log_enabled = access_log_enabled
        self.tracing = tracing  # spans (gateway/_tracing.py); None: none recorded
        self.edges = EdgeCollector()  # per-edge summaries for the federation (gateway._summaries)

    @property
    def sample_bound(self) -> int | None:
        """The ratio sampler's bound for new traces; None while no spans are exported."""
        t = self.tracing
        return None if t is None else t.bound

    def __call__(self, x: Exchange) -> None:
        d = x.duration_ms()
        if x.tcp:
            self.metrics.istio.tcp_closed(x)
            self.edges.tcp_closed(x, d)
        else:
            self.metrics.istio.observe_request(x, d)
            self.edges.request(x, d)
            if x.route_name and x.destination_cluster:  # a TCP connection counted when opened
                self.metrics.observe_route((x.route_name, x.destination_cluster, x.destination_service))
        t = self.tracing
        if t is not None and x.trace is not None and x.trace.sampled and t.bound is not None and not x.tcp:
            t.record(x, d)
        if self.log_enabled:
            access_log.info("access", **x.log_fields(d))

    def tcp_opened(self, x: Exchange) -> None:
        self.metrics.istio.tcp_opened(x)
        self.edges.tcp_opened(x)
        if x.route_name and x.destination_cluster and x.reporter == "source":
            self.metrics.observe_route((x.route_name, x.destination_cluster, x.destination_service))

"""Spans: one per HTTP request a gateway handles, exported over OTLP off the data path.

Theory of operation
-------------------
The outbound gateway records a CLIENT span for each request it forwards to a peer
gateway, the inbound a SERVER span for each request a peer sends it (refusals included:
a denied request shows its span with the denying policy).  The ids and the sampling
decision are made when the request's headers arrive (:func:`gateway._propagation.begin`:
the ids go into the forwarded ``traceparent``/B3 either way); the span itself is made
only when the request ends, and only when sampled: :meth:`Tracing.record` turns the
request's record (:class:`gateway._telemetry.Exchange`) into a span whose attributes
follow OpenTelemetry's HTTP and RPC semantic conventions (:func:`span_fields`), plus
Isthmus' own ``isthmus.*`` attributes (clusters, SPIFFE IDs, response flags, route and
rule, retry attempts, the authorization policy).

Export is OpenTelemetry's SDK: a ``TracerProvider`` whose ``IdGenerator`` hands out the
ids already chosen (:class:`_ChosenIds`), a ``BatchSpanProcessor`` and the OTLP exporter
(gRPC or HTTP/protobuf).  Ending a span only appends it to the processor's queue; a
worker thread of the SDK encodes and sends batches.  The queue is bounded and admission
is counted here (:class:`_Admission`): a span that finds it full is dropped and counted
(``isthmus_trace_spans_dropped_total{reason="queue_full"}``), and a batch the collector
did not take is counted too (``reason="export_failed"``); after a failure the collector
is left alone a while (1 s, doubling to 30 s) and the spans of that while are not even
made (``reason="collector_down"``), so a slow or dead collector costs requests next to
nothing but those counts.  An unreachable collector is logged at most
once a minute (``tracing.export_failed``, with the exporter's own last error, whose
per-retry log lines are held back); it is never fatal.

The settings (:class:`TracingSettings`: collector, protocol, sampling percentage, queue
bounds) come from the gateway config's ``tracing`` block, overridden by the federation's
``Telemetry`` documents (:func:`effective_settings`, computed with each config state).
:meth:`Tracing.apply` swaps the whole pipeline when they change, live: requests in
flight finish on the pipeline they started with, and the old one is shut down (its
queue flushed) in a thread of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import structlog
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, TraceIdRatioBased
from opentelemetry.trace import (NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode,
                                 TraceFlags, set_span_in_context)
from prometheus_client import CollectorRegistry, Counter, Gauge

from federation.models import Telemetry

log = structlog.get_logger("isthmus.gateway")

LOG_INTERVAL = 60.0  # seconds between two "collector unreachable" lines
# After a failed export the collector is left alone (no span made, no batch encoded) for
# this long, doubling per failure up to the cap: a dead collector costs next to nothing.
REST_INITIAL, REST_MAX = 1.0, 30.0
SCOPE = "isthmus.gateway"
# gRPC codes a server span reports as an error (OpenTelemetry RPC conventions); a client
# span reports every code but OK.
_GRPC_SERVER_ERRORS = frozenset(("2", "4", "12", "13", "14", "15"))


@dataclasses.dataclass(frozen=True, slots=True)
class TracingSettings:
    """What the span pipeline is built from (equal settings: the pipeline stays)."""

    collector: str = ""  # "" : no spans exported
    protocol: str = "grpc"  # or "http"
    sampling_percentage: float = 1.0
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    schedule_delay: float = 1.0  # seconds
    export_timeout: float = 5.0  # seconds

    @property
    def enabled(self) -> bool:
        return bool(self.collector)


def effective_settings(base: TracingSettings, documents: Sequence[Telemetry], cluster: str) -> TracingSettings:
    """``base`` (the gateway config's) overridden by the Telemetry documents that apply to
    ``cluster``: federation-wide ones (no ``clusters``) first, then those naming the
    cluster, each in name order; a field a document leaves out keeps what came before
    (Istio's inheritance: mesh-wide, then narrower)."""
    out = base
    mesh = sorted((d for d in documents if not d.clusters), key=lambda d: d.name)
    own = sorted((d for d in documents if cluster in d.clusters), key=lambda d: d.name)
    for doc in (*mesh, *own):
        t = doc.tracing
        update: dict[str, Any] = {}
        if t.collector is not None:
            update["collector"] = t.collector
        if t.protocol is not None:
            update["protocol"] = t.protocol
        if t.random_sampling_percentage is not None:
            update["sampling_percentage"] = t.random_sampling_percentage
        if t.disable_span_reporting:
            update["collector"] = ""
        out = dataclasses.replace(out, **update)
    return out


def ratio_bound(percentage: float) -> int:
    """The trace-id bound of OpenTelemetry's ratio sampler for ``percentage``."""
    return TraceIdRatioBased.get_bound_for_rate(percentage / 100.0)


# ---------------------------------------------------------------- the span of a request


def span_fields(x: Any) -> tuple[str, SpanKind, dict[str, Any], Status]:
    """Name, kind, attributes and status of the span of the finished request ``x``."""
    server = x.reporter == "destination"
    a: dict[str, Any] = {"http.request.method": x.method or "_OTHER"}
    code = x.response_code
    if code:
        a["http.response.status_code"] = code
    a["network.protocol.name"] = "http"
    a["network.protocol.version"] = "2" if x.protocol == "HTTP/2" else "1.1"
    authority = x.authority
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit():
        host, port = authority, ""
    if host:
        a["server.address"] = host
    if port:
        a["server.port"] = int(port)
    if server:
        a["url.path"] = x.path.partition("?")[0]
        a["url.scheme"] = "https"  # gateway to gateway is always mTLS
        query = x.path.partition("?")[2]
        if query:
            a["url.query"] = query
    else:
        a["url.full"] = f"https://{authority}{x.path}"
    if x.user_agent:
        a["user_agent.original"] = x.user_agent
    name = x.method or "HTTP"
    error = ""
    if x.grpc:
        service, _, method = x.path.lstrip("/").partition("/")
        a["rpc.system"] = "grpc"
        a["rpc.service"] = service
        a["rpc.method"] = method.partition("?")[0]
        name = x.path.lstrip("/") or name
        gs = x.grpc_status
        if gs:
            a["rpc.grpc.status_code"] = int(gs)
            if gs != "0" and (not server or gs in _GRPC_SERVER_ERRORS):
                error = gs
    if not error and code >= (500 if server else 400):
        error = str(code)
    if not code and not (x.grpc and x.grpc_status):
        error = x.response_flags or "no_response"
    # Isthmus' own.
    for key, value in (("isthmus.source_cluster", x.source_cluster),
                       ("isthmus.destination_cluster", x.destination_cluster),
                       ("isthmus.source_principal", x.source_principal),
                       ("isthmus.destination_principal", x.destination_principal),
                       ("isthmus.peer_principal", x.peer_principal),
                       ("isthmus.destination_service", x.destination_service),
                       ("isthmus.response_flags", x.response_flags),
                       ("isthmus.request_id", x.request_id)):
        if value:
            a[key] = value
    if x.route_name:
        a["isthmus.route.name"] = x.route_name
        if x.route_rule is not None:
            a["isthmus.route.rule"] = x.route_rule
    attempts = getattr(x, "attempts", 0)  # tries under a route's retries, where counted
    if attempts:
        a["isthmus.retry.attempts"] = attempts
    if x.authz:
        a["isthmus.authz.decision"] = x.authz
        if x.policy:
            a["isthmus.authz.policy"] = x.policy
    if error:
        a["error.type"] = error
        status = Status(StatusCode.ERROR, x.response_code_details or x.response_flags or None)
    else:
        status = Status(StatusCode.UNSET)
    return name, SpanKind.SERVER if server else SpanKind.CLIENT, a, status


# ---------------------------------------------------------------- the SDK pipeline


class _ChosenIds(IdGenerator):
    """Hands the SDK the ids the gateway chose for the span it is making (they were sent
    onward in the trace headers before the span existed).  One pipeline is only used by
    its gateway's event-loop thread."""

    def __init__(self) -> None:
        self.trace_id = self.span_id = 0

    def generate_trace_id(self) -> int:
        return self.trace_id

    def generate_span_id(self) -> int:
        return self.span_id


class _Capture(logging.Filter):
    """Holds back the OTLP exporters' and the batch processor's own log lines (one per
    retry and per dropped span: a flood while a collector is down); keeps the last one,
    which the once-a-minute ``tracing.export_failed`` line quotes."""

    last = ""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            try:
                _Capture.last = record.getMessage()[:300]
            except Exception:  # noqa: BLE001 - a log record that cannot format
                pass
            return False
        return True


_CAPTURED = ("opentelemetry.exporter.otlp.proto.grpc.exporter",
             "opentelemetry.exporter.otlp.proto.http.trace_exporter",
             "opentelemetry.sdk._shared_internal",
             "opentelemetry.sdk.trace.export")
_capture_once = threading.Lock()
_captured = False


def _capture_exporter_logs() -> None:
    global _captured
    with _capture_once:
        if not _captured:
            _captured = True
            f = _Capture()
            for name in _CAPTURED:
                logging.getLogger(name).addFilter(f)


class _Counters:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.exported = Counter("isthmus_trace_spans_exported", "Spans the collector accepted",
                                registry=registry)
        dropped = Counter("isthmus_trace_spans_dropped",
                          "Spans dropped: the export queue was full (queue_full), the collector "
                          "did not take them (export_failed), it failed moments ago and is left "
                          "alone a while (collector_down), or the pipeline was shutting down",
                          ("reason",), registry=registry)
        self.queue_full = dropped.labels("queue_full")
        self.export_failed = dropped.labels("export_failed")
        self.collector_down = dropped.labels("collector_down")
        self.shutdown = dropped.labels("shutdown")
        self.sampling = Gauge("isthmus_trace_sampling_ratio",
                              "Ratio of new traces sampled (0: no spans exported)", registry=registry)


class _Export(SpanExporter):
    """The OTLP exporter, counted, its failures logged at most once a minute."""

    def __init__(self, inner: SpanExporter, collector: str, counters: _Counters) -> None:
        self.inner = inner
        self.collector = collector
        self.counters = counters
        self.lock = threading.Lock()
        self.taken = 0  # spans the processor handed over (batches popped off its queue)
        self.failed_since_log = 0
        self.last_log = -LOG_INTERVAL
        self.ok: bool | None = None  # the last export's outcome (None: none yet)
        self.rest_until = 0.0  # monotonic time before which the collector is left alone
        self.rest = REST_INITIAL

    def resting(self) -> bool:
        return self.rest_until > 0.0 and time.monotonic() < self.rest_until

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        n = len(spans)
        with self.lock:
            self.taken += n
        if self.resting():  # queued before the last failure: not worth encoding now
            self.counters.collector_down.inc(n)
            return SpanExportResult.FAILURE
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # noqa: BLE001 - an exporter's bug must not stop exporting
            _Capture.last = f"{type(exc).__name__}: {exc}"[:300]
            result = SpanExportResult.FAILURE
        self.ok = result == SpanExportResult.SUCCESS
        if self.ok:
            self.counters.exported.inc(n)
            self.rest_until, self.rest = 0.0, REST_INITIAL
            return result
        self.counters.export_failed.inc(n)
        now = time.monotonic()
        self.rest_until, self.rest = now + self.rest, min(self.rest * 2, REST_MAX)
        with self.lock:
            self.failed_since_log += n
            due = now - self.last_log >= LOG_INTERVAL
            if due:
                self.last_log, dropped, self.failed_since_log = now, self.failed_since_log, 0
        if due:
            log.warning("tracing.export_failed", collector=self.collector, dropped_spans=dropped,
                        error=_Capture.last or None, next_report_in=LOG_INTERVAL)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _Admission(SpanProcessor):
    """In front of the batch processor: a span that would find its queue full is dropped
    here and counted (the SDK would drop the oldest, uncounted)."""

    def __init__(self, batch: BatchSpanProcessor, export: _Export, capacity: int, counters: _Counters) -> None:
        self.batch = batch
        self.export = export
        self.capacity = capacity
        self.counters = counters
        self.handed = 0  # written by the event-loop thread only
        self.closed = False

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def full(self) -> bool:
        return self.handed - self.export.taken >= self.capacity

    def on_end(self, span: ReadableSpan) -> None:
        if self.closed:
            self.counters.shutdown.inc()
            return
        if self.full():
            self.counters.queue_full.inc()
            return
        self.handed += 1
        self.batch.on_end(span)

    def shutdown(self) -> None:
        self.closed = True
        self.batch.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.batch.force_flush(timeout_millis)


def _exporter(s: TracingSettings) -> SpanExporter:
    if s.protocol == "http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
        url = s.collector if "://" in s.collector else f"http://{s.collector}/v1/traces"
        return HttpExporter(endpoint=url, timeout=s.export_timeout)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
    secure = s.collector.startswith("https://")
    endpoint = s.collector.split("://", 1)[-1]
    return GrpcExporter(endpoint=endpoint, insecure=not secure, timeout=s.export_timeout)


class _Pipeline:
    def __init__(self, s: TracingSettings, resource: Resource, counters: _Counters) -> None:
        self.ids = _ChosenIds()
        # Sampling was decided when the request arrived (gateway._propagation.begin: the
        # rule of ParentBased(TraceIdRatioBased), on integers); only sampled requests get
        # here, and the SDK records what it is given.
        self.provider = TracerProvider(resource=resource, id_generator=self.ids, sampler=ALWAYS_ON)
        self.export = _Export(_exporter(s), s.collector, counters)
        batch = BatchSpanProcessor(self.export, max_queue_size=s.max_queue_size,
                                   schedule_delay_millis=s.schedule_delay * 1000,
                                   max_export_batch_size=min(s.max_export_batch_size, s.max_queue_size),
                                   export_timeout_millis=s.export_timeout * 1000)
        self.admission = _Admission(batch, self.export, s.max_queue_size, counters)
        self.provider.add_span_processor(self.admission)
        self.tracer = self.provider.get_tracer(SCOPE)

    def shutdown(self) -> None:
        try:
            self.provider.shutdown()
        except Exception:  # noqa: BLE001 - shutting down must not fail anything
            log.warning("tracing.shutdown_failed", exc_info=True)


class Tracing:
    """A gateway's span pipeline (none while no collector is set)."""

    def __init__(self, cluster: str, registry: CollectorRegistry,
                 settings: TracingSettings = TracingSettings()) -> None:
        self.cluster = cluster
        self.counters = _Counters(registry)
        self.resource = Resource.create({"service.name": f"isthmus-gateway.{cluster}",
                                         "service.namespace": "isthmus-system",
                                         "k8s.cluster.name": cluster})
        self.settings = TracingSettings(collector="\0")  # differs from any real settings
        self.pipeline: _Pipeline | None = None
        self.bound: int | None = None  # None: no spans (requests only propagate context)
        self.apply(settings)

    def apply(self, s: TracingSettings) -> None:
        """Use ``s`` from now on (a new pipeline when they differ; the old one is shut
        down, its queue flushed, in a thread of its own)."""
        if s == self.settings:
            return
        old = self.pipeline
        self.settings = s
        pipeline = None
        if s.enabled:
            _capture_exporter_logs()
            try:
                pipeline = _Pipeline(s, self.resource, self.counters)
            except ImportError as exc:
                # The OTLP exporter could not load its protobuf modules: a broken install
                # (e.g. another package overwrote opentelemetry.proto's files).  Spans are
                # off; requests are untouched.
                log.error("tracing.unavailable", error=str(exc),
                          hint="reinstall the OTLP modules: pip install --force-reinstall --no-deps "
                               "opentelemetry-proto")
        if pipeline is not None:
            self.pipeline = pipeline
            self.bound = ratio_bound(s.sampling_percentage)
            self.counters.sampling.set(s.sampling_percentage / 100.0)
        else:
            self.pipeline, self.bound = None, None
            self.counters.sampling.set(0)
        log.info("tracing.configured", collector=s.collector or None, protocol=s.protocol,
                 sampling_percentage=s.sampling_percentage if s.enabled else None)
        if old is not None:
            threading.Thread(target=old.shutdown, name="isthmus-tracing-shutdown", daemon=True).start()

    def document(self) -> dict[str, Any]:
        """The settings in force, as the admin endpoint's ``/config`` shows them, and
        whether the collector took the last batch (None: nothing exported yet)."""
        p = self.pipeline
        return {**dataclasses.asdict(self.settings),
                "collector_reachable": None if p is None else p.export.ok,
                "last_error": (_Capture.last or None) if p is not None and p.export.ok is False else None}

    def record(self, x: Any, duration_ms: float) -> None:
        """The span of the finished request ``x`` (call only when ``x.trace.sampled``)."""
        p = self.pipeline
        hop = x.trace
        if p is None or hop is None:
            return
        if p.admission.full():  # it would be dropped: no span made at all
            self.counters.queue_full.inc()
            return
        if p.export.resting():  # the collector just failed: no span made either
            self.counters.collector_down.inc()
            return
        name, kind, attrs, status = span_fields(x)
        start = int(x.start_time * 1e9)
        if hop.parent_id:
            parent = SpanContext(hop.trace_id, hop.parent_id, is_remote=True,
                                 trace_flags=TraceFlags(TraceFlags.SAMPLED))
            context = set_span_in_context(NonRecordingSpan(parent))
        else:
            context = Context()
        p.ids.trace_id, p.ids.span_id = hop.trace_id, hop.span_id
        span = p.tracer.start_span(name, context, kind, attrs, start_time=start)
        if status.status_code is StatusCode.ERROR:
            span.set_status(status)
        span.end(start + int(duration_ms * 1e6))

    def flush(self) -> None:
        """Export what is queued now (tests, shutdown)."""
        p = self.pipeline
        if p is not None:
            p.provider.force_flush()

    def close(self) -> None:
        p, self.pipeline, self.bound = self.pipeline, None, None
        if p is not None:
            p.shutdown()


__all__ = ["Tracing", "TracingSettings", "effective_settings", "ratio_bound", "span_fields"]

"""Istio's standard metrics: their names, their labels, and the series behind them.

Names and labels are stable API: Kiali's graph and stock Istio Grafana dashboards read
them.  The labels are Istio's standard set (istio/proxy,
``source/extensions/filters/http/istio_stats/istio_stats.cc``), filled the way a sidecar
fills them, with ``unknown`` (and ``latest`` for a canonical revision) where a value is
not known:

* the workload labels of the *caller* come from its SPIFFE ID
  (``spiffe://<td>/ns/<ns>/sa/<sa>``): workload and canonical service are the service
  account (Istio's last fallback for both is the workload name), the namespace is the
  ID's; app and version are ``unknown`` and the canonical revision ``latest``, Istio's
  values for a pod without those labels;
* the *destination* is a service, never a pod the gateway can see: its workload, app,
  version and canonical service are ``unknown``; ``destination_service_name`` and
  ``_namespace`` are the exported service's; the inbound gateway
  (``reporter="destination"``) also knows the workload namespace (the service's pods run
  in it), the outbound (``reporter="source"``) does not;
* ``connection_security_policy`` is ``mutual_tls`` where the inbound gateway reports
  (peer gateways always connect with mTLS) and ``unknown`` at the outbound, as Istio's
  client side reports it;
* ``istio_request_bytes``/``istio_response_bytes`` measure bodies (DATA bytes).

Label values stay bounded: principals are verified (or validated) SPIFFE IDs, clusters
and services come from the federation's config, codes and flags are short enums
(:func:`grpc_status` bounds what an upstream may send).  The caller identities one
gateway reports are capped (:data:`MAX_IDENTITIES`): past the cap a new identity is
reported as ``unknown`` and counted in ``isthmus_telemetry_identities_overflow_total``,
so a peer that asserts ever new IDs cannot grow the series without end.

Cost.  prometheus_client's labelled children take a lock per increment and walk the
buckets in Python: three histograms per request would cost more than the rest of the
record.  So the series are plain numbers in one :class:`IstioMetrics` (the event loop is
the only writer, and the admin endpoint reads them on the same thread), keyed by a short
tuple every label is a function of; per request that is one identity lookup, one key
lookup and a C ``bisect`` per histogram.  Label sets are built on a key's first sight
only, and the library's metric families expose the series on scrape.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from trust import InvalidSpiffeId, SpiffeId

UNKNOWN = "unknown"
LATEST = "latest"  # Istio's canonical revision of a workload without a version label
MUTUAL_TLS = "mutual_tls"
MAX_IDENTITIES = 2048  # distinct caller identities one gateway reports by name

_PEER = ("workload", "workload_namespace", "principal", "app", "version", "canonical_service",
         "canonical_revision")
_SOURCE = tuple(f"source_{n}" for n in _PEER) + ("source_cluster",)
_DESTINATION = (tuple(f"destination_{n}" for n in _PEER)
                + ("destination_service", "destination_service_name",
                   "destination_service_namespace", "destination_cluster"))
_ENDS = ("request_protocol", "response_flags", "connection_security_policy")
TCP_LABELS = ("reporter", *_SOURCE, *_DESTINATION, *_ENDS)
REQUEST_LABELS = (*TCP_LABELS, "response_code", "grpc_response_status")
# Envoy's default histogram buckets (envoy, source/common/stats/histogram_impl.cc,
# HistogramSettingsImpl::defaultBuckets): Istio sets none of its own, so its duration
# (milliseconds) and size (bytes) histograms all use these.
BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
           600000, 1800000, 3600000)
_LE = (*(floatToGoString(b) for b in BUCKETS), "+Inf")

# (workload, namespace, principal, app, version, canonical service, canonical revision)
PeerLabels = tuple[str, str, str, str, str, str, str]
UNKNOWN_PEER: PeerLabels = (UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, LATEST)


def peer_labels(principal: str) -> PeerLabels:
    """The workload labels of a SPIFFE ID; ``unknown`` for what it does not tell."""
    if not principal:
        return UNKNOWN_PEER
    try:
        sid = SpiffeId.parse(principal)
    except InvalidSpiffeId:
        return UNKNOWN_PEER
    ns, sa = sid.namespace, sid.service_account
    if ns is None or sa is None:  # not a workload (an operator, the federation)
        return (UNKNOWN, UNKNOWN, principal, UNKNOWN, UNKNOWN, UNKNOWN, LATEST)
    return (sa, ns, principal, UNKNOWN, UNKNOWN, sa, LATEST)


def grpc_status(value: bytes) -> str:
    """A ``grpc-status`` as a label value: its code (0-99), else 2 (UNKNOWN), which is
    what a gRPC client makes of a status it cannot read."""
    return value.decode() if 0 < len(value) <= 2 and value.isdigit() else "2"


class Record(Protocol):
    """What the metrics read of a finished request (:class:`gateway._telemetry.Exchange`)."""

    reporter: str
    source_principal: str
    source_cluster: str
    destination_principal: str
    destination_cluster: str
    destination_service: str
    destination_namespace: str
    destination_name: str
    grpc: bool
    response_code: int
    grpc_status: str
    response_flags: str
    bytes_received: int
    bytes_sent: int


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # per bucket, not cumulative; last: +Inf
        self.sum = 0.0

    def cumulative(self) -> list[tuple[str, float]]:
        out, n = [], 0
        for le, c in zip(_LE, self.counts, strict=True):
            n += c
            out.append((le, n))
        return out


class _RequestSeries:
    __slots__ = ("labels", "duration", "request_bytes", "response_bytes")

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.duration, self.request_bytes, self.response_bytes = (
            _Histogram(), _Histogram(), _Histogram())


class _TcpSeries:
    __slots__ = ("labels", "opened", "closed", "sent", "received")

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.opened = self.closed = self.sent = self.received = 0


class IstioMetrics:
    """The istio_* series of one gateway; a prometheus_client collector."""

    def __init__(self, max_identities: int = MAX_IDENTITIES) -> None:
        # Caller principal -> its labels; "" (no identity, or past the cap) -> unknown.
        self._peers: dict[str, PeerLabels] = {"": UNKNOWN_PEER}
        self._max_identities = max_identities
        self.identities_overflow = 0
        self._requests: dict[tuple[object, ...], _RequestSeries] = {}
        self._tcp: dict[tuple[object, ...], _TcpSeries] = {}

    # -- per request ----------------------------------------------------------------------
    def _source(self, principal: str) -> str:
        """``principal`` if it is (or can be) one of the identities reported, else ""."""
        if principal in self._peers:
            return principal
        if len(self._peers) > self._max_identities:
            self.identities_overflow += 1
            return ""
        self._peers[principal] = peer_labels(principal)
        return principal

    def observe_request(self, x: Record, duration_ms: float) -> None:
        key = (x.reporter, self._source(x.source_principal), x.source_cluster,
               x.destination_principal, x.destination_cluster, x.destination_service, x.grpc,
               x.response_code, x.grpc_status, x.response_flags)
        s = self._requests.get(key)
        if s is None:
            labels = self._labels(x, key[1], "grpc" if x.grpc else "http")
            labels += (str(x.response_code), x.grpc_status or ("2" if x.grpc else ""))
            s = self._requests[key] = _RequestSeries(labels)
        h = s.duration
        h.counts[bisect_left(BUCKETS, duration_ms)] += 1
        h.sum += duration_ms
        h, n = s.request_bytes, x.bytes_received
        h.counts[bisect_left(BUCKETS, n)] += 1
        h.sum += n
        h, n = s.response_bytes, x.bytes_sent
        h.counts[bisect_left(BUCKETS, n)] += 1
        h.sum += n

    def _tcp_series(self, x: Record) -> _TcpSeries:
        key = (x.reporter, self._source(x.source_principal), x.source_cluster,
               x.destination_principal, x.destination_cluster, x.destination_service,
               x.response_flags)
        s = self._tcp.get(key)
        if s is None:
            s = self._tcp[key] = _TcpSeries(self._labels(x, key[1], "tcp"))
        return s

    def tcp_opened(self, x: Record) -> None:
        self._tcp_series(x).opened += 1

    def tcp_closed(self, x: Record) -> None:
        s = self._tcp_series(x)
        s.closed += 1
        s.sent += x.bytes_sent
        s.received += x.bytes_received

    def _labels(self, x: Record, source: str, protocol: str) -> list[str]:
        """Values of :data:`TCP_LABELS` (a key's first sight only)."""
        inbound = x.reporter == "destination"
        dst_ns = x.destination_namespace or UNKNOWN
        return [x.reporter, *self._peers[source], x.source_cluster or UNKNOWN,
                UNKNOWN, dst_ns if inbound else UNKNOWN, x.destination_principal or UNKNOWN,
                UNKNOWN, UNKNOWN, UNKNOWN, LATEST, x.destination_service,
                x.destination_name or UNKNOWN, dst_ns, x.destination_cluster or UNKNOWN,
                protocol, x.response_flags or "-", MUTUAL_TLS if inbound else UNKNOWN]

    # -- collector ------------------------------------------------------------------------
    def describe(self) -> Iterator[Metric]:
        return self._families(False)

    def collect(self) -> Iterator[Metric]:
        return self._families(True)

    def _families(self, with_samples: bool) -> Iterator[Metric]:
        reqs = list(self._requests.values()) if with_samples else []
        tcp = list(self._tcp.values()) if with_samples else []
        total = CounterMetricFamily("istio_requests_total", "Requests handled",
                                    labels=REQUEST_LABELS)
        for s in reqs:
            total.add_metric(s.labels, sum(s.duration.counts))
        yield total
        for name, doc, attr in (
                ("istio_request_duration_milliseconds", "Request duration in milliseconds",
                 "duration"),
                ("istio_request_bytes", "Request body sizes in bytes", "request_bytes"),
                ("istio_response_bytes", "Response body sizes in bytes", "response_bytes")):
            fam = HistogramMetricFamily(name, doc, labels=REQUEST_LABELS)
            for s in reqs:
                h = getattr(s, attr)
                fam.add_metric(s.labels, h.cumulative(), h.sum)
            yield fam
        for name, doc, attr in (
                ("istio_tcp_connections_opened_total", "TCP connections opened", "opened"),
                ("istio_tcp_connections_closed_total", "TCP connections closed", "closed"),
                ("istio_tcp_sent_bytes_total",
                 "Bytes sent to the downstream of TCP connections", "sent"),
                ("istio_tcp_received_bytes_total",
                 "Bytes received from the downstream of TCP connections", "received")):
            fam = CounterMetricFamily(name, doc, labels=TCP_LABELS)
            for t in tcp:
                fam.add_metric(t.labels, getattr(t, attr))
            yield fam
        over = CounterMetricFamily(
            "isthmus_telemetry_identities_overflow_total",
            "Requests and connections reported with unknown workload labels because the "
            "gateway already reports its maximum of distinct identities")
        over.add_metric([], self.identities_overflow)
        yield over


__all__ = ["BUCKETS", "IstioMetrics", "LATEST", "MAX_IDENTITIES", "MUTUAL_TLS", "REQUEST_LABELS",
           "Record", "TCP_LABELS", "UNKNOWN", "grpc_status", "peer_labels"]

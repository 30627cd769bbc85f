"""Gateway configuration: a YAML file validated with pydantic.

Every field has a default, so an empty file is a valid config for a gateway whose
certificates sit in the default places.  Validation errors name the field path
(``limits.max_concurrent_streams: Input should be greater than 0``).

Defaults follow Envoy where Envoy has one (idle timeout 1 h, 60 KiB header lists,
connect timeout 5 s); flow-control windows are larger than HTTP/2's 64 KiB because
gateway-to-gateway links are long, fat pipes, and still bounded per stream.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from federation.models import Snapshot
from federation.names import GATEWAY_ADMIN_PORT, GATEWAY_INBOUND_PORT, GATEWAY_OUTBOUND_PORT

from ._errors import ConfigError
from ._routes import DEFAULT_DNS_SUFFIX


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerConfig(_Model):
    host: str = "0.0.0.0"
    port: int = Field(ge=0, le=65535)


class TlsConfig(_Model):
    """The gateway's own SVID (issued by the cluster CA) and the federation bundle."""

    cert_file: Path = Path("/etc/isthmus/gateway/cert.pem")
    key_file: Path = Path("/etc/isthmus/gateway/key.pem")
    bundle_file: Path = Path("/etc/isthmus/gateway/bundle.pem")
    # Optional CRL; the federation snapshot's crl_pem is used too.
    crl_file: Path | None = None


class Limits(_Model):
    max_concurrent_streams: int = Field(1024, gt=0, le=2**31 - 1)
    max_header_list_size: int = Field(60 * 1024, ge=1024)
    initial_stream_window: int = Field(1 << 20, ge=65535, le=2**31 - 1)
    initial_connection_window: int = Field(16 << 20, ge=65535, le=2**31 - 1)
    max_frame_size: int = Field(16384, ge=16384, le=2**24 - 1)
    # Frames we accept from peer gateways and local services: larger frames mean fewer
    # events per byte on bulk transfers (HTTP/2 allows up to 16 MiB).
    peer_max_frame_size: int = Field(256 * 1024, ge=16384, le=2**24 - 1)
    handshake_timeout: float = Field(10.0, gt=0)
    connect_timeout: float = Field(5.0, gt=0)
    idle_timeout: float = Field(3600.0, gt=0)
    # Gateway-to-gateway pool: at most this many connections per peer address; a new one
    # is opened when every open one carries streams_per_connection streams.
    max_connections_per_peer: int = Field(4, ge=1, le=64)
    streams_per_connection: int = Field(256, ge=1)
    reconnect_backoff_initial: float = Field(0.1, gt=0)
    reconnect_backoff_max: float = Field(10.0, gt=0)
    max_downstream_connections: int = Field(10_000, ge=1)
    # Bytes read ahead from an opaque TCP or HTTP/1.1 socket before the other side takes them.
    tcp_buffer: int = Field(256 * 1024, ge=4096)
    # -- abuse containment (gateway/_abuse.py); defaults after Envoy's edge best practices.
    # A new connection must complete its first request headers within this, and any header
    # block (HTTP/2) or request head (HTTP/1.1) once begun.
    request_headers_timeout: float = Field(10.0, gt=0)
    # Rapid reset (CVE-2023-44487): once this many streams were opened on a connection, it
    # is closed when half of them were reset by the client within the lifetime below.
    premature_reset_total_stream_count: int = Field(500, ge=1)
    premature_reset_min_stream_lifetime: float = Field(1.0, ge=0)
    # Per connection and second: SETTINGS, PING, PRIORITY, empty DATA, unknown frames; and
    # WINDOW_UPDATE frames (GOAWAY ENHANCE_YOUR_CALM above either).
    max_control_frames_per_second: int = Field(1000, ge=10)
    max_window_updates_per_second: int = Field(10_000, ge=10)
    # Bytes queued toward a client that does not read before its connection is closed.
    # Must exceed the flow-control windows well-behaved clients grant (often 16 MiB).
    max_outbound_buffer: int = Field(32 << 20, ge=65536)
    # Open connections per source IP (every listener, counted from accept, so TLS
    # handshakes in progress count) and per peer gateway identity (inbound).
    max_connections_per_ip: int = Field(1024, ge=1)
    max_inbound_connections_per_peer: int = Field(256, ge=1)
    # Seconds a workload IP whose connection was closed for abuse (rapid reset, floods)
    # may not connect again; 0: no cooldown.  Not applied to peer gateways (inbound).
    abuse_cooldown: float = Field(1.0, ge=0)
    # Process RSS above which new connections and streams are shed (503 / UNAVAILABLE).
    # null: 90% of the container's cgroup memory limit, if it has one; 0: never.
    max_memory_bytes: int | None = Field(None, ge=0)


class TcpPort(_Model):
    """An outbound port whose bytes are tunnelled (HTTP/2 CONNECT) to an imported service."""

    port: int = Field(ge=0, le=65535)
    host: str = "0.0.0.0"
    # An imported name with its port, e.g. "db.prod.west.isthmus.local:5432".
    target: str

    @field_validator("target")
    @classmethod
    def _has_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"target {v!r} must be NAME:PORT, e.g. db.prod.isthmus.local:5432")
        return v


REPORT_INTERVAL = 15.0  # seconds: under a third of the federation's default status lease (60 s)


class FederationSource(_Model):
    """Where config comes from when not from the file alone."""

    address: str = ""  # host:port of the federation service; empty = file only
    # Client certificate for the federation API (defaults to the gateway's own).
    cert_file: Path | None = None
    key_file: Path | None = None
    bundle_file: Path | None = None
    # Seconds between reports of the config in force (each also renews the status entry):
    # under a third of the federation's --status-ttl (60 s by default).
    report_interval: float = Field(REPORT_INTERVAL, ge=0.2, le=1200)


class PathNormalization(_Model):
    """How the inbound normalizes paths before authorization (see ``_normalize``)."""

    # Istio's MERGE_SLASHES: off by default, as in Istio.
    merge_slashes: bool = False
    # %2F and %5C: reject (400), keep (Envoy KEEP_UNCHANGED) or decode to "/".
    escaped_slashes: Literal["reject", "keep", "decode"] = "reject"


class TracingConfig(_Model):
    """Spans over OTLP (gateway/_tracing.py); a federation ``Telemetry`` document
    overrides collector, protocol and sampling live."""

    # HOST:PORT for OTLP/gRPC (https://HOST:PORT for TLS), or with protocol "http" an
    # http(s):// URL (HOST:PORT means http://HOST:PORT/v1/traces).  Empty: no spans.
    collector: str = ""
    protocol: Literal["grpc", "http"] = "grpc"
    # Parent-based: a request carrying a sampling decision keeps it; of new traces this
    # percentage is sampled (Istio's default: 1).
    random_sampling_percentage: float = Field(1.0, ge=0, le=100)
    # The export queue: when full (a slow or dead collector), new spans are dropped and
    # counted (isthmus_trace_spans_dropped_total), never waited for.
    max_queue_size: int = Field(2048, ge=1, le=1_000_000)
    max_export_batch_size: int = Field(512, ge=1, le=1_000_000)
    schedule_delay: float = Field(1.0, gt=0, le=60)  # seconds between exports
    export_timeout: float = Field(5.0, gt=0, le=120)  # seconds per batch, retries included

    @field_validator("collector")
    @classmethod
    def _collector(cls, v: str) -> str:
        scheme, _, rest = v.rpartition("://")
        host, sep, port = rest.split("/", 1)[0].rpartition(":")
        if v and (scheme not in ("", "http", "https") or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536):
            raise ValueError(f"collector {v!r} must be HOST:PORT (e.g. otel-collector.observability:4317) "
                             "or a URL with a port (e.g. http://otel-collector:4318/v1/traces)")
        return v


class GatewayConfig(_Model):
    # Our cluster's name; empty = taken from the certificate's trust domain (first label).
    cluster: str = ""
    dns_suffix: str = DEFAULT_DNS_SUFFIX
    inbound: ListenerConfig = ListenerConfig(port=GATEWAY_INBOUND_PORT)
    outbound: ListenerConfig = ListenerConfig(port=GATEWAY_OUTBOUND_PORT)
    admin: ListenerConfig = ListenerConfig(host="127.0.0.1", port=GATEWAY_ADMIN_PORT)
    tls: TlsConfig = TlsConfig()
    # Local workloads may connect without TLS (then they carry no identity).
    outbound_allow_plain: bool = False
    tcp_ports: tuple[TcpPort, ...] = ()
    limits: Limits = Limits()
    federation: FederationSource = FederationSource()
    last_known_good: Path = Path("/var/lib/isthmus/gateway/last-known-good.json")
    # A static federation snapshot (clusters + services) for file-only operation.
    static: Snapshot | None = None
    access_log: bool = True
    path_normalization: PathNormalization = PathNormalization()
    tracing: TracingConfig = TracingConfig()

    @field_validator("dns_suffix")
    @classmethod
    def _suffix(cls, v: str) -> str:
        v = v.strip(".").lower()
        if not v or any(not part for part in v.split(".")):
            raise ValueError(f"dns_suffix {v!r} must be a DNS name such as isthmus.local")
        return v


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid gateway config {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "(inline)") -> GatewayConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid gateway config {source}: the top level must be a mapping")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read a config file; relative file names in it are relative to the file's folder."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read gateway config {p}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid gateway config {p}: not YAML: {exc}") from None
    return resolve_paths(parse_config(data, str(p)), p.absolute().parent)


def resolve_paths(cfg: GatewayConfig, base: Path) -> GatewayConfig:
    """Every relative file name in ``cfg`` made relative to ``base`` (not to the working directory)."""

    def at(value: Path | None) -> Path | None:
        return value if value is None or value.is_absolute() else base / value

    def fix(model: Any, *names: str) -> Any:
        return model.model_copy(update={n: at(getattr(model, n)) for n in names})

    return cfg.model_copy(update={
        "tls": fix(cfg.tls, "cert_file", "key_file", "bundle_file", "crl_file"),
        "federation": fix(cfg.federation, "cert_file", "key_file", "bundle_file"),
        "last_known_good": at(cfg.last_known_good),
    })


def check_files(cfg: GatewayConfig) -> list[str]:
    """What is wrong with the files ``cfg`` names (``gateway check-config``): the TLS
    identity must load and be usable (trust.check_credentials: PEM, key matches, valid
    now, bundle holds its root), the CRL must load, a last-known-good file that exists
    must load.  Each problem names its field and file."""
    import trust

    problems: list[str] = []

    def check(field: str, cert: Path, key: Path, bundle: Path) -> None:
        try:
            trust.check_credentials(cert, key, bundle)
        except trust.BadFile as exc:
            problems.append(f"{field}: {exc}")

    check("tls", cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.bundle_file)
    fed = cfg.federation
    if fed.address and (fed.cert_file or fed.key_file or fed.bundle_file):
        check("federation", fed.cert_file or cfg.tls.cert_file, fed.key_file or cfg.tls.key_file,
              fed.bundle_file or cfg.tls.bundle_file)
    if cfg.tls.crl_file is not None:
        try:
            data = cfg.tls.crl_file.read_bytes()
        except OSError as exc:
            problems.append(f"tls.crl_file: {cfg.tls.crl_file}: {exc.strerror}")
        else:
            try:
                trust.load_crl(data, cfg.tls.crl_file)
            except trust.BadFile as exc:
                problems.append(f"tls.crl_file: {exc}")
    lkg = cfg.last_known_good
    if lkg.exists():
        try:
            Snapshot.model_validate_json(lkg.read_bytes())
        except (OSError, ValueError) as exc:
            problems.append(f"last_known_good: {lkg}: not a config snapshot: {str(exc).splitlines()[0]}")
    else:
        folder = next((d for d in lkg.parents if d.exists()), None)
        if folder is None or not os.access(folder, os.W_OK | os.X_OK):
            problems.append(f"last_known_good: {lkg}: cannot be created ({folder} is not writable)")
    return problems


def config_json(cfg: GatewayConfig) -> dict[str, Any]:
    return json.loads(cfg.model_dump_json(by_alias=True))

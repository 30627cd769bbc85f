"""A synchronous client for the federation API (grpcio), for gateways, agents, the CLI and tests.

Theory of operation: one class, :class:`FederationClient`, wraps every RPC (unary calls
with fail-over across replicas, and the resumable watch); the functions above it read
what arrives leniently; :class:`SnapshotTracker` folds watch messages into the current
snapshot.  Use it like this:

    client = FederationClient(["fed-a:7443", "fed-b:7443"], cert_dir="/etc/isthmus/gateway")
    tracker = SnapshotTracker()
    for message in client.watch(stop=stop_event):      # reconnects and resumes by itself
        snapshot = tracker.apply(message)              # the current models.Snapshot
        ...apply it, then...
        client.report_applied(gateway_id, snapshot.revision)

The gateway runs this in a worker thread.  Every call fails over across the given
addresses (the federation is stateless over etcd, any replica will do); the watch
reconnects with capped exponential backoff and resumes from the last revision it
delivered, so a consumer never sees a gap (at worst a fresh snapshot).
Certificates are read from disk on every (re)connect, so rotated files are picked up.

What arrives is read leniently (:func:`read_snapshot`, :func:`decode_event`): unknown
fields are ignored, a record that does not validate is skipped (a delta then drops the
key) and reported to ``on_invalid``; a policy that cannot be read is replaced by a DENY
for the services it selects (fail closed), while a traffic route that cannot be read is
only skipped (the name it governs keeps the even spread; nothing is denied), and a
traffic kind this client does not know (a newer federation's) is ignored.  A snapshot that cannot be read at all makes
the watch resync (reconnect for a fresh snapshot, with backoff).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import structlog
from pydantic import ValidationError

from . import models
from .snapshot_index import MAX_STEP_RECORDS, Records
from ._errors import FederationError, InvalidRecord, RemoteError
from .proto import federation_pb2 as pb
from .proto import federation_pb2_grpc as pb_grpc

log = structlog.get_logger("federation.client")

MAX_MESSAGE = 256 * 1024 * 1024
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
KIND_NAMES = {pb.CLUSTER: "cluster", pb.SERVICE: "service", pb.POLICY: "policy", pb.BUNDLE: "bundle", pb.CRL: "crl",
              pb.TRAFFIC: "traffic", pb.LIVENESS: "liveness"}
# The traffic kinds this client reads (key "<kind>/<name>" of a "traffic" change), and
# the Snapshot field each one fills.
TRAFFIC_KINDS: dict[str, type[Any]] = {"TrafficRoute": models.TrafficRoute,
                                       "TrafficPolicy": models.TrafficPolicy, "Telemetry": models.Telemetry,
                                       "ExtensionProvider": models.ExtensionProvider}

Policy = models.Policy
T = TypeVar("T")


def channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def parse_addresses(addresses: str | Sequence[str]) -> list[str]:
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    out = [a.strip() for a in items if a.strip()]
    if not out:
        raise FederationError(
            "no federation address: pass --federation HOST:PORT or set ISTHMUS_FEDERATION"
        )
    for a in out:
        host, sep, port = a.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise FederationError(f"invalid federation address {a!r}: expected HOST:PORT with a port from 1 to 65535")
    return out


# ---------------------------------------------------------------------- watch messages

# Called for each record skipped (or replaced by a DENY) while reading: (kind, key, error).
InvalidHook = Callable[[str, str, str], None]


class UnreadableMessage(FederationError, ValueError):
    """A watch message that cannot be read at all (the watch resyncs)."""


def log_invalid(kind: str, key: str, error: str) -> None:
    log.warning("watch.invalid_record", kind=kind, key=key, error=error[:300])


def fail_closed(raw: Any) -> models.AuthorizationPolicy:
    """The DENY that stands in for a policy this reader cannot enforce, for what it selects."""
    selector = models.Selector()  # unknown scope: everything
    if isinstance(raw, dict):
        try:
            selector = models.read_record(models.Selector, raw.get("selector") or {}, what="selector")
        except InvalidRecord:
            pass
    name = raw.get("name") if isinstance(raw, dict) else None
    for candidate in (name, "unreadable-policy"):  # keep its name where it is a valid one
        try:
            return models.AuthorizationPolicy(name=candidate, action="DENY", rules=(models.Rule(),), selector=selector)
        except ValidationError:
            continue
    raise AssertionError("unreachable")


def read_policy(raw: Any, key: str = "", on_invalid: InvalidHook = log_invalid) -> Policy:
    """A policy from the wire; one this reader cannot enforce becomes :func:`fail_closed`."""
    kind = raw.get("kind") if isinstance(raw, dict) else None
    if kind in models.POLICY_KINDS:
        try:
            return models.read_record(models.Policy, raw, what=kind)
        except InvalidRecord as exc:
            error = str(exc)
    else:
        error = f"unknown policy kind {kind!r}" if isinstance(raw, dict) else "not an object"
    on_invalid("policy", key, f"{error}; enforced as DENY for the services it selects")
    return fail_closed(raw)


def read_snapshot(
    data: str | bytes, on_invalid: InvalidHook = log_invalid
) -> tuple[models.Snapshot, tuple[str, ...]]:
    """A :class:`models.Snapshot` from JSON, record by record; and the policies' keys.

    Raises :class:`UnreadableMessage` only when the document itself is not a snapshot.
    """
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise UnreadableMessage(f"unreadable snapshot: not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("revision", 0), int):
        raise UnreadableMessage("unreadable snapshot: expected an object with an integer revision")

    def items(name: str) -> list[Any]:
        v = doc.get(name) or []
        return v if isinstance(v, list) else []

    def read(kind: str, model: type[Any], raw: Any) -> Any:
        try:
            return models.read_record(model, raw, what=kind)
        except InvalidRecord as exc:
            parts = ("cluster", "namespace", "name") if kind == "service" else ("name",)
            key = "/".join(str(raw.get(k, "?")) for k in parts) if isinstance(raw, dict) else "?"
            on_invalid(kind, key, str(exc))
            return None

    clusters = [c for raw in items("clusters") if (c := read("cluster", models.ClusterRecord, raw)) is not None]
    services = [v for raw in items("services") if (v := read("service", models.ExportedService, raw)) is not None]
    keys, policies = [], []
    for raw in items("policies"):
        key = f"{raw.get('kind')}/{raw.get('name')}" if isinstance(raw, dict) else "?"
        keys.append(key)
        policies.append(read_policy(raw, key, on_invalid))
    def documents(name: str, model: type[Any], why: str) -> list[Any]:
        """The valid documents of one traffic kind; a bad one is skipped and reported."""
        out = []
        for raw in items(name):
            try:
                out.append(models.read_record(model, raw, what=model.__name__))
            except InvalidRecord as exc:
                key = f"{model.__name__}/{raw.get('name', '?') if isinstance(raw, dict) else '?'}"
                on_invalid("traffic", key, f"{exc}; skipped ({why})")
        return out

    routes = documents("routes", models.TrafficRoute, "its host keeps the even spread")
    liveness = [lv for raw in items("liveness")
                if (lv := read("liveness", models.ClusterLiveness, raw)) is not None]
    traffic_policies = documents("traffic_policies", models.TrafficPolicy,
                                 "its service has no limits or outlier detection")
    telemetry = documents("telemetry", models.Telemetry, "the gateway config's tracing stays")
    providers = documents("extension_providers", models.ExtensionProvider,
                          "CUSTOM policies naming it deny what they match")
    pems = {k: v if isinstance(v := doc.get(k, ""), str) else "" for k in ("bundle_pem", "crl_pem")}
    # model_construct: every part was validated above; skip a second pass.
    snap = models.Snapshot.model_construct(
        revision=doc.get("revision", 0),
        clusters=tuple(clusters),
        services=tuple(services),
        policies=tuple(policies),
        routes=tuple(routes),
        liveness=tuple(liveness),
        traffic_policies=tuple(traffic_policies),
        telemetry=tuple(telemetry),
        extension_providers=tuple(providers),
        **pems,
    )
    return snap, tuple(keys)


@dataclass(frozen=True)
class Change:
    kind: str  # cluster | service | policy | traffic (key "<kind>/<name>") | liveness | bundle | crl
    key: str
    deleted: bool
    value: Any = None  # the model (or PEM text for bundle/crl); None when deleted


@dataclass(frozen=True)
class WatchMessage:
    revision: int
    snapshot: models.Snapshot | None = None  # set: replaces all state
    changes: tuple[Change, ...] = ()
    # A heartbeat of a quiet stream: nothing changed up to ``revision``; the config held
    # is still current (a gateway confirms it instead of re-applying).
    progress: bool = False
    # With a snapshot: the key of each of its policies (kind/name as the federation
    # keys it), which a stand-in DENY does not carry itself.
    policy_keys: tuple[str, ...] = ()


def decode_event(event: pb.WatchEvent, on_invalid: InvalidHook = log_invalid) -> WatchMessage:
    """Read one watch event leniently (see the module docstring)."""
    if event.is_snapshot:
        snap, keys = read_snapshot(event.snapshot_json, on_invalid)
        return WatchMessage(event.revision, snapshot=snap, policy_keys=keys)
    if event.progress:
        return WatchMessage(event.revision, progress=True)
    changes = []
    for c in event.changes:
        kind = KIND_NAMES.get(c.kind, "unknown")
        if c.deleted or kind == "unknown":
            changes.append(Change(kind, c.key, c.deleted))
            continue
        if kind == "traffic" and c.key.partition("/")[0] not in TRAFFIC_KINDS:
            continue  # a traffic kind this client does not know yet: newer server
        try:
            value: Any
            if c.kind == pb.CLUSTER:
                value = models.read_record(models.ClusterRecord, c.json, what="cluster record")
            elif c.kind == pb.SERVICE:
                value = models.read_record(models.ExportedService, c.json, what="exported service")
            elif c.kind == pb.POLICY:
                try:
                    raw = json.loads(c.json)
                except ValueError:
                    raw = None
                value = read_policy(raw, c.key, on_invalid)
            elif c.kind == pb.TRAFFIC:
                doc_kind = c.key.partition("/")[0]
                value = models.read_record(TRAFFIC_KINDS[doc_kind], c.json, what=doc_kind)
            elif c.kind == pb.LIVENESS:
                value = models.read_record(models.ClusterLiveness, c.json, what="cluster liveness")
            else:
                value = json.loads(c.json)["pem"]
                if not isinstance(value, str):
                    raise ValueError("pem is not a string")
        except (ValueError, KeyError, TypeError) as exc:
            error = str(exc) if isinstance(exc, InvalidRecord) else f"invalid {kind}: {exc}"
            on_invalid(kind, c.key, error)
            if kind not in ("bundle", "crl"):  # trust material: keep the last good one
                changes.append(Change(kind, c.key, True))  # as the federation does: gone
            continue
        changes.append(Change(kind, c.key, False, value))
    return WatchMessage(event.revision, changes=tuple(changes))


class _KeyOrder:
    """One table of a :class:`SnapshotTracker` in key order, and its tuple, kept up to date
    change by change: a delta costs a binary search and a tuple copy, not a sort.  The
    tuples are :class:`~federation.snapshot_index.Records`: each says which records it
    removed and added since the one before (what the gateway rebuilds)."""

    __slots__ = ("keys", "values", "_tuple", "_removed", "_added")

    def __init__(self, table: dict[str, Any]) -> None:
        self.keys = sorted(table)
        self.values = [table[k] for k in self.keys]
        self._tuple: Records | None = None  # the last one made
        self._removed: list[Any] | None = []  # since then; None: too many to keep
        self._added: list[Any] | None = []

    def _note(self, removed: Any, added: Any) -> None:
        r, a = self._removed, self._added
        if r is None or a is None:
            return
        if len(r) + len(a) >= MAX_STEP_RECORDS:
            self._removed = self._added = None
            return
        if removed is not None:
            r.append(removed)
        if added is not None:
            a.append(added)

    def set(self, key: str, value: Any) -> None:
        i = bisect_left(self.keys, key)
        if i < len(self.keys) and self.keys[i] == key:
            self._note(self.values[i], value)
            self.values[i] = value
        else:
            self._note(None, value)
            self.keys.insert(i, key)
            self.values.insert(i, value)

    def delete(self, key: str) -> None:
        i = bisect_left(self.keys, key)
        if i < len(self.keys) and self.keys[i] == key:
            self._note(self.values[i], None)
            del self.keys[i], self.values[i]

    def tuple(self) -> tuple[Any, ...]:
        last = self._tuple
        if last is None or self._removed is None or self._removed or self._added:
            last = self._tuple = Records.derive(self.values, last, self._removed, self._added)
            self._removed, self._added = [], []
        return last


@dataclass
class SnapshotTracker:
    """Maintains the current :class:`models.Snapshot` from a watch stream.

    Each snapshot shares every record object that did not change with the previous one
    (and the whole tuple of a kind that did not change), which is what lets the gateway
    rebuild only what changed (``federation/snapshot_index.py``).  The tables are the
    tracker's: change them through :meth:`apply` only.
    """

    revision: int = 0
    clusters: dict[str, models.ClusterRecord] = field(default_factory=dict)
    services: dict[str, models.ExportedService] = field(default_factory=dict)
    policies: dict[str, Policy] = field(default_factory=dict)
    traffic: dict[str, Any] = field(default_factory=dict)  # "<kind>/<name>" -> model
    liveness: dict[str, models.ClusterLiveness] = field(default_factory=dict)
    bundle_pem: str = ""
    crl_pem: str = ""
    # Each table in key order (see _KeyOrder); made on first use, dropped by a snapshot.
    _orders: dict[str, _KeyOrder] = field(default_factory=dict, repr=False, compare=False)
    _traffic_tuples: dict[str, tuple[Any, ...]] | None = field(default=None, repr=False, compare=False)

    def apply(self, message: WatchMessage) -> models.Snapshot:
        """Fold one message in; return the current snapshot (unchanged content for progress)."""
        if message.snapshot is not None:
            s = message.snapshot
            self.clusters = {c.name: c for c in s.clusters}
            self.services = {f"{v.cluster}/{v.key}": v for v in s.services}
            keys = message.policy_keys or tuple(f"{p.kind}/{p.name}" for p in s.policies)
            self.policies = dict(zip(keys, s.policies))
            self.traffic = {f"TrafficRoute/{r.name}": r for r in s.routes}
            self.liveness = {lv.cluster: lv for lv in s.liveness}
            self.traffic.update({f"TrafficPolicy/{p.name}": p for p in s.traffic_policies})
            self.traffic.update({f"Telemetry/{t.name}": t for t in s.telemetry})
            self.traffic.update((f"ExtensionProvider/{p.name}", p) for p in s.extension_providers)
            self.bundle_pem, self.crl_pem = s.bundle_pem, s.crl_pem
            self._orders.clear()
            self._traffic_tuples = None
        tables = {"cluster": self.clusters, "service": self.services, "policy": self.policies,
                  "traffic": self.traffic, "liveness": self.liveness}
        for c in message.changes:
            if c.kind in ("bundle", "crl"):
                setattr(self, f"{c.kind}_pem", "" if c.deleted else c.value)
                continue
            table = tables.get(c.kind)
            if table is None:
                continue  # a kind this client does not know yet: newer server
            order = self._orders.get(c.kind)
            if c.deleted:
                table.pop(c.key, None)
                if order is not None:
                    order.delete(c.key)
            else:
                table[c.key] = c.value
                if order is not None:
                    order.set(c.key, c.value)
            if c.kind == "traffic":
                self._traffic_tuples = None
        self.revision = message.revision
        return self.snapshot()

    def _sorted(self, kind: str, table: dict[str, Any]) -> tuple[Any, ...]:
        order = self._orders.get(kind)
        if order is None or len(order.keys) != len(table):
            order = self._orders[kind] = _KeyOrder(table)
        return order.tuple()

    def snapshot(self) -> models.Snapshot:
        t = self._traffic_tuples
        if t is None:
            lists: dict[str, list[Any]] = {kind: [] for kind in (
                "TrafficRoute", "TrafficPolicy", "Telemetry", "ExtensionProvider")}
            for k in sorted(self.traffic):
                got = lists.get(k.partition("/")[0])
                if got is not None:
                    got.append(self.traffic[k])
            t = self._traffic_tuples = {kind: tuple(v) for kind, v in lists.items()}
        # model_construct: every part was validated when decoded; skip a second pass.
        return models.Snapshot.model_construct(
            revision=self.revision,
            clusters=self._sorted("cluster", self.clusters),
            services=self._sorted("service", self.services),
            policies=self._sorted("policy", self.policies),
            routes=t["TrafficRoute"],
            liveness=self._sorted("liveness", self.liveness),
            traffic_policies=t["TrafficPolicy"],
            telemetry=t["Telemetry"],
            extension_providers=t["ExtensionProvider"],
            bundle_pem=self.bundle_pem,
            crl_pem=self.crl_pem,
        )


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class PublishResult:
    revision: int
    lease_id: int
    ttl_seconds: int
    changed: int


@dataclass(frozen=True)
class GatewayStatus:
    """One gateway process's report, as ``isthmus status`` shows it.

    Revisions are config revisions (see ``federation/server/_hub.py``): ``applied_revision``
    is what the gateway's ``/config`` says, ``latest_revision`` the newest config change
    the answering replica knows.  ``synced``: the gateway holds at least that and reported
    recently (within 2/3 of its status lease).
    """

    cluster: str
    gateway_id: str  # <cluster>/<instance> (federation.names.gateway_name)
    applied_revision: int
    reported_at: float
    synced: bool
    enforces_policy: bool = False  # applied the newest policy change
    rejected_revision: int = 0  # the newest snapshot it could not build (0: none since applied_revision)
    rejected_reason: str = ""
    confirmed_at: float = 0.0  # unix time it last knew its config current; 0: unknown
    latest_revision: int = 0  # the status's config_revision; 0: unknown
    routes_applied: bool = False  # applied the newest TrafficRoute change
    no_report: bool = False  # its reports stopped (the federation says so; older ones don't)

    @property
    def silent(self) -> bool:
        """Its reports stopped (crashed or cut off), whether or not the config moved on
        since (the federation marks its cluster STALE then: a config change itself).  An
        older federation does not say: then, it holds the latest config yet is not synced."""
        return self.no_report or (not self.synced and 0 < self.latest_revision <= self.applied_revision)

    @property
    def state(self) -> str:
        """SYNCED; "SYNCED (ahead)": it holds a newer revision than this replica has seen
        (another replica is ahead); STALE: behind, or "STALE (no report)": silent;
        "REJECTED rev N: reason"."""
        if self.rejected_revision:
            return f"REJECTED rev {self.rejected_revision}: {self.rejected_reason}"
        if self.silent:
            return "STALE (no report)"
        if not self.synced:
            return "STALE"
        return "SYNCED (ahead)" if self.applied_revision > self.latest_revision else "SYNCED"


@dataclass(frozen=True)
class ClusterLiveness:
    """A cluster's liveness from its export lease and its gateways' reports (see ``isthmus status``)."""

    cluster: str
    exports: int
    lease_ttl: int  # 0: no live lease
    lease_remaining: int  # -1: no live lease
    last_heartbeat_age: float  # -1: unknown
    published_at: float  # 0: unknown
    # LIVE: its exporter heartbeats or a gateway reports; STALE: both silent, not yet
    # gone; EXPIRED: no export lease and no gateway entry; REVOKED.
    state: str

    @classmethod
    def from_pb(cls, m: pb.ClusterLiveness) -> ClusterLiveness:
        return cls(m.cluster, m.exports, m.lease_ttl, m.lease_remaining, m.last_heartbeat_age, m.published_at, m.state)


@dataclass(frozen=True)
class Status:
    config_revision: int
    gateways: tuple[GatewayStatus, ...]
    clusters: tuple[str, ...]
    policy_revision: int = 0
    liveness: tuple[ClusterLiveness, ...] = ()
    route_revision: int = 0  # the newest TrafficRoute or TrafficPolicy change (apply or delete)


# ---------------------------------------------------------------------- the client


@dataclass(frozen=True)
class Credentials:
    cert_file: Path
    key_file: Path
    bundle_file: Path

    @classmethod
    def from_dir(cls, cert_dir: str | os.PathLike[str]) -> Credentials:
        d = Path(cert_dir)
        creds = cls(d / "cert.pem", d / "key.pem", d / "bundle.pem")
        for p in (creds.cert_file, creds.key_file, creds.bundle_file):
            if not p.is_file():
                raise FederationError(
                    f"credentials: {p} is missing; a cert dir holds cert.pem, key.pem and bundle.pem "
                    "(from `isthmus trust issue-admin` or `isthmus federation join`)"
                )
        return creds

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.bundle_file.read_bytes(),
            private_key=self.key_file.read_bytes(),
            certificate_chain=self.cert_file.read_bytes(),
        )


class FederationClient:
    def __init__(
        self,
        addresses: str | Sequence[str],
        cert_dir: str | os.PathLike[str] | None = None,
        *,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        bundle_file: str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.addresses = parse_addresses(addresses)
        if cert_dir is not None:
            self.creds = Credentials.from_dir(cert_dir)
        elif cert_file and key_file and bundle_file:
            self.creds = Credentials(Path(cert_file), Path(key_file), Path(bundle_file))
        else:
            raise FederationError(
                "no credentials: pass a cert dir (--cert-dir or ISTHMUS_CERT_DIR) or cert, key and bundle files"
            )
        self.timeout = timeout
        self._lock = threading.Lock()
        self._current = 0
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.FederationStub | None = None
        self._watch_call: Any = None
        self._closed = False

    # ------------------------------------------------------------------ plumbing
    def _connect(self) -> pb_grpc.FederationStub:
        with self._lock:
            if self._stub is None:
                address = self.addresses[self._current]
                self._channel = grpc.secure_channel(address, self.creds.channel_credentials(), options=channel_options())
                self._stub = pb_grpc.FederationStub(self._channel)
            return self._stub

    def _fail_over(self, stub: pb_grpc.FederationStub) -> None:
        """Move to the next address (unless another thread already did)."""
        with self._lock:
            if self._stub is stub:
                if self._channel is not None:
                    self._channel.close()
                self._channel = self._stub = None
                self._current = (self._current + 1) % len(self.addresses)

    @property
    def address(self) -> str:
        return self.addresses[self._current]

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        last: grpc.RpcError | None = None
        for _ in range(len(self.addresses)):
            stub = self._connect()
            try:
                return getattr(stub, method)(request, timeout=timeout or self.timeout, wait_for_ready=False)
            except grpc.RpcError as exc:
                if exc.code() not in _RETRYABLE:  # type: ignore[attr-defined]
                    raise RemoteError(exc.code(), exc.details()) from None  # type: ignore[attr-defined]
                last = exc
                log.info("federation.failover", address=self.address, code=exc.code().name)  # type: ignore[attr-defined]
                self._fail_over(stub)
        assert last is not None
        raise RemoteError(last.code(), last.details()) from None  # type: ignore[attr-defined]

    def close(self) -> None:
        self._closed = True
        call = self._watch_call
        if call is not None:
            call.cancel()
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None

    def __enter__(self) -> FederationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ exports
    def publish(self, cluster: str, services: Sequence[models.ExportedService], ttl: int = 30) -> PublishResult:
        r = self._call(
            "PublishExports",
            pb.PublishExportsRequest(
                cluster=cluster, services_json=[s.model_dump_json() for s in services], ttl_seconds=ttl
            ),
        )
        return PublishResult(r.revision, r.lease_id, r.ttl_seconds, r.changed)

    def heartbeat(self, cluster: str) -> int:
        return self._call("Heartbeat", pb.HeartbeatRequest(cluster=cluster)).ttl_seconds

    def withdraw(self, cluster: str, namespace: str = "", name: str = "") -> int:
        return self._call("Withdraw", pb.WithdrawRequest(cluster=cluster, namespace=namespace, name=name)).deleted

    def keep_published(
        self,
        cluster: str,
        services: Callable[[], Sequence[models.ExportedService]],
        stop: threading.Event,
        ttl: int = 30,
    ) -> None:
        """Publish, then heartbeat every ttl/3 until ``stop``; republish when the lease lapsed
        or the set changed.  Blocking: run it in a thread.  Survives federation outages."""
        published: list[str] | None = None
        backoff = _Backoff()
        while not stop.is_set():
            try:
                current = services()
                body = [s.model_dump_json() for s in current]
                if body != published:
                    self.publish(cluster, current, ttl)
                    published = body
                else:
                    self.heartbeat(cluster)
                backoff.reset()
                stop.wait(max(ttl / 3, 0.5))
            except RemoteError as exc:
                if exc.code == grpc.StatusCode.NOT_FOUND:
                    published = None  # lease lapsed: publish again right away
                    continue
                log.warning("exports.keepalive_failed", cluster=cluster, error=str(exc))
                stop.wait(backoff.next())

    # ------------------------------------------------------------------ watch
    def watch(
        self,
        from_revision: int = 0,
        stop: threading.Event | None = None,
        raw: bool = False,
        progress_interval: float = 5.0,
        on_invalid: InvalidHook = log_invalid,
        on_stream: Callable[[int], None] | None = None,
    ) -> Iterator[WatchMessage]:
        """Yield watch messages forever (until ``stop`` or :meth:`close`), reconnecting as needed.

        ``on_stream(revision)`` is called each time a watch stream is opened, with the
        revision it resumes from (0: a fresh snapshot); history checkers use it to tell
        a resumed stream's first message from the deltas that follow it.

        A quiet stream yields a ``progress`` message every ``progress_interval`` seconds.
        With ``raw=True`` yields the protobuf ``WatchEvent`` undecoded (benchmarks).
        Records that do not validate are skipped and passed to ``on_invalid``; a message
        that cannot be read at all makes it reconnect for a fresh snapshot.
        """
        revision = from_revision
        backoff = _Backoff()
        current: list[Any] = [None]
        if stop is not None:
            # grpc's blocking iterator cannot wait on an Event: one helper thread cancels
            # whichever call is current when ``stop`` is set.
            def cancel_on_stop() -> None:
                stop.wait()
                if current[0] is not None:
                    current[0].cancel()

            threading.Thread(target=cancel_on_stop, daemon=True, name="watch-stop").start()
        while not self._closed and not (stop and stop.is_set()):
            stub = self._connect()
            if on_stream is not None:
                on_stream(revision)
            call = stub.Watch(pb.WatchRequest(from_revision=revision, progress_interval=progress_interval))
            current[0] = self._watch_call = call
            if stop is not None and stop.is_set():
                call.cancel()
            try:
                for event in call:
                    if raw:
                        backoff.reset()
                        revision = event.revision
                        yield event  # type: ignore[misc]
                        continue
                    try:
                        message = decode_event(event, on_invalid)
                    except UnreadableMessage as exc:
                        log.error("watch.unreadable_message", address=self.address, revision=event.revision, error=str(exc)[:300])
                        revision = 0  # resync: a fresh snapshot replaces everything
                        call.cancel()
                        break
                    backoff.reset()
                    revision = event.revision
                    yield message
                # Stream ended without error: the server shut down cleanly; reconnect.
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.CANCELLED and (self._closed or (stop and stop.is_set())):
                    return
                if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    raise RemoteError(code, exc.details()) from None  # type: ignore[attr-defined]
                log.info("watch.reconnecting", address=self.address, code=code.name, revision=revision)
            finally:
                self._watch_call = None
            self._fail_over(stub)
            wait = backoff.next()
            if stop is not None:
                if stop.wait(wait):
                    return
            else:
                time.sleep(wait)

    def report_applied(
        self,
        gateway_id: str,
        revision: int,
        *,
        confirmed_at: float = 0.0,
        rejected_revision: int = 0,
        rejected_reason: str = "",
    ) -> None:
        """Tell the federation which revision is in force (and which one was rejected, why).

        ``gateway_id``: ``<cluster>/<instance>`` (:func:`federation.names.gateway_name`),
        the caller's own cluster; empty: ``<cluster>/gateway``.  Call at least every
        third of the federation's ``--status-ttl`` (20 s by default) or the entry lapses.
        """
        self._call(
            "ReportApplied",
            pb.ReportAppliedRequest(
                gateway_id=gateway_id,
                revision=revision,
                confirmed_at=confirmed_at,
                rejected_revision=rejected_revision,
                rejected_reason=rejected_reason,
            ),
        )

    def report_traffic(self, gateway_id: str, summary_json: str) -> int:
        """Push a gateway's per-edge traffic since its last push (federation.topology); the
        lease TTL its summaries are kept under."""
        return self._call("ReportTraffic", pb.ReportTrafficRequest(gateway_id=gateway_id,
                                                                    summary_json=summary_json)).ttl_seconds

    def traffic(self) -> dict[str, Any]:
        """The per-edge figures of the last minute: ``{"window_seconds", "now", "edges",
        "gateways"}`` (``edges``: federation.topology.EdgeView.as_json())."""
        return json.loads(self._call("GetTraffic", pb.GetTrafficRequest()).traffic_json)

    # ------------------------------------------------------------------ admin
    def create_token(self, ttl: int = 3600, cluster: str = "") -> pb.CreateTokenResponse:
        return self._call("CreateToken", pb.CreateTokenRequest(ttl_seconds=ttl, cluster=cluster))

    def apply_policy(self, policy: Policy | dict[str, Any]) -> tuple[int, bool]:
        body = policy if isinstance(policy, dict) else policy.model_dump(by_alias=True, mode="json")
        r = self._call("ApplyPolicy", pb.ApplyPolicyRequest(policy_json=json.dumps(body)))
        return r.revision, r.changed

    def apply_policies(self, policies: Sequence[Policy | dict[str, Any]]) -> tuple[int, list[bool]]:
        """Apply all of ``policies`` in one transaction, or none; per policy: whether it changed."""
        bodies = [p if isinstance(p, dict) else p.model_dump(by_alias=True, mode="json") for p in policies]
        r = self._call("ApplyPolicy", pb.ApplyPolicyRequest(policies_json=[json.dumps(b) for b in bodies]))
        return r.revision, list(r.changed_each)

    def list_policies(self) -> list[Policy]:
        r = self._call("ListPolicies", pb.ListPoliciesRequest())
        return [models.read_record(models.Policy, p) for p in r.policies_json]

    def delete_policy(self, name: str, kind: str = "") -> int:
        return self._call("DeletePolicy", pb.DeletePolicyRequest(name=name, kind=kind)).deleted

    # ------------------------------------------------------------------ documents (every kind)
    def apply_documents(self, docs: Sequence[Any]) -> tuple[int, list[str], list[str]]:
        """Apply every document (policies, routes: models or dicts with ``kind``) in one
        transaction, or none.  Returns the revision, per document ``created``,
        ``configured`` or ``unchanged``, and the federation's warnings."""
        bodies = [d if isinstance(d, dict) else d.model_dump(by_alias=True, mode="json") for d in docs]
        r = self._call("ApplyPolicy", pb.ApplyPolicyRequest(policies_json=[json.dumps(b) for b in bodies]))
        outcomes = ["created" if new else "configured" if changed else "unchanged"
                    for changed, new in zip(r.changed_each, list(r.created_each) or [False] * len(r.changed_each))]
        return r.revision, outcomes, list(r.warnings)

    def list_documents(self, *kinds: str) -> list[Any]:
        """The stored documents of ``kinds`` (none: every kind); unreadable ones are skipped."""
        r = self._call("ListDocuments", pb.ListDocumentsRequest(kinds=list(kinds)))
        out = []
        for text in r.documents_json:
            try:
                kind = json.loads(text).get("kind")
                if kind in models.DOCUMENT_KINDS:
                    out.append(models.read_record(models.DOCUMENT_KINDS[kind], text, what=kind))
            except (ValueError, AttributeError) as exc:
                log.warning("documents.unreadable", error=str(exc)[:300])
        return out

    def list_routes(self) -> list[models.TrafficRoute]:
        return self.list_documents("TrafficRoute")

    def delete_document(self, kind: str, name: str) -> int:
        """Delete document ``kind``/``name`` (NOT_FOUND when there is none)."""
        return self._call("DeletePolicy", pb.DeletePolicyRequest(name=name, kind=kind)).deleted

    def set_route_weights(
        self, name: str, weights: Sequence[tuple[str, str, int]], rule: int | None = None
    ) -> tuple[int, models.TrafficRoute, int]:
        """Set weights ``(cluster, service or "", weight)`` of one rule of route ``name``
        (``rule`` None: the one rule that fits); returns (revision, the route, the rule)."""
        req = pb.SetRouteWeightsRequest(
            name=name, weights=[pb.RouteWeight(cluster=c, service=s, weight=w) for c, s, w in weights]
        )
        if rule is not None:
            req.rule = rule
        r = self._call("SetRouteWeights", req)
        return r.revision, models.read_record(models.TrafficRoute, r.route_json, what="TrafficRoute"), r.rule

    # ------------------------------------------------------------------ listings
    def list_clusters(self) -> list[models.ClusterRecord]:
        return self.clusters_with_liveness()[0]

    def clusters_with_liveness(self) -> tuple[list[models.ClusterRecord], dict[str, ClusterLiveness]]:
        r = self._call("ListClusters", pb.ListClustersRequest())
        records = [models.read_record(models.ClusterRecord, c) for c in r.clusters_json]
        return records, {m.cluster: ClusterLiveness.from_pb(m) for m in r.liveness}

    def revoke_cluster(self, name: str) -> pb.RevokeClusterResponse:
        """Admin: revoke every CA of cluster ``name``, mark it revoked, drop its exports."""
        return self._call("RevokeCluster", pb.RevokeClusterRequest(name=name))

    def list_services(self, cluster: str = "") -> list[models.ExportedService]:
        r = self._call("ListServices", pb.ListServicesRequest(cluster=cluster))
        return [models.read_record(models.ExportedService, s) for s in r.services_json]

    def status(self) -> Status:
        return status_from_pb(self._call("GetStatus", pb.GetStatusRequest()))

    def health(self, timeout: float = 2.0) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self._connect()
        assert self._channel is not None
        try:
            r = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service="isthmus.federation.v1.Federation"), timeout=timeout
            )
            return r.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            self._fail_over(self._stub)  # type: ignore[arg-type]
            return False


def status_from_pb(r: pb.GetStatusResponse) -> Status:
    """A GetStatus answer as :class:`Status` (the CLI's and the topology page's view)."""
    return Status(
        r.config_revision,
        tuple(
            GatewayStatus(g.cluster, g.gateway_id, g.applied_revision, g.reported_at, g.synced, g.enforces_policy,
                          g.rejected_revision, g.rejected_reason, g.confirmed_at, r.config_revision,
                          g.routes_applied, g.no_report)
            for g in r.gateways
        ),
        tuple(r.clusters),
        r.policy_revision,
        tuple(ClusterLiveness.from_pb(m) for m in r.liveness),
        r.route_revision,
    )


class _Backoff:
    """Capped exponential backoff with jitter (0.1 s .. 5 s)."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first, self.cap, self.n = first, cap, 0

    def reset(self) -> None:
        self.n = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * (2**self.n))
        self.n += 1
        return delay * random.uniform(0.5, 1.0)

"""The federation's records in etcd: key layout, encoding, and the writes the API makes.

Theory of operation: :class:`Keys` builds and parses every key below; :func:`read_record`
and :func:`read_valid` are the one door through which a value read from etcd enters the
service (validated, or skipped and counted); :class:`Store` makes every write, each as
one etcd transaction that checks what it depends on (mod revisions, leases), so
concurrent replicas never half-apply a change.

Key layout under the prefix (default ``/isthmus/``) — STABLE API: other tools, older
and newer replicas read it; only ever add new key families.

    <prefix>clusters/<cluster>                    models.ClusterRecord (JSON)
    <prefix>exports/<cluster>/<namespace>/<name>  models.ExportedService (JSON); bound to
                                                  the cluster's lease
    <prefix>leases/<cluster>                      {"lease": <id>, "ttl": <s>}: the cluster's
                                                  export lease, bound to itself
    <prefix>policies/<kind>/<name>                models.AuthorizationPolicy or
                                                  models.RequestAuthentication (JSON)
    <prefix>traffic/<kind>/<name>                 models.TrafficRoute, models.TrafficPolicy,
                                                  models.Telemetry, models.ExtensionProvider
                                                  (by their kind).  Not under policies/:
                                                  a gateway enforces a policy kind it cannot
                                                  read as DENY, and a route is no reason to
                                                  deny anything
    <prefix>liveness/<cluster>                    models.ClusterLiveness, while the cluster is
                                                  STALE (written by the background-job leader)
    <prefix>trust/bundle                          {"pem": ...}: the federation trust bundle
    <prefix>trust/crl                             {"pem": ...}: the root-signed CRL
    <prefix>tokens/<sha256(token) hex>            {"cluster": "", "expires_at": t}; bound to
                                                  a lease of the token's TTL; deleted on use
    <prefix>status/<cluster>/<instance>           {"gateway_id", "revision", "reported_at",
                                                  "confirmed_at", "rejected_revision",
                                                  "rejected_reason", "lease"}; bound to
                                                  that lease (status TTL); gateway_id is
                                                  "<cluster>/<instance>" (names.gateway_name).
                                                  Older replicas wrote the url-quoted
                                                  "<spiffe id>#<host>" as the last part:
                                                  read as that host (legacy_instance)
    <prefix>election/<job>                        a replica's id, bound to its lease: the
                                                  leader of a background job (trust-sync)
    <prefix>meta/sync                             empty; a replica writes it to flush its own
                                                  watch up to "now" (see _hub.Hub.catch_up)
    <prefix>summaries/<cluster>/<instance>        a gateway's traffic summaries of the last
                                                  minute, under a short lease (_summaries)

The watch stream carries the *config* families (clusters, exports, policies, traffic, trust);
tokens, leases and status never reach gateways.  Values are the models' JSON
(``model_dump_json(by_alias=True)``), so what a gateway receives is what etcd holds.

Every value read back is validated first (:func:`read_record`): etcd is shared, other
tools and other versions write it.  A bad value is skipped with one log line
(``record.invalid``) and counted in ``isthmus_federation_invalid_records{kind}``; it
never fails a call that does not need that very record.  Unknown fields are ignored
(a newer replica wrote them); what the watch carries is the stored value, re-encoded
from the model only when unknown fields were dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import structlog
from cryptography import x509
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field

from .. import documents, models, names
from .._errors import (
    InUse,
    InvalidRecord,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StoreUnavailable,
    Unauthenticated,
    UnreadableRecord,
)
from ._etcd import Etcd, prefix_end

log = structlog.get_logger("federation.store")

# etcd's default --max-txn-ops is 128; stay under it so any etcd deployment works.
MAX_TXN_OPS = 100
# Point reads of export records one apply's check runs at once (clusters x names).
EXPORT_READS_IN_FLIGHT = 64
MIN_TTL, MAX_TTL, DEFAULT_TTL = 2, 3600, 30
# Gateway status keys: bound to a lease a gateway's reports renew (it reports at least
# every STATUS_TTL / 3), and at most this many per cluster.
STATUS_TTL = 60
MIN_STATUS_TTL, MAX_STATUS_TTL = 5, 3600
DEFAULT_INSTANCE = "gateway"  # the instance of a report that names none (older gateways)
MAX_GATEWAYS_PER_CLUSTER = 64
CONFIG_FAMILIES = ("clusters/", "exports/", "policies/", "traffic/", "trust/", "liveness/")
# The document kinds kept under traffic/ (every other kind of models.DOCUMENT_KINDS is a
# policy, under policies/).
TRAFFIC_KINDS = tuple(k for k in models.DOCUMENT_KINDS if k not in models.POLICY_KINDS)
MAX_UPDATE_ATTEMPTS = 10


@dataclass(frozen=True)
class Stored:
    """What a batch of documents is checked against: the valid records at one revision."""

    revision: int
    clusters: tuple[models.ClusterRecord, ...] = ()
    services: tuple[models.ExportedService, ...] = ()
    routes: tuple[models.TrafficRoute, ...] = ()
    providers: tuple[str, ...] = ()  # names of the stored ExtensionProviders


# Checks a batch against what is stored; raises to refuse it, returns the warnings.
BatchCheck = Callable[[Stored], list[str]]

@dataclass(frozen=True)
class Liveness:
    """A cluster's liveness as its export lease and its gateways' reports tell it."""

    cluster: str
    lease_ttl: int = 0  # granted TTL; 0: no live lease
    lease_remaining: int = -1  # whole seconds left (etcd rounds down); -1: no live lease
    published_at: float = 0.0
    revoked: bool = False
    gateways_live: int = 0  # gateways that reported recently (report_is_recent)
    gateways_silent: int = 0  # gateways whose status entry is there, but not recent

    @property
    def last_heartbeat_age(self) -> float:
        """Seconds since the last keep-alive: a keep-alive resets the lease to its TTL.

        etcd reports whole seconds rounded down, so the true remainder is in
        [remaining, remaining + 1); the midpoint keeps the error within half a second.
        """
        if self.lease_ttl <= 0 or self.lease_remaining < 0:
            return -1.0
        return max(0.0, self.lease_ttl - self.lease_remaining - 0.5)

    @property
    def lease_state(self) -> str:
        """The export lease alone: LIVE, STALE or EXPIRED (see :func:`liveness_state`)."""
        return liveness_state(self.lease_ttl, self.lease_remaining)

    @property
    def state(self) -> str:
        """The cluster's: the best sign of life, its export lease or a gateway's report.

        A cluster whose gateway reports is LIVE even with no exporter (its exports are
        gone, it still imports); EXPIRED means neither: no live lease and no gateway.
        """
        if self.revoked:
            return "REVOKED"
        lease = self.lease_state
        if lease == "LIVE" or self.gateways_live:
            return "LIVE"
        if lease == "STALE" or self.gateways_silent:
            return "STALE"
        return "EXPIRED"


def liveness_state(lease_ttl: int, lease_remaining: int, revoked: bool = False) -> str:
    """LIVE, STALE (no heartbeat for more than two of the ttl/3 beat intervals: the
    remainder fell under ttl/3), EXPIRED (no live lease: its exports are gone or were
    never published) or REVOKED."""
    if revoked:
        return "REVOKED"
    if lease_ttl <= 0 or lease_remaining < 0:
        return "EXPIRED"
    if (lease_remaining + 0.5) * 3 < lease_ttl:
        return "STALE"
    return "LIVE"


def report_is_recent(reported_at: float, now: float, status_ttl: int = STATUS_TTL) -> bool:
    """Whether a gateway's last report is recent: it reports every status_ttl/3 at least,
    so one more than two intervals old means it missed two (the lease rule above); its
    entry vanishes when the status lease runs out, status_ttl after that report."""
    return (now - reported_at) * 3 <= 2 * status_ttl


def legacy_instance(text: str) -> str:
    """The instance in a gateway ID of the older form: its SPIFFE ID, optionally followed
    by ``#<instance>`` (older gateways send it, older replicas used it in status keys)."""
    _, sep, instance = text.partition("#")
    return names.gateway_instance(instance) if sep and instance else DEFAULT_INSTANCE


def dump(model: BaseModel) -> bytes:
    return model.model_dump_json(by_alias=True).encode()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ---------------------------------------------------------------------- reading records

INVALID_RECORDS = Counter(
    "isthmus_federation_invalid_records",
    "Values read from etcd that failed validation and were skipped (once per bad value)",
    ["kind"],
)


class BadRecord(ValueError):
    """A value in etcd that does not validate; the message says why."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class LeaseBody(_Body):
    lease: int
    ttl: int = 0
    published_at: float = 0.0


class TokenBody(_Body):
    cluster: str = ""
    expires_at: float


class StatusBody(_Body):
    gateway_id: str
    revision: int = Field(ge=0)
    reported_at: float = 0.0
    confirmed_at: float = 0.0  # when the gateway last knew its config current
    rejected_revision: int = 0  # newest snapshot the gateway could not apply (0: none)
    rejected_reason: str = ""
    lease: int = 0


class PemBody(_Body):
    pem: str


@dataclass(frozen=True)
class Record:
    """A validated value: the model (or body), and the JSON the watch carries."""

    family: str
    value: Any
    json: bytes
    certs: tuple[x509.Certificate, ...] = ()  # clusters: the current and previous CAs
    # policies: False when this replica cannot read it (unknown kind, newer fields'
    # values): it is still carried to gateways, which fail closed for what it selects.
    understood: bool = True


def _body(model: type[_Body], raw: bytes, what: str) -> Any:
    return _model(model, raw, what)[0]


def _model(model: Any, raw: bytes, what: str) -> tuple[Any, bytes]:
    """The model and its JSON: the stored value itself unless unknown fields were dropped."""
    try:
        value, dropped = models.read_record_dropping(model, raw, what=what)
    except InvalidRecord as exc:
        raise BadRecord(str(exc)) from None
    return value, (dump(value) if dropped else raw)


def _certs(pems: Iterable[str], what: str) -> tuple[x509.Certificate, ...]:
    out: list[x509.Certificate] = []
    for pem in pems:
        if pem:
            try:
                out.extend(x509.load_pem_x509_certificates(pem.encode()))
            except ValueError:
                raise BadRecord(f"invalid {what}: not a PEM certificate") from None
    return tuple(out)


def read_record(keys: Keys, key: bytes, raw: bytes) -> Record | None:
    """Validate one value read under ``keys.prefix``; None for keys that hold no record.

    Raises :class:`BadRecord` naming the problem.  The record must also match its key
    (a cluster's name, an export's cluster/namespace/name, a policy's kind/name).
    """
    split = keys.split(key)
    if split is None:
        return None
    family, rest = split
    if family == "clusters":
        rec, body = _model(models.ClusterRecord, raw, "cluster record")
        if rec.name != rest:
            raise BadRecord(f"invalid cluster record: name {rec.name!r} does not match its key")
        certs = _certs((rec.ca_cert_pem, *rec.previous_ca_certs_pem), "cluster record: ca_cert_pem")
        return Record(family, rec, body, certs)
    if family == "exports":
        svc, body = _model(models.ExportedService, raw, "exported service")
        if f"{svc.cluster}/{svc.namespace}/{svc.name}" != rest:
            raise BadRecord(f"invalid exported service: {svc.cluster}/{svc.key} does not match its key")
        return Record(family, svc, body)
    if family == "policies":
        return _read_policy(rest, raw)
    if family == "traffic":
        return _read_traffic(rest, raw)
    if family == "trust" and rest in ("bundle", "crl"):
        body = _body(PemBody, raw, f"trust {rest}")
        if rest == "bundle" and not _certs((body.pem,), "trust bundle"):
            raise BadRecord("invalid trust bundle: no certificate")
        if rest == "crl" and body.pem:
            try:
                x509.load_pem_x509_crl(body.pem.encode())
            except ValueError:
                raise BadRecord("invalid trust crl: not a PEM CRL") from None
        return Record(family, body.pem, json.dumps({"pem": body.pem}).encode())
    if family == "liveness":
        lv, body = _model(models.ClusterLiveness, raw, "cluster liveness")
        if lv.cluster != rest:
            raise BadRecord(f"invalid cluster liveness: cluster {lv.cluster!r} does not match its key")
        return Record(family, lv, body)
    if family == "tokens":
        return Record(family, _body(TokenBody, raw, "join token"), raw)
    if family == "leases":
        return Record(family, _body(LeaseBody, raw, "export lease"), raw)
    if family == "status":
        return Record(family, _body(StatusBody, raw, "gateway status"), raw)
    return None


def _read_policy(rest: str, raw: bytes) -> Record:
    kind, _, name = rest.partition("/")
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise BadRecord(f"invalid policy: not JSON: {exc}") from None
    if not isinstance(obj, dict) or obj.get("kind") != kind or obj.get("name") != name:
        raise BadRecord("invalid policy: expected an object whose kind and name match its key")
    if kind in models.POLICY_KINDS:
        try:
            policy, body = _model(models.Policy, raw, kind)
            return Record("policies", policy, body)
        except BadRecord:
            pass
    return Record("policies", None, json.dumps(obj, separators=(",", ":")).encode(), understood=False)


def _read_traffic(rest: str, raw: bytes) -> Record:
    kind, _, name = rest.partition("/")
    if kind not in TRAFFIC_KINDS:
        # A kind a newer replica wrote: not config this replica can serve (it is no
        # policy: skipping it denies nothing).
        raise BadRecord(f"invalid traffic record: unknown kind {kind!r} (written by a newer Isthmus?)")
    doc, body = _model(models.DOCUMENT_KINDS[kind], raw, kind)
    if doc.name != name:
        raise BadRecord(f"invalid {kind}: name {doc.name!r} does not match its key")
    return Record("traffic", doc, body)


_LOGGED_BAD: dict[bytes, int] = {}  # key -> mod_revision already logged and counted


def skip_invalid(family: str, key: bytes, mod_revision: int, error: str) -> None:
    """Log and count a bad value once (per key and version), however often it is read."""
    if _LOGGED_BAD.get(key) == mod_revision:
        return
    if len(_LOGGED_BAD) >= 4096:
        _LOGGED_BAD.clear()
    _LOGGED_BAD[key] = mod_revision
    INVALID_RECORDS.labels(kind=family).inc()
    log.error("record.invalid", kind=family, key=key.decode(errors="replace"), revision=mod_revision, error=error[:300])


def read_valid(keys: Keys, kv: Any) -> Record | None:
    """:func:`read_record` for an etcd KeyValue; a bad one is skipped (None), logged and counted."""
    try:
        rec = read_record(keys, kv.key, kv.value)
    except BadRecord as exc:
        split = keys.split(kv.key)
        skip_invalid(split[0] if split else "unknown", kv.key, kv.mod_revision, str(exc))
        return None
    if rec is not None and not rec.understood:
        skip_invalid("policies", kv.key, kv.mod_revision, "policy this replica cannot read (unknown kind or "
                     "newer values); gateways fail closed for what it selects")
    return rec


@dataclass(frozen=True)
class Keys:
    """Builds and parses keys under one prefix."""

    prefix: str = "/isthmus/"

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            raise InvalidRequest(f"invalid etcd prefix {self.prefix!r}: must start and end with '/', e.g. /isthmus/")

    def k(self, *parts: str) -> bytes:
        return (self.prefix + "/".join(parts)).encode()

    def family(self, name: str) -> bytes:
        return (self.prefix + name).encode()

    def cluster(self, name: str) -> bytes:
        return self.k("clusters", name)

    def export(self, cluster: str, namespace: str, name: str) -> bytes:
        return self.k("exports", cluster, namespace, name)

    def exports_of(self, cluster: str) -> bytes:
        return self.k("exports", cluster, "")

    def lease(self, cluster: str) -> bytes:
        return self.k("leases", cluster)

    def policy(self, kind: str, name: str) -> bytes:
        return self.k("policies", kind, name)

    def traffic(self, kind: str, name: str) -> bytes:
        return self.k("traffic", kind, name)

    def document(self, kind: str, name: str) -> bytes:
        """The key of a document of any kind ``isthmus apply`` takes."""
        return self.traffic(kind, name) if kind in TRAFFIC_KINDS else self.policy(kind, name)

    def liveness(self, cluster: str) -> bytes:
        return self.k("liveness", cluster)

    def token(self, digest: str) -> bytes:
        return self.k("tokens", digest)

    def status(self, cluster: str, instance: str) -> bytes:
        return self.k("status", cluster, quote(instance, safe=""))

    def split(self, key: bytes) -> tuple[str, str] | None:
        """``(family, rest)`` for a key under the prefix, e.g. ``("exports", "east/ns/svc")``."""
        text = key.decode()
        if not text.startswith(self.prefix):
            return None
        family, _, rest = text[len(self.prefix) :].partition("/")
        return family, rest

    @staticmethod
    def status_instance(part: str) -> str:
        """The instance a status key's last part names (older layouts mapped)."""
        text = unquote(part)
        return text if names.gateway_instance(text) == text else legacy_instance(text)


class Store:
    """The writes and reads behind the API.  Stateless: every replica may run every call."""

    def __init__(self, etcd: Etcd, prefix: str = "/isthmus/", status_ttl: int = STATUS_TTL) -> None:
        if not MIN_STATUS_TTL <= status_ttl <= MAX_STATUS_TTL:
            raise InvalidRequest(
                f"invalid status TTL {status_ttl}s: use between {MIN_STATUS_TTL}s and {MAX_STATUS_TTL}s"
            )
        self.etcd = etcd
        self.keys = Keys(prefix)
        self.status_ttl = status_ttl
        # Updates of one record from this replica queue up instead of racing each other
        # (their compare-and-swap then only meets other replicas' writes): key -> (lock, users).
        self._updating: dict[bytes, tuple[asyncio.Lock, int]] = {}

    # ------------------------------------------------------------------ trust material
    async def publish_trust(self, bundle_pem: bytes, crl_pem: bytes) -> None:
        """Idempotently mirror the trust folder's bundle and CRL into etcd (for the watch)."""
        for name, pem in (("bundle", bundle_pem), ("crl", crl_pem)):
            key = self.keys.k("trust", name)
            value = json.dumps({"pem": pem.decode()}).encode()
            kv = await self.etcd.get(key)
            if kv is None or kv.value != value:
                await self.etcd.put(key, value)

    # ------------------------------------------------------------------ tokens
    async def create_token(self, ttl: int, cluster: str = "") -> tuple[str, float]:
        if ttl < MIN_TTL or ttl > 7 * 86400:
            raise InvalidRequest(f"invalid token TTL {ttl}s: use between {MIN_TTL}s and 7d")
        token = secrets.token_urlsafe(32)
        expires_at = time.time() + ttl
        lease, _ = await self.etcd.grant(ttl)
        body = json.dumps({"cluster": cluster, "expires_at": expires_at}).encode()
        # Only the hash is stored: a leaked etcd backup does not leak usable tokens.
        await self.etcd.put(self.keys.token(token_hash(token)), body, lease=lease)
        return token, expires_at

    async def consume_token(self, token: str, name: str) -> None:
        """Check a join token for ``name`` and delete it; it works exactly once."""
        problem = "invalid join token: unknown, expired or already used; create one with `isthmus federation token create`"
        if not token:
            raise Unauthenticated("invalid join token: empty")
        key = self.keys.token(token_hash(token))
        kv = await self.etcd.get(key)
        rec = read_valid(self.keys, kv) if kv is not None else None
        if kv is None or rec is None:
            raise Unauthenticated(problem)
        body: TokenBody = rec.value
        # The lease deletes the key, but lease expiry can lag by a second; the recorded
        # deadline is authoritative.
        if body.expires_at <= time.time():
            raise Unauthenticated("invalid join token: expired; create a new one with `isthmus federation token create`")
        if body.cluster and body.cluster != name:
            raise PermissionDenied(
                f"join token is for cluster {body.cluster!r}, not {name!r}"
            )
        resp = await self.etcd.txn(
            compare=[self.etcd.cmp_mod(key, kv.mod_revision)],
            success=[self.etcd.op_delete(key)],
        )
        if not resp.succeeded:  # someone else used it between our read and delete
            raise Unauthenticated(problem)

    # ------------------------------------------------------------------ clusters
    async def get_cluster(self, name: str) -> tuple[models.ClusterRecord, int] | None:
        kv = await self.etcd.get(self.keys.cluster(name))
        if kv is None:
            return None
        rec = read_valid(self.keys, kv)
        if rec is None:
            key = kv.key.decode(errors="replace")
            raise UnreadableRecord(
                f"invalid cluster record {key} in etcd (see the federation log, record.invalid): "
                f"repair it or delete it (etcdctl del {key}) and join again"
            )
        return rec.value, kv.mod_revision

    async def put_cluster(self, record: models.ClusterRecord, expect_mod_revision: int) -> int:
        """Write a cluster record if nobody changed it since we looked (0: must not exist)."""
        key = self.keys.cluster(record.name)
        resp = await self.etcd.txn(
            compare=[self.etcd.cmp_mod(key, expect_mod_revision)],
            success=[self.etcd.op_put(key, dump(record))],
        )
        if not resp.succeeded:
            raise PermissionDenied(f"cluster {record.name!r} changed concurrently (another join); retry")
        return resp.header.revision

    async def sync_revoked(self, crl_pem: bytes) -> list[str]:
        """Mark every cluster whose current CA the CRL lists as revoked; return their names.

        For revocations made on the trust folder (``isthmus trust revoke-cluster``) and
        mirrored by the trust sync: the record then says so and gateways drop its routes.
        Idempotent, and safe for several replicas at once (compare-and-swap per record).
        """
        from cryptography import x509

        serials = {r.serial_number for r in x509.load_pem_x509_crl(crl_pem)} if crl_pem else set()
        if not serials:
            return []
        resp = await self.etcd.get_prefix(self.keys.family("clusters/"))
        marked = []
        for kv in resp.kvs:
            rec = read_valid(self.keys, kv)
            if rec is None:
                continue
            record: models.ClusterRecord = rec.value
            if record.revoked or not record.ca_cert_pem:
                continue
            if x509.load_pem_x509_certificate(record.ca_cert_pem.encode()).serial_number not in serials:
                continue
            txn = await self.etcd.txn(
                compare=[self.etcd.cmp_mod(kv.key, kv.mod_revision)],
                success=[self.etcd.op_put(kv.key, dump(record.model_copy(update={"revoked": True})))],
            )
            if txn.succeeded:
                marked.append(record.name)
                log.warning("cluster.marked_revoked", cluster=record.name, revision=txn.header.revision)
        return marked

    async def list_clusters(self) -> tuple[list[models.ClusterRecord], int]:
        resp = await self.etcd.get_prefix(self.keys.family("clusters/"))
        return self._valid(resp.kvs), resp.header.revision

    def _valid(self, kvs: Iterable[Any]) -> list[Any]:
        """The values of the records that validate (the others are logged and counted)."""
        return [rec.value for kv in kvs if (rec := read_valid(self.keys, kv)) is not None and rec.understood]

    async def _lease_body(self, cluster: str) -> LeaseBody | None:
        kv = await self.etcd.get(self.keys.lease(cluster))
        rec = read_valid(self.keys, kv) if kv is not None else None
        return rec.value if rec is not None else None

    # ------------------------------------------------------------------ exports
    async def _cluster_lease(self, cluster: str, ttl: int) -> tuple[int, int]:
        body = await self._lease_body(cluster)
        if body is not None:  # (a bad one is replaced below)
            left = await self.etcd.keepalive_once(body.lease)
            if left > 0:
                return body.lease, left
        lease, granted = await self.etcd.grant(ttl)
        await self.etcd.put(self.keys.lease(cluster), self._lease_value(lease, granted), lease=lease)
        log.info("lease.granted", cluster=cluster, lease=lease, ttl=granted)
        return lease, granted

    @staticmethod
    def _lease_value(lease: int, ttl: int) -> bytes:
        # Stable layout: leases/<cluster> = {"lease", "ttl", "published_at"}, bound to the
        # lease itself so it vanishes with the exports.
        return json.dumps({"lease": lease, "ttl": ttl, "published_at": time.time()}).encode()

    async def publish(
        self, cluster: str, services: Sequence[models.ExportedService], ttl: int = DEFAULT_TTL
    ) -> tuple[int, int, int, int]:
        """Replace ``cluster``'s export set; return (revision, lease, ttl, changed keys)."""
        if not MIN_TTL <= ttl <= MAX_TTL:
            raise InvalidRequest(f"invalid export TTL {ttl}s: use between {MIN_TTL}s and {MAX_TTL}s")
        desired: dict[bytes, bytes] = {}
        for svc in services:
            if svc.cluster != cluster:
                raise PermissionDenied(
                    f"service {svc.key} names cluster {svc.cluster!r} but is published for {cluster!r}"
                )
            key = self.keys.export(cluster, svc.namespace, svc.name)
            if key in desired:
                raise InvalidRequest(f"invalid export set: {svc.key} appears twice")
            desired[key] = dump(svc)
        for attempt in range(2):
            lease, granted = await self._cluster_lease(cluster, ttl)
            current = await self.etcd.get_prefix(self.keys.exports_of(cluster))
            have = {kv.key: (kv.value, kv.lease) for kv in current.kvs}
            ops = [
                self.etcd.op_put(k, v, lease)
                for k, v in desired.items()
                if have.get(k) != (v, lease)
            ] + [self.etcd.op_delete(k) for k in have if k not in desired]
            changed = len(ops)
            if ops:  # the set changed: remember when (status shows it)
                ops.append(self.etcd.op_put(self.keys.lease(cluster), self._lease_value(lease, granted), lease))
            revision = current.header.revision
            try:
                for i in range(0, len(ops), MAX_TXN_OPS):
                    # A publish larger than one txn lands in a few revisions; each chunk is
                    # consistent on its own and the last one completes the set.
                    resp = await self.etcd.txn(success=ops[i : i + MAX_TXN_OPS])
                    revision = resp.header.revision
            except Exception as exc:
                if attempt == 0 and "lease not found" in str(exc):
                    continue  # the lease lapsed between our keep-alive and the write
                raise
            return revision, lease, granted, changed
        raise AssertionError("unreachable")

    async def heartbeat(self, cluster: str) -> int:
        body = await self._lease_body(cluster)
        if body is not None:
            left = await self.etcd.keepalive_once(body.lease)
            if left > 0:
                return left
        raise NotFound(f"no live export lease for cluster {cluster!r}: it lapsed; publish the export set again")

    async def liveness(
        self, clusters: Sequence[models.ClusterRecord], reports: Sequence[tuple[str, StatusBody]] = ()
    ) -> list[Liveness]:
        """Each cluster's lease, as etcd's LeaseTimeToLive reports it (one read per cluster),
        and how many of its gateways (``reports``: :meth:`list_status`) report recently."""
        now = time.time()
        live: dict[str, int] = {}
        silent: dict[str, int] = {}
        for cluster, body in reports:
            into = live if report_is_recent(body.reported_at, now, self.status_ttl) else silent
            into[cluster] = into.get(cluster, 0) + 1
        resp = await self.etcd.get_prefix(self.keys.family("leases/"))
        bodies: dict[str, LeaseBody] = {}
        for kv in resp.kvs:
            split = self.keys.split(kv.key)
            rec = read_valid(self.keys, kv)
            if split is not None and rec is not None:
                bodies[split[1]] = rec.value

        async def one(c: models.ClusterRecord) -> Liveness:
            body = bodies.get(c.name)
            gws = {"gateways_live": live.get(c.name, 0), "gateways_silent": silent.get(c.name, 0)}
            if body is None:
                return Liveness(c.name, revoked=c.revoked, **gws)
            ttl, remaining = await self.etcd.time_to_live(body.lease)
            return Liveness(c.name, ttl, remaining, body.published_at, c.revoked, **gws)

        return list(await asyncio.gather(*(one(c) for c in clusters)))

    async def sync_liveness(self, clusters: Sequence[models.ClusterRecord] | None = None) -> list[str]:
        """Make the ``liveness/`` records say which clusters are STALE now (the
        background-job leader calls it): one written when a cluster turns STALE, deleted
        when it is LIVE again, revoked, gone or EXPIRED (whose exports have lapsed anyway).
        Returns the clusters that changed.  Gateways receive these records in their
        snapshots and leave STALE clusters out of their splits."""
        if clusters is None:
            clusters, _ = await self.list_clusters()
        now = time.time()
        current = {lv.cluster: lv for lv in await self.list_liveness()}
        changed: list[str] = []
        for lv in await self.liveness(clusters, await self.list_status()):
            have = current.pop(lv.cluster, None)
            if lv.state == "STALE":
                if have is None:
                    rec = models.ClusterLiveness(cluster=lv.cluster, state="STALE", since=now,
                                                 last_heartbeat_age=round(lv.last_heartbeat_age, 1))
                    await self.etcd.put(self.keys.liveness(lv.cluster), dump(rec))
                    changed.append(lv.cluster)
                    log.warning("cluster.stale", cluster=lv.cluster, last_heartbeat_age=rec.last_heartbeat_age)
            elif have is not None:
                await self.etcd.txn(success=[self.etcd.op_delete(self.keys.liveness(lv.cluster))])
                changed.append(lv.cluster)
                log.info("cluster.not_stale", cluster=lv.cluster, state=lv.state)
        for gone in current:  # the record of a cluster no longer joined
            await self.etcd.txn(success=[self.etcd.op_delete(self.keys.liveness(gone))])
            changed.append(gone)
        return changed

    async def list_liveness(self) -> list[models.ClusterLiveness]:
        resp = await self.etcd.get_prefix(self.keys.family("liveness/"))
        return self._valid(resp.kvs)

    async def drop_lease(self, cluster: str) -> None:
        """Revoke a cluster's export lease: its exports vanish at once."""
        body = await self._lease_body(cluster)
        if body is not None:
            await self.etcd.revoke(body.lease)

    async def withdraw(self, cluster: str, namespace: str = "", name: str = "") -> tuple[int, int]:
        if bool(namespace) != bool(name):
            raise InvalidRequest("invalid withdraw: give both namespace and name, or neither (everything)")
        if name:
            key = self.keys.export(cluster, namespace, name)
            resp = await self.etcd.txn(success=[self.etcd.op_delete(key)])
        else:
            prefix = self.keys.exports_of(cluster)
            resp = await self.etcd.txn(success=[self.etcd.op_delete(prefix, prefix_end(prefix))])
        deleted = resp.responses[0].response_delete_range.deleted
        return resp.header.revision, int(deleted)

    async def list_services(self, cluster: str = "") -> tuple[list[models.ExportedService], int]:
        prefix = self.keys.exports_of(cluster) if cluster else self.keys.family("exports/")
        resp = await self.etcd.get_prefix(prefix)
        return self._valid(resp.kvs), resp.header.revision

    # ------------------------------------------------------------------ policies
    async def apply_policies(
        self, policies: Sequence[models.AuthorizationPolicy | models.RequestAuthentication]
    ) -> tuple[int, list[bool]]:
        """:meth:`apply_documents` for policies: per policy, whether it changed."""
        rev, outcomes, _ = await self.apply_documents(policies)
        return rev, [o != "unchanged" for o in outcomes]

    async def apply_documents(
        self, docs: Sequence[Any], check: BatchCheck | None = None
    ) -> tuple[int, list[str], list[str]]:
        """Write every document (any kind of models.DOCUMENT_KINDS) in one etcd
        transaction, or none (``kubectl apply -f`` of a multi-document file).

        Returns the revision, per document ``created``, ``configured`` or ``unchanged``,
        and the warnings of ``check``.  ``check`` sees the clusters, routes and providers, and the
        exports of the names the batch names (:func:`federation.documents.export_lookups`),
        stored at the revision the batch was read at; the transaction commits only if
        none of the batch's keys, and no route, changed since (else it reads and checks
        again), so two concurrent applies cannot each add a route for the same host.
        """
        if len(docs) > MAX_TXN_OPS:
            raise InvalidRequest(f"invalid file: {len(docs)} documents; apply at most {MAX_TXN_OPS} at once")
        for i, d in enumerate(docs):
            if d.kind not in models.DOCUMENT_KINDS:
                raise InvalidRequest(f"document {i}: kind: {d.kind!r} is not a kind Isthmus stores")
        keys = [self.keys.document(d.kind, d.name) for d in docs]
        if len(set(keys)) != len(keys):
            raise InvalidRequest("invalid file: a name appears twice for the same kind")
        values = [dump(d) for d in docs]
        routes = self.keys.family("traffic/TrafficRoute/")
        lookups = sorted(documents.export_lookups(docs)) if check is not None else []
        for attempt in range(MAX_UPDATE_ATTEMPTS):
            first = await self.etcd.get_prefix(self.keys.family("policies/"))
            rev = first.header.revision
            fam = {f: (await self.etcd.get_prefix(self.keys.family(f), revision=rev)).kvs
                   for f in ("traffic/", "clusters/")}
            current = {kv.key: kv for kv in [*first.kvs, *fam["traffic/"]]}
            warnings: list[str] = []
            if check is not None:
                traffic = self._valid(fam["traffic/"])
                clusters = tuple(self._valid(fam["clusters/"]))
                warnings = check(Stored(
                    rev,
                    clusters,
                    await self._exports_named(rev, clusters, lookups),
                    tuple(v for v in traffic if isinstance(v, models.TrafficRoute)),
                    tuple(v.name for v in traffic if isinstance(v, models.ExtensionProvider)),
                ))
            outcomes = ["created" if k not in current else "unchanged" if current[k].value == v else "configured"
                        for k, v in zip(keys, values)]
            changed = [o != "unchanged" for o in outcomes]
            if not any(changed):
                return max((current[k].mod_revision for k in keys), default=rev), outcomes, warnings
            compare = [self.etcd.cmp_mod(k, current[k].mod_revision) if k in current else self.etcd.cmp_missing(k)
                       for k, c in zip(keys, changed) if c]
            if any(k.startswith(routes) for k in keys):
                compare.append(self.etcd.cmp_unchanged_since(routes, prefix_end(routes), rev))
            # A CUSTOM policy's provider that is not in the batch: still there at commit
            # (a concurrent delete of it makes this read and check again).
            compare += [self.etcd.cmp_exists(self.keys.document("ExtensionProvider", p)) for p in sorted(
                {d.provider for d in docs if isinstance(d, models.AuthorizationPolicy) and d.provider}
                - {d.name for d in docs if isinstance(d, models.ExtensionProvider)})
                if self.keys.document("ExtensionProvider", p) in current]
            puts = [self.etcd.op_put(k, v) for k, v, c in zip(keys, values, changed) if c]
            resp = await self.etcd.txn(compare=compare, success=puts)
            if resp.succeeded:
                return resp.header.revision, outcomes, warnings
            await asyncio.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        raise StoreUnavailable("the documents changed concurrently too often in a row: apply again")

    async def _exports_named(self, rev: int, clusters: Sequence[models.ClusterRecord],
                             lookups: Sequence[tuple[str, str]]) -> tuple[models.ExportedService, ...]:
        """The valid exports, at ``rev``, of the ``(namespace, service)`` pairs a batch's
        check asks about, by every cluster: point reads (clusters x pairs), so an apply
        costs the same with a thousand services or fifty thousand."""
        sem = asyncio.Semaphore(EXPORT_READS_IN_FLIGHT)

        async def read(cluster: str, ns: str, service: str) -> list[Any]:
            async with sem:
                return list((await self.etcd.range(self.keys.export(cluster, ns, service), revision=rev)).kvs)

        found = await asyncio.gather(*(read(c.name, ns, svc) for c in clusters for ns, svc in lookups))
        return tuple(self._valid(kv for kvs in found for kv in kvs))

    async def list_documents(self, kinds: Iterable[str] = ()) -> tuple[list[Any], int]:
        """The valid documents of ``kinds`` (empty: every kind), policies first, by key."""
        first = await self.etcd.get_prefix(self.keys.family("policies/"))
        rev = first.header.revision
        traffic = await self.etcd.get_prefix(self.keys.family("traffic/"), revision=rev)
        wanted = set(kinds)
        docs = self._valid([*first.kvs, *traffic.kvs])
        return [d for d in docs if not wanted or d.kind in wanted], rev

    async def delete_document(self, kind: str, name: str) -> tuple[int, int]:
        """Delete the document ``kind``/``name``; NotFound when there is none.  An
        ExtensionProvider a stored CUSTOM AuthorizationPolicy names is not deleted
        (:class:`InUse`, naming the policies); the delete commits only if no policy
        changed since they were read."""
        if kind not in models.DOCUMENT_KINDS:
            raise InvalidRequest(f"invalid kind {kind!r}: use one of {', '.join(models.DOCUMENT_KINDS)}")
        key = self.keys.document(kind, name)
        if kind != "ExtensionProvider":
            resp = await self.etcd.txn(success=[self.etcd.op_delete(key)])
            return self._deleted(resp, kind, name)
        policies = self.keys.family("policies/")
        for attempt in range(MAX_UPDATE_ATTEMPTS):
            first = await self.etcd.get_prefix(policies)
            rev = first.header.revision
            users = sorted(p.name for p in self._valid(first.kvs)
                           if isinstance(p, models.AuthorizationPolicy) and p.action == "CUSTOM" and p.provider == name)
            if users:
                raise InUse(f"ExtensionProvider {name!r} is in use: the CUSTOM AuthorizationPolicy "
                            f"{', '.join(repr(u) for u in users)} names it; delete {'them' if len(users) > 1 else 'it'} "
                            f"or point {'them' if len(users) > 1 else 'it'} at another provider first")
            resp = await self.etcd.txn(compare=[self.etcd.cmp_unchanged_since(policies, prefix_end(policies), rev)],
                                       success=[self.etcd.op_delete(key)])
            if resp.succeeded:
                return self._deleted(resp, kind, name)
            await asyncio.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        raise StoreUnavailable("the policies changed concurrently too often in a row: delete again")

    @staticmethod
    def _deleted(resp: Any, kind: str, name: str) -> tuple[int, int]:
        deleted = resp.responses[0].response_delete_range.deleted
        if not deleted:
            raise NotFound(f"no {kind} named {name!r}")
        return resp.header.revision, int(deleted)

    async def update_document(self, kind: str, name: str, change: Callable[[Any], Any]) -> tuple[int, Any]:
        """Read ``kind``/``name``, apply ``change`` (model -> model; it raises to refuse),
        and write the result only if the record is still the one read (compare-and-swap
        on its mod revision); on a conflict read again and re-apply ``change``, so
        concurrent updates of one record never lose each other.  Returns (revision, model)."""
        key = self.keys.document(kind, name)
        lock, users = self._updating.get(key) or (asyncio.Lock(), 0)
        self._updating[key] = (lock, users + 1)
        try:
            async with lock:
                return await self._update(key, kind, name, change)
        finally:
            lock, users = self._updating[key]
            if users == 1:
                del self._updating[key]
            else:
                self._updating[key] = (lock, users - 1)

    async def _update(self, key: bytes, kind: str, name: str, change: Callable[[Any], Any]) -> tuple[int, Any]:
        for attempt in range(MAX_UPDATE_ATTEMPTS):
            kv = await self.etcd.get(key)
            if kv is None:
                raise NotFound(f"no {kind} named {name!r}")
            rec = read_valid(self.keys, kv)
            if rec is None or not rec.understood:
                k = key.decode(errors="replace")
                raise UnreadableRecord(f"invalid {kind} record {k} in etcd (see the federation log, record.invalid): "
                                       f"apply it again whole (isthmus apply -f) or delete it (isthmus delete {kind} {name})")
            new = change(rec.value)
            value = dump(new)
            if value == kv.value:
                return kv.mod_revision, new
            resp = await self.etcd.txn(compare=[self.etcd.cmp_mod(key, kv.mod_revision)],
                                       success=[self.etcd.op_put(key, value)])
            if resp.succeeded:
                return resp.header.revision, new
            await asyncio.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        raise StoreUnavailable(f"{kind} {name!r} changed concurrently too often in a row: try again")

    async def list_policies(self) -> tuple[list[models.AuthorizationPolicy | models.RequestAuthentication], int]:
        resp = await self.etcd.get_prefix(self.keys.family("policies/"))
        return self._valid(resp.kvs), resp.header.revision

    async def delete_policy(self, name: str, kind: str = "") -> tuple[int, int]:
        kinds: Iterable[str] = (kind,) if kind else ("AuthorizationPolicy", "RequestAuthentication")
        if kind and kind not in ("AuthorizationPolicy", "RequestAuthentication"):
            raise InvalidRequest(f"invalid policy kind {kind!r}: use AuthorizationPolicy or RequestAuthentication")
        resp = await self.etcd.txn(success=[self.etcd.op_delete(self.keys.policy(k, name)) for k in kinds])
        deleted = sum(r.response_delete_range.deleted for r in resp.responses)
        if not deleted:
            raise NotFound(f"no policy named {name!r}" + (f" of kind {kind}" if kind else ""))
        return resp.header.revision, int(deleted)

    # ------------------------------------------------------------------ status
    async def report_applied(
        self,
        cluster: str,
        instance: str,
        revision: int,
        *,
        confirmed_at: float = 0.0,
        rejected_revision: int = 0,
        rejected_reason: str = "",
    ) -> None:
        """Record what gateway ``<cluster>/<instance>`` applied, under a lease that its next
        reports renew.

        A gateway that stops reporting disappears after the status TTL; a cluster
        has at most :data:`MAX_GATEWAYS_PER_CLUSTER` status keys.
        """
        key = self.keys.status(cluster, instance)
        kv = await self.etcd.get(key)
        old = read_valid(self.keys, kv) if kv is not None else None
        if kv is None:
            prefix = self.keys.k("status", cluster, "")
            count = (await self.etcd.range(prefix, prefix_end(prefix), count_only=True)).count
            if count >= MAX_GATEWAYS_PER_CLUSTER:
                raise ResourceExhausted(
                    f"cluster {cluster!r} already reports {count} gateways (at most {MAX_GATEWAYS_PER_CLUSTER}); "
                    f"stale ones disappear {self.status_ttl}s after their last report"
                )
        lease = 0
        if old is not None and old.value.lease and await self.etcd.keepalive_once(old.value.lease) > 0:
            lease = old.value.lease
        if not lease:
            lease, _ = await self.etcd.grant(self.status_ttl)
        body = StatusBody(
            gateway_id=names.gateway_name(cluster, instance),
            revision=revision,
            reported_at=time.time(),
            confirmed_at=confirmed_at,
            rejected_revision=rejected_revision,
            rejected_reason=rejected_reason,
            lease=lease,
        )
        await self.etcd.put(key, body.model_dump_json().encode(), lease=lease)

    async def list_status(self) -> list[tuple[str, StatusBody]]:
        """``(cluster, body)`` per gateway, by name; ``body.gateway_id`` is the name its key
        gives (``<cluster>/<instance>``), whatever an older replica wrote in the value."""
        resp = await self.etcd.get_prefix(self.keys.family("status/"))
        newest: dict[str, tuple[str, StatusBody]] = {}
        for kv in resp.kvs:
            split = self.keys.split(kv.key)
            rec = read_valid(self.keys, kv)
            if split is None or rec is None:
                continue
            cluster, _, part = split[1].partition("/")
            name = names.gateway_name(cluster, self.keys.status_instance(part))
            body = rec.value.model_copy(update={"gateway_id": name})
            # An older replica's key and ours may name the same gateway: the newest report wins.
            if name not in newest or newest[name][1].reported_at < body.reported_at:
                newest[name] = (cluster, body)
        return [newest[n] for n in sorted(newest)]

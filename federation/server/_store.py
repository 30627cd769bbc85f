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
    <prefix>trust/bundle                          {"pem": ...}: the federation trust bundle
    <prefix>trust/crl                             {"pem": ...}: the root-signed CRL
    <prefix>tokens/<sha256(token) hex>            {"cluster": "", "expires_at": t}; bound to
                                                  a lease of the token's TTL; deleted on use
    <prefix>status/<cluster>/<url-quoted id>      {"gateway_id", "revision", "reported_at",
                                                  "confirmed_at", "rejected_revision",
                                                  "rejected_reason", "lease"}; bound to
                                                  that lease (STATUS_TTL)
    <prefix>election/<job>                        a replica's id, bound to its lease: the
                                                  leader of a background job (trust-sync)
    <prefix>meta/sync                             empty; a replica writes it to flush its own
                                                  watch up to "now" (see _hub.Hub.catch_up)

The watch stream carries the *config* families (clusters, exports, policies, trust);
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import structlog
from cryptography import x509
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field

from .. import models
from .._errors import (
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
MIN_TTL, MAX_TTL, DEFAULT_TTL = 2, 3600, 30
# Gateway status keys: bound to a lease a gateway's reports renew (it reports at least
# every STATUS_TTL / 3), and at most this many per cluster.
STATUS_TTL = 60
MAX_GATEWAYS_PER_CLUSTER = 64
CONFIG_FAMILIES = ("clusters/", "exports/", "policies/", "trust/")

@dataclass(frozen=True)
class Liveness:
    """A cluster's liveness as its etcd lease tells it."""

    cluster: str
    lease_ttl: int = 0  # granted TTL; 0: no live lease
    lease_remaining: int = -1  # whole seconds left (etcd rounds down); -1: no live lease
    published_at: float = 0.0
    revoked: bool = False

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
    def state(self) -> str:
        return liveness_state(self.lease_ttl, self.lease_remaining, self.revoked)


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

    def token(self, digest: str) -> bytes:
        return self.k("tokens", digest)

    def status(self, cluster: str, gateway_id: str) -> bytes:
        return self.k("status", cluster, quote(gateway_id, safe=""))

    def split(self, key: bytes) -> tuple[str, str] | None:
        """``(family, rest)`` for a key under the prefix, e.g. ``("exports", "east/ns/svc")``."""
        text = key.decode()
        if not text.startswith(self.prefix):
            return None
        family, _, rest = text[len(self.prefix) :].partition("/")
        return family, rest

    @staticmethod
    def unquote_gateway(part: str) -> str:
        return unquote(part)


class Store:
    """The writes and reads behind the API.  Stateless: every replica may run every call."""

    def __init__(self, etcd: Etcd, prefix: str = "/isthmus/") -> None:
        self.etcd = etcd
        self.keys = Keys(prefix)

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

    async def liveness(self, clusters: Sequence[models.ClusterRecord]) -> list[Liveness]:
        """Each cluster's lease, as etcd's LeaseTimeToLive reports it (one read per cluster)."""
        resp = await self.etcd.get_prefix(self.keys.family("leases/"))
        bodies: dict[str, LeaseBody] = {}
        for kv in resp.kvs:
            split = self.keys.split(kv.key)
            rec = read_valid(self.keys, kv)
            if split is not None and rec is not None:
                bodies[split[1]] = rec.value

        async def one(c: models.ClusterRecord) -> Liveness:
            body = bodies.get(c.name)
            if body is None:
                return Liveness(c.name, revoked=c.revoked)
            ttl, remaining = await self.etcd.time_to_live(body.lease)
            return Liveness(c.name, ttl, remaining, body.published_at, c.revoked)

        return list(await asyncio.gather(*(one(c) for c in clusters)))

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
    async def apply_policy(self, policy: models.AuthorizationPolicy | models.RequestAuthentication) -> tuple[int, bool]:
        key = self.keys.policy(policy.kind, policy.name)
        value = dump(policy)
        kv = await self.etcd.get(key)
        if kv is not None and kv.value == value:
            return kv.mod_revision, False
        resp = await self.etcd.put(key, value)
        return resp.header.revision, True

    async def apply_policies(
        self, policies: Sequence[models.AuthorizationPolicy | models.RequestAuthentication]
    ) -> tuple[int, list[bool]]:
        """Write every policy in one etcd transaction, or none (``kubectl apply -f`` of a
        multi-document file).  The transaction compares each key with what was read, so a
        concurrent write makes it retry instead of overwriting half of the set."""
        if len(policies) > MAX_TXN_OPS:
            raise InvalidRequest(f"invalid policy file: {len(policies)} policies; apply at most {MAX_TXN_OPS} at once")
        keys = [self.keys.policy(p.kind, p.name) for p in policies]
        if len(set(keys)) != len(keys):
            raise InvalidRequest("invalid policy file: a policy name appears twice for the same kind")
        values = [dump(p) for p in policies]
        for _ in range(5):
            current = {kv.key: kv for kv in (await self.etcd.get_prefix(self.keys.family("policies/"))).kvs}
            changed = [k not in current or current[k].value != v for k, v in zip(keys, values)]
            if not any(changed):
                return max((current[k].mod_revision for k in keys), default=0), changed
            compare = [self.etcd.cmp_mod(k, current[k].mod_revision) if k in current else self.etcd.cmp_missing(k)
                       for k, c in zip(keys, changed) if c]
            puts = [self.etcd.op_put(k, v) for k, v, c in zip(keys, values, changed) if c]
            resp = await self.etcd.txn(compare=compare, success=puts)
            if resp.succeeded:
                return resp.header.revision, changed
        raise StoreUnavailable("policies changed concurrently five times in a row: apply again")

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
        gateway_id: str,
        revision: int,
        *,
        confirmed_at: float = 0.0,
        rejected_revision: int = 0,
        rejected_reason: str = "",
    ) -> None:
        """Record what a gateway applied, under a lease that its next reports renew.

        A gateway that stops reporting disappears after :data:`STATUS_TTL`; a cluster
        has at most :data:`MAX_GATEWAYS_PER_CLUSTER` status keys.
        """
        key = self.keys.status(cluster, gateway_id)
        kv = await self.etcd.get(key)
        old = read_valid(self.keys, kv) if kv is not None else None
        if kv is None:
            prefix = self.keys.k("status", cluster, "")
            count = (await self.etcd.range(prefix, prefix_end(prefix), count_only=True)).count
            if count >= MAX_GATEWAYS_PER_CLUSTER:
                raise ResourceExhausted(
                    f"cluster {cluster!r} already reports {count} gateways (at most {MAX_GATEWAYS_PER_CLUSTER}); "
                    f"stale ones disappear {STATUS_TTL}s after their last report"
                )
        lease = 0
        if old is not None and old.value.lease and await self.etcd.keepalive_once(old.value.lease) > 0:
            lease = old.value.lease
        if not lease:
            lease, _ = await self.etcd.grant(STATUS_TTL)
        body = StatusBody(
            gateway_id=gateway_id,
            revision=revision,
            reported_at=time.time(),
            confirmed_at=confirmed_at,
            rejected_revision=rejected_revision,
            rejected_reason=rejected_reason,
            lease=lease,
        )
        await self.etcd.put(key, body.model_dump_json().encode(), lease=lease)

    async def list_status(self) -> list[tuple[str, StatusBody]]:
        resp = await self.etcd.get_prefix(self.keys.family("status/"))
        out = []
        for kv in resp.kvs:
            split = self.keys.split(kv.key)
            rec = read_valid(self.keys, kv)
            if split is not None and rec is not None:
                out.append((split[1].partition("/")[0], rec.value))
        return out

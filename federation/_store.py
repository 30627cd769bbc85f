"""The federation's records in etcd: key layout, encoding, and the writes the API makes.

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
    <prefix>status/<cluster>/<url-quoted id>      {"gateway_id", "revision", "reported_at"}
    <prefix>election/<job>                        a replica's id, bound to its lease: the
                                                  leader of a background job (trust-sync)
    <prefix>meta/sync                             empty; a replica writes it to flush its own
                                                  watch up to "now" (see _hub.Hub.catch_up)

The watch stream carries the *config* families (clusters, exports, policies, trust);
tokens, leases and status never reach gateways.  Values are the models' JSON
(``model_dump_json(by_alias=True)``), so what a gateway receives is what etcd holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote, unquote

import grpc
import structlog
from aetcd.rpc import rpc_pb2 as etcd_pb
from pydantic import Field, TypeAdapter, ValidationError

from . import models
from ._errors import InvalidRequest, NotFound, PermissionDenied, StoreUnavailable, Unauthenticated
from ._etcd import Etcd, _convert, prefix_end

log = structlog.get_logger("federation.store")

# etcd's default --max-txn-ops is 128; stay under it so any etcd deployment works.
MAX_TXN_OPS = 100
MIN_TTL, MAX_TTL, DEFAULT_TTL = 2, 3600, 30
CONFIG_FAMILIES = ("clusters/", "exports/", "policies/", "trust/")

PolicyAdapter: TypeAdapter[models.AuthorizationPolicy | models.RequestAuthentication] = TypeAdapter(
    Annotated[models.AuthorizationPolicy | models.RequestAuthentication, Field(discriminator="kind")]
)


def validation_message(exc: ValidationError, what: str) -> str:
    """``invalid AuthorizationPolicy: rules.0.from.0.principals: Input should be ...``."""
    parts = []
    for err in exc.errors():
        loc = list(err["loc"])
        if loc and loc[0] == what:  # the union's discriminator tag; the kind is named already
            loc = loc[1:]
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{path}: {msg}")
    return f"invalid {what}: " + "; ".join(parts)


def parse_policy(data: dict[str, Any] | str | bytes) -> models.AuthorizationPolicy | models.RequestAuthentication:
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise InvalidRequest(f"invalid policy: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("invalid policy: expected an object with kind, name, ...")
    try:
        if "kind" not in data:
            raise InvalidRequest(
                "invalid policy: kind: missing; set kind: AuthorizationPolicy or RequestAuthentication"
            )
        return PolicyAdapter.validate_python(data)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc, str(data.get("kind", "policy")))) from None


def parse_service(data: str | bytes) -> models.ExportedService:
    try:
        return models.ExportedService.model_validate_json(data)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc, "exported service")) from None


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


def dump(model: models._Model) -> bytes:
    return model.model_dump_json(by_alias=True).encode()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


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
        if kv is None:
            raise Unauthenticated(problem)
        body = json.loads(kv.value)
        # The lease deletes the key, but lease expiry can lag by a second; the recorded
        # deadline is authoritative.
        if body.get("expires_at", 0) <= time.time():
            raise Unauthenticated("invalid join token: expired; create a new one with `isthmus federation token create`")
        if body.get("cluster") and body["cluster"] != name:
            raise PermissionDenied(
                f"join token is for cluster {body['cluster']!r}, not {name!r}"
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
        return models.ClusterRecord.model_validate_json(kv.value), kv.mod_revision

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
            record = models.ClusterRecord.model_validate_json(kv.value)
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
        return [models.ClusterRecord.model_validate_json(kv.value) for kv in resp.kvs], resp.header.revision

    # ------------------------------------------------------------------ exports
    async def _cluster_lease(self, cluster: str, ttl: int) -> tuple[int, int]:
        kv = await self.etcd.get(self.keys.lease(cluster))
        if kv is not None:
            lease = json.loads(kv.value)["lease"]
            left = await self.etcd.keepalive_once(lease)
            if left > 0:
                return lease, left
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
        kv = await self.etcd.get(self.keys.lease(cluster))
        if kv is not None:
            left = await self.etcd.keepalive_once(json.loads(kv.value)["lease"])
            if left > 0:
                return left
        raise NotFound(f"no live export lease for cluster {cluster!r}: it lapsed; publish the export set again")

    async def liveness(self, clusters: Sequence[models.ClusterRecord]) -> list[Liveness]:
        """Each cluster's lease, as etcd's LeaseTimeToLive reports it (one read per cluster)."""
        resp = await self.etcd.get_prefix(self.keys.family("leases/"))
        bodies: dict[str, dict[str, Any]] = {}
        for kv in resp.kvs:
            split = self.keys.split(kv.key)
            if split is not None:
                bodies[split[1]] = json.loads(kv.value)

        async def one(c: models.ClusterRecord) -> Liveness:
            body = bodies.get(c.name)
            if body is None:
                return Liveness(c.name, revoked=c.revoked)
            ttl, remaining = await self._time_to_live(int(body["lease"]))
            return Liveness(c.name, ttl, remaining, float(body.get("published_at", 0.0)), c.revoked)

        return list(await asyncio.gather(*(one(c) for c in clusters)))

    async def _time_to_live(self, lease: int) -> tuple[int, int]:
        """(granted TTL, remaining); (0, -1) when the lease is gone."""
        try:
            r = await self.etcd.lease.LeaseTimeToLive(
                etcd_pb.LeaseTimeToLiveRequest(ID=lease), timeout=self.etcd.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _convert(exc) from None
        if r.TTL < 0:
            return 0, -1
        return int(r.grantedTTL), int(r.TTL)

    async def drop_lease(self, cluster: str) -> None:
        """Revoke a cluster's export lease: its exports vanish at once."""
        kv = await self.etcd.get(self.keys.lease(cluster))
        if kv is not None:
            await self.etcd.revoke(json.loads(kv.value)["lease"])

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
        return [models.ExportedService.model_validate_json(kv.value) for kv in resp.kvs], resp.header.revision

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
        return [PolicyAdapter.validate_json(kv.value) for kv in resp.kvs], resp.header.revision

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
    async def report_applied(self, cluster: str, gateway_id: str, revision: int) -> None:
        body = {"gateway_id": gateway_id, "revision": revision, "reported_at": time.time()}
        await self.etcd.put(self.keys.status(cluster, gateway_id), json.dumps(body).encode())

    async def list_status(self) -> list[tuple[str, dict[str, Any]]]:
        resp = await self.etcd.get_prefix(self.keys.family("status/"))
        out = []
        for kv in resp.kvs:
            split = self.keys.split(kv.key)
            assert split is not None
            out.append((split[1].partition("/")[0], json.loads(kv.value)))
        return out

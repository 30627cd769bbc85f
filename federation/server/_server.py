"""The gRPC service (``isthmus.federation.v1.Federation``) on grpc.aio.

Every handler starts by naming its caller (:meth:`FederationService._caller`): the
peer's leaf from the mTLS handshake, re-checked against the SPIFFE rules and the CRL.
Admins are ``spiffe://<td>/admin/<name>``; a cluster is its gateway or agent identity
``spiffe://<cluster>.<td>/ns/isthmus-system/sa/isthmus-{gateway,agent}``.  A cluster
writes only its own records; only admins write policies (and every other document
kind: traffic routes) and create tokens.  Join is
the one call that may come without a certificate (on the join port) — the token is
its authentication.  Errors are converted to gRPC status codes in one place
(:func:`_rpc`), and refusals are logged with the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import trust

from .. import models, names
from .._errors import FederationError, InvalidRequest, NotFound, PermissionDenied, Unauthenticated
from ..documents import check_batch, parse_document, with_weights
from ..proto import federation_pb2 as pb
from ..proto import federation_pb2_grpc as pb_grpc
from ._hub import Hub
from ._summaries import Summaries, check_summary, traffic_json
from ._store import (
    DEFAULT_INSTANCE,
    DEFAULT_TTL,
    TRAFFIC_KINDS,
    Liveness,
    Store,
    StatusBody,
    Stored,
    legacy_instance,
    report_is_recent,
)

log = structlog.get_logger("federation.server")

DEFAULT_CLUSTER_VALIDITY = 90 * 86400.0
DEFAULT_TOKEN_TTL = 3600
MAX_GATEWAY_ID = 256  # the older form: the SPIFFE ID and "#<instance>"
MAX_REASON = 500  # characters of a rejected snapshot's reason that are kept


@dataclass(frozen=True)
class Caller:
    spiffe_id: str
    admin: str = ""  # admin name
    cluster: str = ""  # cluster name (gateway or agent identity)

    def may_write_cluster(self, cluster: str) -> bool:
        return bool(self.admin) or self.cluster == cluster


F = TypeVar("F", bound=Callable[..., Any])


def _rpc(fn: F) -> F:
    """Convert our errors into gRPC status codes, at one boundary."""

    @functools.wraps(fn)
    async def wrapper(self: FederationService, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except FederationError as exc:
            level = "warning" if exc.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED) else "info"
            getattr(log, level)("rpc.refused", method=fn.__name__, code=exc.code.name, error=str(exc), peer=context.peer())
            await context.abort(exc.code, str(exc))
        except trust.TrustError as exc:
            log.info("rpc.refused", method=fn.__name__, code="INVALID_ARGUMENT", error=str(exc))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    return wrapper  # type: ignore[return-value]


class FederationService(pb_grpc.FederationServicer):
    def __init__(self, store: Store, hub: Hub, trust_dir: trust.TrustDir) -> None:
        self.store = store
        self.hub = hub
        self.trust_dir = trust_dir
        self.trust_domain = trust_dir.trust_domain
        self._sign_lock = asyncio.Lock()
        self.summaries = Summaries(store)

    # ------------------------------------------------------------------ identity
    def _caller(self, context: grpc.aio.ServicerContext, required: bool = True) -> Caller | None:
        pem = (context.auth_context() or {}).get("x509_pem_cert")
        if not pem:
            if required:
                raise Unauthenticated(
                    "no client certificate: call the mTLS port with a gateway, agent or admin certificate "
                    "(ISTHMUS_CERT_DIR or --cert-dir)"
                )
            return None

        cert = x509.load_pem_x509_certificate(pem[0])
        try:
            sid = trust.verify_peer(cert, trust.PeerPolicy(revocations=self.hub.revocations()))
        except trust.PeerRejected as exc:
            raise Unauthenticated(str(exc)) from None
        td = self.trust_domain
        if sid.trust_domain == td and sid.path.startswith("/admin/"):
            return Caller(str(sid), admin=sid.path.removeprefix("/admin/"))
        if sid.trust_domain.endswith("." + td):
            cluster = sid.trust_domain[: -len(td) - 1]
            if sid.path in names.CLUSTER_IDENTITY_PATHS:
                return Caller(str(sid), cluster=cluster)
        raise PermissionDenied(
            f"{sid} may not call the federation API: only admins and cluster gateways/agents may"
        )

    def _admin(self, context: grpc.aio.ServicerContext, what: str) -> Caller:
        caller = self._caller(context)
        assert caller is not None
        if not caller.admin:
            raise PermissionDenied(f"{caller.spiffe_id} may not {what}: admins only (isthmus trust issue-admin)")
        return caller

    def _cluster_writer(self, context: grpc.aio.ServicerContext, cluster: str) -> Caller:
        caller = self._caller(context)
        assert caller is not None
        if not cluster:
            raise InvalidRequest("invalid request: cluster is empty")
        if not caller.may_write_cluster(cluster):
            raise PermissionDenied(f"{caller.spiffe_id} may not write cluster {cluster!r}'s records")
        return caller

    # ------------------------------------------------------------------ join and tokens
    @_rpc
    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinResponse:
        name = request.name
        try:
            trust.validate_cluster_name(name)
        except trust.InvalidName as exc:
            raise InvalidRequest(str(exc)) from None
        caller = self._caller(context, required=False)
        existing = await self.store.get_cluster(name)
        expect = 0
        if existing is not None:
            record, expect = existing
            if caller is None:
                raise PermissionDenied(
                    f"cluster {name!r} is already joined; only that cluster's identity or an admin may "
                    "join it again (call the mTLS port with its certificate)"
                )
            if not caller.may_write_cluster(name):
                raise PermissionDenied(f"{caller.spiffe_id} may not take over cluster name {name!r}")
        cluster_td = trust.cluster_trust_domain(name, self.trust_domain)
        csr = trust.load_csr(request.csr_pem, cluster_td)  # refuse a bad CSR before burning the token
        previous = _previous_cas(existing[0]) if existing is not None else []
        if previous and any(_same_key(c, csr.public_key()) for c in previous):
            # Re-joining revokes the previous CA by its key: the same key would be revoked too.
            raise InvalidRequest(
                f"invalid join request: cluster {name!r} re-joins with the key of its previous CA, which a "
                "re-join revokes; generate a new key (isthmus join-cluster does)"
            )
        validity = trust.parse_duration(request.validity) if request.validity else DEFAULT_CLUSTER_VALIDITY
        await self.store.consume_token(request.token, name)
        async with self._sign_lock:  # the trust folder is files: one writer at a time
            cert = await asyncio.to_thread(self.trust_dir.sign_cluster_csr, name, request.csr_pem, validity)
            if previous:
                # The old intermediate (and every leaf it signed) must stop working: the
                # name may have been re-joined precisely because that key leaked.
                await asyncio.to_thread(self._revoke_serials, [c.serial_number for c in previous])
            bundle, crl = await asyncio.to_thread(lambda: (self.trust_dir.bundle_pem(), self.trust_dir.crl_pem()))
            if previous:
                await self.store.publish_trust(bundle, crl)

        ca_pem = cert.public_bytes(serialization.Encoding.PEM)
        record = models.parse_input(
            models.ClusterRecord,
            {
                "name": name,
                "trust_domain": cluster_td,
                "gateway_addresses": tuple(request.gateway_addresses),
                "labels": dict(request.labels),
                "ca_cert_pem": ca_pem.decode(),
                "joined_at": time.time(),
                "previous_ca_certs_pem": tuple(_pem(c) for c in previous),
            },
            what="join request",
        )
        revision = await self.store.put_cluster(record, expect)
        log.info(
            "cluster.joined", cluster=name, rejoin=existing is not None, by=caller.spiffe_id if caller else "token",
            revision=revision, revoked_cas=[f"{c.serial_number:x}" for c in previous],
        )
        return pb.JoinResponse(
            ca_cert_pem=ca_pem,
            bundle_pem=bundle,
            crl_pem=crl,
            trust_domain=cluster_td,
            federation_trust_domain=self.trust_domain,
            cluster_json=record.model_dump_json(),
            revision=revision,
        )

    def _revoke_serials(self, serials: list[int]) -> None:
        revoked = self.trust_dir.revoked_serials()
        now = datetime.datetime.now(datetime.timezone.utc)
        if all(s in revoked for s in serials):
            return
        for s in serials:
            revoked.setdefault(s, now)
        self.trust_dir.write_crl(revoked, now)

    @_rpc
    async def RevokeCluster(self, request: pb.RevokeClusterRequest, context: grpc.aio.ServicerContext) -> pb.RevokeClusterResponse:
        caller = self._admin(context, "revoke clusters")
        name = request.name
        existing = await self.store.get_cluster(name)
        if existing is None:
            raise NotFound(f"cluster {name!r} has not joined the federation")
        record, mod = existing
        async with self._sign_lock:
            serials = await asyncio.to_thread(self.trust_dir.revoke_cluster, name)
            bundle, crl = await asyncio.to_thread(lambda: (self.trust_dir.bundle_pem(), self.trust_dir.crl_pem()))
        await self.store.publish_trust(bundle, crl)
        # Its exports go at once (no waiting for the lease), and the record says why.
        _, withdrawn = await self.store.withdraw(name)
        await self.store.drop_lease(name)
        revision = await self.store.put_cluster(record.model_copy(update={"revoked": True}), mod)
        log.warning("cluster.revoked", cluster=name, by=caller.spiffe_id, serials=[f"{s:x}" for s in serials], revision=revision)
        return pb.RevokeClusterResponse(revision=revision, serials=[f"{s:x}" for s in serials], withdrawn=withdrawn)

    @_rpc
    async def CreateToken(self, request: pb.CreateTokenRequest, context: grpc.aio.ServicerContext) -> pb.CreateTokenResponse:
        caller = self._admin(context, "create join tokens")
        if request.cluster:
            try:
                trust.validate_cluster_name(request.cluster)
            except trust.InvalidName as exc:
                raise InvalidRequest(str(exc)) from None
        token, expires_at = await self.store.create_token(request.ttl_seconds or DEFAULT_TOKEN_TTL, request.cluster)
        log.info("token.created", by=caller.spiffe_id, cluster=request.cluster or "*", ttl=request.ttl_seconds or DEFAULT_TOKEN_TTL)
        return pb.CreateTokenResponse(token=token, ca_pin=self.trust_dir.ca_pin(), expires_at=expires_at)

    # ------------------------------------------------------------------ exports
    async def _require_joined(self, cluster: str) -> None:
        if self.hub.state.get(self.store.keys.cluster(cluster)) is None and await self.store.get_cluster(cluster) is None:
            raise NotFound(f"cluster {cluster!r} has not joined the federation")

    @_rpc
    async def PublishExports(self, request: pb.PublishExportsRequest, context: grpc.aio.ServicerContext) -> pb.PublishExportsResponse:
        self._cluster_writer(context, request.cluster)
        await self._require_joined(request.cluster)
        services = [models.parse_input(models.ExportedService, s, what="exported service") for s in request.services_json]
        rev, lease, ttl, changed = await self.store.publish(request.cluster, services, int(request.ttl_seconds or DEFAULT_TTL))
        if changed:
            log.info("exports.published", cluster=request.cluster, services=len(services), changed=changed, revision=rev)
        return pb.PublishExportsResponse(revision=rev, lease_id=lease, ttl_seconds=ttl, changed=changed)

    @_rpc
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        self._cluster_writer(context, request.cluster)
        return pb.HeartbeatResponse(ttl_seconds=await self.store.heartbeat(request.cluster))

    @_rpc
    async def Withdraw(self, request: pb.WithdrawRequest, context: grpc.aio.ServicerContext) -> pb.WithdrawResponse:
        self._cluster_writer(context, request.cluster)
        rev, deleted = await self.store.withdraw(request.cluster, request.namespace, request.name)
        log.info("exports.withdrawn", cluster=request.cluster, namespace=request.namespace, name=request.name, deleted=deleted)
        return pb.WithdrawResponse(revision=rev, deleted=deleted)

    # ------------------------------------------------------------------ watch and status
    async def Watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext):  # type: ignore[override]
        try:
            caller = self._caller(context)
        except FederationError as exc:
            log.warning("rpc.refused", method="Watch", code=exc.code.name, error=str(exc))
            await context.abort(exc.code, str(exc))
            return
        assert caller is not None
        log.info("watch.started", peer=caller.spiffe_id, from_revision=request.from_revision)
        # aclosing: a cancelled stream (client gone) unregisters its queue right away.
        try:
            events_ = self.hub.watch(request.from_revision, request.progress_interval)
            async with contextlib.aclosing(events_) as events:
                async for event in events:
                    yield event
        finally:
            log.info("watch.ended", peer=caller.spiffe_id)

    @_rpc
    async def ReportApplied(self, request: pb.ReportAppliedRequest, context: grpc.aio.ServicerContext) -> pb.ReportAppliedResponse:
        caller = self._caller(context)
        assert caller is not None
        if not caller.cluster:
            raise PermissionDenied(f"{caller.spiffe_id} is not a cluster gateway or agent: it has no config to report")
        instance = self._reporting_instance(caller, request.gateway_id)
        for what, rev in (("revision", request.revision), ("rejected_revision", request.rejected_revision)):
            if rev < 0:
                raise InvalidRequest(f"invalid report: {what} {rev} is negative")
            if rev > self.hub.revision and rev > await self.store.etcd.current_revision():
                raise InvalidRequest(f"invalid report: {what} {rev} is ahead of the federation's ({self.hub.revision})")
        reason = "".join(ch if ch.isprintable() else " " for ch in request.rejected_reason[:MAX_REASON])
        await self.store.report_applied(
            caller.cluster,
            instance,
            request.revision,
            confirmed_at=request.confirmed_at,
            rejected_revision=request.rejected_revision,
            rejected_reason=reason if request.rejected_revision else "",
        )
        return pb.ReportAppliedResponse()

    @_rpc
    async def ReportTraffic(self, request: pb.ReportTrafficRequest, context: grpc.aio.ServicerContext) -> pb.ReportTrafficResponse:
        caller = self._caller(context)
        assert caller is not None
        if not caller.cluster:
            raise PermissionDenied(f"{caller.spiffe_id} is not a cluster gateway: it has no traffic to report")
        instance = self._reporting_instance(caller, request.gateway_id)
        summary = check_summary(caller.cluster, request.summary_json)
        ttl = await self.summaries.push(caller.cluster, instance, summary)
        return pb.ReportTrafficResponse(ttl_seconds=ttl, edges=len(summary.edges))

    @_rpc
    async def GetTraffic(self, request: pb.GetTrafficRequest, context: grpc.aio.ServicerContext) -> pb.GetTrafficResponse:
        self._caller(context)
        doc = traffic_json(await self.summaries.windows())
        return pb.GetTrafficResponse(traffic_json=json.dumps(doc, separators=(",", ":")))

    @staticmethod
    def _reporting_instance(caller: Caller, gateway_id: str) -> str:
        """The instance a report is for: ``gateway_id`` is ``<caller's cluster>/<instance>``
        (names.gateway_name); older gateways send their SPIFFE ID, optionally with
        ``#<host>``, or nothing."""
        if not gateway_id or gateway_id == caller.spiffe_id:
            return DEFAULT_INSTANCE
        if gateway_id.startswith("spiffe://"):
            ident, _, instance = gateway_id.partition("#")
            if ident != caller.spiffe_id or not instance or len(gateway_id) > MAX_GATEWAY_ID:
                raise PermissionDenied(
                    f"{caller.spiffe_id} may report only as itself: gateway_id must be "
                    f"{caller.cluster}/<instance> (or, from older gateways, its own SPIFFE ID with '#<instance>')"
                )
            return legacy_instance(gateway_id)
        try:
            cluster, instance = names.parse_gateway_name(gateway_id)
        except ValueError as exc:
            raise InvalidRequest(f"invalid report: {exc}") from None
        if cluster != caller.cluster:
            raise PermissionDenied(
                f"{caller.spiffe_id} may report only for its own cluster: gateway_id must be {caller.cluster}/<instance>"
            )
        return instance

    @_rpc
    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        self._caller(context)
        return await self.status()

    async def status(self, catch_up: bool = True) -> pb.GetStatusResponse:
        """What GetStatus answers (also the topology page's clusters and gateways, which
        polls: it skips the catch-up, a write to etcd)."""
        # Read-your-writes: a change the caller just made must count as the latest config.
        try:
            if catch_up:
                await self.hub.catch_up(timeout=2.0)
        except FederationError:
            pass  # etcd away: report what this replica knows
        # One revision notion: the stream tags everything with config revisions (see
        # _hub), so a gateway is in sync when it holds config_revision; above it, another
        # replica saw a newer change first.  A gateway whose reports stopped is not known
        # to be in sync: synced is false (the CLI shows STALE) until its entry lapses.
        config_rev = self.hub.config_revision
        policy_rev = self.hub.policy_revision
        reports = await self.store.list_status()
        now = time.time()
        route_rev = self.hub.route_revision
        gateways = [
            pb.GatewayStatus(
                cluster=cluster,
                gateway_id=body.gateway_id,
                applied_revision=body.revision,
                reported_at=body.reported_at,
                synced=body.revision >= config_rev and report_is_recent(body.reported_at, now, self.store.status_ttl),
                no_report=not report_is_recent(body.reported_at, now, self.store.status_ttl),
                enforces_policy=body.revision >= policy_rev,
                rejected_revision=body.rejected_revision if body.rejected_revision > body.revision else 0,
                rejected_reason=body.rejected_reason if body.rejected_revision > body.revision else "",
                confirmed_at=body.confirmed_at,
                routes_applied=body.revision >= route_rev,
            )
            for cluster, body in reports
        ]
        records = self._hub_clusters()
        return pb.GetStatusResponse(
            config_revision=config_rev,
            gateways=gateways,
            clusters=[r.name for r in records],
            policy_revision=policy_rev,
            liveness=await self._liveness(records, reports),
            route_revision=route_rev,
        )

    def _hub_clusters(self) -> list[models.ClusterRecord]:
        return self.hub.clusters()

    async def _liveness(
        self, records: list[models.ClusterRecord], reports: list[tuple[str, StatusBody]]
    ) -> list[pb.ClusterLiveness]:
        exports: dict[str, int] = {}
        prefix = self.store.keys.family("exports/")
        for k in self.hub.state:
            if k.startswith(prefix):
                c = k[len(prefix) :].split(b"/", 1)[0].decode()
                exports[c] = exports.get(c, 0) + 1
        return [_liveness_pb(lv, exports.get(lv.cluster, 0)) for lv in await self.store.liveness(records, reports)]

    # ------------------------------------------------------------------ policies
    @_rpc
    async def ApplyPolicy(self, request: pb.ApplyPolicyRequest, context: grpc.aio.ServicerContext) -> pb.ApplyPolicyResponse:
        caller = self._admin(context, "write policies or routes")
        if request.policies_json:  # a whole file: every document valid, one transaction
            batch = [_checked_document(text, f"document {i}: ") for i, text in enumerate(request.policies_json)]
        else:
            batch = [_checked_document(request.policy_json)]

        def check(stored: Stored) -> list[str]:
            return check_batch(batch, clusters=stored.clusters, services=stored.services, stored_routes=stored.routes,
                               stored_providers=stored.providers)

        rev, outcomes, warnings = await self.store.apply_documents(batch, check)
        each = [o != "unchanged" for o in outcomes]
        log.info("policy.applied", documents=[f"{d.kind}/{d.name}" for d in batch], changed=sum(each),
                 warnings=len(warnings), by=caller.spiffe_id, revision=rev)
        return pb.ApplyPolicyResponse(revision=rev, changed=any(each), changed_each=each if request.policies_json else [],
                                      created_each=[o == "created" for o in outcomes], warnings=warnings)

    @_rpc
    async def ListPolicies(self, request: pb.ListPoliciesRequest, context: grpc.aio.ServicerContext) -> pb.ListPoliciesResponse:
        self._caller(context)
        policies, rev = await self.store.list_policies()
        return pb.ListPoliciesResponse(policies_json=[p.model_dump_json(by_alias=True) for p in policies], revision=rev)

    @_rpc
    async def DeletePolicy(self, request: pb.DeletePolicyRequest, context: grpc.aio.ServicerContext) -> pb.DeletePolicyResponse:
        caller = self._admin(context, "delete policies or routes")
        if request.kind in TRAFFIC_KINDS:
            rev, deleted = await self.store.delete_document(request.kind, request.name)
        else:
            rev, deleted = await self.store.delete_policy(request.name, request.kind)
        log.info("policy.deleted", name=request.name, kind=request.kind or "*", by=caller.spiffe_id, revision=rev)
        return pb.DeletePolicyResponse(revision=rev, deleted=deleted)

    @_rpc
    async def ListDocuments(self, request: pb.ListDocumentsRequest, context: grpc.aio.ServicerContext) -> pb.ListDocumentsResponse:
        self._caller(context)
        unknown = [k for k in request.kinds if k not in models.DOCUMENT_KINDS]
        if unknown:
            raise InvalidRequest(f"invalid kind {unknown[0]!r}: use one of {', '.join(models.DOCUMENT_KINDS)}")
        docs, rev = await self.store.list_documents(request.kinds)
        return pb.ListDocumentsResponse(documents_json=[d.model_dump_json(by_alias=True) for d in docs], revision=rev)

    @_rpc
    async def SetRouteWeights(self, request: pb.SetRouteWeightsRequest, context: grpc.aio.ServicerContext) -> pb.SetRouteWeightsResponse:
        caller = self._admin(context, "change route weights")
        weights = [(w.cluster, w.service, w.weight) for w in request.weights]
        rule = request.rule if request.HasField("rule") else None
        chosen: list[int] = []

        def change(route: models.TrafficRoute) -> models.TrafficRoute:
            new, r = with_weights(route, weights, rule)
            chosen[:] = [r]
            return new

        rev, route = await self.store.update_document("TrafficRoute", request.name, change)
        log.info("route.weights_set", name=request.name, rule=chosen[0], weights=[f"{c}{'/' + s if s else ''}={w}"
                 for c, s, w in weights], by=caller.spiffe_id, revision=rev)
        return pb.SetRouteWeightsResponse(revision=rev, route_json=route.model_dump_json(by_alias=True), rule=chosen[0])

    # ------------------------------------------------------------------ listings
    @_rpc
    async def ListClusters(self, request: pb.ListClustersRequest, context: grpc.aio.ServicerContext) -> pb.ListClustersResponse:
        self._caller(context)
        clusters, rev = await self.store.list_clusters()
        try:
            await self.hub.catch_up(timeout=2.0)  # export counts include the caller's own writes
        except FederationError:
            pass
        reports = await self.store.list_status()
        return pb.ListClustersResponse(
            clusters_json=[c.model_dump_json() for c in clusters], revision=rev,
            liveness=await self._liveness(clusters, reports),
        )

    @_rpc
    async def ListServices(self, request: pb.ListServicesRequest, context: grpc.aio.ServicerContext) -> pb.ListServicesResponse:
        self._caller(context)
        services, rev = await self.store.list_services(request.cluster)
        return pb.ListServicesResponse(services_json=[s.model_dump_json() for s in services], revision=rev)


def _checked_document(text: str, where: str = "") -> Any:
    """A document of any kind, validated as the gateways will use it (policies: as they
    will enforce it); refused with ``where`` (``document N: ``) and the field path."""
    try:
        return parse_document(text)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{where}{exc}") from None


def _liveness_pb(lv: Liveness, exports: int) -> pb.ClusterLiveness:
    return pb.ClusterLiveness(
        cluster=lv.cluster,
        exports=exports,
        lease_ttl=lv.lease_ttl,
        lease_remaining=lv.lease_remaining,
        last_heartbeat_age=lv.last_heartbeat_age,
        published_at=lv.published_at,
        state=lv.state,
    )


def _previous_cas(record: models.ClusterRecord) -> list[x509.Certificate]:
    """The CA a re-join replaces (the ones it replaced are revoked already, and kept)."""
    pems = [record.ca_cert_pem] if record.ca_cert_pem else []
    pems += list(record.previous_ca_certs_pem)
    out: list[x509.Certificate] = []
    now = datetime.datetime.now(datetime.timezone.utc)
    for pem in pems:
        # Expired ones need no revocation entry any more: the list stays short.
        out.extend(c for c in x509.load_pem_x509_certificates(pem.encode()) if c.not_valid_after_utc > now)
    return out


def _same_key(cert: x509.Certificate, key: object) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_bytes(*fmt)  # type: ignore[attr-defined]


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()

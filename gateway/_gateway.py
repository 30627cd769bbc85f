"""The gateway: listeners, TLS, identity checks, pools, config swaps (the trio shell).

Three listeners (plus one per opaque TCP port):

* inbound (peer-facing): mTLS with ALPN ``h2``; the peer must be the gateway of a joined,
  non-revoked cluster.  Requests name exported services and are re-originated to them
  (mTLS with our certificate, or plain, per ``ServicePort.target_tls``);
* outbound (workload-facing): mTLS with workload certificates, or plain where allowed;
  HTTP/2 (ALPN or prior knowledge) and HTTP/1.1; routes imported names to peer gateways;
* admin: see :mod:`gateway._admin`.

The route table is swapped whole; each request reads ``self.table`` once, so new config
applies to new requests while streams in flight finish on the old one.  TLS contexts
come from :class:`trust.CertificateSource`, read per new connection: renewed certificates
apply to new connections, old ones keep theirs.
"""

from __future__ import annotations

import errno
import functools
import os
import socket as _socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio
from cryptography import x509

import trust
from federation.models import Snapshot

from ._abuse import FrameGuard, HeadersDeadlineStream, Shield, refuse_connection
from ._config import GatewayConfig
from ._deadlines import Deadlines, parse_grpc_timeout
from ._errors import ConfigError, GatewayError, UpstreamError
from ._h1 import H1Connection, H1Half, H1Pool, H1Upstream
from ._io import PrefixedStream, TcpHalf, h2_connection, link, new_upstream, pump_h2
from ._pool import Pool
from ._authz import Authz, Parked, PolicyState
from ._proxy import Authorizer, Forward, Reject, allow_all, inbound, outbound, refusal, strip
from ._relay import H2Endpoint, H2Half, Headers
from ._routes import LocalTarget, OutboundRoute, PeerCluster, RouteTable, build_routes
from ._telemetry import Exchange, Metrics, Recorder
from ._tlsrefusal import handshake_failure, refuse_plaintext

log = structlog.get_logger("isthmus.gateway")

GATEWAY_PATH = "/ns/isthmus-system/sa/isthmus-gateway"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def is_gateway(sid: trust.SpiffeId) -> bool:
    return sid.path == GATEWAY_PATH


@dataclass(frozen=True)
class ConnInfo:
    """What the per-connection abuse-limits hook sees."""

    listener: str
    peer_principal: str
    remote: str


# Per-connection abuse-limits hook: return False to refuse the connection.
ConnectionGuard = Callable[[ConnInfo], bool]


def _listen(host: str, port: int, reuse_port: bool) -> trio.SocketListener:
    family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
    sock = _socket.socket(family, _socket.SOCK_STREAM)
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = " (is another gateway running?)" if exc.errno == errno.EADDRINUSE else ""
        raise GatewayError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None
    sock.listen(4096)
    sock.setblocking(False)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


class Gateway:
    def __init__(self, cfg: GatewayConfig, *, authorize: Authorizer = allow_all,
                 jwks_store: Any = None,
                 guard: ConnectionGuard | None = None, reuse_port: bool = False) -> None:
        self.cfg = cfg
        self.limits = cfg.limits
        self.authorize = authorize
        self.guard = guard
        self.reuse_port = reuse_port
        tls = cfg.tls
        watched = [tls.cert_file, tls.key_file, tls.bundle_file]
        files = (tls.cert_file, tls.key_file, tls.bundle_file)
        try:
            self.inbound_tls = trust.CertificateSource(
                functools.partial(trust.server_context, *files, alpn=("h2",)), watched)
            self.outbound_tls = trust.CertificateSource(
                functools.partial(trust.server_context, *files, alpn=("h2", "http/1.1")), watched)
            self.client_tls = trust.CertificateSource(
                functools.partial(trust.client_context, tls.bundle_file, tls.cert_file,
                                  tls.key_file, alpn=("h2",)), watched)
            self.client_tls_h1 = trust.CertificateSource(
                functools.partial(trust.client_context, tls.bundle_file, tls.cert_file,
                                  tls.key_file, alpn=("http/1.1",)), watched)
        except trust.TrustError as exc:
            raise ConfigError(f"invalid gateway config: tls: {exc}") from None
        leaf = self.inbound_tls.leaf()
        assert leaf is not None
        ids = trust.spiffe_ids_of(leaf)
        if len(ids) != 1:
            raise ConfigError(f"invalid gateway config: tls.cert_file {tls.cert_file}: "
                              "the certificate must carry exactly one SPIFFE ID")
        self.identity = trust.SpiffeId.parse(ids[0])
        self.trust_domain = self.identity.trust_domain
        self.cluster = cfg.cluster or self.trust_domain.split(".", 1)[0]
        self.metrics = Metrics()
        self.metrics.cert_expiry.set(leaf.not_valid_after_utc.timestamp())
        self.recorder = Recorder(self.metrics, cfg.access_log)
        # Abuse containment: per-IP / per-peer caps, memory shedding (see _abuse).
        self.shield = Shield(self.limits, self.metrics.overload)
        self.table = RouteTable(0, self.cluster, cfg.dns_suffix)
        self.snapshot: Snapshot | None = None
        self.revocations = trust.Revocations()
        self.config_source = "none"
        self.last_confirmed = time.time()
        self.metrics.config_staleness.set_function(lambda: time.time() - self.last_confirmed)
        self.ready = False
        self.ports: dict[str, int] = {}
        self.deadlines = Deadlines()
        self.downstream = {"inbound": 0, "outbound": 0, "tcp": 0}
        self._rr: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None
        self.peer_pool: Pool | None = None
        self.svc_pool: Pool | None = None
        self._tls_generation = self.client_tls.generation
        self.endpoints: set[H2Endpoint] = set()
        self.h1_pool = H1Pool()  # every live HTTP/2 connection (introspection)
        # Federation AuthorizationPolicy + JWT; ``authorize`` runs after it (see _authz).
        self.authz = Authz(authorize, jwks_store, cluster=self.cluster)
        self.policy: PolicyState = self.authz.build(None)
        if cfg.static is not None:
            self.apply_snapshot(cfg.static, source="file")

    # -- config -------------------------------------------------------------------------
    def apply_snapshot(self, snap: Snapshot, source: str = "federation") -> RouteTable:
        """Swap in the routes of ``snap`` (new requests use them; streams in flight don't care)."""
        table = build_routes(snap, self.cluster, self.cfg.dns_suffix)
        crl = snap.crl_pem.encode() if snap.crl_pem else b""
        if not crl and self.cfg.tls.crl_file is not None and self.cfg.tls.crl_file.exists():
            crl = self.cfg.tls.crl_file.read_bytes()
        intermediates: list[x509.Certificate] = []
        for c in snap.clusters:
            # A re-joined cluster's earlier CAs are revoked: map the CRL onto them too.
            for pem in (c.ca_cert_pem, *c.previous_ca_certs_pem):
                if not pem:
                    continue
                try:
                    intermediates.extend(x509.load_pem_x509_certificates(pem.encode()))
                except ValueError:
                    log.warning("config.bad_cluster_ca", cluster=c.name)
        try:
            self.revocations = trust.Revocations.from_crl(crl or None, intermediates)
        except trust.TrustError as exc:
            log.warning("config.bad_crl", error=str(exc))
        policy = self.authz.build(snap)
        # Routes and policies swap together (no await in between): a request reads both
        # in one synchronous step, so it never mixes two revisions.
        self.table, self.policy = table, policy
        self.metrics.policy_revision.set(policy.revision)
        self.metrics.policy_errors.set(len(policy.failed))
        self.snapshot = snap
        self.config_source = source
        self.last_confirmed = time.time()
        self.metrics.config_revision.set(snap.revision)
        self.ready = True
        log.info("config.applied", revision=snap.revision, source=source,
                 imported=len(table.outbound), exported=len(table.inbound),
                 peers=len(table.peers_by_td))
        return table

    def confirm_current(self) -> None:
        self.last_confirmed = time.time()

    def buffered_bytes(self) -> int:
        """Bytes held by the relay right now (queued in halves + h2 output buffers)."""
        total = 0
        for ep in self.endpoints:
            total += len(ep.conn._data_to_send)
            for h in ep.halves.values():
                total += sum(len(item[1]) for item in h.q if item[0] == 1)
        return total

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
                  extra: Callable[[Gateway, trio.Nursery], None] | None = None) -> None:
        from ._admin import serve_admin

        cfg = self.cfg
        listeners = {
            "inbound": _listen(cfg.inbound.host, cfg.inbound.port, self.reuse_port),
            "outbound": _listen(cfg.outbound.host, cfg.outbound.port, self.reuse_port),
        }
        admin = _listen(cfg.admin.host, cfg.admin.port, self.reuse_port)
        tcp = [(t, _listen(t.host, t.port, self.reuse_port)) for t in cfg.tcp_ports]
        for name, lst in listeners.items():
            self.ports[name] = lst.socket.getsockname()[1]
        self.ports["admin"] = admin.socket.getsockname()[1]
        for t, lst in tcp:
            self.ports[f"tcp:{t.target}"] = lst.socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.peer_pool = Pool(nursery, self.limits, self._dial_peer, self._pool_changed)
            self.svc_pool = Pool(nursery, self.limits, self._dial_service, self._pool_changed)
            nursery.start_soon(self.deadlines.run)
            nursery.start_soon(self.shield.memory.run)
            nursery.start_soon(self.authz.run)
            nursery.start_soon(self._accept, listeners["inbound"], self._handle_inbound)
            nursery.start_soon(self._accept, listeners["outbound"], self._handle_outbound)
            for t, lst in tcp:
                nursery.start_soon(self._accept, lst,
                                   functools.partial(self._handle_tcp_port, t.target))
            nursery.start_soon(serve_admin, self, admin)
            if extra is not None:
                extra(self, nursery)
            log.info("gateway.started", cluster=self.cluster, identity=str(self.identity),
                     **{f"port_{k.split(':')[0]}": v for k, v in self.ports.items()})
            task_status.started(self)

    def stop(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _accept(self, listener: trio.SocketListener, handler: Any) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.warning("listener.accept_failed", error=exc.strerror)
                        await trio.sleep(0.1)
                        continue
                    raise
                assert self._nursery is not None
                self._nursery.start_soon(self._guarded, handler, stream)

    async def _guarded(self, handler: Any, stream: trio.abc.Stream) -> None:
        """A bug in one connection's handling must not take the gateway down."""
        # Counted from accept, so connections still in their TLS handshake count too.
        ip = _remote_ip(stream)
        if not self.shield.accept(ip):
            await trio.aclose_forcefully(stream)
            return
        try:
            await handler(stream)
        except Exception as exc:  # noqa: BLE001 - logged with traceback, connection dropped
            log.error("connection.crashed", error=repr(exc), exc_info=True)
            await trio.aclose_forcefully(stream)
        finally:
            self.shield.release(ip)

    def _guard_h2(self, ep: H2Endpoint, listener: str, peer: str,
                  remote: str) -> tuple[FrameGuard, Callable[[str, str], None]]:
        """Abuse limits for a downstream HTTP/2 connection: frame guard, output ceiling."""
        guard = FrameGuard(self.limits, trio.current_time,
                           lambda: self.shield.reject("max_concurrent_streams"))
        guard.install(ep.conn)
        guard.close_on_rapid_reset = listener != "inbound"
        ep.out_limit = self.limits.max_outbound_buffer
        ep.on_request = self.shield.shed_streams(ep.on_request)  # type: ignore[arg-type]

        def on_abuse(reason: str, detail: str) -> None:
            self.metrics.abuse_closed.labels(listener, reason).inc()
            log.warning("abuse.connection_closed", listener=listener, peer=peer or None,
                        remote=remote, reason=reason, detail=detail)
            if listener != "inbound":
                # Workloads only: a peer gateway's IP carries many clients' traffic.
                self.shield.penalize(remote, reason)

        return guard, on_abuse

    def _pool_changed(self, key: Any, n: int) -> None:
        self.metrics.pool_connections.labels(str(key[1])).set(n)

    def _check_tls_generation(self) -> None:
        # Renewed certificates: new connections only; let old pooled ones drain.  current()
        # re-stats the files (at most once per check interval): without it a busy pool
        # would never dial, so the renewal would never be noticed.
        self.client_tls.current()
        gen = self.client_tls.generation
        if gen != self._tls_generation:
            self._tls_generation = gen
            for pool in (self.peer_pool, self.svc_pool):
                if pool is not None:
                    pool.drain_all()

    # -- connection admission -------------------------------------------------------------
    def _admit(self, listener: str, peer: str, stream: Any) -> bool:
        if self.downstream.get(listener, 0) >= self.limits.max_downstream_connections:
            self.shield.reject("downstream_connections", listener=listener)
            return False
        if self.guard is not None:
            remote = ""
            try:
                remote = str(stream.socket.getpeername()[0])
            except (AttributeError, OSError):
                pass
            if not self.guard(ConnInfo(listener, peer, remote)):
                self.metrics.overload.labels("guard").inc()
                return False
        return True

    async def _tls_accept(self, stream: trio.abc.Stream, ctx: ssl.SSLContext) -> trio.SSLStream | None:
        tls = trio.SSLStream(stream, ctx, server_side=True)
        try:
            with trio.fail_after(self.limits.handshake_timeout):
                await tls.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            log.info("tls.handshake_failed", **handshake_failure(exc))
            await trio.aclose_forcefully(stream)
            return None
        return tls

    def _peer_policy(self) -> trust.PeerPolicy:
        return trust.PeerPolicy(trust_domains=self.table.trust_domains(),
                                revocations=self.revocations, ids=is_gateway)

    # -- inbound --------------------------------------------------------------------------
    async def _handle_inbound(self, stream: trio.SocketStream) -> None:
        tls = await self._tls_accept(stream, self.inbound_tls.current())
        if tls is None:
            return
        try:
            sid = trust.verify_peer(tls.getpeercert(binary_form=True), self._peer_policy())
        except trust.PeerRejected as exc:
            log.warning("inbound.peer_rejected", error=str(exc))
            await trio.aclose_forcefully(tls)
            return
        if tls.selected_alpn_protocol() != "h2":
            log.warning("inbound.no_h2", peer=str(sid))
            await trio.aclose_forcefully(tls)
            return
        if not self._admit("inbound", str(sid), stream):
            await refuse_connection(tls, True, "gateway connection limit reached")
            return
        if not self.shield.admit_peer(str(sid)):
            await refuse_connection(tls, True, "too many connections from this peer")
            return
        ep = H2Endpoint(h2_connection(False, self.limits, trusted=True))
        ep.on_request = functools.partial(self._inbound_request, sid)
        guard, on_abuse = self._guard_h2(ep, "inbound", str(sid), _remote_ip(stream))
        self.downstream["inbound"] += 1
        self.metrics.downstream_connections.labels("inbound").inc()
        self.endpoints.add(ep)
        try:
            await pump_h2(tls, ep, self.limits.idle_timeout, guard=guard, on_abuse=on_abuse)
        finally:
            self.shield.release_peer(str(sid))
            self.endpoints.discard(ep)
            self.downstream["inbound"] -= 1
            self.metrics.downstream_connections.labels("inbound").dec()

    def _inbound_request(self, sid: trust.SpiffeId, half: H2Half, headers: Headers,
                         end: bool) -> None:
        x = Exchange("destination", "HTTP/2", self.recorder)
        half.x = x
        x.destination_principal = str(self.identity)
        table = self.table
        peer = table.peer(sid.trust_domain)
        if peer is None:  # revoked or removed since the connection was made
            x.peer_principal = str(sid)
            x.response_flags = "RBAC"
            half.respond(403, [(b"content-type", b"text/plain")], b"peer cluster not joined\n")
            return
        d = inbound(headers, table, peer, str(sid), self.policy, x)
        if isinstance(d, Reject):
            self._reject(half, x, d)
            return
        if d.pending is not None:
            # Decision waits on a JWKS fetch: park the request, decide in a thread.
            parked = Parked()
            link(half, parked)
            assert self._nursery is not None
            self._nursery.start_soon(self._resume_inbound, half, parked, d, headers, end, x)
            return
        self._forward_inbound(half, d, headers, end, x)

    async def _resume_inbound(self, half: H2Half, parked: Parked, d: Forward, headers: Headers,
                              end: bool, x: Exchange) -> None:
        assert d.pending is not None
        try:
            decision = await trio.to_thread.run_sync(d.pending, abandon_on_cancel=True)
        except Exception as exc:  # noqa: BLE001 - fail closed, never crash the gateway
            log.error("authz.pending_failed", error=repr(exc), exc_info=True)
            decision = None
        if parked.aborted or half.closed:
            return  # the caller went away meanwhile
        denied = refusal(decision, x, x.peer_principal) if decision is not None else \
            Reject("RBAC", "RBAC: access denied (authorization failed)", 403)
        if denied is not None:
            parked.release()
            self._reject(half, x, denied)
            return
        if decision is not None and decision.strip_headers:
            d.headers = strip(d.headers, decision.strip_headers)
        self._forward_inbound(half, d, headers, end, x)
        if half.peer is not parked:
            parked.replay(half.peer)

    def _forward_inbound(self, half: H2Half, d: Forward, headers: Headers, end: bool,
                         x: Exchange) -> None:
        target: LocalTarget = d.route
        x.upstream_cluster = f"inbound|{target.port}||{target.destination_service}"
        x.upstream_host = f"{target.host}:{target.target_port}"
        self._deadline(half, headers, x)
        if d.connect:
            self._connect_local(half, target, x)
            return
        if target.protocol == "HTTP":
            # Plain "HTTP" services may speak HTTP/1.1 only: re-originate with h11.
            h1 = H1Upstream(self.limits.tcp_buffer)
            link(half, h1)
            h1.write_headers(d.headers, end)
            assert self._nursery is not None
            self._nursery.start_soon(self._run_h1_upstream, h1, target)
            return
        up = new_upstream()
        link(half, up)
        up.write_headers(d.headers, end)
        self._check_tls_generation()  # renewed certificate: drain the service pool too
        assert self.svc_pool is not None
        self.svc_pool.open(("svc", target.host, target.target_port, target.tls), up)

    async def _run_h1_upstream(self, h1: H1Upstream, target: LocalTarget) -> None:
        async def connect() -> trio.abc.Stream:
            with trio.fail_after(self.limits.connect_timeout):
                tcp = await trio.open_tcp_stream(target.host, target.target_port)
            _nodelay(tcp)
            if not target.tls:
                return tcp
            return await self._tls_client(tcp, target.host, None,
                                          frozenset({self.trust_domain}), ctx=self.client_tls_h1)

        try:
            await h1.run((target.host, target.target_port, target.tls), self.h1_pool, connect)
        except Exception as exc:  # noqa: BLE001 - as in _guarded
            log.error("connection.crashed", error=repr(exc), exc_info=True)
            if h1.peer is not None:
                h1.peer.abort(8, "UF", "upstream failed")

    def _connect_local(self, half: H2Half, target: LocalTarget, x: Exchange) -> None:
        x.tcp = True
        assert self._nursery is not None
        self._nursery.start_soon(self._run_connect_local, half, target, x)

    async def _run_connect_local(self, half: H2Half, target: LocalTarget, x: Exchange) -> None:
        try:
            await self._connect_local_inner(half, target, x)
        except Exception as exc:  # noqa: BLE001 - as in _guarded
            log.error("connection.crashed", error=repr(exc), exc_info=True)
            half.abort(8, "UF", "tunnel failed")

    async def _connect_local_inner(self, half: H2Half, target: LocalTarget, x: Exchange) -> None:
        try:
            with trio.fail_after(self.limits.connect_timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(target.host, target.target_port)
                if target.tls:
                    stream = await self._tls_client(stream, target.host, alpn=None,
                                                    allowed=frozenset({self.trust_domain}))
        except (OSError, trio.TooSlowError, UpstreamError, ssl.SSLError,
                trio.BrokenResourceError) as exc:
            log.info("connect.failed", target=x.upstream_host, error=str(exc))
            half.abort(8, "UF", "upstream connect failed")
            return
        up = TcpHalf(stream, self.limits.tcp_buffer)
        link(half, up)
        self.recorder.tcp_opened(x)
        half.write_headers([(b":status", b"200")], False)
        up.open_ok.set()
        await up.run()

    # -- outbound -------------------------------------------------------------------------
    async def _handle_outbound(self, stream: trio.SocketStream) -> None:
        try:
            with trio.fail_after(self.limits.handshake_timeout):
                first = await stream.receive_some(4096)
        except (trio.TooSlowError, trio.BrokenResourceError, OSError):
            await trio.aclose_forcefully(stream)
            return
        if not first:
            await stream.aclose()
            return
        caller = ""
        s: trio.abc.Stream = PrefixedStream(stream, first)
        if first[0] == 0x16:  # TLS handshake record
            tls = await self._tls_accept(s, self.outbound_tls.current())
            if tls is None:
                return
            try:
                caller = str(trust.verify_peer(
                    tls.getpeercert(binary_form=True),
                    trust.PeerPolicy(trust_domains=frozenset({self.trust_domain}),
                                     revocations=self.revocations)))
            except trust.PeerRejected as exc:
                log.warning("outbound.client_rejected", error=str(exc))
                await trio.aclose_forcefully(tls)
                return
            h2 = tls.selected_alpn_protocol() == "h2"
            s, scheme = tls, b"https"
        elif not self.cfg.outbound_allow_plain:
            log.info("outbound.plain_refused", remote=_remote_ip(stream))
            await refuse_plaintext(stream, first)  # a readable 400, not an empty reply
            return
        else:
            h2 = first.startswith(H2_PREFACE[: len(first)]) if len(first) < 24 else \
                first.startswith(H2_PREFACE)
            scheme = b"http"
        if not self._admit("outbound", caller, stream):
            await refuse_connection(s, h2, "gateway connection limit reached")
            return
        self.downstream["outbound"] += 1
        self.metrics.downstream_connections.labels("outbound").inc()
        try:
            if h2:
                ep = H2Endpoint(h2_connection(False, self.limits, trusted=False))
                ep.on_request = functools.partial(self._outbound_request, caller, "HTTP/2")
                guard, on_abuse = self._guard_h2(ep, "outbound", caller, _remote_ip(stream))
                self.endpoints.add(ep)
                try:
                    await pump_h2(s, ep, self.limits.idle_timeout, guard=guard,
                                  on_abuse=on_abuse)
                finally:
                    self.endpoints.discard(ep)
            else:
                remote = _remote_ip(stream)
                slow = HeadersDeadlineStream(s, self.limits.request_headers_timeout, lambda: (
                    self.metrics.abuse_closed.labels("outbound", "headers_timeout").inc(),
                    log.warning("abuse.connection_closed", listener="outbound",
                                remote=remote, reason="headers_timeout",
                                detail="HTTP/1.1 request headers too slow")))
                on_request = self.shield.shed_streams(
                    functools.partial(self._outbound_request, caller, "HTTP/1.1"))
                conn = H1Connection(
                    slow, scheme, self.limits.tcp_buffer, slow.wrap_on_request(on_request),
                    lambda: None, self.limits.idle_timeout)
                await conn.run()
        finally:
            self.downstream["outbound"] -= 1
            self.metrics.downstream_connections.labels("outbound").dec()

    def _outbound_request(self, caller: str, protocol: str, half: Any, headers: Headers,
                          end: bool) -> None:
        x = Exchange("source", protocol, self.recorder)
        half.x = x
        x.source_principal = caller
        x.source_cluster = self.cluster
        d = outbound(headers, self.table, caller, x)
        if isinstance(d, Reject):
            self._reject(half, x, d)
            return
        if d.connect and isinstance(half, H1Half):
            self._reject(half, x, Reject("NR", "CONNECT needs HTTP/2", 405))
            return
        route: OutboundRoute = d.route
        pc = self._pick(route)
        if pc is None:
            self._reject(half, x, Reject("UH", f"no healthy cluster serves {x.authority}", 503))
            return
        self._fill_upstream(x, route, pc)
        self._deadline(half, headers, x)
        if d.connect:
            x.tcp = True
            self.recorder.tcp_opened(x)
        up = new_upstream()
        link(half, up)
        up.write_headers(d.headers, end)
        self._check_tls_generation()
        assert self.peer_pool is not None
        self.peer_pool.open(self._peer_key(pc), up)

    def _peer_key(self, pc: PeerCluster) -> tuple[str, str, str, str]:
        """Pool key of a peer: its first gateway address not backing off."""
        pool = self.peer_pool
        for address in pc.addresses:
            key = ("peer", pc.name, pc.trust_domain, address)
            if pool is None or pool.healthy(key):
                return key
        return ("peer", pc.name, pc.trust_domain, pc.addresses[0])

    def _fill_upstream(self, x: Exchange, route: OutboundRoute, pc: PeerCluster) -> None:
        x.destination_cluster = pc.name
        x.destination_principal = str(trust.gateway_id(pc.trust_domain))
        x.upstream_cluster = f"outbound|{route.port}||{route.destination_service}|{pc.name}"
        x.upstream_host = self._peer_key(pc)[3]

    def _pick(self, route: OutboundRoute) -> PeerCluster | None:
        """Round-robin over the exporting clusters, skipping ones backing off."""
        clusters = [c for c in route.clusters if c.addresses]
        if not clusters:
            return None
        n = self._rr.get(route.authority, 0)
        self._rr[route.authority] = n + 1
        pool = self.peer_pool
        for i in range(len(clusters)):
            pc = clusters[(n + i) % len(clusters)]
            if pool is None or any(pool.healthy(("peer", pc.name, pc.trust_domain, a))
                                   for a in pc.addresses):
                return pc
        return clusters[n % len(clusters)]

    def _reject(self, half: Any, x: Exchange, d: Reject) -> None:
        x.response_flags = d.flags
        if x.grpc:
            from ._relay import _FLAG_GRPC
            half.respond_grpc(d.grpc_status or _FLAG_GRPC.get(d.flags, 14), d.message)
        elif d.status:
            half.respond(d.status, [(b"content-type", b"text/plain"), *d.headers],
                         d.message.encode() + b"\n")
        else:
            half.respond_error(d.flags, d.message)

    def _deadline(self, half: Any, headers: Headers, x: Exchange) -> None:
        if not x.grpc:
            return
        for k, v in headers:
            if k == b"grpc-timeout":
                t = parse_grpc_timeout(v)
                if t is not None:
                    x.deadline = trio.current_time() + t
                    self.deadlines.add(x.deadline, half)
                return

    # -- opaque TCP ports -------------------------------------------------------------------
    async def _handle_tcp_port(self, target: str, stream: trio.SocketStream) -> None:
        x = Exchange("source", "TCP", self.recorder)
        x.tcp = True
        x.source_cluster = self.cluster
        x.authority = target
        route = self.table.outbound_route(target)
        pc = self._pick(route) if route is not None else None
        if route is None or pc is None:
            x.response_flags = "NR" if route is None else "UH"
            log.info("tcp.no_route", target=target)
            await trio.aclose_forcefully(stream)
            x.finish()
            return
        if not self._admit("tcp", "", stream):
            await trio.aclose_forcefully(stream)
            return
        x.destination_service = route.destination_service
        self._fill_upstream(x, route, pc)
        down = TcpHalf(stream, self.limits.tcp_buffer, x=x, down=True)
        up = new_upstream()
        link(down, up)
        self.recorder.tcp_opened(x)
        from ._proxy import traceparent
        tp, x.trace_id = traceparent(None)
        up.write_headers([(b":method", b"CONNECT"), (b":authority", route.authority.encode()),
                          (b"traceparent", tp)], False)
        assert self.peer_pool is not None
        self.peer_pool.open(self._peer_key(pc), up)
        self.downstream["tcp"] += 1
        try:
            await down.run()
        finally:
            self.downstream["tcp"] -= 1
            if not up.closed:
                up.abort(8, "DC")
            x.finish()

    # -- dialling ----------------------------------------------------------------------------
    async def _tls_client(self, stream: trio.abc.Stream, host: str, alpn: str | None,
                          allowed: frozenset[str], require_gateway: bool = False,
                          session: Any = None, ctx: Any = None) -> trio.SSLStream:
        ctx = (ctx or self.client_tls).current()
        tls = trio.SSLStream(stream, ctx, server_hostname=host or None)
        if session is not None:
            try:
                tls.session = session
            except (ValueError, AttributeError, ssl.SSLError):
                pass
        with trio.fail_after(self.limits.handshake_timeout):
            await tls.do_handshake()
        try:
            trust.verify_peer(tls.getpeercert(binary_form=True),
                              trust.PeerPolicy(trust_domains=allowed, revocations=self.revocations,
                                               ids=is_gateway if require_gateway else None))
        except trust.PeerRejected as exc:
            await trio.aclose_forcefully(tls)
            raise UpstreamError(str(exc), "UF") from None
        if alpn is not None and tls.selected_alpn_protocol() != alpn:
            await trio.aclose_forcefully(tls)
            raise UpstreamError(f"{host}: upstream did not negotiate {alpn}", "UF")
        return tls

    async def _dial_peer(self, key: Any, nursery: trio.Nursery) -> H2Endpoint:
        _, name, td, address = key
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        with trio.fail_after(self.limits.connect_timeout):
            tcp = await trio.open_tcp_stream(host, int(port))
        _nodelay(tcp)
        assert self.peer_pool is not None
        entry = self.peer_pool.entries.get(key)
        session = getattr(entry, "session_source", None)
        session = _session_of(session)
        tls = await self._tls_client(tcp, host, "h2", frozenset({td}), require_gateway=True,
                                     session=session)
        if entry is not None:
            entry.session_source = tls  # type: ignore[attr-defined]
        ep = H2Endpoint(h2_connection(True, self.limits, trusted=True), info=key)
        nursery.start_soon(self._run_pooled, self.peer_pool, key, tls, ep)
        log.info("pool.connected", peer=name, address=address,
                 resumed=bool(tls.session_reused))
        return ep

    async def _dial_service(self, key: Any, nursery: trio.Nursery) -> H2Endpoint:
        _, host, port, use_tls = key
        with trio.fail_after(self.limits.connect_timeout):
            tcp = await trio.open_tcp_stream(host, port)
        _nodelay(tcp)
        stream: trio.abc.Stream = tcp
        if use_tls:
            stream = await self._tls_client(tcp, host, "h2", frozenset({self.trust_domain}))
        ep = H2Endpoint(h2_connection(True, self.limits, trusted=True), info=key)
        assert self.svc_pool is not None
        nursery.start_soon(self._run_pooled, self.svc_pool, key, stream, ep)
        return ep

    async def _run_pooled(self, pool: Pool, key: Any, stream: trio.abc.Stream,
                          ep: H2Endpoint) -> None:
        def idle(e: H2Endpoint) -> None:
            if e.draining:
                e.conn.close_connection()
                e.closed = True
                e.mark()

        ep.on_idle = idle
        self.endpoints.add(ep)
        try:
            await pump_h2(stream, ep, self.limits.idle_timeout)
        except Exception as exc:  # noqa: BLE001 - as in _guarded
            log.error("connection.crashed", error=repr(exc), exc_info=True)
        finally:
            self.endpoints.discard(ep)
            pool.closed(key, ep)


def _remote_ip(stream: Any) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except (AttributeError, OSError, IndexError):
        return ""


def _nodelay(stream: trio.SocketStream) -> None:
    try:
        stream.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, True)
    except OSError:
        pass


def _session_of(tls: Any) -> Any:
    if tls is None:
        return None
    try:
        return tls.session
    except (AttributeError, ssl.SSLError, trio.NeedHandshakeError):
        return None


__all__ = ["ConnInfo", "ConnectionGuard", "Gateway", "is_gateway", "os"]

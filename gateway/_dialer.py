"""The dialer: upstream connections to peer gateways and local services (trio shell).

* Peer gateways: pooled, multiplexed mTLS HTTP/2 (:class:`gateway._pool.Pool`, keyed by
  ``("peer", cluster, trust domain, address)``), with TLS session resumption; the peer
  must present the gateway identity of the cluster we dialled.
* Local HTTP/2 and gRPC services: pooled HTTP/2, plain or mTLS with our own certificate
  (the service must lie in our trust domain).
* Local ``protocol: HTTP`` services: HTTP/1.1 keep-alive connections
  (:mod:`gateway._h1io`); CONNECT tunnels: a TCP (or TLS) socket per tunnel.

Which cluster serves a request is :mod:`federation.traffic`'s choice; the dialer feeds it
live health (:meth:`Dialer.health`): a peer cluster whose every gateway address is
failing (its last dial failed and no connection is up) is out until a background
re-dial (the pool's probe) succeeds, so requests are not spent discovering that a peer
is still down.  Within a cluster, its first address not backing off.
When the gateway's client certificate is renewed, both pools drain (no new streams on
old connections; they close when idle), so the renewed identity is in use within about
a second.
"""

from __future__ import annotations

import socket as _socket
import ssl
from collections.abc import Callable
from typing import Any

import structlog
import trio
from h2.errors import ErrorCodes

from federation.traffic import UNREACHABLE, Out, Target

from ._config import Limits
from ._context import RequestContext
from ._errors import UpstreamError
from ._h1 import H1Upstream
from ._h1io import H1Pool, run_h1_upstream
from ._h2 import ConnectionFactory
from ._half import Half, link
from ._io import TcpHalf, pump_h2
from ._pool import Pool
from ._relay import H2Endpoint, H2Half
from ._routes import LocalTarget, PeerCluster
from ._state import ConfigState
from ._telemetry import Metrics, Recorder
from ._tls import GatewayTls, session_of

log = structlog.get_logger("isthmus.gateway")

PeerKey = tuple[str, str, str, str]  # ("peer", cluster, trust domain, "host:port")
ServiceKey = tuple[str, str, int, bool]  # ("svc", host, port, mtls)


def nodelay(stream: trio.SocketStream) -> None:
    try:
        stream.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, True)
    except OSError:
        pass


class Dialer:
    """Owns the upstream pools; opens upstream halves for the request handlers."""

    def __init__(self, limits: Limits, tls: GatewayTls, state: Callable[[], ConfigState],
                 metrics: Metrics, recorder: Recorder, endpoints: set[H2Endpoint],
                 connect: ConnectionFactory) -> None:
        self.limits = limits
        self.connect = connect  # HTTP/2 connections on the gateway's core
        self.tls = tls
        self.state = state
        self.metrics = metrics
        self.recorder = recorder
        self.endpoints = endpoints  # every live HTTP/2 connection (introspection)
        self.peer_pool: Pool | None = None
        self.svc_pool: Pool | None = None
        self.h1_pool = H1Pool()
        self._sessions: dict[Any, Any] = {}  # peer key -> last TLS stream (session resumption)

    def start(self, nursery: trio.Nursery) -> None:
        self.peer_pool = Pool(nursery, self.limits, self._dial_peer, self._pool_changed,
                              probe=self._still_a_peer)
        self.svc_pool = Pool(nursery, self.limits, self._dial_service, self._pool_changed)

    # -- peer health and choice -----------------------------------------------------------
    def health(self, target: Target) -> Out | None:
        """Live health of a destination for :mod:`federation.traffic` (static reasons —
        revoked, not exported, 0 ready endpoints — were decided when the routes compiled):
        out when every gateway address of its cluster is failing, or (soft: used when
        nothing else serves) when the federation streams the cluster as STALE."""
        pool = self.peer_pool
        if pool is None:
            return None
        error = ""
        for address in target.addresses:
            why = pool.failing(("peer", target.cluster, target.trust_domain, address))
            if why is None:
                return self.state().traffic.stale.get(target.cluster)
            error = error or f"{address}: {why}"
        return Out(UNREACHABLE, error)

    def _still_a_peer(self, key: PeerKey) -> bool:
        """Whether a failing peer key is worth re-dialling: still a peer in force."""
        pc = self.state().routes.peers_by_name.get(key[1])
        return pc is not None and pc.trust_domain == key[2] and key[3] in pc.addresses

    def peer_key(self, pc: PeerCluster) -> PeerKey:
        """Pool key of a peer: its first gateway address neither failing nor backing off."""
        pool = self.peer_pool
        fallback = None
        for address in pc.addresses:
            key = ("peer", pc.name, pc.trust_domain, address)
            if pool is None or (pool.healthy(key) and pool.failing(key) is None):
                return key
            if fallback is None and pool.healthy(key):
                fallback = key
        return fallback or ("peer", pc.name, pc.trust_domain, pc.addresses[0])

    # -- opening upstream halves ----------------------------------------------------------
    def open_peer(self, pc: PeerCluster, up: H2Half, cap: int | None = None) -> None:
        """``cap``: the service's max_connections_per_peer (its TrafficPolicy), if any."""
        self._check_renewal()
        assert self.peer_pool is not None
        self.peer_pool.open(self.peer_key(pc), up, cap)

    def open_service(self, target: LocalTarget, up: H2Half) -> None:
        self._check_renewal()  # renewed certificate: drain the service pool too
        assert self.svc_pool is not None
        self.svc_pool.open(("svc", target.host, target.target_port, target.tls), up)

    def _check_renewal(self) -> None:
        # Renewed certificates: new connections only; let old pooled ones drain.
        if self.tls.client_renewed():
            for pool in (self.peer_pool, self.svc_pool):
                if pool is not None:
                    pool.drain_all()

    async def h1_upstream(self, h1: H1Upstream, target: LocalTarget) -> None:
        """Run one request to an HTTP/1.1 service."""
        async def connect() -> trio.abc.Stream:
            with trio.fail_after(self.limits.connect_timeout):
                tcp = await trio.open_tcp_stream(target.host, target.target_port)
            nodelay(tcp)
            if not target.tls:
                return tcp
            return await self.tls.connect(tcp, target.host, alpn=None,
                                          allowed=frozenset({self.tls.trust_domain}),
                                          revocations=self.state().revocations, http1=True)

        try:
            await run_h1_upstream(h1, (target.host, target.target_port, target.tls),
                                  self.h1_pool, connect)
        except Exception as exc:  # noqa: BLE001 - one request's failure never the gateway's
            log.error("connection.crashed", error=repr(exc), exc_info=True)
            if h1.peer is not None:
                h1.peer.abort(ErrorCodes.CANCEL, "UF", "upstream failed")

    async def connect_local(self, half: Half, target: LocalTarget, ctx: RequestContext) -> None:
        """Run a CONNECT tunnel to a local TCP service."""
        try:
            await self._connect_local(half, target, ctx)
        except Exception as exc:  # noqa: BLE001 - one tunnel's failure never the gateway's
            log.error("connection.crashed", error=repr(exc), exc_info=True)
            half.abort(ErrorCodes.CANCEL, "UF", "tunnel failed")

    async def _connect_local(self, half: Half, target: LocalTarget, ctx: RequestContext) -> None:
        try:
            with trio.fail_after(self.limits.connect_timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(target.host,
                                                                     target.target_port)
                if target.tls:
                    stream = await self.tls.connect(
                        stream, target.host, alpn=None, allowed=frozenset({self.tls.trust_domain}),
                        revocations=self.state().revocations)
        except (OSError, trio.TooSlowError, UpstreamError, ssl.SSLError,
                trio.BrokenResourceError) as exc:
            log.info("connect.failed", target=ctx.record.upstream_host, error=str(exc))
            half.abort(ErrorCodes.CANCEL, "UF", "upstream connect failed")
            return
        up = TcpHalf(stream, self.limits.tcp_buffer)
        link(half, up)
        self.recorder.tcp_opened(ctx.record)
        half.write_headers([(b":status", b"200")], False)
        up.open_ok.set()
        await up.run()

    # -- pooled HTTP/2 connections --------------------------------------------------------
    async def _dial_peer(self, key: PeerKey, nursery: trio.Nursery) -> H2Endpoint:
        _, name, td, address = key
        conn = self.connect(True, True)  # first: a refused session leaves no socket open
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        with trio.fail_after(self.limits.connect_timeout):
            tcp = await trio.open_tcp_stream(host, int(port))
        nodelay(tcp)
        tls = await self.tls.connect(tcp, host, alpn="h2", allowed=frozenset({td}),
                                     revocations=self.state().revocations, require_gateway=True,
                                     session=session_of(self._sessions.get(key)))
        self._sessions[key] = tls
        ep = H2Endpoint(conn, info=key)
        assert self.peer_pool is not None
        nursery.start_soon(self._run_pooled, self.peer_pool, key, tls, ep)
        log.info("pool.connected", peer=name, address=address,
                 resumed=bool(tls.session_reused))
        return ep

    async def _dial_service(self, key: ServiceKey, nursery: trio.Nursery) -> H2Endpoint:
        _, host, port, use_tls = key
        conn = self.connect(True, True)
        with trio.fail_after(self.limits.connect_timeout):
            tcp = await trio.open_tcp_stream(host, port)
        nodelay(tcp)
        stream: trio.abc.Stream = tcp
        if use_tls:
            stream = await self.tls.connect(tcp, host, alpn="h2",
                                            allowed=frozenset({self.tls.trust_domain}),
                                            revocations=self.state().revocations)
        ep = H2Endpoint(conn, info=key)
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
        except Exception as exc:  # noqa: BLE001 - one connection's failure never the gateway's
            log.error("connection.crashed", error=repr(exc), exc_info=True)
        finally:
            self.endpoints.discard(ep)
            pool.closed(key, ep)

    def _pool_changed(self, key: Any, n: int) -> None:
        self.metrics.pool_connections.labels(str(key[1])).set(n)


__all__ = ["Dialer", "PeerKey", "ServiceKey", "nodelay"]

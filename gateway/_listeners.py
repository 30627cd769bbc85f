"""Listeners and admission: sockets, protocol sniffing, per-connection checks (trio shell).

* inbound (peer-facing): mTLS with ALPN ``h2``; the peer must be the gateway of a joined,
  non-revoked cluster (:meth:`GatewayTls.peer_gateway`), within the per-peer cap;
* outbound (workload-facing): the first bytes tell TLS (a handshake record) from plain
  HTTP/2 (the connection preface) and HTTP/1.1; TLS callers are verified workloads of
  our trust domain, plain ones are let in only with ``outbound_allow_plain``;
* one listener per opaque TCP port, tunnelled as HTTP/2 CONNECT.

Every accepted connection is counted per source IP from accept (so handshakes in
progress count, see :class:`gateway._abuse.Shield`), then admitted against the
downstream-connection cap and the optional ``guard`` hook; HTTP/2 downstreams get a
:class:`~gateway._frames.FrameGuard`, on a connection of the core the gateway runs
(:class:`gateway._h2.ConnectionFactory`; a session the core refuses to create refuses
that connection).  Requests are handed to :mod:`gateway._handlers`.
"""

from __future__ import annotations

import errno
import functools
import socket as _socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio
from h2.errors import ErrorCodes

import trust

from . import h2core
from ._abuse import HeadersDeadlineStream, Shield, refuse_connection
from ._config import GatewayConfig
from ._errors import GatewayError
from ._frames import FrameGuard
from ._h2 import ConnectionFactory
from ._h1io import H1Connection
from ._handlers import Handlers
from ._io import PrefixedStream, TcpHalf, pump_h2
from ._relay import H2Endpoint
from ._state import ConfigState
from ._telemetry import Metrics
from ._tls import GatewayTls
from ._tlsrefusal import refuse_plaintext

log = structlog.get_logger("isthmus.gateway")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_TLS_HANDSHAKE = 0x16  # first byte of a TLS handshake record


@dataclass(frozen=True)
class ConnInfo:
    """What the per-connection abuse-limits hook sees."""

    listener: str
    peer_principal: str
    remote: str


# Per-connection abuse-limits hook: return False to refuse the connection.
ConnectionGuard = Callable[[ConnInfo], bool]


def listen(host: str, port: int, reuse_port: bool) -> trio.SocketListener:
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


def sniff(first: bytes) -> str:
    """What a workload connection speaks, from its first bytes: tls, h2 or http/1.1."""
    if first[0] == _TLS_HANDSHAKE:
        return "tls"
    if H2_PREFACE.startswith(first) if len(first) < len(H2_PREFACE) else first.startswith(H2_PREFACE):
        return "h2"
    return "http/1.1"


def socket_addresses(stream: Any) -> tuple[tuple[str, int], tuple[str, int]]:
    """(peer, local) (host, port) of a socket stream; ("", 0) for what is unknown."""
    out = []
    for name in ("getpeername", "getsockname"):
        try:
            addr = getattr(stream.socket, name)()
            out.append((str(addr[0]), int(addr[1])))
        except (AttributeError, OSError, IndexError, TypeError, ValueError):
            out.append(("", 0))
    return out[0], out[1]


def remote_ip(stream: Any) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except (AttributeError, OSError, IndexError):
        return ""


class Listeners:
    """Accepts, admits and serves downstream connections."""

    def __init__(self, cfg: GatewayConfig, tls: GatewayTls, state: Callable[[], ConfigState],
                 handlers: Handlers, shield: Shield, metrics: Metrics,
                 guard: ConnectionGuard | None, endpoints: set[H2Endpoint],
                 connect: ConnectionFactory) -> None:
        self.cfg = cfg
        self.connect = connect
        self.limits = cfg.limits
        self.tls = tls
        self.state = state
        self.handlers = handlers
        self.shield = shield
        self.metrics = metrics
        self.guard = guard
        self.endpoints = endpoints
        self.downstream = {"inbound": 0, "outbound": 0, "tcp": 0}

    # -- accept ---------------------------------------------------------------------------
    async def accept(self, listener: trio.SocketListener,
                     handler: Callable[[trio.SocketStream], Awaitable[None]],
                     nursery: trio.Nursery) -> None:
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
                nursery.start_soon(self._guarded, handler, stream)

    async def _guarded(self, handler: Callable[[trio.SocketStream], Awaitable[None]],
                       stream: trio.SocketStream) -> None:
        """A bug in one connection's handling must not take the gateway down."""
        # Counted from accept, so connections still in their TLS handshake count too.
        ip = remote_ip(stream)
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

    # -- admission ------------------------------------------------------------------------
    def admit(self, listener: str, peer: str, stream: Any) -> bool:
        if self.downstream.get(listener, 0) >= self.limits.max_downstream_connections:
            self.shield.reject("downstream_connections", listener=listener)
            return False
        if self.guard is not None and not self.guard(ConnInfo(listener, peer, remote_ip(stream))):
            self.metrics.overload.labels("guard").inc()
            return False
        return True

    def _guard_h2(self, ep: H2Endpoint, listener: str, peer: str,
                  remote: str) -> tuple[FrameGuard, Callable[[str, str], None]]:
        """Abuse limits for a downstream HTTP/2 connection: frame guard, output ceiling."""
        guard = FrameGuard(self.limits, trio.current_time,
                           lambda: self.shield.reject("max_concurrent_streams"))
        guard.install(ep.conn)
        guard.close_on_rapid_reset = listener != "inbound"
        ep.out_limit = self.limits.max_outbound_buffer
        if ep.on_request is not None:
            ep.on_request = self.shield.shed_streams(ep.on_request)

        def on_abuse(reason: str, detail: str) -> None:
            self.metrics.abuse_closed.labels(listener, reason).inc()
            log.warning("abuse.connection_closed", listener=listener, peer=peer or None,
                        remote=remote, reason=reason, detail=detail)
            if listener != "inbound":
                # Workloads only: a peer gateway's IP carries many clients' traffic.
                self.shield.penalize(remote, reason)

        return guard, on_abuse

    async def _new_endpoint(self, stream: trio.abc.Stream, listener: str,
                            trusted: bool) -> H2Endpoint | None:
        """A server-side endpoint on the gateway's core, or None (connection refused)."""
        try:
            return H2Endpoint(self.connect(False, trusted))
        except h2core.SessionInitError:
            # Logged by the factory (which falls back to h2 after a few of these).
            await refuse_connection(stream, True, "HTTP/2 session could not be created")
            return None

    def _opened(self, listener: str) -> None:
        self.downstream[listener] += 1
        self.metrics.downstream_connections.labels(listener).inc()

    def _closed(self, listener: str) -> None:
        self.downstream[listener] -= 1
        self.metrics.downstream_connections.labels(listener).dec()

    # -- inbound --------------------------------------------------------------------------
    async def inbound(self, stream: trio.SocketStream) -> None:
        tls = await self.tls.accept(stream, self.tls.inbound)
        if tls is None:
            return
        state = self.state()
        try:
            sid = self.tls.peer_gateway(tls, state.routes.trust_domains(), state.revocations)
        except trust.PeerRejected as exc:
            log.warning("inbound.peer_rejected", error=str(exc))
            await trio.aclose_forcefully(tls)
            return
        if tls.selected_alpn_protocol() != "h2":
            log.warning("inbound.no_h2", peer=str(sid))
            await trio.aclose_forcefully(tls)
            return
        if not self.admit("inbound", str(sid), stream):
            await refuse_connection(tls, True, "gateway connection limit reached")
            return
        if not self.shield.admit_peer(str(sid)):
            await refuse_connection(tls, True, "too many connections from this peer")
            return
        ep = await self._new_endpoint(tls, "inbound", trusted=True)
        if ep is None:
            self.shield.release_peer(str(sid))
            return
        ep.on_request = functools.partial(self.handlers.inbound_request, sid, addresses=socket_addresses(stream))
        guard, on_abuse = self._guard_h2(ep, "inbound", str(sid), remote_ip(stream))
        self._opened("inbound")
        self.endpoints.add(ep)
        try:
            await pump_h2(tls, ep, self.limits.idle_timeout, guard=guard, on_abuse=on_abuse)
        finally:
            self.shield.release_peer(str(sid))
            self.endpoints.discard(ep)
            self._closed("inbound")

    # -- outbound -------------------------------------------------------------------------
    async def outbound(self, stream: trio.SocketStream) -> None:
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
        kind = sniff(first)
        if kind == "tls":
            tls = await self.tls.accept(s, self.tls.outbound)
            if tls is None:
                return
            try:
                caller = str(self.tls.workload(tls, self.state().revocations))
            except trust.PeerRejected as exc:
                log.warning("outbound.client_rejected", error=str(exc))
                await trio.aclose_forcefully(tls)
                return
            h2 = tls.selected_alpn_protocol() == "h2"
            s, scheme = tls, b"https"
        elif not self.cfg.outbound_allow_plain:
            log.info("outbound.plain_refused", remote=remote_ip(stream))
            await refuse_plaintext(stream, first)  # a readable 400, not an empty reply
            return
        else:
            h2 = kind == "h2"
            scheme = b"http"
        if not self.admit("outbound", caller, stream):
            await refuse_connection(s, h2, "gateway connection limit reached")
            return
        self._opened("outbound")
        try:
            if h2:
                await self._outbound_h2(s, caller, remote_ip(stream))
            else:
                await self._outbound_h1(s, scheme, caller, remote_ip(stream))
        finally:
            self._closed("outbound")

    async def _outbound_h2(self, s: trio.abc.Stream, caller: str, remote: str) -> None:
        ep = await self._new_endpoint(s, "outbound", trusted=False)
        if ep is None:
            return
        ep.on_request = functools.partial(self.handlers.outbound_request, caller, "HTTP/2")
        guard, on_abuse = self._guard_h2(ep, "outbound", caller, remote)
        self.endpoints.add(ep)
        try:
            await pump_h2(s, ep, self.limits.idle_timeout, guard=guard, on_abuse=on_abuse)
        finally:
            self.endpoints.discard(ep)

    async def _outbound_h1(self, s: trio.abc.Stream, scheme: bytes, caller: str,
                           remote: str) -> None:
        def headers_timed_out() -> None:
            self.metrics.abuse_closed.labels("outbound", "headers_timeout").inc()
            log.warning("abuse.connection_closed", listener="outbound", remote=remote,
                        reason="headers_timeout", detail="HTTP/1.1 request headers too slow")

        slow = HeadersDeadlineStream(s, self.limits.request_headers_timeout, headers_timed_out)
        on_request = self.shield.shed_streams(
            functools.partial(self.handlers.outbound_request, caller, "HTTP/1.1"))
        conn = H1Connection(slow, scheme, self.limits.tcp_buffer, slow.wrap_on_request(on_request),
                            self.limits.idle_timeout)
        await conn.run()

    # -- opaque TCP ports -----------------------------------------------------------------
    async def tcp_port(self, target: str, stream: trio.SocketStream) -> None:
        ctx, route, dest = self.handlers.tcp_route(target)
        if route is None or dest is None:
            await trio.aclose_forcefully(stream)
            ctx.finish()
            return
        if not self.admit("tcp", "", stream):
            await trio.aclose_forcefully(stream)
            return
        down = TcpHalf(stream, self.limits.tcp_buffer)
        up = self.handlers.tcp_open(ctx, route, dest, down)
        if up is None:  # the service's circuit breaker is full
            await trio.aclose_forcefully(stream)
            ctx.finish()
            return
        self.downstream["tcp"] += 1
        try:
            await down.run()
        finally:
            self.downstream["tcp"] -= 1
            if not up.closed:
                up.abort(ErrorCodes.CANCEL, "DC")
            ctx.finish()


__all__ = ["ConnInfo", "ConnectionGuard", "H2_PREFACE", "Listeners", "listen", "remote_ip",
           "sniff"]

"""TLS and identity: the gateway's four TLS contexts and the checks on every peer.

The gateway's certificate (a SPIFFE X.509-SVID of its cluster CA), key and the
federation bundle back four contexts, each a :class:`trust.CertificateSource` that
re-stats the files at most once a second and rebuilds on change, so renewed
certificates apply to *new* connections while established ones keep theirs:

* ``inbound``: server side of the peer-facing listener, ALPN ``h2`` only;
* ``outbound``: server side of the workload-facing listener, ``h2`` and ``http/1.1``;
* ``client``: dialling peer gateways and HTTP/2 services (``h2``);
* ``client_h1``: dialling HTTP/1.1 services (``http/1.1``).

Identity checks (:func:`trust.verify_peer`: chain to the bundle, name constraints,
revocations) are made here too: a peer gateway must carry a *gateway* identity of a
joined, non-revoked cluster; a workload calling the outbound listener, and a service
dialled with mTLS, must lie in our own trust domain.
"""

from __future__ import annotations

import functools
import ssl
from typing import Any

import structlog
import trio

import trust

from ._config import TlsConfig
from ._errors import ConfigError, UpstreamError
from ._tlsrefusal import handshake_failure

log = structlog.get_logger("isthmus.gateway")


def is_gateway(sid: trust.SpiffeId) -> bool:
    """Whether ``sid`` is the gateway identity of its trust domain."""
    return sid == trust.gateway_id(sid.trust_domain)


class GatewayTls:
    """The gateway's TLS contexts, its own identity, and handshakes with identity checks."""

    def __init__(self, cfg: TlsConfig, handshake_timeout: float) -> None:
        self.handshake_timeout = handshake_timeout
        watched = [cfg.cert_file, cfg.key_file, cfg.bundle_file]
        files = (cfg.cert_file, cfg.key_file, cfg.bundle_file)
        client = functools.partial(trust.client_context, cfg.bundle_file, cfg.cert_file,
                                   cfg.key_file)
        try:
            self.inbound = trust.CertificateSource(
                functools.partial(trust.server_context, *files, alpn=("h2",)), watched)
            self.outbound = trust.CertificateSource(
                functools.partial(trust.server_context, *files, alpn=("h2", "http/1.1")), watched)
            self.client = trust.CertificateSource(functools.partial(client, alpn=("h2",)), watched)
            self.client_h1 = trust.CertificateSource(functools.partial(client, alpn=("http/1.1",)),
                                                     watched)
        except trust.TrustError as exc:
            raise ConfigError(f"invalid gateway config: tls: {exc}") from None
        leaf = self.inbound.leaf()
        assert leaf is not None
        ids = trust.spiffe_ids_of(leaf)
        if len(ids) != 1:
            raise ConfigError(f"invalid gateway config: tls.cert_file {cfg.cert_file}: "
                              "the certificate must carry exactly one SPIFFE ID")
        self.identity = trust.SpiffeId.parse(ids[0])
        self.trust_domain = self.identity.trust_domain
        self._expiry = leaf.not_valid_after_utc.timestamp()
        self._expiry_generation = self.inbound.generation
        self._client_generation = self.client.generation

    # -- rotation -------------------------------------------------------------------------
    def leaf_expiry(self) -> float:
        """Expiry (unix time) of the certificate now served: follows rotation."""
        self.inbound.current()  # re-stats the files, at most once per check interval
        gen = self.inbound.generation
        if gen != self._expiry_generation:
            try:
                leaf = self.inbound.leaf()
            except (OSError, ValueError, trust.TrustError) as exc:
                log.warning("tls.leaf_unreadable", error=str(exc))
            else:
                if leaf is not None:
                    self._expiry = leaf.not_valid_after_utc.timestamp()
                    self._expiry_generation = gen
        return self._expiry

    def client_renewed(self) -> bool:
        """True once after each renewal of the client certificate (pools should drain)."""
        # current() re-stats the files (at most once per check interval): without it a busy
        # pool would never dial, so a renewal would never be noticed.
        self.client.current()
        gen = self.client.generation
        if gen == self._client_generation:
            return False
        self._client_generation = gen
        return True

    # -- handshakes -----------------------------------------------------------------------
    async def accept(self, stream: trio.abc.Stream,
                     source: trust.CertificateSource) -> trio.SSLStream | None:
        """Server-side handshake; None (the stream closed) if it fails or is too slow."""
        tls = trio.SSLStream(stream, source.current(), server_side=True)
        try:
            with trio.fail_after(self.handshake_timeout):
                await tls.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            log.info("tls.handshake_failed", **handshake_failure(exc))
            await trio.aclose_forcefully(stream)
            return None
        return tls

    async def connect(self, stream: trio.abc.Stream, host: str, *, alpn: str | None,
                      allowed: frozenset[str], revocations: trust.Revocations,
                      require_gateway: bool = False, session: Any = None,
                      http1: bool = False) -> trio.SSLStream:
        """Client-side handshake and identity check; :class:`UpstreamError` if refused."""
        ctx = (self.client_h1 if http1 else self.client).current()
        tls = trio.SSLStream(stream, ctx, server_hostname=host or None)
        if session is not None:
            try:
                tls.session = session
            except (ValueError, AttributeError, ssl.SSLError):
                pass
        with trio.fail_after(self.handshake_timeout):
            await tls.do_handshake()
        try:
            trust.verify_peer(tls.getpeercert(binary_form=True),
                              trust.PeerPolicy(trust_domains=allowed, revocations=revocations,
                                               ids=is_gateway if require_gateway else None))
        except trust.PeerRejected as exc:
            await trio.aclose_forcefully(tls)
            raise UpstreamError(str(exc), "UF") from None
        if alpn is not None and tls.selected_alpn_protocol() != alpn:
            await trio.aclose_forcefully(tls)
            raise UpstreamError(f"{host}: upstream did not negotiate {alpn}", "UF")
        return tls

    # -- identity checks ------------------------------------------------------------------
    @staticmethod
    def peer_gateway(tls: trio.SSLStream, trust_domains: frozenset[str],
                     revocations: trust.Revocations) -> trust.SpiffeId:
        """The identity of a peer gateway; :class:`trust.PeerRejected` unless it is the
        gateway of one of ``trust_domains`` (joined, non-revoked clusters)."""
        return trust.verify_peer(tls.getpeercert(binary_form=True),
                                 trust.PeerPolicy(trust_domains=trust_domains,
                                                  revocations=revocations, ids=is_gateway))

    def workload(self, tls: trio.SSLStream, revocations: trust.Revocations) -> trust.SpiffeId:
        """The identity of a calling workload of our own trust domain."""
        return trust.verify_peer(tls.getpeercert(binary_form=True),
                                 trust.PeerPolicy(trust_domains=frozenset({self.trust_domain}),
                                                  revocations=revocations))


def session_of(tls: Any) -> Any:
    """The TLS session of an earlier connection, for resumption (None if there is none)."""
    if tls is None:
        return None
    try:
        return tls.session
    except (AttributeError, ssl.SSLError, trio.NeedHandshakeError):
        return None


__all__ = ["GatewayTls", "is_gateway", "session_of"]

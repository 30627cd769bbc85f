"""mTLS contexts and the post-handshake SPIFFE check.

Python's ``ssl`` verifies the chain (signatures, validity, name constraints — OpenSSL
rejects a cluster CA minting another cluster's IDs with "permitted subtree violation")
but cannot check URI SANs, nor can it tell us which intermediate a peer used before
Python 3.13.  So right after the handshake, before any application byte is read, the
caller runs :func:`verify_peer` on the peer's leaf: exactly one SPIFFE ID, in an allowed
trust domain, and not issued by a revoked cluster CA.  Revocation is keyed by the
revoked intermediates' subject key identifiers, which the leaf names in its authority
key identifier; the CRL (signed by a root) says which intermediates are revoked.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from cryptography import x509

from ._errors import BadFile, PeerRejected, TrustError
from ._spiffe import SpiffeId

MIN_TLS = ssl.TLSVersion.TLSv1_2
# TLS 1.2 suites: forward secrecy and AEAD only (no CBC, no static RSA).  TLS 1.3 suites
# are all AEAD and configured separately by OpenSSL.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def _base_context(purpose: ssl.Purpose, bundle_file: str | os.PathLike[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MIN_TLS
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_ciphers(TLS12_CIPHERS)
    try:
        ctx.load_verify_locations(cafile=os.fspath(bundle_file))
    except FileNotFoundError:
        raise BadFile(bundle_file, "trust bundle not found") from None
    except ssl.SSLError as exc:
        raise BadFile(bundle_file, f"cannot load trust bundle: {exc.reason or exc}") from None
    # X.509 strict checks (e.g. AKI/SKI rules) are OpenSSL's default in 3.x via VERIFY_X509_STRICT.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str], password: bytes | None) -> None:
    for p, what in ((cert_file, "certificate"), (key_file, "private key")):
        if not os.path.exists(p):
            raise BadFile(p, f"{what} not found")
    try:
        ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file), password=password)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason.upper():
            raise BadFile(key_file, f"private key does not match {cert_file}") from None
        raise BadFile(cert_file, f"cannot load certificate and key: {reason}") from None


def server_context(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    bundle_file: str | os.PathLike[str],
    alpn: Sequence[str] | None = ("h2",),
    require_client_cert: bool = True,
    password: bytes | None = None,
    min_version: ssl.TLSVersion = MIN_TLS,
    max_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A server context: our SVID, the roots to verify clients with, client certs required."""
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH, bundle_file)
    ctx.minimum_version = min_version
    if max_version is not None:
        ctx.maximum_version = max_version
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    _load_chain(ctx, cert_file, key_file, password)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def client_context(
    bundle_file: str | os.PathLike[str],
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
    alpn: Sequence[str] | None = ("h2",),
    password: bytes | None = None,
    min_version: ssl.TLSVersion = MIN_TLS,
    max_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client context. Hostname checking is off: identity is the SPIFFE URI SAN,
    checked by :func:`verify_peer` after the handshake."""
    ctx = _base_context(ssl.Purpose.SERVER_AUTH, bundle_file)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = min_version
    if max_version is not None:
        ctx.maximum_version = max_version
    if cert_file is not None and key_file is not None:
        _load_chain(ctx, cert_file, key_file, password)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def _ski(cert: x509.Certificate) -> bytes:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest  # type: ignore[arg-type]


def _aki(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        return None


@dataclass(frozen=True)
class Revocations:
    """Subject key identifiers of revoked CA certificates."""

    revoked_key_ids: frozenset[bytes] = frozenset()

    @classmethod
    def from_crl(
        cls,
        crl_pem: bytes | None,
        intermediates: Iterable[x509.Certificate],
        roots: Iterable[x509.Certificate] | None = None,
    ) -> Revocations:
        """Map a root-signed CRL onto the known intermediates.

        With ``roots``, the CRL's signature must verify against one of them.
        """
        if not crl_pem:
            return cls()
        try:
            crl = x509.load_pem_x509_crl(crl_pem)
        except ValueError as exc:
            raise BadFile("CRL", f"malformed CRL: {exc}") from None
        if roots is not None:
            if not any(
                r.subject == crl.issuer and crl.is_signature_valid(r.public_key())  # type: ignore[arg-type]
                for r in roots
            ):
                raise TrustError("invalid CRL: its signature does not verify against any root in the bundle")
        serials = {r.serial_number for r in crl}
        return cls(frozenset(_ski(c) for c in intermediates if c.serial_number in serials))

    def is_revoked(self, leaf: x509.Certificate) -> bool:
        aki = _aki(leaf)
        return aki is not None and aki in self.revoked_key_ids


@dataclass(frozen=True)
class PeerPolicy:
    """What :func:`verify_peer` accepts.

    ``trust_domains``: allowed trust domains (None: any).  ``ids``: an optional
    predicate over the SPIFFE ID (e.g. "is a gateway ID").
    """

    trust_domains: frozenset[str] | None = None
    revocations: Revocations = field(default_factory=Revocations)
    ids: Callable[[SpiffeId], bool] | None = None


def verify_peer(
    peer: bytes | x509.Certificate | ssl.SSLObject | ssl.SSLSocket | None,
    policy: PeerPolicy = PeerPolicy(),
    now: dt.datetime | None = None,
) -> SpiffeId:
    """Check the peer's leaf after the chain was verified by OpenSSL; return its SPIFFE ID.

    ``peer`` is the DER leaf, a parsed certificate, or the SSL object of a finished handshake.
    """
    if isinstance(peer, (ssl.SSLObject, ssl.SSLSocket)):
        peer = peer.getpeercert(binary_form=True)
    if peer is None:
        raise PeerRejected("invalid X509-SVID: the peer presented no certificate")
    cert = peer if isinstance(peer, x509.Certificate) else x509.load_der_x509_certificate(peer)
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise PeerRejected("invalid X509-SVID: leaf certificate is a CA")
    except x509.ExtensionNotFound:
        pass
    now = now or dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc <= now:
        raise PeerRejected(f"invalid X509-SVID: expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise PeerRejected(f"invalid X509-SVID: expected exactly one URI SAN, found {len(uris)}")
    try:
        sid = SpiffeId.parse(uris[0])
    except TrustError as exc:
        raise PeerRejected(f"invalid X509-SVID: {exc}") from None
    if policy.trust_domains is not None and sid.trust_domain not in policy.trust_domains:
        raise PeerRejected(f"peer {sid} rejected: trust domain {sid.trust_domain!r} is not allowed here")
    if policy.revocations.is_revoked(cert):
        raise PeerRejected(f"peer {sid} rejected: its issuing cluster CA has been revoked")
    if policy.ids is not None and not policy.ids(sid):
        raise PeerRejected(f"peer {sid} rejected: identity not allowed on this listener")
    return sid

"""Certificate templates and signing: build, sign, re-check as separate steps.

Templates take an injected clock (``now``) and produce certificates whose NotAfter is
capped at the issuer's NotAfter and whose NotBefore is back-dated by ``CLOCK_SKEW`` so a
peer whose clock runs slightly behind accepts a fresh certificate.  Every certificate
this module signs is verified against its issuer before it is returned.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._errors import InvalidCSR, TrustError
from ._files import PrivateKey
from ._spiffe import SpiffeId

KeyType = Literal["ec-p256", "ec-p384", "ed25519"]
KEY_TYPES: tuple[str, ...] = ("ec-p256", "ec-p384", "ed25519")
CLOCK_SKEW = dt.timedelta(minutes=5)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def generate_key(key_type: str = "ec-p256") -> PrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise TrustError(f"invalid key type {key_type!r}: choose one of {', '.join(KEY_TYPES)}")


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key.curve, ec.SECP384R1):
        return hashes.SHA384()
    return hashes.SHA256()


def public_key_der(key_or_cert: object) -> bytes:
    pub = key_or_cert.public_key()  # type: ignore[attr-defined]
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def ca_pin(cert: x509.Certificate) -> str:
    """kubeadm-style pin of a CA: ``sha256:<hex>`` over the DER SubjectPublicKeyInfo."""
    return "sha256:" + hashlib.sha256(public_key_der(cert)).hexdigest()


def key_matches(cert: x509.Certificate, key: PrivateKey) -> bool:
    return public_key_der(cert) == public_key_der(key)


def spiffe_ids_of(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def not_after(cert: x509.Certificate) -> dt.datetime:
    return cert.not_valid_after_utc


def not_before(cert: x509.Certificate) -> dt.datetime:
    return cert.not_valid_before_utc


def _window(now: dt.datetime, validity: float, issuer: x509.Certificate | None) -> tuple[dt.datetime, dt.datetime]:
    start = now - CLOCK_SKEW
    end = now + dt.timedelta(seconds=validity)
    if issuer is not None:
        end = min(end, not_after(issuer))
        start = max(start, not_before(issuer))
    if end <= now:
        raise TrustError(
            "issuer certificate has expired or expires now: renew the issuing CA first"
        )
    return start, end


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: object,
    start: dt.datetime,
    end: dt.datetime,
    serial: int | None,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )


def _sign(builder: x509.CertificateBuilder, signing_key: PrivateKey) -> x509.Certificate:
    return builder.sign(signing_key, _hash_for(signing_key))  # type: ignore[arg-type]


def verify_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """Raise TrustError unless ``issuer`` signed ``cert`` (signature and name chaining)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise TrustError(f"certificate check failed: not issued by {issuer.subject.rfc4514_string()}: {exc}") from None


def build_root(
    key: PrivateKey,
    trust_domain: str,
    validity: float,
    now: dt.datetime | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    now = now or utcnow()
    start, end = _window(now, validity, None)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Isthmus"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Isthmus federation root {trust_domain} {now:%Y-%m-%d}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())  # type: ignore[arg-type]
    b = (
        _builder(name, name, key.public_key(), start, end, serial)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(SpiffeId(trust_domain)))]),
            critical=False,
        )
    )
    cert = _sign(b, key)
    verify_signed_by(cert, cert)
    return cert


def _key_usage(ca: bool) -> x509.KeyUsage:
    """CAs sign certificates and CRLs; leaves (SVIDs) only sign handshakes."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def build_intermediate(
    public_key: object,
    cluster_td: str,
    cluster: str,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    validity: float,
    now: dt.datetime | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    """A cluster CA: pathlen 0, name-constrained to URIs in its own trust domain."""
    now = now or utcnow()
    start, end = _window(now, validity, issuer_cert)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Isthmus"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cluster),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Isthmus cluster CA {cluster_td}"),
        ]
    )
    b = (
        _builder(subject, issuer_cert.subject, public_key, start, end, serial)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)  # type: ignore[arg-type]
        .add_extension(_aki(issuer_cert), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(SpiffeId(cluster_td)))]),
            critical=False,
        )
        # OpenSSL matches a URI constraint without a leading '.' against the URI's host
        # exactly, so this permits spiffe://<cluster_td>/... and nothing else.
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(cluster_td)], excluded_subtrees=None
            ),
            critical=True,
        )
    )
    cert = _sign(b, issuer_key)
    verify_signed_by(cert, issuer_cert)
    return cert


def _aki(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key())  # type: ignore[arg-type]


def build_leaf(
    public_key: object,
    spiffe_id: SpiffeId,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    validity: float,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    now: dt.datetime | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    """An X509-SVID: one URI SAN, cA=false, digitalSignature, serverAuth+clientAuth."""
    now = now or utcnow()
    start, end = _window(now, validity, issuer_cert)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    sans += [x509.DNSName(d) for d in dns_names]
    for ip in ip_addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise TrustError(f"invalid IP address {ip!r} for the certificate") from None
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Isthmus"),
            x509.NameAttribute(NameOID.COMMON_NAME, (dns_names[0] if dns_names else spiffe_id.trust_domain)[:64]),
        ]
    )
    b = (
        _builder(subject, issuer_cert.subject, public_key, start, end, serial)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)  # type: ignore[arg-type]
        .add_extension(_aki(issuer_cert), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    cert = _sign(b, issuer_key)
    verify_signed_by(cert, issuer_cert)
    return cert


def make_csr(key: PrivateKey, spiffe_id: SpiffeId | str) -> bytes:
    """A PEM CSR carrying ``spiffe_id`` as its only URI SAN (used by join)."""
    sid = SpiffeId.parse(str(spiffe_id))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sid.trust_domain[:64])]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(sid))]), critical=False)
        .sign(key, _hash_for(key))  # type: ignore[arg-type]
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def load_csr(csr_pem: bytes, allowed_trust_domain: str) -> x509.CertificateSigningRequest:
    """Parse a CSR, check proof of possession and that it names nothing outside the domain."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidCSR(f"invalid CSR: malformed PEM: {exc}") from None
    if not csr.is_signature_valid:
        raise InvalidCSR("invalid CSR: signature does not verify (no proof of possession of the key)")
    pub = csr.public_key()
    if not isinstance(pub, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise InvalidCSR(f"invalid CSR: unsupported key type {type(pub).__name__}; use ECDSA or Ed25519")
    if isinstance(pub, ec.EllipticCurvePublicKey) and not isinstance(pub.curve, (ec.SECP256R1, ec.SECP384R1)):
        raise InvalidCSR(f"invalid CSR: unsupported curve {pub.curve.name}; use P-256 or P-384")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return csr
    for name in san:
        if isinstance(name, x509.UniformResourceIdentifier):
            try:
                sid = SpiffeId.parse(name.value)
            except TrustError as exc:
                raise InvalidCSR(f"invalid CSR: {exc}") from None
            if sid.trust_domain != allowed_trust_domain:
                raise InvalidCSR(
                    f"invalid CSR: names {name.value!r}, outside the cluster's trust domain {allowed_trust_domain!r}"
                )
        else:
            raise InvalidCSR(
                f"invalid CSR: subject alternative name {name.value!r} is not allowed; "
                f"only SPIFFE IDs in {allowed_trust_domain!r}"
            )
    return csr


def build_crl(
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    revoked: Iterable[tuple[int, dt.datetime]],
    now: dt.datetime | None = None,
    next_update: dt.timedelta = dt.timedelta(days=30),
) -> x509.CertificateRevocationList:
    now = now or utcnow()
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + next_update)
        .add_extension(_aki(issuer_cert), critical=False)
    )
    for serial, when in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return b.sign(issuer_key, _hash_for(issuer_key))  # type: ignore[arg-type]

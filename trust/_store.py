"""The federation root folder and cluster CA folders on disk.

Layout of a trust folder (``isthmus trust init --dir DIR``) — stable, other tools read it::

    DIR/root.crt                  the current federation root
    DIR/root.key                  its key (0600, optionally encrypted)
    DIR/bundle.pem                every trusted root, current first (several during a rotation)
    DIR/crl.pem                   CRL signed by the current root: revoked cluster CAs
    DIR/roots/<sha256>.crt        earlier roots kept after a rotation
    DIR/clusters/NAME/ca.crt      NAME's current intermediate CA
    DIR/clusters/NAME/ca.key      its key (0600) — absent when NAME joined with a CSR
    DIR/clusters/NAME/chain.pem   intermediate then root
    DIR/clusters/NAME/bundle.pem  the roots, for leaves issued from this folder
    DIR/clusters/NAME/issued/     every intermediate ever issued to NAME (for revocation)

A cluster CA folder (``clusters/NAME`` or a joined cluster's own copy) holds ``ca.crt``,
``ca.key``, ``chain.pem`` and ``bundle.pem``; :class:`ClusterCA` issues leaves from it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import _ca
from ._errors import BadFile, TrustError
from ._files import (
    PrivateKey,
    certs_to_pem,
    key_to_pem,
    load_cert,
    load_certs,
    load_key,
    read_bytes,
    write_files,
)
from ._spiffe import (
    SpiffeId,
    admin_id,
    cluster_trust_domain,
    validate_cluster_name,
    validate_trust_domain,
)

DEFAULT_ROOT_VALIDITY = 10 * 365 * 86400.0
DEFAULT_CLUSTER_VALIDITY = 90 * 86400.0
DEFAULT_LEAF_VALIDITY = 24 * 3600.0
KEY_MODE = 0o600
CERT_MODE = 0o644


@dataclass(frozen=True)
class IssuedFiles:
    cert: Path
    key: Path
    bundle: Path


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def trust_domain_of(cert: x509.Certificate) -> str | None:
    """The trust domain of a CA's SPIFFE ID (``spiffe://td``), if it carries one."""
    for uri in _ca.spiffe_ids_of(cert):
        try:
            return SpiffeId.parse(uri).trust_domain
        except TrustError:
            continue
    return None


def check_ca_cert(cert: x509.Certificate, source: object, now: dt.datetime, what: str = "CA certificate") -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise BadFile(source, f"{what} is not a CA (basicConstraints cA=true is missing)")
    if _ca.not_after(cert) <= now:
        raise BadFile(source, f"{what} expired at {_ca.not_after(cert):%Y-%m-%d %H:%M:%S}Z: rotate it")
    if _ca.not_before(cert) > now + _ca.CLOCK_SKEW:
        raise BadFile(
            source, f"{what} is not valid before {_ca.not_before(cert):%Y-%m-%d %H:%M:%S}Z: check the clock"
        )


def _write_leaf(out_dir: Path, leaf: x509.Certificate, chain: Sequence[x509.Certificate], key: PrivateKey, bundle_pem: bytes) -> IssuedFiles:
    out_dir = Path(out_dir)
    files = IssuedFiles(out_dir / "cert.pem", out_dir / "key.pem", out_dir / "bundle.pem")
    write_files(
        {
            files.cert: (certs_to_pem([leaf, *chain]), CERT_MODE),
            files.key: (key_to_pem(key), KEY_MODE),
            files.bundle: (bundle_pem, CERT_MODE),
        }
    )
    return files


class TrustDir:
    """The federation's root CA folder."""

    def __init__(self, path: str | os.PathLike[str], passphrase: bytes | None = None) -> None:
        self.path = Path(path)
        self.passphrase = passphrase

    # ------------------------------------------------------------------ paths
    @property
    def root_cert_path(self) -> Path:
        return self.path / "root.crt"

    @property
    def root_key_path(self) -> Path:
        return self.path / "root.key"

    @property
    def bundle_path(self) -> Path:
        return self.path / "bundle.pem"

    @property
    def crl_path(self) -> Path:
        return self.path / "crl.pem"

    def cluster_dir(self, name: str) -> Path:
        return self.path / "clusters" / validate_cluster_name(name)

    def exists(self) -> bool:
        return self.root_cert_path.exists() or self.root_key_path.exists()

    # ------------------------------------------------------------------ creation
    def init(
        self,
        trust_domain: str,
        key_type: str = "ec-p256",
        validity: float = DEFAULT_ROOT_VALIDITY,
        force: bool = False,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        validate_trust_domain(trust_domain)
        self._refuse_overwrite(force)
        key = _ca.generate_key(key_type)
        cert = _ca.build_root(key, trust_domain, validity, now)
        self._write_root(cert, key, extra_roots=[], now=now)
        return cert

    def import_root(
        self,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        trust_domain: str | None = None,
        key_passphrase: bytes | None = None,
        force: bool = False,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Adopt an existing CA as the federation root (Istio's plug-in CA)."""
        now = now or _ca.utcnow()
        self._refuse_overwrite(force)
        cert = load_cert(cert_file, "root certificate")
        key = load_key(key_file, key_passphrase)
        check_ca_cert(cert, cert_file, now, "root certificate")
        if not _ca.key_matches(cert, key):
            raise BadFile(key_file, f"private key does not match the certificate in {cert_file}")
        found = trust_domain_of(cert)
        if trust_domain is None:
            if found is None:
                raise BadFile(cert_file, "certificate has no spiffe:// URI SAN: pass --trust-domain")
            trust_domain = found
        validate_trust_domain(trust_domain)
        if found is not None and found != trust_domain:
            raise BadFile(cert_file, f"certificate is for trust domain {found!r}, not {trust_domain!r}")
        self._write_root(cert, key, extra_roots=[], now=now, trust_domain=trust_domain)
        return cert

    def _refuse_overwrite(self, force: bool) -> None:
        if self.exists() and not force:
            raise TrustError(
                f"{self.root_cert_path}: a federation root already exists; refusing to overwrite it "
                "(pass --force to replace it — every certificate issued from it stops validating)"
            )

    def _write_root(
        self,
        cert: x509.Certificate,
        key: PrivateKey,
        extra_roots: list[x509.Certificate],
        now: dt.datetime | None,
        trust_domain: str | None = None,
    ) -> None:
        crl = _ca.build_crl(cert, key, [], now)
        files: dict[Path, tuple[bytes, int]] = {
            self.root_key_path: (key_to_pem(key, self.passphrase), KEY_MODE),
            self.root_cert_path: (_pem(cert), CERT_MODE),
            self.bundle_path: (certs_to_pem([cert, *extra_roots]), CERT_MODE),
            self.crl_path: (crl.public_bytes(serialization.Encoding.PEM), CERT_MODE),
        }
        if trust_domain is not None:
            files[self.path / "trust-domain"] = (trust_domain.encode() + b"\n", CERT_MODE)
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        write_files(files)

    # ------------------------------------------------------------------ loading
    @property
    def root_cert(self) -> x509.Certificate:
        cert = load_cert(self.root_cert_path, "root certificate")
        check_ca_cert(cert, self.root_cert_path, _ca.utcnow(), "root certificate")
        return cert

    @property
    def root_key(self) -> PrivateKey:
        key = load_key(self.root_key_path, self.passphrase)
        if not _ca.key_matches(load_cert(self.root_cert_path), key):
            raise BadFile(self.root_key_path, f"private key does not match {self.root_cert_path}")
        return key

    @property
    def trust_domain(self) -> str:
        override = self.path / "trust-domain"
        if override.exists():
            return validate_trust_domain(override.read_text().strip())
        td = trust_domain_of(load_cert(self.root_cert_path, "root certificate"))
        if td is None:
            raise BadFile(self.root_cert_path, "root certificate has no spiffe:// URI SAN")
        return td

    def bundle(self) -> list[x509.Certificate]:
        return load_certs(self.bundle_path, "trust bundle")

    def bundle_pem(self) -> bytes:
        return read_bytes(self.bundle_path, "trust bundle")

    def crl_pem(self) -> bytes:
        return read_bytes(self.crl_path, "CRL")

    def ca_pin(self) -> str:
        return _ca.ca_pin(self.root_cert)

    def _signer(self) -> tuple[x509.Certificate, PrivateKey]:
        return self.root_cert, self.root_key

    # ------------------------------------------------------------------ clusters
    def issue_cluster(
        self, name: str, validity: float = DEFAULT_CLUSTER_VALIDITY, key_type: str = "ec-p256", now: dt.datetime | None = None
    ) -> ClusterCA:
        """Issue NAME's intermediate CA, key included, into ``clusters/NAME``."""
        validate_cluster_name(name)
        key = _ca.generate_key(key_type)
        cert = self._sign_intermediate(name, key.public_key(), validity, now)
        self._write_cluster(name, cert, key)
        return ClusterCA(self.cluster_dir(name))

    def sign_cluster_csr(
        self, name: str, csr_pem: bytes, validity: float = DEFAULT_CLUSTER_VALIDITY, now: dt.datetime | None = None
    ) -> x509.Certificate:
        """Sign a cluster's CSR (join): proof of possession checked, foreign names refused."""
        validate_cluster_name(name)
        csr = _ca.load_csr(csr_pem, cluster_trust_domain(name, self.trust_domain))
        cert = self._sign_intermediate(name, csr.public_key(), validity, now)
        self._write_cluster(name, cert, None)
        return cert

    def _sign_intermediate(self, name: str, public_key: object, validity: float, now: dt.datetime | None) -> x509.Certificate:
        root, root_key = self._signer()
        td = cluster_trust_domain(name, self.trust_domain)
        return _ca.build_intermediate(public_key, td, name, root, root_key, validity, now)

    def _write_cluster(self, name: str, cert: x509.Certificate, key: PrivateKey | None) -> None:
        d = self.cluster_dir(name)
        files: dict[Path, tuple[bytes, int]] = {
            d / "ca.crt": (_pem(cert), CERT_MODE),
            d / "chain.pem": (certs_to_pem([cert, self.root_cert]), CERT_MODE),
            d / "bundle.pem": (self.bundle_pem(), CERT_MODE),
            d / "issued" / f"{cert.serial_number:x}.crt": (_pem(cert), CERT_MODE),
        }
        if key is not None:
            files[d / "ca.key"] = (key_to_pem(key, self.passphrase), KEY_MODE)
        elif (d / "ca.key").exists():
            # The cluster now holds its own key; a stale one here would not match ca.crt.
            (d / "ca.key").unlink()
        write_files(files)

    def cluster_certs(self, name: str) -> list[x509.Certificate]:
        """Every intermediate ever issued to NAME."""
        issued = self.cluster_dir(name) / "issued"
        if not issued.is_dir():
            return []
        return [load_cert(p) for p in sorted(issued.glob("*.crt"))]

    def all_cluster_certs(self) -> list[x509.Certificate]:
        base = self.path / "clusters"
        if not base.is_dir():
            return []
        return [c for d in sorted(base.iterdir()) if d.is_dir() for c in self.cluster_certs(d.name)]

    # ------------------------------------------------------------------ revocation
    def revoked_serials(self) -> dict[int, dt.datetime]:
        if not self.crl_path.exists():
            return {}
        crl = load_crl(self.crl_pem(), self.crl_path)
        return {r.serial_number: r.revocation_date_utc for r in crl}

    def revoke_cluster(self, name: str, now: dt.datetime | None = None) -> list[int]:
        """Add every intermediate issued to NAME to the CRL; return their serials."""
        certs = self.cluster_certs(name)
        if not certs:
            raise TrustError(f"unknown cluster {name!r}: nothing was issued to it from {self.path}")
        now = now or _ca.utcnow()
        revoked = self.revoked_serials()
        for c in certs:
            revoked.setdefault(c.serial_number, now)
        self.write_crl(revoked, now)
        return [c.serial_number for c in certs]

    def write_crl(self, revoked: dict[int, dt.datetime], now: dt.datetime | None = None) -> None:
        root, key = self._signer()
        crl = _ca.build_crl(root, key, sorted(revoked.items()), now)
        write_files({self.crl_path: (crl.public_bytes(serialization.Encoding.PEM), CERT_MODE)})

    def revocations(self) -> Revocations:
        from ._tls import Revocations

        return Revocations.from_crl(self.crl_pem(), self.all_cluster_certs(), self.bundle())

    # ------------------------------------------------------------------ leaves signed by the root
    def issue_admin(
        self, name: str, out_dir: str | os.PathLike[str], validity: float = DEFAULT_LEAF_VALIDITY, now: dt.datetime | None = None
    ) -> IssuedFiles:
        return self.issue_server(admin_id(self.trust_domain, name), out_dir, validity=validity, now=now)

    def issue_server(
        self,
        spiffe_id: SpiffeId | str,
        out_dir: str | os.PathLike[str],
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        validity: float = DEFAULT_LEAF_VALIDITY,
        now: dt.datetime | None = None,
    ) -> IssuedFiles:
        """A leaf signed by the root itself (federation server, operators)."""
        sid = SpiffeId.parse(str(spiffe_id))
        if sid.trust_domain != self.trust_domain:
            raise TrustError(
                f"invalid SPIFFE ID {sid}: the root issues only IDs in {self.trust_domain!r}; "
                "cluster identities come from the cluster's CA"
            )
        root, root_key = self._signer()
        key = _ca.generate_key()
        leaf = _ca.build_leaf(key.public_key(), sid, root, root_key, validity, dns_names, ip_addresses, now)
        return _write_leaf(Path(out_dir), leaf, [], key, self.bundle_pem())

    # ------------------------------------------------------------------ root rotation
    def rotate_root(self, key_type: str = "ec-p256", validity: float = DEFAULT_ROOT_VALIDITY, now: dt.datetime | None = None) -> x509.Certificate:
        """Make a new root current; keep the old ones in the bundle (overlap)."""
        old_bundle = self.bundle()
        old_root = self.root_cert
        td = self.trust_domain
        revoked = self.revoked_serials()
        archive = self.path / "roots" / f"{fingerprint(old_root)}.crt"
        write_files({archive: (_pem(old_root), CERT_MODE)})
        key = _ca.generate_key(key_type)
        cert = _ca.build_root(key, td, validity, now)
        keep = [c for c in old_bundle if fingerprint(c) != fingerprint(cert)]
        self._write_root(cert, key, extra_roots=keep, now=now)
        # Carry revocations over: from now on the CRL is signed by the new root.
        if revoked:
            self.write_crl(revoked, now)
        return cert

    def add_to_bundle(self, cert_file: str | os.PathLike[str]) -> list[x509.Certificate]:
        new = load_certs(cert_file, "root certificate")
        now = _ca.utcnow()
        for c in new:
            check_ca_cert(c, cert_file, now, "root certificate")
        bundle = self.bundle()
        have = {fingerprint(c) for c in bundle}
        bundle += [c for c in new if fingerprint(c) not in have]
        write_files({self.bundle_path: (certs_to_pem(bundle), CERT_MODE)})
        return bundle

    def prune_bundle(self) -> list[x509.Certificate]:
        """Drop every root but the current one (the end of a rotation)."""
        bundle = [self.root_cert]
        write_files({self.bundle_path: (certs_to_pem(bundle), CERT_MODE)})
        return bundle


def load_crl(data: bytes, source: object) -> x509.CertificateRevocationList:
    if b"-----BEGIN X509 CRL-----" not in data:
        raise BadFile(source, "no PEM CRL found (expected '-----BEGIN X509 CRL-----')")
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise BadFile(source, f"malformed CRL: {exc}") from None


class ClusterCA:
    """A cluster's intermediate CA folder: issues the cluster's SPIFFE leaves."""

    def __init__(self, path: str | os.PathLike[str], passphrase: bytes | None = None) -> None:
        self.path = Path(path)
        self.passphrase = passphrase

    @property
    def cert(self) -> x509.Certificate:
        p = self.path / "ca.crt"
        cert = load_cert(p, "cluster CA certificate")
        check_ca_cert(cert, p, _ca.utcnow(), "cluster CA certificate")
        return cert

    @property
    def key(self) -> PrivateKey:
        p = self.path / "ca.key"
        key = load_key(p, self.passphrase)
        if not _ca.key_matches(load_cert(self.path / "ca.crt"), key):
            raise BadFile(p, f"private key does not match {self.path / 'ca.crt'}")
        return key

    @property
    def trust_domain(self) -> str:
        td = trust_domain_of(self.cert)
        if td is None:
            raise BadFile(self.path / "ca.crt", "cluster CA has no spiffe:// URI SAN")
        return td

    def bundle_pem(self) -> bytes:
        return read_bytes(self.path / "bundle.pem", "trust bundle")

    def issue_leaf(
        self,
        spiffe_id: SpiffeId | str,
        dns_names: Sequence[str] = (),
        validity: float = DEFAULT_LEAF_VALIDITY,
        now: dt.datetime | None = None,
        key_type: str = "ec-p256",
    ) -> tuple[x509.Certificate, PrivateKey]:
        sid = SpiffeId.parse(str(spiffe_id))
        ca, ca_key = self.cert, self.key
        if sid.trust_domain != self.trust_domain:
            raise TrustError(
                f"invalid SPIFFE ID {sid}: outside this CA's trust domain {self.trust_domain!r}"
            )
        key = _ca.generate_key(key_type)
        leaf = _ca.build_leaf(key.public_key(), sid, ca, ca_key, validity, dns_names, (), now)
        return leaf, key

    def issue(
        self,
        spiffe_id: SpiffeId | str,
        out_dir: str | os.PathLike[str],
        dns_names: Sequence[str] = (),
        validity: float = DEFAULT_LEAF_VALIDITY,
        now: dt.datetime | None = None,
    ) -> IssuedFiles:
        leaf, key = self.issue_leaf(spiffe_id, dns_names, validity, now)
        return _write_leaf(Path(out_dir), leaf, [self.cert], key, self.bundle_pem())


from ._tls import Revocations  # noqa: E402  (circular-safe: _tls does not import _store)

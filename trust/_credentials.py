"""Checking a TLS identity on disk before it is used: certificate, key and trust bundle.

A TLS library given an expired certificate, a key of another certificate or a bundle
of another federation fails the handshake with a reason the user never sees (gRPC:
``UNAVAILABLE: failed to connect to all addresses``).  :func:`check_credentials` finds
the same problems locally and names the file and the dates, so the CLI (``--cert-dir``)
and ``isthmus gateway check-config`` can say what is wrong before any connection.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from . import _ca
from ._errors import BadFile
from ._files import load_certs, load_key


def _date(t: dt.datetime) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S}Z"


def _name(cert: x509.Certificate) -> str:
    ids = _ca.spiffe_ids_of(cert)
    return ids[0] if ids else cert.subject.rfc4514_string()


def check_credentials(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    bundle_file: str | os.PathLike[str],
    now: dt.datetime | None = None,
    passphrase: bytes | None = None,
) -> x509.Certificate:
    """Return the leaf of ``cert_file`` if the three files make a usable identity.

    Raise :class:`BadFile` naming the file at fault when a file is missing or not PEM,
    when the key does not belong to the certificate, when a certificate of the chain is
    expired or not yet valid (both dates given), or when the bundle does not hold the
    root the chain leads to.
    """
    now = now or _ca.utcnow()
    chain = load_certs(cert_file, "certificate")
    key = load_key(key_file, passphrase)
    bundle = load_certs(bundle_file, "trust bundle certificate")
    leaf = chain[0]
    if not _ca.key_matches(leaf, key):
        raise BadFile(key_file, f"private key does not match the certificate in {cert_file} ({_name(leaf)})")
    for i, cert in enumerate(chain):
        what = f"certificate {_name(cert)}" if i == 0 else f"issuer certificate [{i}] {_name(cert)}"
        start, end = _ca.not_before(cert), _ca.not_after(cert)
        window = f"valid from {_date(start)} to {_date(end)}; now {_date(now)}"
        if end <= now:
            raise BadFile(cert_file, f"{what} has expired ({window}): issue a new one")
        if start > now + _ca.CLOCK_SKEW:
            raise BadFile(cert_file, f"{what} is not valid yet ({window}): check the clock")
    top = chain[-1]
    if not any(_issued_by(top, root) for root in bundle):
        raise BadFile(
            bundle_file,
            f"the trust bundle does not contain the root that issued {cert_file} "
            f"(its chain ends at issuer {top.issuer.rfc4514_string()}): "
            "use the bundle of the federation that issued the certificate",
        )
    return leaf


def _issued_by(cert: x509.Certificate, root: x509.Certificate) -> bool:
    if cert == root:
        return True
    try:
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):  # another issuer, another key type: not this one
        return False
    return True


def cert_dir_files(cert_dir: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``cert.pem``, ``key.pem`` and ``bundle.pem`` of a credentials folder."""
    d = Path(cert_dir)
    return d / "cert.pem", d / "key.pem", d / "bundle.pem"

"""Loading and writing PEM files: clear errors in, atomic 0600 writes out."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ._errors import BadFile, InvalidValidity

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdwy])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def parse_duration(text: str | int | float) -> float:
    """``'90d'`` → seconds. Units: s, m, h, d, w, y (365 days)."""
    if isinstance(text, (int, float)):
        if text <= 0:
            raise InvalidValidity(f"invalid duration {text!r}: must be positive")
        return float(text)
    m = _DURATION.match(str(text))
    if not m or int(m.group(1)) == 0:
        raise InvalidValidity(
            f"invalid duration {text!r}: use a positive number and a unit, e.g. 30m, 24h, 90d, 10y"
        )
    return float(int(m.group(1)) * _UNITS[m.group(2)])


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename.

    A crash leaves either the old file or the new one, never half of either; the temp
    file is created with ``mode`` already set so a key is never world-readable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_files(files: dict[Path, tuple[bytes, int]]) -> None:
    """Write several files so that either all are new or (on failure) none changed.

    Each file goes to a temp file first; only when every temp file is written are they
    renamed into place.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, (data, mode) in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
        staged.clear()
    finally:
        for tmp, _ in staged:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def read_bytes(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise BadFile(path, f"{what} not found") from None
    except IsADirectoryError:
        raise BadFile(path, f"expected a {what} file, found a directory") from None
    except PermissionError:
        raise BadFile(path, f"cannot read {what}: permission denied") from None


def load_certs_pem(data: bytes, source: object, what: str = "certificate") -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise BadFile(source, f"no PEM {what} found (expected '-----BEGIN CERTIFICATE-----')")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise BadFile(source, f"malformed PEM {what}: {exc}") from None
    return certs


def load_certs(path: str | os.PathLike[str], what: str = "certificate") -> list[x509.Certificate]:
    return load_certs_pem(read_bytes(path, what), path, what)


def load_cert(path: str | os.PathLike[str], what: str = "certificate") -> x509.Certificate:
    return load_certs(path, what)[0]


def load_key_pem(data: bytes, source: object, passphrase: bytes | None = None) -> PrivateKey:
    if b"PRIVATE KEY-----" not in data:
        raise BadFile(source, "no PEM private key found (expected '-----BEGIN PRIVATE KEY-----')")
    encrypted = b"ENCRYPTED" in data
    if encrypted and passphrase is None:
        raise BadFile(source, "private key is encrypted: pass --passphrase-file")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        if encrypted and ("decrypt" in msg.lower() or "password" in msg.lower()):
            raise BadFile(source, "cannot decrypt private key: wrong passphrase") from None
        raise BadFile(source, f"malformed private key: {msg}") from None
    except Exception as exc:  # cryptography raises several kinds on garbage
        raise BadFile(source, f"malformed private key: {exc}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise BadFile(source, f"unsupported key type {type(key).__name__}: use ECDSA P-256/P-384 or Ed25519")
    return key


def load_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> PrivateKey:
    return load_key_pem(read_bytes(path, "private key"), path, passphrase)


def key_to_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def certs_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def read_passphrase(path: str | os.PathLike[str] | None) -> bytes | None:
    if path is None:
        return None
    data = read_bytes(path, "passphrase file").rstrip(b"\r\n")
    if not data:
        raise BadFile(path, "passphrase file is empty")
    return data

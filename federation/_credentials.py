"""The CLI's credentials, checked before any call, and why a connection failed.

* :func:`check_cert_dir` runs :func:`trust.check_credentials` on a ``--cert-dir``
  (cert.pem, key.pem, bundle.pem): an expired certificate, a key of another
  certificate, a file that is not PEM or a bundle without the certificate's root is
  named with its file (and dates) instead of surfacing as gRPC's ``UNAVAILABLE``.
* :func:`diagnose` is asked by the CLI's error boundary when a call failed with
  UNAVAILABLE: it repeats the connection with Python's ``ssl`` (same bundle, same client
  certificate, same host name check as gRPC) and names the reason by exception type and
  OpenSSL reason code: nothing listening, not TLS on the other side
  (``WRONG_VERSION_NUMBER``), a server certificate the bundle does not trust, or a
  client certificate the server refused.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trust

from ._errors import FederationError


class InvalidCredentials(FederationError, ValueError):
    """The --cert-dir files cannot make a working mTLS identity."""


def check_cert_dir(cert_dir: str | os.PathLike[str]) -> None:
    d = Path(cert_dir)
    if not d.is_dir():
        raise InvalidCredentials(
            f"invalid credentials: {d} is not a folder; --cert-dir (ISTHMUS_CERT_DIR) names a folder with "
            "cert.pem, key.pem and bundle.pem (from `isthmus trust issue-admin` or `isthmus federation join`)"
        )
    cert, key, bundle = (d / "cert.pem", d / "key.pem", d / "bundle.pem")
    try:
        trust.check_credentials(cert, key, bundle)
    except trust.BadFile as exc:
        raise InvalidCredentials(f"invalid credentials: {exc}") from None


# OpenSSL reason codes of an alert the server sends when it refuses our certificate.
_CLIENT_CERT_REFUSED = frozenset({
    "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "TLSV1_ALERT_ACCESS_DENIED", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "TLSV1_ALERT_DECRYPT_ERROR",
})
_HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH
_IP_MISMATCH = 64  # X509_V_ERR_IP_ADDRESS_MISMATCH


def diagnose(addresses: Sequence[str], creds: Any, timeout: float = 3.0) -> str:
    """One line per address that fails the way gRPC would; empty when TLS works from here."""
    reasons = []
    for address in list(addresses)[:3]:
        reason = probe(address, creds.cert_file, creds.key_file, creds.bundle_file, timeout)
        if reason:
            reasons.append(f"{address}: {reason}")
    return "\n  ".join(reasons)


def probe(address: str, cert_file: Path, key_file: Path, bundle_file: Path, timeout: float = 3.0) -> str:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(bundle_file))
        ctx.load_cert_chain(str(cert_file), str(key_file))
        ctx.set_alpn_protocols(["h2"])
    except (OSError, ssl.SSLError):
        return ""  # check_cert_dir reports bad files
    try:
        raw = socket.create_connection((host, int(port)), timeout=timeout)
    except socket.gaierror:
        return f"cannot resolve {host!r}"
    except ConnectionRefusedError:
        return "connection refused: nothing listens there (is `isthmus federation serve` running, on this port?)"
    except TimeoutError:
        return f"no answer within {timeout:.0f}s (a firewall, or the wrong address?)"
    except OSError as exc:
        return f"cannot connect: {exc.strerror or exc}"
    with raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                # TLS 1.3: the server judges our certificate after the handshake; its
                # alert (or its HTTP/2 SETTINGS frame) is the first thing we read.
                try:
                    tls.recv(1)
                except ssl.SSLError as exc:
                    return _ssl_reason(exc, bundle_file, host)
                except (TimeoutError, OSError):
                    pass
                return ""
        except ssl.SSLCertVerificationError as exc:
            if exc.verify_code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
                return (f"the server's certificate is not valid for {host!r} ({exc.verify_message}): "
                        "connect by a name or address it was issued for (`federation serve --advertise`)")
            return (f"the server's certificate is not trusted by {bundle_file} ({exc.verify_message}): "
                    "is this the federation that issued these credentials?")
        except ssl.SSLError as exc:
            return _ssl_reason(exc, bundle_file, host)
        except (ConnectionResetError, BrokenPipeError, EOFError):
            return "the other side closed the connection during the TLS handshake"
        except TimeoutError:
            return f"the TLS handshake did not finish within {timeout:.0f}s"
        except OSError as exc:
            return f"TLS handshake failed: {exc.strerror or exc}"


def _ssl_reason(exc: ssl.SSLError, bundle_file: Path, host: str) -> str:
    reason = getattr(exc, "reason", None) or ""
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"):
        return f"the other side does not speak TLS ({reason}): is this the federation's mTLS port?"
    if reason in _CLIENT_CERT_REFUSED:
        return (f"the server refused our client certificate ({reason}): it trusts another root, "
                "or the certificate is revoked")
    return f"TLS handshake failed ({reason or type(exc).__name__})"

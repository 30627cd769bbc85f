"""What a TLS-only listener says to a client that did not do TLS right.

* Plain HTTP on the mTLS-only outbound listener (``outbound_allow_plain: false``) gets a
  readable answer, as nginx gives plain HTTP on an HTTPS port: HTTP/1.1 ``400`` with a
  body saying the listener requires mTLS, or for HTTP/2 with prior knowledge a GOAWAY
  ``INADEQUATE_SECURITY`` carrying the same words.  Never an empty reply.
* A failed handshake is logged with its reason, taken from the ``ssl.SSLError`` trio
  wraps in ``BrokenResourceError`` (its OpenSSL reason code, an attribute, not message
  text): a client that sent no certificate is logged as that.
"""

from __future__ import annotations

import ssl
from typing import Any

import trio
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes

PLAINTEXT_MESSAGE = (
    "this listener requires mTLS: connect with TLS and a client certificate issued by this cluster's CA "
    "(or set outbound_allow_plain: true in the gateway config)"
)
H2_PREFACE_START = b"PRI * HTTP/2.0"


async def refuse_plaintext(stream: trio.abc.Stream, first: bytes) -> None:
    """Answer a plaintext connection with 400 (HTTP/1.x) or GOAWAY (HTTP/2), then close it."""
    if first.startswith(H2_PREFACE_START[: len(first)]):
        conn = H2Connection(H2Configuration(client_side=False))
        conn.initiate_connection()
        conn.close_connection(ErrorCodes.INADEQUATE_SECURITY, additional_data=PLAINTEXT_MESSAGE.encode())
        data = conn.data_to_send()
    else:
        body = PLAINTEXT_MESSAGE.encode() + b"\n"
        data = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body))
    with trio.move_on_after(2):
        try:
            await stream.send_all(data)
            # Half-close and let the client finish sending: closing with unread bytes
            # would reset the connection and could destroy the answer on its way.
            send_eof = getattr(stream, "send_eof", None)
            if send_eof is not None:
                await send_eof()
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


# OpenSSL reason codes of a server-side handshake failure, in words.
_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate",
    "CERTIFICATE_VERIFY_FAILED": "client certificate not trusted",
    "NO_SHARED_CIPHER": "no shared cipher",
    "UNSUPPORTED_PROTOCOL": "unsupported TLS version",
    "HTTP_REQUEST": "plain HTTP sent to a TLS port",
    "WRONG_VERSION_NUMBER": "not TLS",
}


def handshake_failure(exc: BaseException) -> dict[str, Any]:
    """Log fields for a failed server-side handshake: ``reason`` (in words) and ``error``."""
    if isinstance(exc, trio.TooSlowError):
        return {"reason": "handshake timeout", "error": "TooSlowError"}
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError):
            code = getattr(cur, "reason", None) or type(cur).__name__
            fields: dict[str, Any] = {"reason": _REASONS.get(code, code), "error": code}
            if isinstance(cur, ssl.SSLCertVerificationError):
                fields["reason"] = f"client certificate not trusted: {cur.verify_message}"
            return fields
        cur = cur.__cause__ or cur.__context__
    if isinstance(exc, trio.BrokenResourceError):
        return {"reason": "connection closed during the handshake", "error": type(exc).__name__}
    return {"reason": str(exc) or type(exc).__name__, "error": type(exc).__name__}

"""Errors of the nghttp2 core.  Those that end a session are also ``h2.exceptions``
types, so the relay catches them where it catches h2's."""

from __future__ import annotations

import h2.exceptions
from h2.errors import ErrorCodes

from .._errors import GatewayError


class CoreLoadError(GatewayError):
    """libnghttp2 could not be loaded or is not usable; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"nghttp2 unavailable: {reason}")
        self.reason = reason


class SessionTerminated(GatewayError, h2.exceptions.ProtocolError):
    """nghttp2 ended the session (GOAWAY queued); ``error_code`` is the GOAWAY's code."""

    def __init__(self, error_code: int, detail: str) -> None:
        super().__init__(f"nghttp2 GOAWAY({code_name(error_code)}): {detail}")
        self.error_code = error_code
        self.detail = detail


class SessionFlooded(SessionTerminated, h2.exceptions.DenialOfServiceError):
    """The peer broke a flood limit; ``reason`` uses the abuse reasons of the gateway."""

    def __init__(self, reason: str, detail: str,
                 error_code: int = ErrorCodes.ENHANCE_YOUR_CALM) -> None:
        super().__init__(error_code, f"{reason}: {detail}")
        self.reason = reason


class SessionInitError(GatewayError):
    """nghttp2 refused to create or configure a session (a library that loads but
    misbehaves): the connection is refused; enough of these should mean falling back."""


class CoreInternalError(SessionTerminated):
    """A callback of ours failed (a bug): the session is ended with INTERNAL_ERROR."""


def code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"

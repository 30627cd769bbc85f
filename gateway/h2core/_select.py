"""Which HTTP/2 core this process runs on, and why.

:func:`select_core` loads libnghttp2 and proves it works by running one request through
a client and a server session in memory; if anything fails it falls back to h2 and says
why.  The answer is a :class:`CoreInfo`, meant for the one start-up log line, the admin
``/config`` page, the ``isthmus_http2_core{core=...}`` gauge and
``isthmus gateway run --check-core``.  ``ISTHMUS_HTTP2_CORE=h2`` forces the fallback
(``=nghttp2`` makes a load failure an error instead of a fallback).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import h2

from .._errors import GatewayError
from . import _ffi
from ._errors import CoreLoadError
from ._conn import NgHttp2Connection

CORES = ("nghttp2", "h2")


@dataclass(frozen=True)
class CoreInfo:
    """The selected core: ``name`` is ``"nghttp2"`` or ``"h2"``; ``reason`` says why;
    ``self_test`` is nghttp2's: ``"passed"``, ``"failed"`` (the reason says how) or
    ``"not run"`` (h2 was asked for, or the library did not load)."""

    name: str
    reason: str
    version: str
    library: str = ""
    protections: dict[str, bool] = field(default_factory=dict)
    self_test: str = "not run"

    def as_dict(self) -> dict[str, Any]:
        """For ``/config`` and ``--check-core``: plain JSON types."""
        return {"core": self.name, "reason": self.reason, "version": self.version,
                "library": self.library, "self_test": self.self_test,
                "protections": dict(self.protections)}

    def describe(self) -> str:
        """One line for the log and the CLI."""
        extra = ""
        if self.protections:
            have = sorted(k for k, v in self.protections.items() if v)
            missing = sorted(k for k, v in self.protections.items() if not v)
            extra = f"; protections: {', '.join(have) or 'none'}"
            if missing:
                extra += f" (missing: {', '.join(missing)})"
        return f"HTTP/2 core {self.name} {self.version}: {self.reason}{extra}"


def select_core(prefer: str | None = None, path: str | None = None) -> CoreInfo:
    """Pick the core: nghttp2 where it loads and works, else h2.

    ``prefer`` (default ``$ISTHMUS_HTTP2_CORE``) may be ``"h2"`` to force the fallback or
    ``"nghttp2"`` to require the library (a :class:`GatewayError` if it cannot load);
    ``path`` overrides the library's soname (tests).
    """
    prefer = (prefer if prefer is not None else os.environ.get("ISTHMUS_HTTP2_CORE", "")).strip()
    if prefer and prefer not in CORES:
        raise GatewayError(f"invalid ISTHMUS_HTTP2_CORE {prefer!r}: use one of "
                           f"{', '.join(CORES)}")
    if prefer == "h2":
        return _h2("ISTHMUS_HTTP2_CORE=h2 asked for it")
    tested = "not run"
    try:
        lib = _ffi.load(path)
        tested = "failed"
        _self_test(lib)
    except (CoreLoadError, GatewayError, OSError) as exc:
        reason = exc.reason if isinstance(exc, CoreLoadError) else str(exc)
        if prefer == "nghttp2":
            raise GatewayError(f"HTTP/2 core nghttp2 was required but {reason}") from None
        return _h2(f"fallback: {reason}", tested)
    return CoreInfo(name="nghttp2", reason=f"{lib.path} loaded and passed its self-test",
                    version=lib.version, library=lib.path, protections=dict(lib.protections),
                    self_test="passed")


def _h2(reason: str, self_test: str = "not run") -> CoreInfo:
    return CoreInfo(name="h2", reason=reason, version=h2.__version__, self_test=self_test)


def _self_test(lib: _ffi.Library) -> None:
    """One request and response between two sessions in memory, or GatewayError."""
    try:
        client = NgHttp2Connection(True, library=lib)
        server = NgHttp2Connection(False, library=lib)
        client.initiate_connection()
        server.initiate_connection()
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"),
                                  (b":path", b"/"), (b":authority", b"self-test")],
                            end_stream=True)
        events = server.receive_data(client.data_to_send())
        if not any(type(e).__name__ == "RequestReceived" for e in events):
            raise GatewayError("nghttp2 self-test: the server saw no request")
        server.send_headers(sid, [(b":status", b"204")], end_stream=True)
        events = client.receive_data(server.data_to_send())
        if not any(type(e).__name__ == "ResponseReceived" for e in events):
            raise GatewayError("nghttp2 self-test: the client saw no response")
    except GatewayError:
        raise
    except Exception as exc:  # a library that loads but misbehaves must not start
        raise GatewayError(f"nghttp2 self-test failed: {type(exc).__name__}: {exc}") from None

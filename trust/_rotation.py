"""Certificate rotation: a pure decision and a source that swaps contexts.

``rotation_due`` is a pure function of ``now``: renew once ``fraction`` of the lifetime
has passed (SPIRE renews at one half).  :class:`CertificateSource` keeps the current
``SSLContext`` and builds a fresh one when the files on disk change; connections
already established keep the context they were made with, so nothing is dropped.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509

from ._files import load_cert


def rotation_due(cert: x509.Certificate, now: dt.datetime, fraction: float = 0.5) -> bool:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    lifetime = end - start
    return now >= start + lifetime * fraction


def time_left(cert: x509.Certificate, now: dt.datetime) -> dt.timedelta:
    return cert.not_valid_after_utc - now


class CertificateSource:
    """Serves the newest ``SSLContext`` built from files that may be renewed in place.

    ``factory`` builds a context from the current files (e.g. a partial of
    :func:`trust.server_context`). ``current()`` is cheap: it re-stats the files at most
    every ``check_interval`` seconds and rebuilds only when their mtimes changed. A
    rebuild that fails (a half-renewed pair on disk) keeps the previous context.
    """

    def __init__(
        self,
        factory: Callable[[], ssl.SSLContext],
        watched: Sequence[str | os.PathLike[str]],
        check_interval: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self._factory = factory
        self._watched = [Path(p) for p in watched]
        self._interval = check_interval
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._stamp = self._mtimes()
        self._ctx = factory()
        self._checked = self._clock()
        self.generation = 1
        self.last_error: Exception | None = None

    def _mtimes(self) -> tuple[int, ...]:
        out = []
        for p in self._watched:
            try:
                out.append(p.stat().st_mtime_ns)
            except FileNotFoundError:
                out.append(-1)
        return tuple(out)

    def current(self) -> ssl.SSLContext:
        now = self._clock()
        if now - self._checked < self._interval:
            return self._ctx
        with self._lock:
            self._checked = now
            stamp = self._mtimes()
            if stamp != self._stamp:
                try:
                    ctx = self._factory()
                except Exception as exc:  # keep serving the old one; report it
                    self.last_error = exc
                    return self._ctx
                self._ctx, self._stamp = ctx, stamp
                self.generation += 1
                self.last_error = None
        return self._ctx

    def reload(self) -> ssl.SSLContext:
        """Force a rebuild now (e.g. right after writing renewed files)."""
        with self._lock:
            self._ctx = self._factory()
            self._stamp = self._mtimes()
            self._checked = self._clock()
            self.generation += 1
        return self._ctx

    def leaf(self) -> x509.Certificate | None:
        return load_cert(self._watched[0]) if self._watched else None

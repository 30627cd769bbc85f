"""Pools of long-lived, multiplexed HTTP/2 client connections (per peer gateway address,
and per local service target).

A request's upstream half is attached to the least-loaded connection that has room; a
new connection is dialled only when every open one carries ``streams_per_connection``
streams (up to ``max_connections_per_peer``), so gateway-to-gateway traffic rides few
connections and pays no handshake per request.  A request may bring a smaller cap of its
own (its service's TrafficPolicy): it then uses only the key's first ``cap`` connections.
Failed dials back off exponentially (with jitter) per key; while a key is backing off
with no live connection, requests fail fast with ``UF``.  A key whose last dial failed and that has no connection is
*failing* (:meth:`Pool.failing`): route selection leaves it out, and — when the owner's
``probe(key)`` says the key still matters — the pool re-dials it in the background after
each backoff, with no request waiting, so that traffic returns once a dial succeeds.
"""

from __future__ import annotations

import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio
from h2.errors import ErrorCodes

from ._config import Limits
from ._relay import H2Endpoint, H2Half

log = structlog.get_logger("isthmus.gateway")

# (stream) -> endpoint; does the dial, TLS and identity check, returns a running endpoint.
Dialer = Callable[[Any, "trio.Nursery"], Awaitable[H2Endpoint]]


@dataclass
class _Entry:
    conns: list[H2Endpoint] = field(default_factory=list)
    waiting: list[H2Half] = field(default_factory=list)
    dialling: int = 0
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    session: ssl.SSLSession | None = None


class Pool:
    def __init__(self, nursery: trio.Nursery, limits: Limits, dial: Dialer,
                 on_change: Callable[[Any, int], None] | None = None,
                 probe: Callable[[Any], bool] | None = None) -> None:
        self.nursery = nursery
        self.limits = limits
        self.dial = dial
        self.entries: dict[Any, _Entry] = {}
        self.on_change = on_change
        self.probe = probe

    def healthy(self, key: Any) -> bool:
        e = self.entries.get(key)
        return e is None or bool(e.conns) or e.retry_at <= trio.current_time()

    def failing(self, key: Any) -> str | None:
        """Why ``key`` is failing (its last dial failed, no connection is up); None if not."""
        e = self.entries.get(key)
        if e is None or e.conns or not e.failures:
            return None
        return e.last_error or "dial failed"

    def open(self, key: Any, half: H2Half, cap: int | None = None) -> None:
        """Attach ``half`` to a connection for ``key`` now or once one is up.

        ``cap``: the request's service may use at most this many of the key's connections
        (``TrafficPolicy.connection_pool.max_connections_per_peer``): the first ``cap``
        open ones, and a new one is dialled for it only while fewer are open.  The
        gateway's ``limits.max_connections_per_peer`` bounds every key whatever the cap.
        """
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = _Entry()
        limit = self.limits.streams_per_connection
        most = self.limits.max_connections_per_peer
        conns = e.conns
        if cap is not None and cap < most:
            most = cap
            conns = [c for c in e.conns if not c.draining][:cap]
        best: H2Endpoint | None = None
        for ep in conns:
            if ep.has_capacity(self.limits.max_concurrent_streams) and (
                    best is None or len(ep.halves) < len(best.halves)):
                best = ep
        # Draining connections (old certificate) finish their streams but don't count.
        total = sum(1 for c in conns if not c.draining) + e.dialling
        if best is not None and (len(best.halves) < limit or total >= most):
            half.attach(best)
            return
        if best is None and total >= most and not e.dialling:
            half.remote_reset(ErrorCodes.REFUSED_STREAM, "UO")
            return
        if not e.conns and not e.dialling and e.retry_at > trio.current_time():
            half.remote_reset(ErrorCodes.REFUSED_STREAM, "UF")
            return
        e.waiting.append(half)
        if not e.dialling and (best is None or total < most):
            e.dialling += 1
            self.nursery.start_soon(self._dial, key, e)
        elif best is not None:
            # A dial is under way but this connection still has room: don't wait.
            e.waiting.remove(half)
            half.attach(best)

    async def _dial(self, key: Any, e: _Entry) -> None:
        try:
            with trio.fail_after(self.limits.connect_timeout + self.limits.handshake_timeout):
                ep = await self.dial(key, self.nursery)
        except Exception as exc:  # noqa: BLE001 - any dial failure fails its waiters, never the pool
            e.dialling -= 1
            e.failures += 1
            backoff = min(self.limits.reconnect_backoff_max,
                          self.limits.reconnect_backoff_initial * 2 ** (e.failures - 1))
            e.retry_at = trio.current_time() + backoff * random.uniform(0.5, 1.0)
            e.last_error = str(exc) or type(exc).__name__
            log.warning("pool.dial_failed", target=str(key), error=e.last_error,
                        failures=e.failures, backoff=round(backoff, 3))
            waiting, e.waiting = e.waiting, []
            flags = getattr(exc, "flags", "UF")
            for h in waiting:
                h.remote_reset(ErrorCodes.REFUSED_STREAM, flags)
            if self.probe is not None:
                self.nursery.start_soon(self._probe, key, e)
            return
        e.dialling -= 1
        e.failures = 0
        e.retry_at = 0.0
        e.conns.append(ep)
        if self.on_change:
            self.on_change(key, len(e.conns))
        waiting, e.waiting = e.waiting, []
        for h in waiting:
            if not h.closed:
                h.attach(ep)

    async def _probe(self, key: Any, e: _Entry) -> None:
        """Re-dial a failing key once its backoff ends, while it still matters."""
        await trio.sleep_until(e.retry_at)
        if e.conns or e.dialling or e.retry_at > trio.current_time():
            return  # a request's dial got there first (a failed one scheduled its own probe)
        try:
            wanted = self.probe is not None and self.probe(key)
        except Exception:  # noqa: BLE001 - a broken callback must not end the pool
            log.error("pool.probe_check_failed", target=str(key), exc_info=True)
            return
        if wanted:
            e.dialling += 1
            await self._dial(key, e)

    def closed(self, key: Any, ep: H2Endpoint) -> None:
        """The shell calls this when a pooled connection's pump ended."""
        e = self.entries.get(key)
        if e is not None and ep in e.conns:
            e.conns.remove(ep)
            if self.on_change:
                self.on_change(key, len(e.conns))

    def drain_all(self) -> None:
        """Stop putting new streams on existing connections (e.g. after a cert renewal)."""
        for e in self.entries.values():
            for ep in e.conns:
                ep.draining = True
                if not ep.halves and ep.on_idle is not None:
                    ep.on_idle(ep)

    def connection_count(self) -> int:
        return sum(len(e.conns) for e in self.entries.values())

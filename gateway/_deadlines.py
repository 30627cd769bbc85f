"""Request timers: a heap of deadlines (sans-IO), which one task of the gateway fires
(:func:`gateway._gateway.run_timers`: it sleeps until :meth:`Deadlines.next_at`, and is
woken through :attr:`Deadlines.wake` when an earlier deadline is added).

What expiry does is the request's own decision (e.g.
:meth:`gateway._context.RequestContext.expire`); this is only the clock.

A timer's callback holds its request (halves, headers, retry state), so a request that
ends before its deadline cancels its timers (:meth:`Timer.cancel`, from
:meth:`~gateway._context.RequestContext.finish`): the callback is dropped at once and
the heap entry, now a few bytes, goes at its time or when cancelled entries make up half
the heap.  Without that, a route's 10 s timeout kept ten seconds' worth of finished
requests alive, and the garbage collector's passes over them cost more than the
requests themselves.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import structlog

COMPACT_MIN = 1024  # cancelled entries below this are left for their time


class Timer:
    """One deadline in a :class:`Deadlines` heap."""

    __slots__ = ("expire", "_owner")

    def __init__(self, owner: Deadlines, expire: Callable[[], None]) -> None:
        self.expire: Callable[[], None] | None = expire
        self._owner = owner

    def cancel(self) -> None:
        """Never call back (a no-op once it has fired or been cancelled)."""
        if self.expire is not None:
            self.expire = None
            self._owner._cancelled()


class Deadlines:
    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Timer]] = []
        self.counter = itertools.count()
        self.cancelled = 0  # entries of the heap whose timer was cancelled
        self.wake: Callable[[], None] = _nothing  # the firing task's: a new earliest deadline

    def add(self, at: float, expire: Callable[[], None]) -> Timer:
        """Call ``expire()`` at ``at`` (trio clock), unless the timer is cancelled first."""
        t = Timer(self, expire)
        first = not self.heap or at < self.heap[0][0]
        heapq.heappush(self.heap, (at, next(self.counter), t))
        if first:
            self.wake()
        return t

    def next_at(self) -> float | None:
        """When the earliest timer is due (None: no timer)."""
        return self.heap[0][0] if self.heap else None

    def _cancelled(self) -> None:
        self.cancelled += 1
        if self.cancelled >= COMPACT_MIN and 2 * self.cancelled >= len(self.heap):
            self.heap = [e for e in self.heap if e[2].expire is not None]
            heapq.heapify(self.heap)
            self.cancelled = 0

    def fire(self, now: float) -> None:
        """Call back every timer due at ``now``."""
        while self.heap and self.heap[0][0] <= now:
            t = heapq.heappop(self.heap)[2]
            expire = t.expire
            if expire is None:
                self.cancelled -= 1
                continue
            t.expire = None
            try:
                expire()
            except Exception:  # noqa: BLE001 - one odd stream must not stop the timer
                structlog.get_logger("isthmus.gateway").error("deadline.expire_failed", exc_info=True)


def _nothing() -> None:
    pass


__all__ = ["Deadlines", "Timer"]

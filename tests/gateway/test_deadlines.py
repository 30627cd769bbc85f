"""The gateway's request timers (gateway/_deadlines.py): a finished request's timers are
cancelled, so nothing a request held outlives it until its deadline, and the heap does
not grow with requests that ended long before their timeouts."""

from __future__ import annotations

import gc
import weakref

from gateway._context import RequestContext
from gateway._deadlines import COMPACT_MIN, Deadlines
from gateway._telemetry import Exchange


class _Held:
    """Stands for what a request's timer callback holds (halves, headers, retry state)."""


def test_a_cancelled_timer_lets_go_of_its_callback_at_once() -> None:
    d = Deadlines()
    held = _Held()
    ref = weakref.ref(held)
    t = d.add(10.0, lambda h=held: None)
    del held
    gc.collect()
    assert ref() is not None  # armed: the heap holds it
    t.cancel()
    gc.collect()
    assert ref() is None
    t.cancel()  # twice is a no-op
    assert d.cancelled == 1


def test_fire_calls_due_timers_in_order_and_never_a_cancelled_one() -> None:
    d = Deadlines()
    calls: list[int] = []
    timers = [d.add(float(i), lambda i=i: calls.append(i)) for i in (3, 1, 2, 5, 4)]
    timers[2].cancel()  # the one at 2
    d.fire(3.5)
    assert calls == [1, 3]
    assert d.cancelled == 0  # the cancelled entry was popped and forgotten
    timers[0].cancel()  # already fired: nothing to cancel
    assert d.cancelled == 0
    d.fire(10)
    assert calls == [1, 3, 4, 5] and not d.heap


def test_cancelled_entries_are_compacted_away_once_they_are_half_the_heap() -> None:
    d = Deadlines()
    n = 4 * COMPACT_MIN
    timers = [d.add(100.0 + i, lambda: None) for i in range(n)]
    for t in timers[: n - 10]:
        t.cancel()
    assert len(d.heap) < n // 2 + 10, len(d.heap)
    assert all(e[2].expire is not None for e in d.heap) or d.cancelled < COMPACT_MIN
    calls: list[int] = []
    d.add(50.0, lambda: calls.append(1))
    d.fire(60.0)
    assert calls == [1]  # still a heap: the earliest first


def test_finishing_a_request_cancels_the_timers_it_armed_and_a_late_one_at_once() -> None:
    d = Deadlines()
    ctx = RequestContext(Exchange("source", "HTTP/2", lambda x: None))
    fired: list[str] = []
    ctx.arm(d.add(1.0, lambda: fired.append("a")))
    ctx.arm(d.add(2.0, lambda: fired.append("b")))
    ctx.finish()
    late = d.add(3.0, lambda: fired.append("c"))
    ctx.arm(late)
    d.fire(10.0)
    assert fired == [] and late.expire is None

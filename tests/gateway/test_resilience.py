"""The resilience state machines (gateway/_resilience.py), driven without an event loop:
deadlines and their headers, retry decisions, the retry budget, circuit breakers, outlier
ejection and fault decisions.  Property tests pin the budget's bound, the breakers' limits
and the ejection timing; the benchmark's --smoke mode runs at the end."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.models import Fault, OutlierDetection, Retries, parse_input
from gateway._resilience import (
    BACKOFF_BASE,
    BACKOFF_MAX,
    DEADLINE_HEADER,
    GRPC_TIMEOUT,
    CircuitBreaker,
    Deadline,
    Failure,
    FaultInjector,
    OutlierDetector,
    RetryBudget,
    RetryBuffer,
    RetryPolicy,
    RetryState,
    Skip,
    backoff,
    encode_deadline,
    encode_grpc_timeout,
    grpc_status_for_http,
    http_status_for_grpc,
    parse_deadline,
    parse_grpc_timeout,
    request_timeout,
    untried,
)

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Draws(random.Random):
    """A Random whose ``random()`` returns the given values in turn."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


# ---------------------------------------------------------------- deadlines


@pytest.mark.parametrize(("value", "seconds"), [
    (b"100m", 0.1), (b"5S", 5.0), (b"2M", 120.0), (b"1H", 3600.0), (b"250u", 250e-6), (b"7n", 7e-9),
    (b"99999999S", 99999999.0), (b"0m", 0.0),
])
def test_grpc_timeout_values_parse_per_the_grpc_spec(value: bytes, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"m", b"100", b"100x", b"-1S", b"123456789S", b"1.5S", b" 1S", b"1s"])
def test_malformed_grpc_timeouts_are_none(value: bytes) -> None:
    assert parse_grpc_timeout(value) is None


def test_grpc_timeout_encoding_uses_the_finest_unit_that_fits_eight_digits() -> None:
    assert encode_grpc_timeout(0.05) == b"50000000n"
    assert encode_grpc_timeout(0.5) == b"500000u"
    assert encode_grpc_timeout(2.0) == b"2000000u"
    assert encode_grpc_timeout(1000.0) == b"1000000m"
    assert encode_grpc_timeout(0) == b"0n" and encode_grpc_timeout(-1) == b"0n"


@given(st.floats(min_value=1e-9, max_value=3600 * 99_999_999, allow_nan=False))
def test_an_encoded_grpc_timeout_is_valid_and_never_earlier_than_ours(seconds: float) -> None:
    value = encode_grpc_timeout(seconds)
    assert 2 <= len(value) <= 9 and value[:-1].isdigit()
    back = parse_grpc_timeout(value)
    assert back is not None
    assert back >= seconds * (1 - 1e-12) - 1e-9  # rounded up (float noise aside)
    assert back <= seconds * (1 + 1e-5) + 1e-9  # by at most one unit in 100,000


def test_the_deadline_header_carries_remaining_milliseconds() -> None:
    assert encode_deadline(1.5) == b"1500" and encode_deadline(0.0004) == b"1"
    assert parse_deadline(b"1500") == 1.5
    for bad in (b"", b"0", b"-5", b"1.5", b"12345678901234", b"ten", b" 5"):
        assert parse_deadline(bad) is None, bad


@given(st.floats(min_value=0.001, max_value=10**6, allow_nan=False))
def test_the_deadline_header_round_trips_within_a_millisecond_and_never_later(seconds: float) -> None:
    back = parse_deadline(encode_deadline(seconds))
    assert back is not None and seconds - 0.001 <= back <= seconds + 1e-9


def test_the_lower_of_the_route_timeout_and_grpc_timeout_wins() -> None:
    assert request_timeout(None, None) is None
    assert request_timeout(2.0, None) == 2.0 and request_timeout(None, 0.5) == 0.5
    assert request_timeout(2.0, 0.5) == 0.5 and request_timeout(0.5, 2.0) == 0.5


def test_a_per_try_timeout_never_outlasts_the_request() -> None:
    d = Deadline(100.0, 2.0)
    assert d.at == 102.0 and d.remaining(101.0) == 1.0 and not d.expired(101.9) and d.expired(102.0)
    assert d.try_deadline(100.0, 0.5) == 100.5
    assert d.try_deadline(101.8, 0.5) == 102.0
    assert d.try_deadline(100.0, None) == 102.0
    forever = Deadline(0.0, None)
    assert forever.try_deadline(5.0, 0.5) == 5.5 and not forever.expired(1e12)


def test_upstream_headers_carry_the_time_left() -> None:
    d = Deadline(10.0, 2.0)
    assert d.upstream_headers(10.5, grpc=False) == [(DEADLINE_HEADER, b"1500")]
    assert d.upstream_headers(10.5, grpc=True) == [(DEADLINE_HEADER, b"1500"), (GRPC_TIMEOUT, b"1500000u")]
    assert Deadline(0.0, None).upstream_headers(1.0, grpc=True) == []


# ---------------------------------------------------------------- retry decisions


def policy(*retry_on: str, attempts: int = 3) -> RetryPolicy:
    return RetryPolicy.from_model(parse_input(Retries, {"attempts": attempts, "retry_on": list(retry_on)}))


@pytest.mark.parametrize(("retry_on", "outcome", "reason"), [
    (["connect-failure"], {"failure": Failure.CONNECT}, "connect-failure"),
    (["connect-failure"], {"failure": Failure.RESET}, None),
    (["connect-failure"], {"status": 503}, None),
    (["refused-stream"], {"failure": Failure.REFUSED_STREAM}, "refused-stream"),
    (["refused-stream"], {"failure": Failure.RESET}, None),
    (["reset"], {"failure": Failure.RESET}, "reset"),
    (["reset"], {"failure": Failure.CONNECT}, "reset"),
    (["reset"], {"failure": Failure.TIMEOUT}, "reset"),
    (["reset"], {"status": 503}, None),
    (["reset-before-request"], {"failure": Failure.BEFORE_REQUEST}, "reset-before-request"),
    (["reset-before-request"], {"failure": Failure.RESET}, None),
    (["5xx"], {"status": 500}, "5xx"),
    (["5xx"], {"status": 599}, "5xx"),
    (["5xx"], {"status": 404}, None),
    (["5xx"], {"failure": Failure.REFUSED_STREAM}, "5xx"),
    (["gateway-error"], {"status": 502}, "gateway-error"),
    (["gateway-error"], {"status": 504}, "gateway-error"),
    (["gateway-error"], {"status": 500}, None),
    (["gateway-error"], {"failure": Failure.TIMEOUT}, "gateway-error"),
    (["retriable-4xx"], {"status": 409}, "retriable-4xx"),
    (["retriable-4xx"], {"status": 400}, None),
    (["503"], {"status": 503}, "503"),
    (["503"], {"status": 502}, None),
    (["429", "503"], {"status": 429}, "429"),
    (["unavailable"], {"status": 200, "grpc_status": 14}, "unavailable"),
    (["unavailable"], {"status": 200, "grpc_status": 4}, None),
    (["deadline-exceeded", "unavailable"], {"status": 200, "grpc_status": 4}, "deadline-exceeded"),
    (["unavailable"], {"status": 200, "grpc_status": 0}, None),
    (["connect-failure", "reset", "503"], {"status": 200}, None),
    # the most specific condition names the reason
    (["5xx", "connect-failure"], {"failure": Failure.CONNECT}, "connect-failure"),
    (["5xx", "gateway-error"], {"status": 503}, "gateway-error"),
])
def test_retry_on_matches_envoys_conditions(retry_on: list[str], outcome: dict, reason: str | None) -> None:
    assert policy(*retry_on).reason(**outcome) == reason


@given(st.integers(min_value=1, max_value=64), st.integers(min_value=0, max_value=2**32))
def test_backoff_is_fully_jittered_and_capped(retry: int, seed: int) -> None:
    b = backoff(retry, random.Random(seed))
    assert 0 <= b < min((2**retry - 1) * BACKOFF_BASE, BACKOFF_MAX) + 1e-12


def test_backoff_spreads_over_its_whole_range() -> None:
    rng = random.Random(7)
    draws = [backoff(1, rng) for _ in range(2000)]
    assert max(draws) > 0.9 * BACKOFF_BASE and min(draws) < 0.1 * BACKOFF_BASE
    assert max(backoff(10, rng) for _ in range(2000)) > 0.9 * BACKOFF_MAX


def test_a_retry_prefers_a_destination_not_tried_yet() -> None:
    assert untried(["east", "west"], []) == ["east", "west"]
    assert untried(["east", "west"], ["east"]) == ["west"]
    assert untried(["east", "west"], ["east", "west"]) == ["east", "west"]  # all tried: any again


def test_the_retry_buffer_keeps_64_kib_then_gives_up() -> None:
    buf = RetryBuffer()
    buf.add(b"x" * 40_000)
    buf.add(b"x" * 25_536)
    assert buf.retriable and buf.size == 65_536 and len(buf.chunks) == 2
    buf.add(b"x")
    assert not buf.retriable and buf.chunks == []
    buf.add(b"more")
    assert not buf.retriable


def state(p: RetryPolicy, budget: RetryBudget | None = None, breaker: CircuitBreaker | None = None,
          now: float = 0.0) -> RetryState:
    return RetryState(p, budget, breaker, random.Random(1), now)


def test_retries_happen_until_attempts_are_used_up() -> None:
    s = state(policy("503", attempts=2))
    first = s.decide(0.0, "east", status=503)
    assert first.retry and first.reason == "503" and 0 <= first.backoff < BACKOFF_BASE
    second = s.decide(0.1, "west", status=503)
    assert second.retry and second.backoff < 3 * BACKOFF_BASE
    third = s.decide(0.2, "east", status=503)
    assert not third.retry and third.skipped is Skip.ATTEMPTS and third.reason == "503"  # flag URX
    assert s.tried == ["east", "west", "east"] and s.retries == 2


def test_a_success_or_an_unlisted_failure_is_not_retried() -> None:
    s = state(policy("503"))
    assert s.decide(0.0, status=200) == s.decide(0.0, status=500)
    assert not s.decide(0.0, status=200).retry and s.decide(0.0, status=500).skipped is None


@pytest.mark.parametrize(("kwargs", "skip"), [
    ({"body_retriable": False}, Skip.BUFFER),
    ({"response_started": True}, Skip.RESPONSE_STARTED),
    ({"deadline": 0.001}, Skip.DEADLINE),
])
def test_a_retry_needs_the_body_no_response_sent_and_time_left(kwargs: dict, skip: Skip) -> None:
    s = state(policy("reset"))
    d = s.decide(0.0, failure=Failure.RESET, **kwargs)
    assert not d.retry and d.skipped is skip and d.reason == "reset"


def test_a_retry_takes_a_breaker_slot_until_its_try_ends() -> None:
    breaker = CircuitBreaker(max_retries=1)
    a, b = state(policy("reset"), breaker=breaker), state(policy("reset"), breaker=breaker)
    assert a.decide(0.0, failure=Failure.RESET).retry and breaker.retries == 1
    refused = b.decide(0.0, failure=Failure.RESET)
    assert not refused.retry and refused.skipped is Skip.OVERFLOW and breaker.overflows == 1
    a.try_done()
    assert breaker.retries == 0 and b.decide(0.0, failure=Failure.RESET).retry
    b.decide(0.1, status=200)  # the retry's try ended: its slot is back
    assert breaker.retries == 0


def test_past_the_budget_retries_are_skipped_and_counted() -> None:
    budget = RetryBudget(percent=20, min_per_second=0, ttl=10)
    states = [state(policy("503"), budget=budget) for _ in range(10)]  # ten requests: two retries
    decisions = [s.decide(0.5, status=503) for s in states]
    assert [d.retry for d in decisions] == [True, True] + [False] * 8
    assert {d.skipped for d in decisions[2:]} == {Skip.BUDGET} and budget.skipped == 8


def test_a_budget_refusal_gives_the_breaker_slot_back() -> None:
    breaker = CircuitBreaker(max_retries=5)
    s = state(policy("503"), budget=RetryBudget(0, 0, 10), breaker=breaker)
    assert s.decide(0.0, status=503).skipped is Skip.BUDGET and breaker.retries == 0


# ---------------------------------------------------------------- retry budget


events = st.lists(st.tuples(st.floats(min_value=0, max_value=3.0), st.sampled_from(["request", "retry"])),
                  max_size=300)


@settings(max_examples=200, deadline=None)
@given(events, st.floats(min_value=0, max_value=100), st.integers(min_value=0, max_value=5),
       st.sampled_from([1.0, 2.0, 10.0]))
def test_the_budget_grants_a_retry_exactly_when_the_window_allows_it(
        steps: list[tuple[float, str]], percent: float, min_per_second: int, ttl: float) -> None:
    """Replayed from a log: every grant keeps retries <= percent x requests + reserve in the
    trailing window (ttl in 10 slots), and every refusal would have broken that bound."""
    budget = RetryBudget(percent, min_per_second, ttl)
    slot_len = ttl / 10
    log: list[tuple[int, str]] = []
    now = 0.0
    for dt, kind in steps:
        now += dt
        slot = int(now / slot_len)
        if kind == "request":
            budget.deposit(now)
            log.append((slot, "request"))
            continue
        window = [k for s, k in log if slot - 10 < s <= slot]
        bound = percent / 100 * window.count("request") + min_per_second * ttl
        granted = budget.try_withdraw(now)
        assert granted == (window.count("retry") + 1 <= bound + 1e-9) or \
            abs(window.count("retry") + 1 - bound) < 1e-6  # float ties either way
        if granted:
            log.append((slot, "retry"))


def test_with_everything_failing_retries_stay_within_the_budget() -> None:
    """1,000 requests over 10 s, each wanting 3 retries against an upstream that always fails."""
    budget = RetryBudget(percent=20, min_per_second=10, ttl=10)
    retries = skipped = 0
    for i in range(1000):
        now = i * 0.01
        s = RetryState(policy("503", attempts=3), budget, None, random.Random(i), now)
        while (d := s.decide(now, status=503)).retry:
            retries += 1
        skipped += d.skipped is Skip.BUDGET
    assert retries == 200 + 100  # 20 % of the requests, plus 10/s over the 10 s window
    assert budget.skipped == skipped > 600  # counted, once per request that wanted more


def test_old_slots_leave_the_window() -> None:
    b = RetryBudget(percent=100, min_per_second=0, ttl=10)
    for _ in range(5):
        b.deposit(0.0)
    assert b.allowed(9.9) == 5 and b.allowed(10.0) == 0
    b.deposit(100.0)
    assert b.try_withdraw(100.0) and not b.try_withdraw(100.0)


# ---------------------------------------------------------------- circuit breakers


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(["request", "pending", "retries"]), st.booleans()), max_size=200),
       st.integers(min_value=1, max_value=5), st.integers(min_value=1, max_value=5),
       st.integers(min_value=1, max_value=5))
def test_breakers_refuse_exactly_at_their_limits(ops: list[tuple[str, bool]], max_requests: int,
                                                 max_pending: int, max_retries: int) -> None:
    b = CircuitBreaker(max_requests, max_pending, max_retries)
    limits = {"request": max_requests, "pending": max_pending, "retries": max_retries}
    held = {"request": 0, "pending": 0, "retries": 0}
    refusals = 0
    for name, take in ops:
        suffix = "retry" if name == "retries" else name
        if take:
            ok = getattr(b, f"try_{suffix}")()
            assert ok == (held[name] < limits[name])
            held[name] += ok
            refusals += not ok
        elif held[name]:
            getattr(b, f"release_{suffix}")()
            held[name] -= 1
        assert (b.requests, b.pending, b.retries) == (held["request"], held["pending"], held["retries"])
        fill = b.fill()
        assert fill == {"requests": held["request"] / max_requests, "pending": held["pending"] / max_pending,
                        "retries": held["retries"] / max_retries}
    assert b.overflows == refusals


def test_a_breaker_without_limits_never_refuses_and_shows_no_fill() -> None:
    b = CircuitBreaker()
    assert all(b.try_request() for _ in range(10_000))
    assert b.fill() == {"requests": 0.0, "pending": 0.0, "retries": 0.0}


def test_new_limits_keep_what_is_in_flight() -> None:
    b = CircuitBreaker(max_requests=10)
    for _ in range(8):
        assert b.try_request()
    b.set_limits(5, None, None)
    assert not b.try_request() and b.fill()["requests"] == 1.0
    for _ in range(4):
        b.release_request()
    assert b.requests == 4 and b.try_request() and not b.try_request()


# ---------------------------------------------------------------- outlier detection


def detector(clock: Clock, service: str = "cart", **od: object) -> OutlierDetector:
    d = OutlierDetector(clock)
    d.configure(service, parse_input(OutlierDetection, {"max_ejection_percent": 100, **od}))
    return d


@settings(max_examples=100)
@given(st.integers(min_value=1, max_value=10), st.integers(min_value=1, max_value=60),
       st.floats(min_value=0, max_value=1e6), st.floats(min_value=0, max_value=0.999))
def test_consecutive_5xx_eject_for_the_base_time_and_the_destination_returns(
        threshold: int, base: int, start: float, frac: float) -> None:
    clock = Clock(start)
    d = detector(clock, consecutive_5xx=threshold, base_ejection_time=f"{base}s", max_ejection_time="1h")
    d.add_destinations("cart", ["east", "west"])
    for i in range(threshold):
        assert not d.ejected("east", "cart")
        assert d.record("east", "cart", status=503) == (i == threshold - 1)
    assert d.ejected("east", "cart") and not d.ejected("west", "cart")
    assert d.ejected("east", "cart", now=start + frac * base)
    assert not d.ejected("east", "cart", now=start + base)  # back the moment the time is up
    [e] = d.ejections(now=start)
    assert (e.cluster, e.service, e.ejections) == ("east", "cart", 1) and e.until - e.since == pytest.approx(base)


@settings(max_examples=100)
@given(st.integers(min_value=2, max_value=12), st.integers(min_value=1, max_value=30))
def test_repeated_ejections_grow_by_the_base_time_up_to_the_cap(times: int, base: int) -> None:
    clock = Clock(0.0)
    cap = 5 * base
    d = detector(clock, consecutive_5xx=1, base_ejection_time=f"{base}s", max_ejection_time=f"{cap}s",
                 interval="1h")
    lengths = []
    for _ in range(times):
        assert d.record("east", "cart", failure=Failure.CONNECT)
        [e] = d.ejections()
        lengths.append(e.until - e.since)
        clock.t = e.until  # fails again the moment it is back
    assert lengths == pytest.approx([min(base * n, cap) for n in range(1, times + 1)])


def test_healthy_intervals_bring_the_ejection_time_back_down() -> None:
    clock = Clock(0.0)
    d = detector(clock, consecutive_5xx=1, base_ejection_time="30s", interval="10s")
    d.record("east", "cart", status=500)
    clock.t = 30.0
    d.record("east", "cart", status=500)  # at once again: 2 x 30 s
    assert d.ejections()[0].until == 90.0
    clock.t = 90.0 + 25.0  # two healthy intervals: the multiplier drops from 2 to 0, then 1
    d.record("east", "cart", status=500)
    assert d.ejections()[0].until - clock.t == 30.0


def test_failures_in_flight_during_an_ejection_start_a_new_run() -> None:
    clock = Clock()
    d = detector(clock, consecutive_5xx=2, base_ejection_time="10s")
    d.record("east", "cart", status=503)
    assert d.record("east", "cart", status=503)
    for _ in range(4):  # answers of requests sent before the ejection: two more runs, no new ejection
        assert not d.record("east", "cart", status=503)
    clock.t = 10.0
    assert not d.ejected("east", "cart")
    assert not d.record("east", "cart", status=503)  # one failure after its return is not a run
    assert d.record("east", "cart", status=503)


def test_successes_reset_the_count_and_only_gateway_errors_count_for_their_detector() -> None:
    clock = Clock()
    d = detector(clock, consecutive_5xx=0, consecutive_gateway_errors=3)
    for status in (503, 502, 200, 504, 503):
        assert not d.record("east", "cart", status=status)
    assert not d.record("east", "cart", status=500)  # a 5xx that is no gateway error breaks the run
    for _ in range(2):
        d.record("east", "cart", status=503)
    assert d.record("east", "cart", failure=Failure.RESET)  # a local failure is a gateway error
    assert d.ejections()[0].detector == "consecutive_gateway_errors"


def test_grpc_answers_are_judged_by_their_grpc_status() -> None:
    clock = Clock()
    d = detector(clock, consecutive_5xx=2)
    assert not d.record("east", "cart", status=200, grpc_status=14)
    assert not d.record("east", "cart", status=200, grpc_status=0)  # OK resets
    assert not d.record("east", "cart", status=200, grpc_status=5)  # NOT_FOUND is a 404
    d.record("east", "cart", status=200, grpc_status=14)
    assert d.record("east", "cart", status=200, grpc_status=13)  # INTERNAL: 500


def test_max_ejection_percent_keeps_destinations_in_and_panic_uses_them_all() -> None:
    clock = Clock()
    d = detector(clock, consecutive_5xx=1, max_ejection_percent=50)
    d.add_destinations("cart", ["east", "west"])
    assert d.record("east", "cart", status=503)
    assert not d.record("west", "cart", status=503)  # 1 of 2 ejected already: 50 %
    assert d.usable("cart", ["east", "west"]) == (["west"], False)
    full = detector(clock, consecutive_5xx=1)
    full.record("east", "cart", status=503)
    full.record("west", "cart", status=503)
    assert full.usable("cart", ["east", "west"]) == (["east", "west"], True) and full.panics == 1
    assert [e.cluster for e in full.ejections()] == ["east", "west"]


def test_the_default_ejection_share_still_ejects_one_of_two() -> None:
    clock = Clock()
    d = OutlierDetector(clock)
    d.configure("cart", parse_input(OutlierDetection, {"consecutive_5xx": 1}))  # 10 %
    d.add_destinations("cart", ["east", "west"])
    assert d.record("east", "cart", status=503) and not d.record("west", "cart", status=503)


def test_a_service_without_outlier_detection_is_never_ejected() -> None:
    d = OutlierDetector(Clock())
    for _ in range(100):
        assert not d.record("east", "cart", status=503)
    assert not d.ejected("east", "cart") and d.ejections() == [] and d.usable("cart", ["east"]) == (["east"], False)
    d2 = detector(Clock(), consecutive_5xx=1)
    d2.record("east", "cart", status=503)
    d2.configure("cart", None)
    assert not d2.ejected("east", "cart")


def test_ejections_list_for_explain_and_config() -> None:
    clock = Clock(100.0)
    d = detector(clock, consecutive_5xx=1, base_ejection_time="30s")
    d.record("west", "cart", status=503)
    clock.t = 110.0
    assert [e.as_dict(clock.t) for e in d.ejections()] == [
        {"cluster": "west", "service": "cart", "ejections": 1, "detector": "consecutive_5xx",
         "remaining_seconds": 20.0}]
    json.dumps([e.as_dict(clock.t) for e in d.ejections()])


# ---------------------------------------------------------------- faults


def injector(doc: dict) -> FaultInjector:
    return FaultInjector.from_model(parse_input(Fault, doc))


def test_fault_probabilities_are_floats_drawn_from_the_injected_rng() -> None:
    f = injector({"abort": {"percent": 0.5, "http_status": 503}})
    assert f.decide(Draws(0.0049), grpc=False).http_status == 503  # type: ignore[union-attr]
    assert f.decide(Draws(0.005), grpc=False) is None
    rng = random.Random(42)
    half = injector({"abort": {"percent": 50, "http_status": 503}})
    aborted = sum(half.decide(rng, grpc=False) is not None for _ in range(10_000))
    assert 4800 <= aborted <= 5200


def test_delay_and_abort_are_decided_independently() -> None:
    f = injector({"delay": {"percent": 10, "fixed": "200ms"}, "abort": {"percent": 5, "http_status": 503}})
    assert f.decide(Draws(0.05, 0.01), grpc=False) == f.decide(Draws(0.05, 0.01), grpc=False)
    both = f.decide(Draws(0.05, 0.01), grpc=False)
    assert both is not None and both.delay == 0.2 and both.http_status == 503 and both.aborts
    delay_only = f.decide(Draws(0.05, 0.9), grpc=False)
    assert delay_only is not None and delay_only.delay == 0.2 and not delay_only.aborts
    abort_only = f.decide(Draws(0.5, 0.01), grpc=False)
    assert abort_only is not None and abort_only.delay == 0.0 and abort_only.aborts
    assert f.decide(Draws(0.5, 0.9), grpc=False) is None
    always = injector({"delay": {"fixed": "1s"}})
    assert all(always.decide(random.Random(i), grpc=False).delay == 1.0 for i in range(100))  # type: ignore[union-attr]


def test_aborts_answer_grpc_with_a_status_and_http_with_a_code() -> None:
    http_abort = injector({"abort": {"http_status": 503}})
    assert (lambda d: (d.http_status, d.grpc_status))(http_abort.decide(Draws(0.0), grpc=True)) == (200, 14)
    assert (lambda d: (d.http_status, d.grpc_status))(http_abort.decide(Draws(0.0), grpc=False)) == (503, None)
    grpc_abort = injector({"abort": {"grpc_status": "DEADLINE_EXCEEDED"}})
    assert (lambda d: (d.http_status, d.grpc_status))(grpc_abort.decide(Draws(0.0), grpc=True)) == (200, 4)
    assert (lambda d: (d.http_status, d.grpc_status))(grpc_abort.decide(Draws(0.0), grpc=False)) == (504, None)


def test_status_mappings_follow_grpc_and_google_rpc() -> None:
    assert [grpc_status_for_http(s) for s in (400, 401, 403, 404, 429, 502, 503, 504, 500, 418)] == \
        [13, 16, 7, 12, 14, 14, 14, 14, 2, 2]
    assert [http_status_for_grpc(c) for c in (0, 4, 8, 14, 16, 99)] == [200, 504, 429, 503, 401, 500]


# ---------------------------------------------------------------- benchmark


def test_the_resilience_benchmark_smoke_mode_reports_ratios() -> None:
    out = subprocess.run([sys.executable, str(REPO / "tests/bench/resilience.py"), "--smoke", "--json"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["baseline_ns"] > 0 and r["guarded_ns"] > 0 and r["ratio_guarded/baseline"] > 0
    assert set(r["parts_ns"]) >= {"deadline", "budget", "breaker", "retry_state"}

"""Resilience state machines: deadlines, retries and their budget, circuit breakers,
outlier detection and fault injection.  Plain Python, no event loop; time comes in as
``now`` arguments (or an injected clock, for the outlier detector whose readers have none),
randomness from an injected ``random.Random``.  The data path asks; these only decide.

Theory of operation
===================

Settings come from :mod:`federation.models` (``RouteRule.timeout/retries/fault/mirror``,
``TrafficPolicy.connection_pool/outlier_detection``).  They are compiled once per config
build (:meth:`RetryPolicy.from_model`, :meth:`FaultInjector.from_model`, ...) so that a
request pays only for integer compares and a dict lookup or two.

Deadlines.  A request's timeout is the lower of the rule's ``timeout`` and the
``grpc-timeout`` it carried (:func:`request_timeout`).  The remaining time goes upstream as
``grpc-timeout`` for gRPC (gRPC's PROTOCOL-HTTP2.md: at most 8 digits and a unit
``H M S m u n``; we round up and use the finest unit that fits, as grpc-go does) and, for
every request, as ``x-isthmus-deadline``: the *remaining* milliseconds as a decimal
integer, the convention of Envoy's ``x-envoy-expected-rq-timeout-ms``.  It is relative
because two clusters' clocks are not synchronised; the inbound gateway starts its own
deadline from it on arrival.  A per-try timeout bounds one try, never past the request's
deadline (:meth:`Deadline.try_deadline`).

Retries (Envoy's router semantics, Istio's names).  :meth:`RetryPolicy.reason` says
whether what happened matches ``retry_on``, and by which condition (the metric's
``reason`` label): ``connect-failure``; ``refused-stream`` (REFUSED_STREAM: the peer did
not process it); ``reset`` (any reset or close before a response, connect failures and
per-try timeouts included); ``reset-before-request`` (connect failures and resets before the
request head went out); ``5xx`` (any 5xx and every reset); ``gateway-error``
(502/503/504, connect failures, resets, per-try timeouts); ``retriable-4xx`` (409); an
HTTP status code; a gRPC status name.  :class:`RetryState` is one request's retry state
(Envoy's ``RetryStateImpl``): a retry happens only while attempts are left, the request
body fits the 64 KiB retry buffer (:class:`RetryBuffer`, Envoy's default
``per_request_buffer_limit_bytes``), no response byte went downstream, the breaker's
``max_retries`` has room, the budget allows one, and the backoff ends before the
deadline.  Backoff is Envoy's fully jittered exponential one: retry *n* waits a uniform
random time in ``[0, (2**n - 1) × 25 ms)``, capped at 250 ms (10 × the base).  A retry
prefers a destination not yet tried (Envoy's ``previous_hosts`` predicate,
:func:`untried`); when every candidate was tried, any may be picked again.

Retry budget (Linkerd's, as tower's ``Budget`` implements it).  Each original request is
a deposit; each retry a withdrawal; both are counted in ``ttl`` (10 s) split into 10
slots.  A retry is allowed while ``retries + 1 <= percent/100 × requests + min_per_second
× ttl`` over the slots still in the window, so retries never exceed ``percent`` of the
requests plus a small reserve for quiet callers, however the upstream fails.

Circuit breakers (Envoy's per-cluster thresholds).  Counters of requests, pending
requests and retries in flight; past a limit the caller is refused at once (503/``UO``,
gRPC UNAVAILABLE), never queued.  :meth:`CircuitBreaker.fill` is the gauge: in-flight /
limit per counter.  Limits are updated in place on a config change so that requests in
flight release the counters they took.

Outlier detection (Envoy's consecutive-5xx and consecutive-gateway-failure detectors).
Each (cluster, service) destination counts consecutive 5xx answers (connect failures,
resets and timeouts count as local-origin 5xx, Envoy's default when
``split_external_local_origin_errors`` is off) and consecutive gateway errors (502, 503,
504 and the same local failures); any other answer resets both.  gRPC answers are judged
by their grpc-status mapped to HTTP (google/rpc/code.proto's mapping), as Envoy's router
does.  Reaching a threshold ejects the destination at once for ``base_ejection_time × n``
(``n``: its ejections so far, decremented for every ``interval`` it stayed healthy), at
most ``max_ejection_time``; it returns as soon as the time is up (Envoy un-ejects at its
next ``interval`` sweep; we do not wait for one).  A destination is not ejected while the
service's ejected share is already ``>= max_ejection_percent`` (the check Envoy and gRPC
make before counting the new one, so one ejection is always possible).  When every
destination of a request would be ejected, the routing code uses them all: Envoy's panic
mode, flagged and counted (:meth:`OutlierDetector.usable`).

Fault injection (Istio's HTTPFaultInjection).  Delay and abort are decided independently
with float probabilities (``percent / 100`` against ``rng.random()``); an HTTP abort of a
gRPC request is answered with the gRPC status gRPC's http-grpc-status-mapping.md gives,
a gRPC abort of a plain request with google/rpc/code.proto's HTTP status.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from federation.models import GRPC_STATUS_CODES

if TYPE_CHECKING:
    from federation.models import ConnectionPool, Fault, OutlierDetection, Retries
    from federation.models import RetryBudget as BudgetSettings

T = TypeVar("T")
INF = math.inf

# ---------------------------------------------------------------- deadlines

GRPC_TIMEOUT = b"grpc-timeout"
DEADLINE_HEADER = b"x-isthmus-deadline"
_GRPC_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
# Finest first, in nanoseconds (grpc-go's encodeTimeout order).
_GRPC_ENCODE = ((b"n", 1), (b"u", 1_000), (b"m", 1_000_000), (b"S", 1_000_000_000),
                (b"M", 60_000_000_000), (b"H", 3_600_000_000_000))
_GRPC_MAX_VALUE = 99_999_999  # "TimeoutValue: positive integer as ASCII string of at most 8 digits"
_DEADLINE_MAX_MS = 10**10  # ~115 days: past any sane timeout; longer values are malformed


def parse_grpc_timeout(value: bytes) -> float | None:
    """Seconds of a ``grpc-timeout`` value (``100m``, ``5S``...), None if malformed."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _GRPC_TIMEOUT_UNITS.get(value[-1:])
    return None if unit is None else int(value[:-1]) * unit


def encode_grpc_timeout(seconds: float) -> bytes:
    """``seconds`` as a ``grpc-timeout`` value: the finest unit whose value fits 8 digits,
    rounded up (a deadline passed on must never be later than ours); ``0n`` when none is left."""
    ns = round(seconds * 1e9)
    if ns <= 0:
        return b"0n"
    for unit, size in _GRPC_ENCODE:
        v = -(-ns // size)
        if v <= _GRPC_MAX_VALUE:
            return b"%d%s" % (v, unit)
    return b"%dH" % _GRPC_MAX_VALUE


def encode_deadline(seconds: float) -> bytes:
    """The ``x-isthmus-deadline`` value for ``seconds`` remaining: whole milliseconds,
    rounded down (never later than ours), at least 1 (0 would read as malformed)."""
    ms = int(seconds * 1000)
    if ms < 1:
        ms = 1
    elif ms > _DEADLINE_MAX_MS:
        ms = _DEADLINE_MAX_MS
    return b"%d" % ms


def parse_deadline(value: bytes) -> float | None:
    """Seconds remaining from an ``x-isthmus-deadline`` value, None if malformed (a
    lenient reader: the header is then ignored, not an error)."""
    if not 1 <= len(value) <= 11 or not value.isdigit():
        return None
    ms = int(value)
    return ms / 1000 if 0 < ms <= _DEADLINE_MAX_MS else None


def request_timeout(route_timeout: float | None, grpc_timeout: float | None) -> float | None:
    """The timeout a request runs under: the lower of the rule's and the caller's."""
    if route_timeout is None:
        return grpc_timeout
    if grpc_timeout is None or route_timeout < grpc_timeout:
        return route_timeout
    return grpc_timeout


class Deadline:
    """When one request must be done (``at``; ``inf``: never), from ``start``."""

    __slots__ = ("start", "at", "timeout")

    def __init__(self, now: float, timeout: float | None) -> None:
        self.start = now
        self.timeout = timeout
        self.at = INF if timeout is None else now + timeout

    def remaining(self, now: float) -> float:
        return self.at - now

    def expired(self, now: float) -> bool:
        return now >= self.at

    def try_deadline(self, now: float, per_try_timeout: float | None) -> float:
        """When a try starting at ``now`` must be done: its per-try timeout, never past
        the request's deadline."""
        if per_try_timeout is None:
            return self.at
        t = now + per_try_timeout
        return t if t < self.at else self.at

    def upstream_headers(self, now: float, grpc: bool) -> list[tuple[bytes, bytes]]:
        """The headers that carry the time left to the next hop (none without a deadline)."""
        if self.at == INF:
            return []
        left = self.at - now
        out = [(DEADLINE_HEADER, encode_deadline(left))]
        if grpc:
            out.append((GRPC_TIMEOUT, encode_grpc_timeout(left)))
        return out


# ---------------------------------------------------------------- status mappings

# gRPC's doc/http-grpc-status-mapping.md: the gRPC status a client sees for an HTTP status.
_HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
_GRPC_UNKNOWN = 2
# google/rpc/code.proto: the HTTP status that goes with each gRPC status.
_GRPC_TO_HTTP = {0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400,
                 10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}


def grpc_status_for_http(status: int) -> int:
    return _HTTP_TO_GRPC.get(status, _GRPC_UNKNOWN)


def http_status_for_grpc(code: int) -> int:
    return _GRPC_TO_HTTP.get(code, 500)


# ---------------------------------------------------------------- retries


class Failure(enum.Enum):
    """A try that ended without a response from the destination; values are the
    ``reason`` label of the retry metric."""

    CONNECT = "connect-failure"  # no connection to the peer (dial failed, pool failing)
    BEFORE_REQUEST = "reset-before-request"  # connection lost before the request head went out
    REFUSED_STREAM = "refused-stream"  # the peer answered RST_STREAM(REFUSED_STREAM)/GOAWAY past it
    RESET = "reset"  # reset or closed after the request went out, before a response
    TIMEOUT = "per-try-timeout"  # the try ran out of its per-try timeout


_ON_5XX, _ON_GATEWAY, _ON_RESET, _ON_BEFORE, _ON_CONNECT, _ON_REFUSED, _ON_409 = (1 << i for i in range(7))
_CONDITION_BITS = {"5xx": _ON_5XX, "gateway-error": _ON_GATEWAY, "reset": _ON_RESET,
                   "reset-before-request": _ON_BEFORE, "connect-failure": _ON_CONNECT,
                   "refused-stream": _ON_REFUSED, "retriable-4xx": _ON_409}
# Which conditions retry each failure, most specific first (the first set one names the reason).
_FAILURE_CONDITIONS: dict[Failure, tuple[tuple[int, str], ...]] = {
    Failure.CONNECT: ((_ON_CONNECT, "connect-failure"), (_ON_BEFORE, "reset-before-request"),
                      (_ON_RESET, "reset"), (_ON_GATEWAY, "gateway-error"), (_ON_5XX, "5xx")),
    Failure.BEFORE_REQUEST: ((_ON_BEFORE, "reset-before-request"), (_ON_RESET, "reset"),
                             (_ON_GATEWAY, "gateway-error"), (_ON_5XX, "5xx")),
    Failure.REFUSED_STREAM: ((_ON_REFUSED, "refused-stream"), (_ON_RESET, "reset"),
                             (_ON_GATEWAY, "gateway-error"), (_ON_5XX, "5xx")),
    Failure.RESET: ((_ON_RESET, "reset"), (_ON_GATEWAY, "gateway-error"), (_ON_5XX, "5xx")),
    Failure.TIMEOUT: ((_ON_RESET, "reset"), (_ON_GATEWAY, "gateway-error"), (_ON_5XX, "5xx")),
}
# retry_on's gRPC conditions: the status names in Envoy's spelling (unavailable, deadline-exceeded).
_GRPC_CODES = {n.lower().replace("_", "-"): c for n, c in GRPC_STATUS_CODES.items() if c}
_GRPC_NAMES = {v: k for k, v in _GRPC_CODES.items()}

RETRY_BUFFER_LIMIT = 64 * 1024  # Envoy's default per-request buffer for retries
BACKOFF_BASE = 0.025  # Envoy's default base interval
BACKOFF_MAX = 10 * BACKOFF_BASE  # Envoy's default max_interval


def backoff(retry: int, rng: random.Random, base: float = BACKOFF_BASE, cap: float = BACKOFF_MAX) -> float:
    """Seconds to wait before retry number ``retry`` (1 for the first): uniform in
    ``[0, (2**retry - 1) × base)``, the upper end capped at ``cap`` (Envoy's fully jittered
    exponential backoff)."""
    span = ((1 << min(retry, 30)) - 1) * base
    return rng.random() * (span if span < cap else cap)


class RetryPolicy:
    """A rule's ``retries``, compiled: how many, per-try timeout, on what."""

    __slots__ = ("attempts", "per_try_timeout", "bits", "statuses", "grpc_statuses")

    def __init__(self, attempts: int, per_try_timeout: float | None, retry_on: Iterable[str]) -> None:
        self.attempts = attempts
        self.per_try_timeout = per_try_timeout
        bits, statuses, grpc = 0, set(), set()
        for name in retry_on:
            if name in _CONDITION_BITS:
                bits |= _CONDITION_BITS[name]
            elif name.isdigit():
                statuses.add(int(name))
            elif name in _GRPC_CODES:
                grpc.add(_GRPC_CODES[name])
            else:  # the model refuses these; a newer writer's name is skipped, not fatal
                continue
        self.bits = bits
        self.statuses = frozenset(statuses)
        self.grpc_statuses = frozenset(grpc)

    @classmethod
    def from_model(cls, r: Retries) -> RetryPolicy:
        return cls(r.attempts, r.per_try_timeout, r.retry_on)

    def reason(self, failure: Failure | None = None, status: int = 0, grpc_status: int | None = None) -> str | None:
        """The ``retry_on`` condition that makes this try's outcome retriable, or None:
        ``failure`` when the try got no response, else its HTTP ``status`` and, for gRPC,
        the ``grpc_status`` it carried (in a trailers-only answer or the trailers)."""
        bits = self.bits
        if failure is not None:
            for bit, name in _FAILURE_CONDITIONS[failure]:
                if bits & bit:
                    return name
            return None
        if grpc_status is not None and grpc_status in self.grpc_statuses:
            return _GRPC_NAMES[grpc_status]
        if status in self.statuses:
            return str(status)
        if status >= 500:
            if bits & _ON_GATEWAY and status in (502, 503, 504):
                return "gateway-error"
            if bits & _ON_5XX:
                return "5xx"
        elif status == 409 and bits & _ON_409:
            return "retriable-4xx"
        return None


class RetryBudget:
    """Linkerd's retry budget over a sliding window of ``slots`` slots of ``ttl / slots``."""

    __slots__ = ("ratio", "reserve", "slot_len", "slots", "requests", "retries", "req_sum", "ret_sum",
                 "current", "skipped")

    def __init__(self, percent: float, min_per_second: int, ttl: float, slots: int = 10) -> None:
        self.ratio = percent / 100.0
        self.reserve = min_per_second * ttl
        self.slot_len = ttl / slots
        self.slots = slots
        self.requests = [0] * slots
        self.retries = [0] * slots
        self.req_sum = self.ret_sum = 0
        self.current = -1  # absolute slot number the ring's head holds
        self.skipped = 0  # retries refused by the budget

    @classmethod
    def from_model(cls, b: BudgetSettings) -> RetryBudget:
        return cls(b.percent, b.min_per_second, b.ttl)

    def _advance(self, now: float) -> int:
        slot = int(now / self.slot_len)
        cur = self.current
        if slot != cur:
            if slot < cur:  # a clock that went back: count it in the head slot
                return cur % self.slots
            n = self.slots
            for s in range(max(cur + 1, slot - n + 1), slot + 1):
                i = s % n
                self.req_sum -= self.requests[i]
                self.ret_sum -= self.retries[i]
                self.requests[i] = self.retries[i] = 0
            self.current = slot
        return slot % self.slots

    def deposit(self, now: float) -> None:
        """An original request (not a retry) started."""
        slot = int(now / self.slot_len)
        i = slot % self.slots if slot == self.current else self._advance(now)
        self.requests[i] += 1
        self.req_sum += 1

    def allowed(self, now: float) -> float:
        """How many retries the window allows in all (used ones included)."""
        self._advance(now)
        return self.ratio * self.req_sum + self.reserve

    def try_withdraw(self, now: float) -> bool:
        """Take one retry from the budget, if it has one."""
        i = self._advance(now)
        if self.ret_sum + 1 > self.ratio * self.req_sum + self.reserve:
            self.skipped += 1
            return False
        self.retries[i] += 1
        self.ret_sum += 1
        return True


class RetryBuffer:
    """The request body kept for a retry, up to ``limit`` bytes; past it the request
    streams on but can no longer be retried."""

    __slots__ = ("chunks", "size", "limit", "overflowed")

    def __init__(self, limit: int = RETRY_BUFFER_LIMIT) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.overflowed = False

    def add(self, data: bytes) -> None:
        if self.overflowed:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.overflowed = True
            self.chunks = []
        else:
            self.chunks.append(data)

    @property
    def retriable(self) -> bool:
        return not self.overflowed


def untried(candidates: Sequence[T], tried: Collection[T]) -> Sequence[T]:
    """The candidates not tried yet; all of them when every one was (Envoy's
    ``previous_hosts`` predicate, after which any host may be picked again)."""
    if not tried:
        return candidates
    left = [c for c in candidates if c not in tried]
    return left or candidates


class Skip(enum.Enum):
    """Why a retriable failure was not retried (the ``skipped`` metric label)."""

    ATTEMPTS = "attempts"  # no attempts left: the last answer goes back, flag URX
    BUFFER = "buffer"  # the body outgrew the retry buffer
    RESPONSE_STARTED = "response-started"  # a response byte went downstream
    OVERFLOW = "overflow"  # the breaker's max_retries is full
    BUDGET = "budget"  # past the retry budget
    DEADLINE = "deadline"  # the backoff would end past the request's deadline


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    reason: str | None = None  # the retry_on condition matched (None: not retriable)
    skipped: Skip | None = None
    backoff: float = 0.0


NO_RETRY = RetryDecision(False)


class RetryState:
    """One request's retries (Envoy's ``RetryStateImpl``): call :meth:`decide` after each
    failed try, :meth:`try_done` when a retry's try ends (it releases its breaker slot)."""

    __slots__ = ("policy", "budget", "breaker", "rng", "retries", "tried", "holding")

    def __init__(self, policy: RetryPolicy, budget: RetryBudget | None, breaker: CircuitBreaker | None,
                 rng: random.Random, now: float | None) -> None:
        """``now``: when the request started, to count it toward the budget; None when it
        was counted already (the gateway makes this state on a request's first failure)."""
        self.policy = policy
        self.budget = budget
        self.breaker = breaker
        self.rng = rng
        self.retries = 0
        self.tried: list[object] | None = None  # made on the first decision: most requests need none
        self.holding = False
        if budget is not None and now is not None:
            budget.deposit(now)

    def decide(self, now: float, destination: object = None, *, failure: Failure | None = None,
               status: int = 0, grpc_status: int | None = None, body_retriable: bool = True,
               response_started: bool = False, deadline: float = INF) -> RetryDecision:
        if self.holding:
            self.try_done()
        if failure is None and status < 400 and not grpc_status:
            return NO_RETRY  # the common case: an answer no condition retries
        if destination is not None:
            if self.tried is None:
                self.tried = []
            self.tried.append(destination)
        reason = self.policy.reason(failure, status, grpc_status)
        if reason is None:
            return NO_RETRY
        skip = None
        if self.retries >= self.policy.attempts:
            skip = Skip.ATTEMPTS
        elif not body_retriable:
            skip = Skip.BUFFER
        elif response_started:
            skip = Skip.RESPONSE_STARTED
        if skip is not None:
            return RetryDecision(False, reason, skip)
        wait = backoff(self.retries + 1, self.rng)
        if now + wait >= deadline:
            return RetryDecision(False, reason, Skip.DEADLINE)
        breaker = self.breaker
        if breaker is not None and not breaker.try_retry():
            return RetryDecision(False, reason, Skip.OVERFLOW)
        if self.budget is not None and not self.budget.try_withdraw(now):
            if breaker is not None:
                breaker.release_retry()
            return RetryDecision(False, reason, Skip.BUDGET)
        self.holding = breaker is not None
        self.retries += 1
        return RetryDecision(True, reason, None, wait)

    def try_done(self) -> None:
        if self.holding:
            self.holding = False
            self.breaker.release_retry()  # type: ignore[union-attr]


# ---------------------------------------------------------------- circuit breakers

_UNLIMITED = 1 << 62


class CircuitBreaker:
    """Envoy's thresholds for one destination group: requests, pending requests and
    retries in flight.  ``try_*`` takes a slot or refuses at once; ``release_*`` gives it back."""

    __slots__ = ("max_requests", "max_pending", "max_retries", "requests", "pending", "retries", "overflows")

    def __init__(self, max_requests: int | None = None, max_pending: int | None = None,
                 max_retries: int | None = None) -> None:
        self.requests = self.pending = self.retries = 0
        self.overflows = 0  # refusals, for the UO counter
        self.max_requests = self.max_pending = self.max_retries = _UNLIMITED
        self.set_limits(max_requests, max_pending, max_retries)

    @classmethod
    def from_model(cls, pool: ConnectionPool) -> CircuitBreaker:
        return cls(pool.max_requests, pool.max_pending, pool.max_retries)

    def set_limits(self, max_requests: int | None, max_pending: int | None, max_retries: int | None) -> None:
        """New limits, in place: what is in flight stays counted."""
        self.max_requests = _UNLIMITED if max_requests is None else max_requests
        self.max_pending = _UNLIMITED if max_pending is None else max_pending
        self.max_retries = _UNLIMITED if max_retries is None else max_retries

    def try_request(self) -> bool:
        if self.requests >= self.max_requests:
            self.overflows += 1
            return False
        self.requests += 1
        return True

    def release_request(self) -> None:
        self.requests -= 1

    def try_pending(self) -> bool:
        if self.pending >= self.max_pending:
            self.overflows += 1
            return False
        self.pending += 1
        return True

    def release_pending(self) -> None:
        self.pending -= 1

    def try_retry(self) -> bool:
        if self.retries >= self.max_retries:
            self.overflows += 1
            return False
        self.retries += 1
        return True

    def release_retry(self) -> None:
        self.retries -= 1

    def fill(self) -> dict[str, float]:
        """In flight / limit per counter, from 0 to 1 (0 for no limit): the gauge."""
        return {name: (0.0 if limit == _UNLIMITED else min(1.0, used / limit))
                for name, used, limit in (("requests", self.requests, self.max_requests),
                                          ("pending", self.pending, self.max_pending),
                                          ("retries", self.retries, self.max_retries))}


# ---------------------------------------------------------------- outlier detection


@dataclass(frozen=True, slots=True)
class Ejection:
    """One ejected destination, for ``route explain --live`` and ``/config``."""

    cluster: str
    service: str
    since: float
    until: float
    ejections: int  # the multiplier: how many times in a row, less healthy intervals
    detector: str  # "consecutive_5xx" or "consecutive_gateway_errors"

    def as_dict(self, now: float) -> dict[str, object]:
        return {"cluster": self.cluster, "service": self.service, "ejections": self.ejections,
                "detector": self.detector, "remaining_seconds": round(max(0.0, self.until - now), 3)}


class _Settings:
    __slots__ = ("c5xx", "cgw", "interval", "base", "cap", "max_percent")

    def __init__(self, od: OutlierDetection) -> None:
        self.c5xx = od.consecutive_5xx or _UNLIMITED
        self.cgw = od.consecutive_gateway_errors or _UNLIMITED
        self.interval = od.interval
        self.base = od.base_ejection_time
        self.cap = od.max_ejection_time
        self.max_percent = od.max_ejection_percent


class _Dest:
    __slots__ = ("n5xx", "ngw", "multiplier", "until", "since", "returned", "detector")

    def __init__(self) -> None:
        self.n5xx = self.ngw = self.multiplier = 0
        self.until = self.since = 0.0
        self.returned = 0.0
        self.detector = ""


class OutlierDetector:
    """Consecutive-error ejection of (cluster, service) destinations, grouped by service.
    ``service`` is whatever key the routing code names a service by; a service without
    :meth:`configure`\\ d settings is never ejected."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.settings: dict[str, _Settings] = {}
        self.dests: dict[str, dict[str, _Dest]] = {}  # service -> cluster -> state
        self.ejections_total = 0
        self.panics = 0  # requests routed in panic mode

    def configure(self, service: str, od: OutlierDetection | None) -> None:
        """Set (or, with None, drop) ``service``'s settings; its counts are kept."""
        if od is None:
            self.settings.pop(service, None)
            self.dests.pop(service, None)
        else:
            self.settings[service] = _Settings(od)

    def add_destinations(self, service: str, clusters: Iterable[str]) -> None:
        """Make destinations known before any answer, so ``max_ejection_percent`` counts them."""
        if service in self.settings:
            group = self.dests.setdefault(service, {})
            for c in clusters:
                group.setdefault(c, _Dest())

    def record(self, cluster: str, service: str, status: int = 0, grpc_status: int | None = None,
               failure: Failure | None = None, now: float | None = None) -> bool:
        """Count one try's outcome; True when it ejected the destination."""
        s = self.settings.get(service)
        if s is None:
            return False
        group = self.dests.setdefault(service, {})
        d = group.get(cluster)
        if d is None:
            d = group[cluster] = _Dest()
        if failure is None:
            code = http_status_for_grpc(grpc_status) if grpc_status is not None else status
            if code < 500:
                d.n5xx = d.ngw = 0
                return False
            d.n5xx += 1
            if code in (502, 503, 504):
                d.ngw += 1
            else:
                d.ngw = 0
        else:  # a local-origin failure: a 5xx and a gateway error
            d.n5xx += 1
            d.ngw += 1
        if d.n5xx < s.c5xx and d.ngw < s.cgw:
            return False
        detector = "consecutive_5xx" if d.n5xx >= s.c5xx else "consecutive_gateway_errors"
        d.n5xx = d.ngw = 0  # a new run starts, whether or not this one ejects
        now = self.clock() if now is None else now
        if d.until > now:  # already ejected (answers still in flight)
            return False
        ejected = sum(1 for x in group.values() if x.until > now)
        if 100.0 * ejected / len(group) >= s.max_percent:
            return False
        if d.multiplier and d.returned:  # one step back for each healthy interval since its return
            d.multiplier = max(0, d.multiplier - int((now - d.returned) / s.interval))
        d.multiplier += 1
        d.since = now
        d.until = now + min(s.base * d.multiplier, s.cap)
        d.returned = d.until
        d.detector = detector
        self.ejections_total += 1
        return True

    def ejected(self, cluster: str, service: str, now: float | None = None) -> bool:
        group = self.dests.get(service)
        if group is None:
            return False
        d = group.get(cluster)
        return d is not None and d.until > (self.clock() if now is None else now)

    def usable(self, service: str, clusters: Sequence[str], now: float | None = None) -> tuple[Sequence[str], bool]:
        """The clusters not ejected, and False; or, when every one is, all of them and True
        (panic mode: counted in ``panics``)."""
        group = self.dests.get(service)
        if not group:
            return clusters, False
        now = self.clock() if now is None else now
        left = [c for c in clusters if not (c in group and group[c].until > now)]
        if left or not clusters:
            return left, False
        self.panics += 1
        return clusters, True

    def ejections(self, now: float | None = None) -> list[Ejection]:
        """Every destination ejected now, by service and cluster."""
        now = self.clock() if now is None else now
        return [Ejection(c, svc, d.since, d.until, d.multiplier, d.detector)
                for svc, group in sorted(self.dests.items()) for c, d in sorted(group.items()) if d.until > now]


# ---------------------------------------------------------------- fault injection


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What to do to one request before routing: wait ``delay`` seconds (flag ``DI``), then,
    when ``http_status`` is set, answer without routing it (flag ``FI``): a gRPC request
    gets ``:status 200`` and ``grpc_status`` in a trailers-only answer."""

    delay: float = 0.0
    http_status: int | None = None
    grpc_status: int | None = None

    @property
    def aborts(self) -> bool:
        return self.http_status is not None


class FaultInjector:
    """A rule's ``fault``, compiled; :meth:`decide` draws from the injected ``rng``."""

    __slots__ = ("delay_p", "delay", "abort_p", "abort_http", "abort_grpc")

    def __init__(self, delay_percent: float = 0.0, delay: float = 0.0, abort_percent: float = 0.0,
                 abort_http: int | None = None, abort_grpc: int | None = None) -> None:
        self.delay_p = delay_percent / 100.0 if delay else 0.0
        self.delay = delay
        self.abort_p = abort_percent / 100.0 if (abort_http or abort_grpc is not None) else 0.0
        self.abort_http = abort_http
        self.abort_grpc = abort_grpc

    @classmethod
    def from_model(cls, f: Fault) -> FaultInjector:
        d, a = f.delay, f.abort
        return cls(d.percent if d else 0.0, d.fixed if d else 0.0, a.percent if a else 0.0,
                   a.http_status if a else None,
                   GRPC_STATUS_CODES[a.grpc_status] if a and a.grpc_status else None)

    def decide(self, rng: random.Random, grpc: bool) -> FaultDecision | None:
        """None when this request is left alone (the common case allocates nothing)."""
        delay = self.delay if self.delay_p and rng.random() < self.delay_p else 0.0
        if self.abort_p and rng.random() < self.abort_p:
            if grpc:  # a trailers-only answer: :status 200 and the grpc-status
                code = self.abort_grpc if self.abort_grpc is not None else grpc_status_for_http(self.abort_http or 0)
                return FaultDecision(delay, 200, code)
            http = self.abort_http if self.abort_http is not None else http_status_for_grpc(self.abort_grpc or 0)
            return FaultDecision(delay, http, None)
        return FaultDecision(delay) if delay else None


__all__ = [
    "BACKOFF_BASE", "BACKOFF_MAX", "DEADLINE_HEADER", "GRPC_TIMEOUT", "NO_RETRY", "RETRY_BUFFER_LIMIT",
    "CircuitBreaker", "Deadline", "Ejection", "Failure", "FaultDecision", "FaultInjector", "OutlierDetector",
    "RetryBudget", "RetryBuffer", "RetryDecision", "RetryPolicy", "RetryState", "Skip", "backoff",
    "encode_deadline", "encode_grpc_timeout", "grpc_status_for_http", "http_status_for_grpc",
    "parse_deadline", "parse_grpc_timeout", "request_timeout", "untried",
]

"""Resilience settings in force at the outbound gateway: what a snapshot asks for
(:class:`GuardPlan`, pure, built with the rest of the config state) and the state that
must outlive config changes (:class:`Guards`: breakers, retry budgets, outlier
detection, the metrics).

Theory of operation
-------------------
:func:`compile_guards` reads a :class:`~federation.models.Snapshot` once per config build:
each TrafficRoute rule's ``timeout``, ``retries`` and ``fault`` become a :class:`RulePlan`
keyed by (route name, rule index), the key a route selection returns
(:class:`gateway._routes.Destination`); each :class:`~federation.models.TrafficPolicy`
becomes a :class:`ServicePlan` keyed by the (namespace, service) of its host.  A policy
applies to every name of its service, per-cluster pins included, because the key is the
service the request is finally sent to, whichever name it was called by.

The state machines themselves are :mod:`gateway._resilience`'s.  :class:`Guards` owns
their instances for the gateway's lifetime and re-syncs with the plan of the state a
request uses (an identity check per request): breakers are updated in place (requests
in flight release the slots they took), a retry budget is kept while its rule's budget
settings stay the same, outlier detection keeps its counts per destination.

Health.  :meth:`Guards.health` is the route selection's health input: the dialer's
(peer gateway reachable) plus outlier detection (an ejected destination is out with
reason ``ejected``).  When every candidate of a request is out only because of
ejections, the selection is run again without them: Envoy's panic mode, counted in
``isthmus_outlier_panic_total``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from federation.models import ConnectionPool, OutlierDetection, RetryBudget as BudgetSettings, Snapshot, format_duration
from federation.traffic import EJECTED, Health, Out, Target

from ._resilience import CircuitBreaker, FaultInjector, OutlierDetector, RetryBudget, RetryPolicy

ServiceKey = tuple[str, str]  # (namespace, service)
RuleKey = tuple[str, int]  # (route name, rule index)


class RulePlan:
    """One route rule's timeout, retries and fault, compiled."""

    __slots__ = ("timeout", "retry", "budget", "fault", "mirror")

    def __init__(self, timeout: float | None, retry: RetryPolicy | None, budget: BudgetSettings | None,
                 fault: FaultInjector | None, mirror: tuple[str, str, float] | None = None) -> None:
        self.timeout = timeout
        self.retry = retry
        self.budget = budget
        self.fault = fault
        self.mirror = mirror  # (cluster, service, probability)


class ServicePlan:
    """One service's TrafficPolicy, as the gateway applies it."""

    __slots__ = ("name", "pool", "outlier")

    def __init__(self, name: str, pool: ConnectionPool, outlier: OutlierDetection | None) -> None:
        self.name = name
        self.pool = pool
        self.outlier = outlier

    @property
    def limited(self) -> bool:
        p = self.pool
        return p.max_requests is not None or p.max_pending is not None or p.max_retries is not None


class GuardPlan:
    """Every rule's and service's settings of one snapshot (immutable once built)."""

    __slots__ = ("digest", "rules", "services")

    def __init__(self, rules: dict[RuleKey, RulePlan], services: dict[ServiceKey, ServicePlan],
                 digest: str = "") -> None:
        self.rules = rules
        self.services = services
        # Of the TrafficPolicies in force (the same set gives the same digest in every
        # gateway, as the routes' and the AuthorizationPolicies' digests do).
        self.digest = digest or _digest(())

    def connection_cap(self, key: ServiceKey) -> int | None:
        """The service's ``max_connections_per_peer`` (None: the gateway's limit alone)."""
        sp = self.services.get(key) if self.services else None
        return sp.pool.max_connections_per_peer if sp is not None else None

    def rule(self, route: str, index: int | None) -> RulePlan | None:
        if not route or index is None or not self.rules:
            return None
        return self.rules.get((route, index))

    def document(self) -> dict[str, Any]:
        """What ``/config`` shows of the plan."""
        return {
            "rules": [{"route": r, "rule": i, "timeout": format_duration(p.timeout) if p.timeout else None,
                       "retries": p.retry.attempts if p.retry else None, "fault": p.fault is not None,
                       "mirror": f"{p.mirror[0]}/{p.mirror[1]}" if p.mirror else None}
                      for (r, i), p in sorted(self.rules.items())],
            "traffic_policies": [{"name": p.name, "service": f"{ns}/{svc}",
                                  "connection_pool": p.pool.model_dump(exclude_none=True),
                                  "outlier_detection": p.outlier is not None}
                                 for (ns, svc), p in sorted(self.services.items())],
        }


def _digest(policies: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(
        [p.model_dump(mode="json") for p in sorted(policies, key=lambda p: p.name)],
        sort_keys=True).encode()).hexdigest()


EMPTY_PLAN = GuardPlan({}, {})


def compile_guards(snap: Snapshot) -> GuardPlan:
    """The plan of ``snap`` (pure)."""
    rules: dict[RuleKey, RulePlan] = {}
    for route in snap.routes:
        for i, r in enumerate(route.rules):
            if r.timeout is None and r.retries is None and r.fault is None and r.mirror is None:
                continue
            m = r.mirror
            mirror = (m.cluster, route.destination_service(m.service), m.percent / 100.0) if m is not None else None
            retry = RetryPolicy.from_model(r.retries) if r.retries is not None and r.retries.attempts else None
            rules[(route.name, i)] = RulePlan(r.timeout, retry, r.retries.budget if retry else None,
                                              FaultInjector.from_model(r.fault) if r.fault is not None else None,
                                              mirror)
    services: dict[ServiceKey, ServicePlan] = {}
    policies = getattr(snap, "traffic_policies", ()) or ()
    for tp in sorted(policies, key=lambda p: p.name):
        key = (tp.host.namespace, tp.host.service)
        services.setdefault(key, ServicePlan(tp.name, tp.connection_pool, tp.outlier_detection))
    return GuardPlan(rules, services, _digest(policies))


class GuardSpec:
    """What guards one destination of one route rule: the rule's plan, the service's key
    and breaker, the rule's retry budget, the service's connection cap.  Made once per
    (route, rule, service) and plan (:meth:`Guards.spec`), not per request."""

    __slots__ = ("breaker", "budget", "cap", "outlier", "rule", "skey")

    def __init__(self, rule: RulePlan | None, skey: ServiceKey, breaker: CircuitBreaker | None,
                 budget: RetryBudget | None, cap: int | None, outlier: bool) -> None:
        self.rule = rule
        self.skey = skey
        self.breaker = breaker
        self.budget = budget
        self.cap = cap
        self.outlier = outlier  # the service's TrafficPolicy has outlier_detection


class Slot:
    """A breaker's request slot that a CONNECT tunnel or an opaque TCP connection holds
    while it lasts (armed on its request context: :meth:`cancel` at its end gives it back)."""

    __slots__ = ("breaker",)

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker: CircuitBreaker | None = breaker

    def cancel(self) -> None:
        b = self.breaker
        if b is not None:
            self.breaker = None
            b.release_request()


SPECS_MAX = 65536  # (route, rule, service)s remembered per plan; past that, made per request


def service_key(destination_service: str) -> ServiceKey:
    """(namespace, service) of ``<svc>.<ns>.svc.cluster.local``."""
    svc, _, rest = destination_service.partition(".")
    return rest.partition(".")[0], svc


class Guards:
    """The gateway's resilience state (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float], base_health: Health,
                 rng: random.Random | None = None) -> None:
        self.clock = clock
        self.base_health = base_health
        self.rng = rng or random.Random()
        self.plan = EMPTY_PLAN
        self.breakers: dict[ServiceKey, CircuitBreaker] = {}
        self.budgets: dict[RuleKey, tuple[BudgetSettings, RetryBudget]] = {}
        self.outlier = OutlierDetector(clock)
        self.retries = Counter("isthmus_retries_total", "Retries the outbound gateway made, by the "
                               "retry_on condition that matched", ("reason",), registry=registry)
        self.skipped = Counter("isthmus_retries_skipped_total", "Retriable failures not retried, by why "
                               "(attempts, budget, overflow, buffer, deadline, response-started)", ("reason",),
                               registry=registry)
        self.overflows = Counter("isthmus_circuit_breaker_overflows_total", "Requests refused at once by a "
                                 "service's circuit breaker (503 UO)", ("service",), registry=registry)
        self.ejections = Counter("isthmus_outlier_ejections_total", "Destinations ejected by outlier "
                                 "detection", ("service", "cluster"), registry=registry)
        self.panics = Counter("isthmus_outlier_panic_total", "Requests routed in panic mode (every "
                              "destination ejected, all used)", ("service",), registry=registry)
        self.faults = Counter("isthmus_faults_injected_total", "Faults injected by route rules",
                              ("kind",), registry=registry)
        self.mirrored = Counter("isthmus_mirror_requests_total", "Mirror copies: sent, dropped (could not "
                                "keep up, no slot) or failed (their answer is discarded either way)",
                                ("outcome",), registry=registry)
        registry.register(_BreakerFill(self))
        self._children: dict[tuple[Any, ...], Any] = {}
        self._specs: dict[tuple[str, int | None, str], GuardSpec | None] = {}

    def count(self, counter: Counter, *labels: str) -> None:
        key = (id(counter), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*labels)
        child.inc()

    # -- config ------------------------------------------------------------------------
    def sync(self, plan: GuardPlan) -> None:
        """Adopt ``plan`` (cheap when it is the one in force)."""
        if plan is self.plan:
            return
        self.plan = plan
        self._specs = {}
        for key, sp in plan.services.items():
            b = self.breakers.get(key)
            p = sp.pool
            if b is None:
                self.breakers[key] = CircuitBreaker.from_model(p)
            else:
                b.set_limits(p.max_requests, p.max_pending, p.max_retries)
            self.outlier.configure(_okey(key), sp.outlier)
        for key in [k for k in self.breakers if k not in plan.services]:
            del self.breakers[key]  # requests in flight keep (and release) their own
            self.outlier.configure(_okey(key), None)
        budgets = {}
        for key, rp in plan.rules.items():
            if rp.budget is None:
                continue
            old = self.budgets.get(key)
            budgets[key] = old if old is not None and old[0] == rp.budget else (rp.budget,
                                                                               RetryBudget.from_model(rp.budget))
        self.budgets = budgets

    def spec(self, route: str, rule: int | None, destination_service: str) -> GuardSpec | None:
        """The guards of a request the route selection sent to ``destination_service`` by
        ``route``'s rule ``rule`` (None: nothing guards it)."""
        key = (route, rule, destination_service)
        specs = self._specs
        got = specs.get(key, specs)
        if got is not specs:
            return got  # type: ignore[return-value]
        plan = self.plan
        rp = plan.rule(route, rule)
        skey = service_key(destination_service)
        spec = None
        sp = plan.services.get(skey)
        if rp is not None or sp is not None:
            spec = GuardSpec(rp, skey, self.breaker(skey),
                             self.budget((route, rule if rule is not None else -1)) if rp is not None else None,
                             plan.connection_cap(skey), sp is not None and sp.outlier is not None)
        if len(specs) < SPECS_MAX:
            specs[key] = spec
        return spec

    def budget(self, key: RuleKey) -> RetryBudget | None:
        got = self.budgets.get(key)
        return got[1] if got is not None else None

    def breaker(self, key: ServiceKey) -> CircuitBreaker | None:
        return self.breakers.get(key) if self.breakers else None

    # -- outlier detection --------------------------------------------------------------
    def record(self, cluster: str, key: ServiceKey, **outcome: Any) -> None:
        if key in self.plan.services and self.outlier.record(cluster, _okey(key), **outcome):
            self.count(self.ejections, f"{key[1]}.{key[0]}", cluster)

    def health(self, target: Target) -> Out | None:
        """The selection's health: the dialer's, and outlier ejections."""
        if self.outlier.dests and self.outlier.ejected(target.cluster, f"{target.namespace}/{target.service}"):
            return Out(EJECTED, "consecutive errors; returns when its ejection time is up")
        return self.base_health(target)

    def ejected_only(self, target: Target) -> bool:
        return bool(self.outlier.dests) and self.outlier.ejected(target.cluster,
                                                                 f"{target.namespace}/{target.service}")

    def panic(self, key: ServiceKey) -> None:
        self.outlier.panics += 1
        self.count(self.panics, f"{key[1]}.{key[0]}")

    def document(self) -> dict[str, Any]:
        """What ``/config`` shows: the plan, breaker fill and the destinations ejected now."""
        return {**self.plan.document(),
                "breakers": {f"{svc}.{ns}": b.fill() for (ns, svc), b in sorted(self.breakers.items())},
                "ejections": [e.as_dict(self.clock()) for e in self.outlier.ejections()]}


def _okey(key: ServiceKey) -> str:
    return f"{key[0]}/{key[1]}"


class _BreakerFill(Collector):
    """``isthmus_circuit_breaker_fill{service, resource}``: in flight / limit, read at scrape."""

    def __init__(self, guards: Guards) -> None:
        self.guards = guards

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("isthmus_circuit_breaker_fill", "How full each service's circuit breaker is "
                              "(in flight / limit; 0 without a limit)", labels=("service", "resource"))
        for (ns, svc), b in sorted(self.guards.breakers.items()):
            for resource, v in b.fill().items():
                g.add_metric((f"{svc}.{ns}", resource), v)
        yield g

    def describe(self) -> list[GaugeMetricFamily]:
        return []


__all__ = ["EMPTY_PLAN", "GuardPlan", "GuardSpec", "Guards", "Slot", "RulePlan", "ServicePlan", "compile_guards",
           "service_key"]

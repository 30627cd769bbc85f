"""Traffic routes: where a request to a federated name goes, and why (pure: no IO).

Theory of operation
-------------------
This module is the one home of :class:`~federation.models.TrafficRoute` semantics.  The
gateway runs it per request (``gateway/_state.py`` builds it, ``gateway/_handlers.py``
selects with it) and ``isthmus route explain`` runs it on the federation's listings or
asks a gateway's admin endpoint, which runs it on its own state: one implementation, so
the answer and the traffic agree.

:func:`compile_routes` turns one :class:`~federation.models.Snapshot` into a
:class:`RouteSet` for one *calling* cluster (the gateway that applies it).  Compiling
decides everything that does not change between requests:

* which (cluster, service, port) can serve the caller at all, and if not why
  (:data:`REASONS`: not joined, revoked, not exported to the caller, 0 ready endpoints
  where the count is known, ...): a :class:`Target` or an :class:`Out`;
* each route's rules, per port of the federated name, with matches compiled (RE2 via
  :func:`federation.models.compile_regex`) and ``source_clusters`` already evaluated
  against the caller; a route's destinations and failover steps resolved to targets
  (``"*"``: every other exporting cluster not listed already, same-region first with
  ``locality: prefer-same-region``);
* for a federated name without a route, one implicit rule spreading evenly over every
  exporting cluster (the behaviour before routes, minus unhealthy clusters).

Locality.  ``prefer-same-region`` may come from the route (``TrafficRoute.locality``) or
from the service's :class:`~federation.models.TrafficPolicy` (``locality``, keyed by the
route's host, the name called).  ``""`` means *not set*, not *off*: a route that sets it
wins, a route that leaves it out takes the policy's, so either one asking for it turns it
on (there is no value that turns it off against the other).  A name without a route
takes the policy's.  It splits each weighted group and each failover step into the
caller's region (the ``topology.kubernetes.io/region`` label of its ClusterRecord) and
the rest; the rest serves only when no same-region candidate is healthy.  A caller
without the label, or destinations none of which share it, see no change.

Per-cluster names are pins: the gateway never asks this module about them.

Per request, :meth:`RouteSet.select` costs a dict lookup by (namespace, service, port),
the first matching rule (a rule's matches are alternatives; within one, every condition
must hold), then :meth:`_Rule.serving`: the healthy weighted destinations share the
traffic in proportion to their weights (an unhealthy one's weight is shared among the
others in proportion); when none is healthy, the failover steps are tried in order; when
those are exhausted there is no destination (the gateway answers 503, flag ``UH``).
Health is an input (:data:`Health`): the gateway passes its live signals (peer pools),
``explain`` the federation's (liveness).  :meth:`RouteSet.explain` runs the same
:meth:`_Rule.serving` and reports shares instead of drawing one.

Regex results are memoised per compiled pattern (bounded; cleared when full), because
the Python binding of RE2 costs microseconds per search and paths repeat.  That memo is
the only thing in a :class:`RouteSet` that changes after compiling.
"""

from __future__ import annotations

import hashlib
import json
import random
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ._errors import FederationError
from .models import (
    ClusterRecord,
    ExportedService,
    RouteMatch,
    ServicePort,
    Snapshot,
    StringMatch,
    TrafficRoute,
    compile_regex,
)
from .names import DNS_SUFFIX, local_host, service_hosts, split_authority
from .snapshot_index import CowMap, ServiceIndex

REGION_LABEL = "topology.kubernetes.io/region"
PREFER_SAME_REGION = "prefer-same-region"

# Why a (cluster, service) does not take traffic.  Stable: explain's JSON carries the codes.
CALLER = "caller"
NOT_JOINED = "not-joined"
REVOKED = "revoked"
NOT_EXPORTED = "not-exported"
NOT_EXPORTED_TO_CALLER = "not-exported-to-caller"
NO_PORT = "no-port"
NO_GATEWAY = "no-gateway"
NO_ENDPOINTS = "no-endpoints"
STALE = "stale"
EXPIRED = "expired"
UNREACHABLE = "unreachable"
EJECTED = "ejected"
REASONS: dict[str, str] = {
    CALLER: "the calling cluster itself (its own traffic does not cross the gateway)",
    NOT_JOINED: "not a joined cluster",
    REVOKED: "revoked",
    NOT_EXPORTED: "does not export the service",
    NOT_EXPORTED_TO_CALLER: "does not export the service to the calling cluster",
    NO_PORT: "does not export the port",
    NO_GATEWAY: "has no gateway address",
    NO_ENDPOINTS: "0 ready endpoints",
    STALE: "STALE (heartbeats missed)",
    EXPIRED: "EXPIRED (lease lapsed)",
    UNREACHABLE: "peer gateway unreachable",
    EJECTED: "ejected (outlier detection)",
}
# Reasons that take a destination out only while something else can serve.
SOFT = frozenset({STALE})
_MEMO = 4096  # regex results kept per pattern


class RouteConflict(FederationError, ValueError):
    """The routes of a snapshot cannot be compiled together (two govern one host)."""


class Out(NamedTuple):
    """Why a destination takes no traffic: a code of :data:`REASONS` and a detail."""

    code: str
    detail: str = ""

    def describe(self) -> str:
        text = REASONS.get(self.code, self.code)
        return f"{text}: {self.detail}" if self.detail else text


@dataclass(frozen=True, slots=True)
class Target:
    """One (cluster, service, port) that can serve the caller, and how to reach it."""

    cluster: str
    namespace: str
    service: str
    port: int
    protocol: str
    trust_domain: str
    addresses: tuple[str, ...]
    region: str = ""
    # Derived, once (read per request): the service as its own cluster names it, and what
    # that cluster's inbound listener expects as ``:authority``.
    destination_service: str = field(default="", compare=False)
    authority: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        name = local_host(self.service, self.namespace)
        object.__setattr__(self, "destination_service", name)
        object.__setattr__(self, "authority", f"{name}:{self.port}")


# A destination's live health: None when it may take traffic, else why not.
Health = Callable[[Target], "Out | None"]


def all_healthy(target: Target) -> Out | None:
    return None


class Request:
    """What a rule can match on: method, path (its query is no part of it), headers.

    Headers are given as a mapping, or ``raw`` as the request's header pairs (HTTP/2 and
    h11 both give lower-case names as bytes): a header is looked up only when a match
    asks for it, so a route without header matches never pays for them.
    ``tcp``: a connection, not a request; a match naming an HTTP condition fails.
    """

    __slots__ = ("method", "target", "tcp", "_raw", "_path")

    def __init__(self, method: str = "GET", path: str = "/", headers: Mapping[str, str] | None = None,
                 *, raw: Sequence[tuple[bytes, bytes]] = (), tcp: bool = False) -> None:
        self.method = method
        self.target = path  # as sent: with its query
        self.tcp = tcp
        self._path: str | None = None
        self._raw = raw if headers is None else [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    @property
    def path(self) -> str:
        """The path without its query (and fragment)."""
        p = self._path
        if p is None:
            p = self.target
            if "?" in p:
                p = p.partition("?")[0]
            if "#" in p:
                p = p.partition("#")[0]
            self._path = p
        return p

    def header(self, name: bytes) -> str | None:
        """The value of header ``name`` (lower-case bytes); several fields of one name
        match as one, joined with commas (RFC 9110, section 5.3)."""
        found = None
        for k, v in self._raw:
            if k == name:
                found = v if found is None else found + b"," + v
        return None if found is None else found.decode("latin-1")

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, _ in self._raw:
            name = k.decode("latin-1").lower() if isinstance(k, bytes) else str(k).lower()
            if not name.startswith(":") and name not in out:
                out[name] = self.header(name.encode("latin-1")) or ""
        return out


class Selection(NamedTuple):
    """The outcome of one selection.  ``target`` None: no destination — ``rule`` None
    means no rule matched (404, ``NR``), else none was healthy (503, ``UH``)."""

    target: Target | None
    route: str  # the TrafficRoute's name; "" for a federated name without one
    rule: int | None  # the matched rule's index; None: no rule matched (or no route)
    tier: str  # "split", "failover", "none" (nothing healthy) or "no-rule"


# ---------------------------------------------------------------- compiled matches


def _regex_test(pattern: str) -> Callable[[str | None], bool]:
    rx = compile_regex(pattern)
    memo: dict[str, bool] = {}  # bounded: cleared when full (values come from requests)

    def test(value: str | None) -> bool:
        if value is None:
            return False
        hit = memo.get(value)
        if hit is None:
            hit = rx.search(value) is not None
            if len(memo) >= _MEMO:
                memo.clear()
            memo[value] = hit
        return hit
    return test


def _string_test(m: StringMatch) -> Callable[[str | None], bool]:
    # Closures, not objects with __call__: this runs per request and per condition.
    if m.present is not None:
        want = m.present
        return lambda v: (v is not None) is want
    if m.exact is not None:
        exact = m.exact
        return lambda v: v == exact
    if m.prefix is not None:
        prefix = m.prefix
        return lambda v: v is not None and v.startswith(prefix)
    assert m.regex is not None
    return _regex_test(m.regex)


class _Match:
    """One RouteMatch, its source clusters already evaluated against the caller; ``test``
    is the compiled check (``req -> bool``)."""

    __slots__ = ("method", "path", "headers", "http", "test")

    def __init__(self, m: RouteMatch) -> None:
        self.method = m.method
        self.path = _string_test(m.path) if m.path is not None else None
        self.headers = tuple((name.encode("latin-1"), _string_test(sm)) for name, sm in sorted(m.headers.items()))
        self.http = bool(m.method or m.path is not None or m.headers)
        self.test = self._compile()

    def _compile(self) -> Callable[[Request], bool]:
        method, path, headers = self.method or None, self.path, self.headers
        if not self.http:
            return lambda req: True  # source_clusters only: decided already

        def test(req: Request) -> bool:
            if req.tcp:
                return False
            if method is not None and req.method != method:
                return False
            if path is not None and not path(req.path):
                return False
            for name, t in headers:
                if not t(req.header(name)):
                    return False
            return True
        return test

    def __call__(self, req: Request) -> bool:
        return self.test(req)


def _why_not(m: _Match, spec: RouteMatch, req: Request) -> str:
    """The first condition of ``spec`` that ``req`` fails (for explain)."""
    if m.http and req.tcp:
        return "matches HTTP requests only; this is a TCP connection"
    if m.method and req.method != m.method:
        return f"method {req.method} is not {m.method}"
    if m.path is not None and not m.path(req.path):
        return f"path {req.path!r} does not match {spec.path.model_dump(exclude_none=True)}"  # type: ignore[union-attr]
    for name, test in m.headers:
        if not test(req.header(name)):
            n = name.decode("latin-1")
            return f"header {n} does not match {spec.headers[n].model_dump(exclude_none=True)}"
    return ""


# ---------------------------------------------------------------- compiled rules


class _Split:
    """Targets sharing traffic by weight (normalised: only ratios matter), each with its
    :class:`Selection` made once (``label``: route name, rule index, tier)."""

    __slots__ = ("targets", "weights", "cum", "total", "label", "choices")

    def __init__(self, targets: Sequence[Target], weights: Sequence[int],
                 label: tuple[str, int | None, str] = ("", None, "split")) -> None:
        self.targets = tuple(targets)
        self.weights = tuple(weights)
        cum, total = [], 0
        for w in self.weights:
            total += w
            cum.append(total)
        self.cum = tuple(cum)
        self.total = total
        self.label = label
        route, rule, tier = label
        self.choices = tuple(Selection(t, route, rule, tier) for t in self.targets)

    def pick(self, rand: Callable[[], float]) -> Selection:
        c = self.choices
        if len(c) == 1:
            return c[0]
        i = bisect_right(self.cum, rand() * self.total)
        return c[i] if i < len(c) else c[-1]  # rand() * total may round up to total

    def shares(self) -> dict[tuple[str, str], float]:
        return {(t.cluster, t.service): w / self.total for t, w in zip(self.targets, self.weights) if w}

    def healthy(self, health: Health) -> _Split | None:
        """This split without its unhealthy targets (itself when all are healthy)."""
        for t in self.targets:
            if health(t) is not None:
                break
        else:
            return self  # the common case: no list is made
        keep = [i for i, t in enumerate(self.targets) if health(t) is None]
        if not keep:
            return None
        return _Split([self.targets[i] for i in keep], [self.weights[i] for i in keep], self.label)


@dataclass(frozen=True, slots=True)
class _Dest:
    """A destination or failover candidate as the route names it, resolved."""

    cluster: str
    service: str
    weight: int
    target: Target | None
    out: Out | None  # why it can never serve the caller (target is None then)


@dataclass(frozen=True, slots=True)
class _Step:
    """One failover step: a cluster, or ``*`` (its candidates, same region first)."""

    spec: str
    candidates: tuple[_Dest, ...]
    groups: tuple[_Split, ...]  # available candidates in locality order, even weights


@dataclass(frozen=True, slots=True)
class _Rule:
    index: int | None  # None: the implicit rule of a name without a route
    matches: tuple[_Match, ...] | None  # None: every request
    tests: tuple[Callable[[Request], bool], ...]  # their compiled checks
    specs: tuple[RouteMatch, ...]
    excluded: tuple[int, ...]  # indices of matches whose source_clusters exclude the caller
    dests: tuple[_Dest, ...]
    groups: tuple[_Split, ...]  # available weighted destinations in locality order
    failover: tuple[_Step, ...]
    exhausted: Selection  # the outcome when nothing is healthy

    def matched(self, req: Request) -> bool:
        if self.matches is None:
            return True
        for test in self.tests:
            if test(req):
                return True
        return False

    def serving(self, health: Health) -> _Split | None:
        """Who takes traffic now: the healthy weighted destinations of the first locality
        group that has any (tier "split"), else the healthy candidates of the first
        failover step that has any, evenly (tier "failover"), else None.

        Soft reasons (:data:`SOFT`: STALE, which the federation's own trouble can cause
        for every cluster at once) never empty a rule alone: when nothing else is left,
        the destinations out only for them serve (Envoy's panic mode, for liveness)."""
        s = self._serving(health)
        if s is None:
            def hard(t: Target) -> Out | None:
                out = health(t)
                return None if out is not None and out.code in SOFT else out
            s = self._serving(hard)
        return s

    def _serving(self, health: Health) -> _Split | None:
        for g in self.groups:
            s = g.healthy(health)
            if s is not None:
                return s
        for step in self.failover:
            for g in step.groups:
                s = g.healthy(health)
                if s is not None:
                    return s
        return None


@dataclass(frozen=True, slots=True)
class _Plan:
    """One federated (namespace, service, port) as the caller sees it."""

    namespace: str
    service: str
    port: int
    route: str
    rules: tuple[_Rule, ...]
    no_rule: Selection  # the outcome when no rule matches


# ---------------------------------------------------------------- compiling


def default_port(ports: Sequence[ServicePort]) -> ServicePort:
    """The port a name without one means: the only port, else port 80 if exported, else
    the first (stable API: see ``federation/names.py``)."""
    for p in ports:
        if p.port == 80:
            return p
    return ports[0]


def _region(c: ClusterRecord | None) -> str:
    return c.labels.get(REGION_LABEL, "") if c is not None else ""


class _Compiler:
    def __init__(self, snapshot: Snapshot, caller: str, index: ServiceIndex | None = None) -> None:
        self.caller = caller
        self.clusters = {c.name: c for c in snapshot.clusters}
        # (namespace, name) -> {cluster: service}, in cluster order.
        self.exports: Mapping[tuple[str, str], dict[str, ExportedService]] = (
            index if index is not None else ServiceIndex.of(snapshot.services)).groups
        self.region = _region(self.clusters.get(caller))
        # TrafficPolicy.locality by the (namespace, service) it governs.
        self.policy_locality: dict[tuple[str, str], str] = {
            (p.host.namespace, p.host.service): p.locality for p in snapshot.traffic_policies if p.locality}
        self._resolved: dict[tuple[str, str, str, int], tuple[Target | None, Out | None]] = {}

    def resolve(self, cluster: str, ns: str, service: str, port: int,
                same_service: bool) -> tuple[Target | None, Out | None]:
        key = (cluster, ns, service, port)
        got = self._resolved.get(key)
        if got is None:
            got = self._resolved[key] = self._resolve(cluster, ns, service, port, same_service)
        return got

    def forget(self) -> None:
        """Drop the memo of :meth:`resolve` once compiled (explain refills what it asks):
        entry by entry here, in the build, rather than in one long call wherever the
        RouteSet is freed (a full compile's memo has an entry per exported port)."""
        memo = self._resolved
        while memo:
            memo.popitem()

    def _resolve(self, cluster: str, ns: str, service: str, port: int,
                 same_service: bool) -> tuple[Target | None, Out | None]:
        rec = self.clusters.get(cluster)
        name = f"{ns}/{service}"
        if cluster == self.caller:
            return None, Out(CALLER)
        if rec is None:
            return None, Out(NOT_JOINED, cluster)
        if rec.revoked:
            return None, Out(REVOKED)
        svc = self.exports.get((ns, service), {}).get(cluster)
        if svc is None or not svc.ports:
            return None, Out(NOT_EXPORTED, name)
        if not svc.visible_to(self.caller):
            return None, Out(NOT_EXPORTED_TO_CALLER, f"{name} is exported to {', '.join(svc.export_to)}")
        sp = next((p for p in svc.ports if p.port == port), None)
        if sp is None and not same_service and len(svc.ports) == 1:
            sp = svc.ports[0]  # another service's only port stands in for the requested one
        if sp is None:
            return None, Out(NO_PORT, f"{name} exports {', '.join(str(p.port) for p in svc.ports)}, not {port}")
        if not rec.gateway_addresses:
            return None, Out(NO_GATEWAY)
        if svc.endpoints_known and svc.ready_endpoints == 0:
            return None, Out(NO_ENDPOINTS, name)
        return Target(cluster, ns, service, sp.port, sp.protocol, rec.trust_domain,
                      tuple(rec.gateway_addresses), _region(rec)), None

    def groups(self, targets: Sequence[Target], weights: Sequence[int], locality: bool,
               label: tuple[str, int | None, str]) -> tuple[_Split, ...]:
        pairs = [(t, w) for t, w in zip(targets, weights) if w > 0]
        if not pairs:
            return ()
        if locality and self.region:
            near = [p for p in pairs if p[0].region == self.region]
            far = [p for p in pairs if p[0].region != self.region]
            parts = [g for g in (near, far) if g]
        else:
            parts = [pairs]
        return tuple(_Split([t for t, _ in g], [w for _, w in g], label) for g in parts)

    def locality(self, route: TrafficRoute) -> str:
        """The route's locality: its own when set, else its host's TrafficPolicy's."""
        return route.locality or self.policy_locality.get((route.host.namespace, route.host.service), "")

    def rule(self, route: TrafficRoute, index: int, ns: str, port: int) -> _Rule:
        r = route.rules[index]
        host_svc = route.host.service
        matches: tuple[_Match, ...] | None = None
        excluded: list[int] = []
        if r.match:
            kept = []
            for i, m in enumerate(r.match):
                if m.source_clusters and self.caller not in m.source_clusters:
                    excluded.append(i)
                else:
                    kept.append(_Match(m))
            matches = tuple(kept)
        dests = []
        listed = set()
        for d in r.destinations:
            svc = route.destination_service(d.service)
            t, out = self.resolve(d.cluster, ns, svc, port, svc == host_svc)
            dests.append(_Dest(d.cluster, svc, d.weight, t, out))
            listed.add((d.cluster, svc))
        ok = [d for d in dests if d.target is not None]
        locality = self.locality(route) == PREFER_SAME_REGION
        groups = self.groups([d.target for d in ok], [d.weight for d in ok],  # type: ignore[misc]
                             locality, (route.name, index, "split"))
        steps = []
        for f in r.failover:
            svc = route.destination_service(f.service)
            if f.cluster == "*":
                names = [c for c in self.exports.get((ns, svc), {}) if (c, svc) not in listed]
                names.sort(key=lambda c: (bool(self.region) and locality
                                          and _region(self.clusters.get(c)) != self.region, c))
            else:
                names = [f.cluster] if (f.cluster, svc) not in listed else []
            cands = []
            for c in names:
                listed.add((c, svc))
                t, out = self.resolve(c, ns, svc, port, svc == host_svc)
                cands.append(_Dest(c, svc, 1, t, out))
            avail = [d.target for d in cands if d.target is not None]
            steps.append(_Step(f.cluster, tuple(cands),
                               self.groups(avail, [1] * len(avail), locality,  # type: ignore[arg-type]
                                           (route.name, index, "failover"))))
        return _Rule(index, matches, tuple(m.test for m in matches or ()), r.match, tuple(excluded), tuple(dests),
                     groups, tuple(steps),
                     Selection(None, route.name, index, "none"))

    def spread(self, ns: str, service: str, port: int) -> _Rule:
        """The implicit rule of a federated name without a route: even over every exporter
        (same region first when the service's TrafficPolicy asks for it)."""
        dests = []
        for c in self.exports.get((ns, service), {}):
            t, out = self.resolve(c, ns, service, port, True)
            dests.append(_Dest(c, service, 1, t, out))
        ok = [d.target for d in dests if d.target is not None]
        near = self.policy_locality.get((ns, service), "") == PREFER_SAME_REGION
        return _Rule(None, None, (), (), (), tuple(dests),
                     self.groups(ok, [1] * len(ok), near, ("", None, "split")),  # type: ignore[arg-type]
                     (), Selection(None, "", None, "none"))

    def federated_ports(self, ns: str, service: str) -> list[ServicePort]:
        """The ports of ``ns/service``'s federated name as the caller sees it (the same
        set the gateway's route table answers, in the same order)."""
        ports: dict[int, ServicePort] = {}
        for c, svc in self.exports.get((ns, service), {}).items():
            rec = self.clusters.get(c)
            if rec is None or rec.revoked or c == self.caller or not svc.visible_to(self.caller):
                continue
            for p in svc.ports:
                ports[p.port] = p
        return list(ports.values())


def compile_routes(snapshot: Snapshot, caller: str, dns_suffix: str = DNS_SUFFIX,
                   index: ServiceIndex | None = None, previous: RouteSet | None = None) -> RouteSet:
    """The routes of ``snapshot`` as ``caller``'s gateway applies them.

    ``index``: the snapshot's :class:`~federation.snapshot_index.ServiceIndex`.  When it was
    derived from ``previous``'s and the clusters and routes are those ``previous`` was
    compiled from, only the plans of the changed services (and of the routes naming them)
    are compiled again; the rest is shared with ``previous``: the same RouteSet a full
    compile makes.

    Raises :class:`RouteConflict` when two routes govern one host, ``ValueError`` when a
    route's regex does not compile.
    """
    if index is None:
        index = ServiceIndex.of(snapshot.services)
    comp = _Compiler(snapshot, caller, index)
    stale = {lv.cluster: Out(STALE if lv.state == "STALE" else EXPIRED,
                             f"last heartbeat {lv.last_heartbeat_age:.0f}s ago" if lv.last_heartbeat_age >= 0 else "")
             for lv in snapshot.liveness}
    if (previous is not None and index.derived_from(previous.index) and previous.caller == caller
            and previous.dns_suffix == dns_suffix and isinstance(previous.plans, CowMap)
            and previous.inputs == (snapshot.clusters, snapshot.routes)):
        affected = set(index.changed or ())
        for g in index.changed or ():
            affected.update(previous.referrers.get(g, ()))
        remove = [(ns, name, p.port) for ns, name in affected for p in previous._comp.federated_ports(ns, name)]
        put = [item for ns, name in affected for item in _plans_of(comp, previous.by_host, ns, name)]
        comp.forget()
        return RouteSet(snapshot.revision, caller, previous.plans.evolve(remove, put), previous.by_host, comp, previous.digest,
                        dns_suffix, stale, index=index, inputs=previous.inputs, referrers=previous.referrers)
    by_host: dict[tuple[str, str], TrafficRoute] = {}
    for r in snapshot.routes:
        key = (r.host.namespace, r.host.service)
        other = by_host.get(key)
        if other is not None:
            first, second = sorted((other.name, r.name))
            raise RouteConflict(f"routes {first!r} and {second!r} both govern {key[1]}.{key[0]}: "
                                "one host takes one TrafficRoute; merge their rules or delete one")
        by_host[key] = r
    built: dict[tuple[str, str, int], _Plan] = {}
    for (ns, name) in comp.exports:
        built.update(_plans_of(comp, by_host, ns, name))
    comp.forget()
    digest = "sha256:" + hashlib.sha256(json.dumps(
        [r.model_dump(mode="json") for r in sorted(snapshot.routes, key=lambda r: r.name)],
        sort_keys=True).encode()).hexdigest()
    return RouteSet(snapshot.revision, caller, CowMap(built), by_host, comp, digest, dns_suffix, stale,
                    index=index, inputs=(snapshot.clusters, snapshot.routes), referrers=_referrers(by_host))


def _plans_of(comp: _Compiler, by_host: Mapping[tuple[str, str], TrafficRoute], ns: str,
              name: str) -> list[tuple[tuple[str, str, int], _Plan]]:
    """The plans of the federated name ``ns/name``, one per port the caller sees."""
    route = by_host.get((ns, name))
    out = []
    for p in comp.federated_ports(ns, name):
        if route is None:
            rules: tuple[_Rule, ...] = (comp.spread(ns, name, p.port),)
        else:
            try:
                rules = tuple(comp.rule(route, i, ns, p.port) for i in range(len(route.rules)))
            except ValueError as exc:
                raise ValueError(f"route {route.name!r}: {exc}") from None
        rname = route.name if route else ""
        out.append(((ns, name, p.port), _Plan(ns, name, p.port, rname, rules, Selection(None, rname, None, "no-rule"))))
    return out


def _referrers(by_host: Mapping[tuple[str, str], TrafficRoute]) -> dict[tuple[str, str], frozenset[tuple[str, str]]]:
    """(namespace, service) -> the hosts whose route names it as a destination or failover:
    their plans change with its exports."""
    refs: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for (ns, host), route in by_host.items():
        for r in route.rules:
            for d in (*r.destinations, *r.failover):
                svc = route.destination_service(d.service)
                if svc != host:
                    refs.setdefault((ns, svc), set()).add((ns, host))
    return {k: frozenset(v) for k, v in refs.items()}


class RouteSet:
    """The compiled routes of one snapshot for one calling cluster (see the module doc)."""

    def __init__(self, revision: int, caller: str, plans: Mapping[tuple[str, str, int], _Plan],
                 by_host: dict[tuple[str, str], TrafficRoute], compiler: _Compiler, digest: str,
                 dns_suffix: str = DNS_SUFFIX, stale: dict[str, Out] | None = None, *,
                 index: ServiceIndex | None = None, inputs: tuple[Any, Any] = ((), ()),
                 referrers: Mapping[tuple[str, str], frozenset[tuple[str, str]]] | None = None) -> None:
        self.revision = revision
        # What the next compile derives from (see compile_routes): the services' index,
        # the (clusters, routes) compiled, and which hosts' plans name which services.
        self.index = index
        self.inputs = inputs
        self.referrers = referrers or {}
        # The clusters the federation streams as not LIVE (models.ClusterLiveness): the
        # gateway's health reports them (soft: see _Rule.serving).
        self.stale: dict[str, Out] = stale or {}
        self.dns_suffix = dns_suffix
        self._host_index: dict[str, tuple[str, str, str | None]] | None = None
        self.caller = caller
        self.plans = plans
        self.by_host = by_host
        self.digest = digest
        self._comp = compiler

    @classmethod
    def empty(cls, caller: str = "", dns_suffix: str = DNS_SUFFIX) -> RouteSet:
        return compile_routes(Snapshot(), caller, dns_suffix)

    @property
    def names(self) -> list[str]:
        return sorted(r.name for r in self.by_host.values())

    def __len__(self) -> int:
        return len(self.by_host)

    def select(self, namespace: str, service: str, port: int, req: Request,
               health: Health = all_healthy, rand: Callable[[], float] = random.random) -> Selection | None:
        """Where ``req`` to the federated name of ``namespace/service:port`` goes; None if
        the caller imports no such name."""
        plan = self.plans.get((namespace, service, port))
        if plan is None:
            return None
        for rule in plan.rules:  # matched() and serving(), inlined: this runs per request
            if rule.matches is not None:
                for test in rule.tests:
                    if test(req):
                        break
                else:
                    continue
            for g in rule.groups:
                for t in g.targets:
                    if health(t) is not None:
                        break
                else:
                    return g.pick(rand)
                break  # someone in the first group is out: the general path
            split = rule.serving(health)
            return split.pick(rand) if split is not None else rule.exhausted
        return plan.no_rule

    # ------------------------------------------------------------ explain

    def explain(self, host: str, req: Request, health: Health = all_healthy) -> dict[str, Any]:
        """Where ``req`` to ``host`` would go and why, as a JSON-able document: the rule
        matched (and why earlier ones did not), each destination's effective weight after
        health, the failover order, and for every cluster exporting the services involved
        why it is in or out.  Uses :meth:`_Rule.serving`, as :meth:`select` does."""
        name, port = split_authority(host)
        doc: dict[str, Any] = {
            "host": host, "from": self.caller, "revision": self.revision, "route_digest": self.digest,
            "request": {"method": None if req.tcp else req.method, "path": None if req.tcp else req.path,
                        "headers": {} if req.tcp else req.headers(), "tcp": req.tcp},
            "service": None, "pinned": None, "route": None, "locality": None, "rule": None, "rules": [],
            "destinations": [], "failover": [], "serving": [], "clusters": [],
        }
        where = self._hosts().get(name)
        if where is None:
            return _outcome(doc, "no-such-name", f"no exported service is named {name!r}")
        ns, svc, pin = where
        comp = self._comp
        if pin is None:
            ports = comp.federated_ports(ns, svc)
        else:
            exp = comp.exports.get((ns, svc), {}).get(pin)
            ports = list(exp.ports) if exp is not None else []
        if port is None and ports:
            port = default_port(ports).port
        doc["service"] = {"namespace": ns, "name": svc, "port": port}
        if port is None:
            doc["clusters"] = [self._cluster(c, ns, svc, default_port(e.ports).port if e.ports else 0, health)
                               for c, e in comp.exports.get((ns, svc), {}).items()]
            return _outcome(doc, "no-such-name", f"{svc}.{ns} is exported to {self.caller} by no cluster")
        if pin is not None:
            entry = self._cluster(pin, ns, svc, port, health)
            doc["pinned"] = pin
            doc["clusters"] = [entry]
            if entry["reason"] in _STATIC:
                return _outcome(doc, "no-such-name", f"{name!r} names {pin}'s export: {entry['detail']}")
            # A pin is never re-routed: it goes to its cluster even while that is unhealthy.
            entry["state"] = "serving"
            doc["serving"] = [{"cluster": pin, "service": svc, "effective_weight": 100.0}]
            return _outcome(doc, "pinned", "per-cluster names are pins: routes do not re-route them")
        plan = self.plans.get((ns, svc, port))
        route = self.by_host.get((ns, svc))
        doc["route"] = route.name if route is not None else None
        # Where prefer-same-region comes from: the route's own setting wins over the policy's.
        mode, source = ((route.locality, "route") if route is not None and route.locality else
                        (comp.policy_locality.get((ns, svc), ""), "traffic-policy"))
        doc["locality"] = {"mode": mode or None, "from": source if mode else None, "region": comp.region or None}
        if plan is None:
            doc["clusters"] = [self._cluster(c, ns, svc, port, health) for c in comp.exports.get((ns, svc), {})]
            return _outcome(doc, "no-such-name", f"no cluster exports port {port} of {svc}.{ns} to {self.caller}")
        chosen: _Rule | None = None
        for rule in plan.rules:
            if rule.index is None:
                doc["rules"].append({"index": None, "matched": True, "why": "no TrafficRoute: spread evenly"})
                chosen = rule
                break
            why = _rule_why(rule, req)
            doc["rules"].append({"index": rule.index, "matched": not why, "why": why or "matched"})
            if not why:
                chosen = rule
                break
        if chosen is None:
            doc["clusters"] = [self._cluster(c, ns, svc, port, health) for c in comp.exports.get((ns, svc), {})]
            return _outcome(doc, "no-rule", f"no rule of route {plan.route!r} matches")
        doc["rule"] = chosen.index
        split = chosen.serving(health)
        tier = split.label[2] if split is not None else "none"
        shares = split.shares() if split is not None else {}
        named: dict[tuple[str, str], dict[str, Any]] = {}
        for d in chosen.dests:
            e = self._entry(d, shares, health, tier == "split")
            e["weight"] = d.weight
            doc["destinations"].append(e)
            named[(d.cluster, d.service)] = {**e, "role": "destination"}
        for i, step in enumerate(chosen.failover):
            for d in step.candidates:
                e = {"step": i, "spec": step.spec, **self._entry(d, shares, health, tier == "failover")}
                doc["failover"].append(e)
                named.setdefault((d.cluster, d.service), {**e, "role": "failover"})
        doc["serving"] = [{"cluster": c, "service": s, "effective_weight": _pct(share)}
                          for (c, s), share in shares.items()]
        services = [svc, *sorted({s for _, s in named} - {svc})]
        for s in services:
            for c in comp.exports.get((ns, s), {}):
                if (c, s) not in named:
                    e = self._cluster(c, ns, s, port, health)
                    if e["state"] != "out":
                        e.update(state="unused", reason=None, detail="not named by the rule")
                    named[(c, s)] = {**e, "role": None}
        order = sorted(named, key=lambda cs: (services.index(cs[1]), cs[0]))
        doc["clusters"] = [{"cluster": c, "service": s, **{k: v for k, v in named[(c, s)].items() if k in _ENTRY}}
                           for c, s in order]
        if tier == "none":
            return _outcome(doc, "no-healthy-destination", "every destination and failover target is out")
        return _outcome(doc, tier, "")

    def _hosts(self) -> dict[str, tuple[str, str, str | None]]:
        hosts = self._host_index
        if hosts is None:
            hosts = {}
            for (ns, name), by_cluster in self._comp.exports.items():
                for h in service_hosts(name, ns, None, self.dns_suffix):
                    hosts[h] = (ns, name, None)
                for c in by_cluster:
                    for h in service_hosts(name, ns, c, self.dns_suffix):
                        hosts[h] = (ns, name, c)
            self._host_index = hosts
        return hosts

    def _cluster(self, cluster: str, ns: str, svc: str, port: int, health: Health) -> dict[str, Any]:
        t, out = self._comp.resolve(cluster, ns, svc, port, True)
        if out is None and t is not None:
            out = health(t)
        return {"cluster": cluster, "service": svc, "state": "out" if out else "available",
                "reason": out.code if out else None, "detail": out.describe() if out else ""}

    def _entry(self, d: _Dest, shares: dict[tuple[str, str], float], health: Health,
               tier_active: bool) -> dict[str, Any]:
        out = d.out if d.target is None else health(d.target)
        share = shares.get((d.cluster, d.service), 0.0) if tier_active else 0.0
        if out is not None and share > 0:  # out only for a soft reason, and nothing else serves
            state, detail = "serving", f"{out.describe()}; serving anyway: nothing else is left"
        elif out is not None:
            state, detail = "out", out.describe()
        elif share > 0:
            state, detail = "serving", ""
        elif d.weight == 0:
            state, detail = "standby", "weight 0"
        else:
            state, detail = "standby", "healthy; takes traffic only when those before it are out"
        return {"cluster": d.cluster, "service": d.service,
                "port": d.target.port if d.target is not None else None, "state": state,
                "reason": out.code if out else None, "detail": detail, "effective_weight": _pct(share)}


_STATIC = frozenset({CALLER, NOT_JOINED, REVOKED, NOT_EXPORTED, NOT_EXPORTED_TO_CALLER, NO_PORT})
_ENTRY = ("state", "reason", "detail", "role", "effective_weight")
_OUTCOMES = {"split": (200, ""), "failover": (200, ""), "pinned": (200, ""),
             "no-healthy-destination": (503, "UH"), "no-rule": (404, "NR"), "no-such-name": (404, "NR")}


def _pct(share: float) -> float:
    return round(share * 100.0, 3)


def _outcome(doc: dict[str, Any], outcome: str, detail: str) -> dict[str, Any]:
    status, flags = _OUTCOMES[outcome]
    doc["result"] = {"outcome": outcome, "status": status, "flags": flags or None, "detail": detail}
    return doc


def _rule_why(rule: _Rule, req: Request) -> str:
    """"" when ``rule`` matches ``req``, else why not (every alternative's first failure)."""
    if rule.matches is None:
        return ""
    reasons = []
    kept = iter(rule.matches)
    for i, spec in enumerate(rule.specs):
        if i in rule.excluded:
            reasons.append(f"match[{i}]: source_clusters {list(spec.source_clusters)} excludes the caller")
            continue
        m = next(kept)
        if m(req):
            return ""
        reasons.append(f"match[{i}]: {_why_not(m, spec, req)}")
    return "; ".join(reasons)


__all__ = [
    "CALLER", "EJECTED", "EXPIRED", "Health", "NOT_EXPORTED", "NOT_EXPORTED_TO_CALLER", "NOT_JOINED",
    "NO_ENDPOINTS", "NO_GATEWAY", "NO_PORT", "Out", "PREFER_SAME_REGION", "REASONS", "REGION_LABEL", "REVOKED", "Request", "SOFT",
    "RouteConflict", "RouteSet", "STALE", "Selection", "Target", "UNREACHABLE", "all_healthy",
    "compile_routes", "default_port",
]

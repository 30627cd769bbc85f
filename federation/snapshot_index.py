"""Persistent indexes over a snapshot's services, so that one change costs one change.

Theory of operation
-------------------
A gateway derives its tables (routes, compiled TrafficRoutes) from a whole
:class:`~federation.models.Snapshot`, yet a watch delta changes one record of tens of
thousands.  Rebuilding everything per delta makes a delta cost the size of the config.
This module holds what lets the builders redo only what a change touched, without ever
changing a table a request may still be reading:

* :class:`CowMap`: an immutable mapping split over two levels of :data:`SHARDS` slots
  by key hash, the leaves plain dicts.  :meth:`CowMap.evolve` returns a new map that
  copies only the path to the leaves the change touches and shares the rest, so a change
  costs a few hundred references per key it touches, not ``len``; a lookup is a hash and
  two indexings more than a dict's.  The previous map stays valid (a
  request in flight, or a build that fails, still has it).
* :class:`Records`: a tuple of records that says how it was made from earlier ones
  (:class:`federation.client.SnapshotTracker` makes them): its generation and its last
  :data:`MAX_STEPS` steps, each the records removed and added since a generation.
  :func:`changes_since` reads the steps from an earlier tuple's generation, so finding
  what changed costs the change, not a walk over every record.
* :func:`changed_span`: the fallback for tuples without a known derivation: which
  elements differ between two tuples of records, by identity.  Snapshots made by :class:`federation.client.SnapshotTracker` share every
  unchanged record object with the previous one, so the unchanged prefix and suffix are
  skipped at C speed; what remains (the changed records, in one span) is returned.
  Identity, not equality: a record that is not the same object counts as changed, which
  is always safe (it is rebuilt).  It touches every record (tens of ms for 50,000 that
  are not in the CPU's cache): snapshots from the tracker do not need it.
* :class:`ServiceIndex`: the services grouped by ``(namespace, name)``, each group a dict
  ``cluster -> service`` in cluster order (the order a full build uses), with the groups a
  change touched relative to the index it was derived from (``changed``; ``None``: built
  from scratch, everything is new).

Builders take the new index and their previous output; when ``changed`` is ``None`` they
build from scratch, else they replace the entries of the changed groups only.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from itertools import compress, count
from typing import Any, Generic, TypeVar

from .models import ExportedService

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

SHARDS = 256  # per level: 256 x 256 leaf dicts
_MASK = SHARDS - 1
_EMPTY: dict[Any, Any] = {}  # the leaf of every empty slot (never written: evolve copies first)
_EMPTY_BUCKET: tuple[dict[Any, Any], ...] = (_EMPTY,) * SHARDS

Group = tuple[str, str]  # (namespace, name)


class CowMap(Mapping[K, V], Generic[K, V]):
    """An immutable mapping whose :meth:`evolve` copies only what it changes.

    Two levels of :data:`SHARDS` slots by key hash, each leaf a plain dict: a lookup is a
    hash and two indexings more than a dict's; a change copies the top level, the buckets
    and the leaves of the keys it touches (a few hundred references each), whatever the
    size.  Empty slots share one empty leaf."""

    __slots__ = ("_top", "_len")

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        top: list[Any] = [None] * SHARDS
        pairs = items.items() if isinstance(items, Mapping) else items
        size = 0
        for k, v in pairs:
            h = hash(k)
            bucket = top[h & _MASK]
            if bucket is None:
                bucket = top[h & _MASK] = [None] * SHARDS
            leaf = bucket[(h >> 8) & _MASK]
            if leaf is None:
                leaf = bucket[(h >> 8) & _MASK] = {}
            size += k not in leaf
            leaf[k] = v
        self._top = [_EMPTY_BUCKET if b is None else tuple(_EMPTY if x is None else x for x in b) for b in top]
        self._len = size

    def get(self, key: K, default: Any = None) -> Any:  # type: ignore[override]
        h = hash(key)
        return self._top[h & _MASK][(h >> 8) & _MASK].get(key, default)

    def __getitem__(self, key: K) -> V:
        h = hash(key)
        return self._top[h & _MASK][(h >> 8) & _MASK][key]

    def __contains__(self, key: object) -> bool:
        h = hash(key)
        return key in self._top[h & _MASK][(h >> 8) & _MASK]

    def __iter__(self) -> Iterator[K]:
        for bucket in self._top:
            if bucket is not _EMPTY_BUCKET:
                for leaf in bucket:
                    if leaf:
                        yield from leaf

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"CowMap({len(self)} entries)"

    def leaves(self) -> Iterator[dict[K, V]]:
        """The leaf dicts (for tests and :meth:`take_apart`)."""
        for bucket in self._top:
            yield from bucket

    def evolve(self, remove: Iterable[K] = (), put: Iterable[tuple[K, V]] = ()) -> CowMap[K, V]:
        """A new map: this one without ``remove`` (missing keys are ignored), then with
        ``put``.  This map is left as it is."""
        top: list[Any] | None = None
        buckets: dict[int, list[dict[K, V]]] = {}
        leaves: dict[tuple[int, int], dict[K, V]] = {}
        size = self._len

        def leaf(h: int) -> dict[K, V]:
            nonlocal top
            i, j = h & _MASK, (h >> 8) & _MASK
            got = leaves.get((i, j))
            if got is None:
                if top is None:
                    top = list(self._top)
                bucket = buckets.get(i)
                if bucket is None:
                    bucket = buckets[i] = list(top[i])
                got = leaves[(i, j)] = bucket[j] = dict(bucket[j])
            return got

        for k in remove:
            h = hash(k)
            if k in self._top[h & _MASK][(h >> 8) & _MASK] or (h & _MASK, (h >> 8) & _MASK) in leaves:
                d = leaf(h)
                if k in d:
                    del d[k]
                    size -= 1
        for k, v in put:
            d = leaf(hash(k))
            size += k not in d
            d[k] = v
        if top is None:
            return self  # nothing changed: the same (immutable) map
        for i, bucket in buckets.items():
            top[i] = tuple(bucket)
        out = CowMap.__new__(CowMap)
        out._top, out._len = top, size
        return out

    def take_apart(self) -> None:
        """Empty this map bucket by bucket (see ``gateway/_state.py``'s ``retire``): what no
        other map shares is freed a bucket at a time, never all in one call."""
        top = self._top
        self._len = 0
        for i in range(len(top)):
            top[i] = _EMPTY_BUCKET


MAX_STEPS = 16  # steps a Records keeps: a gateway this many deltas behind scans instead
MAX_STEP_RECORDS = 4096  # a bigger step is not kept (the consumer scans, or builds afresh)
_generations = itertools.count(1)

Step = tuple[Sequence[Any], Sequence[Any]]  # (removed, added)


class Records(tuple):  # type: ignore[type-arg]
    """A tuple of records with its generation and how it was derived (see the module doc).
    Equal to, and used as, a plain tuple."""

    gen: int
    steps: tuple[tuple[int, Sequence[Any], Sequence[Any]], ...]

    @classmethod
    def derive(cls, values: Iterable[Any], previous: Records | None, removed: Sequence[Any] | None,
               added: Sequence[Any] | None) -> Records:
        """``values`` as Records: made from ``previous`` by removing ``removed`` and adding
        ``added`` (None: unknown, e.g. too many; then no steps)."""
        out = cls(values)
        out.gen = next(_generations)
        if previous is None or removed is None or added is None:
            out.steps = ()
        else:
            out.steps = (*previous.steps[-(MAX_STEPS - 1):], (previous.gen, tuple(removed), tuple(added)))
        return out


def changes_since(old: Sequence[Any], new: Sequence[Any]) -> list[Step] | None:
    """The steps (removed, added) that made ``new`` from ``old``, oldest first; None when
    ``new`` does not know (then use :func:`changed_span`)."""
    if old is new:
        return []
    gen = getattr(old, "gen", None)
    if gen is None:
        return None
    steps = getattr(new, "steps", ())
    for i, (base, _, _) in enumerate(steps):
        if base == gen:
            return [(removed, added) for _, removed, added in steps[i:]]
    return None


def changed_span(old: Sequence[Any], new: Sequence[Any]) -> tuple[Sequence[Any], Sequence[Any]]:
    """``(removed, added)``: the elements of ``old`` and of ``new`` outside their common
    prefix and suffix of identical objects.  Everything else is the same objects in the
    same places; a record in neither span is unchanged."""
    if old is new:
        return (), ()
    n = min(len(old), len(new))
    start = next(compress(count(), map(operator.is_not, old, new)), n)
    if start == len(old) == len(new):
        return (), ()
    tail = n - start
    end = next(compress(count(), map(operator.is_not, reversed(old), reversed(new))), tail)
    end = min(end, tail)
    return old[start:len(old) - end], new[start:len(new) - end]


class ServiceIndex:
    """The services of one snapshot by ``(namespace, name)``, and what changed since the
    index it was derived from (see the module doc)."""

    __slots__ = ("services", "groups", "changed", "duplicates", "_base", "__weakref__")

    def __init__(self, services: tuple[ExportedService, ...], groups: CowMap[Group, dict[str, ExportedService]],
                 changed: frozenset[Group] | None, duplicates: int = 0) -> None:
        self.services = services
        self.groups = groups
        self.changed = changed
        # Records that share (cluster, namespace, name) with a later one (which wins, as
        # in a dict): the federation never sends any; a snapshot with some is always
        # indexed from scratch, so that removing one brings back the one it hid.
        self.duplicates = duplicates
        self._base: weakref.ref[ServiceIndex] | None = None

    def derived_from(self, other: ServiceIndex | None) -> bool:
        """True when ``changed`` is relative to ``other`` (what a builder's previous output
        was built from); False for an index built from scratch."""
        return other is not None and self.changed is not None and self._base is not None and self._base() is other

    def _derived(self, previous: ServiceIndex) -> ServiceIndex:
        self._base = weakref.ref(previous)
        return self

    @classmethod
    def of(cls, services: Sequence[ExportedService], previous: ServiceIndex | None = None,
           full_above: int = 0) -> ServiceIndex:
        """The index of ``services``, derived from ``previous`` when given (``changed`` then
        says which groups differ).  More than ``full_above`` changed records (0: no limit)
        build from scratch instead."""
        services = services if isinstance(services, tuple) else tuple(services)
        if previous is not None:
            steps = changes_since(previous.services, services)
            if steps is None:
                steps = [changed_span(previous.services, services)]
            size = sum(len(r) + len(a) for r, a in steps)
            if not size:
                return cls(services, previous.groups, frozenset(), previous.duplicates)._derived(previous)
            if not previous.duplicates and (not full_above or size <= full_above):
                derived = cls._derive(services, previous, steps)
                if derived is not None:
                    return derived
        by_group: dict[Group, dict[str, ExportedService]] = {}
        for s in sorted(services, key=lambda s: (s.namespace, s.name, s.cluster)):
            by_group.setdefault((s.namespace, s.name), {})[s.cluster] = s
        return cls(services, CowMap(by_group), None, len(services) - sum(map(len, by_group.values())))

    @classmethod
    def _derive(cls, services: tuple[ExportedService, ...], previous: ServiceIndex,
                steps: list[Step]) -> ServiceIndex | None:
        touched: dict[Group, dict[str, ExportedService]] = {}

        def members(s: ExportedService) -> dict[str, ExportedService]:
            g = (s.namespace, s.name)
            m = touched.get(g)
            if m is None:
                m = touched[g] = dict(previous.groups.get(g) or {})
            return m

        for removed, added in steps:  # in order: a record changed twice ends as its last
            for s in removed:
                m = members(s)
                if m.get(s.cluster) is s:
                    del m[s.cluster]
            for s in added:
                m = members(s)
                if s.cluster in m:
                    return None  # a duplicate (see ``duplicates``): index from scratch
                m[s.cluster] = s
        gone = [g for g, m in touched.items() if not m]
        put = [(g, dict(sorted(m.items()))) for g, m in touched.items() if m]
        return cls(services, previous.groups.evolve(gone, put), frozenset(touched))._derived(previous)


__all__ = ["MAX_STEPS", "SHARDS", "CowMap", "Records", "ServiceIndex", "changed_span", "changes_since"]

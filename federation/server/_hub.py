"""The watch hub: one etcd watch per replica, fanned out to every gRPC watcher.

Theory of operation.  The hub lists the config families (clusters, exports, policies,
traffic, trust) once, then follows a single etcd watch on the whole prefix from the next
revision.  It keeps the current config in memory (key -> (mod_revision, JSON)) and its
``revision``: every event under the prefix up to it has been applied.  Each etcd
revision that touched config becomes one :class:`WatchEvent` (a delta) which is put,
by reference, on every watcher's bounded queue.

A new watcher gets a snapshot built from memory at ``revision`` (cached per revision,
so a thundering herd after a restart costs one build).  A resuming watcher (it has
everything up to ``r``) gets one delta that brings it from ``r`` to ``revision``:
changed keys are those in memory with mod_revision > r, deleted keys come from a
keys-only etcd range *at revision r*; if etcd compacted past ``r`` that range fails and
the watcher gets a fresh snapshot instead — never a silent gap.

Slow watchers: when a watcher's queue is full the hub drops its queue and marks it for
resync; its sender then sends a fresh snapshot and skips anything older.  Memory per
watcher is therefore bounded by the queue size, and a slow watcher never delays others.

etcd restarts and reconnects: the hub resumes its etcd watch from ``revision + 1``; if
that was compacted it re-lists and broadcasts the difference as one delta.

Bad values: every value is validated as it is read (:func:`federation.server._store.read_valid`).  A bad
one is logged once and counted, and is absent from the config, as if deleted (a fresh
replica would not see it either); a bad trust bundle or CRL keeps the last good one
instead (the trust sync rewrites it from the trust folder).  Memory holds the JSON of
each valid value (re-encoded when unknown fields were dropped), which is what snapshots
are spliced from and what deltas carry, and the parsed cluster and trust records, from
which the revocations for caller checks are built once per config revision.

Revisions on the stream are *config* revisions: a delta carries the etcd revision of
its change, and a snapshot, a resume delta and a progress message carry
``config_revision``, the newest config change (status reports, tokens and leases move
etcd's revision but not the config).  So the revision a gateway holds, shows in
``/config`` and reports is the one ``GetStatus`` calls LATEST when it is current: a
gateway is in sync exactly when its revision equals it (or is above it: another replica
has seen a newer change).  Resuming from a revision at or past ``config_revision`` is
"nothing changed since" and needs no etcd read.

Progress: a watcher whose queue stays empty for its progress interval gets a
``progress`` message at ``config_revision`` (no changes).  Sent only when the queue is empty,
so it never overtakes a queued delta; it lets a gateway tell "nothing changed" from
"the stream is dead" (its config staleness stays small in a quiet federation).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog
from cryptography import x509

import trust

from .. import models
from .._errors import Compacted, FederationError, StoreUnavailable
from ..proto import federation_pb2 as pb
from ._etcd import Etcd, prefix_end
from ._store import CONFIG_FAMILIES, Keys, Record, read_valid

log = structlog.get_logger("federation.hub")

DEFAULT_QUEUE = 256
DEFAULT_PROGRESS_INTERVAL = 5.0
MIN_PROGRESS_INTERVAL, MAX_PROGRESS_INTERVAL = 0.2, 300.0
_KIND = {"clusters": pb.CLUSTER, "exports": pb.SERVICE, "policies": pb.POLICY, "traffic": pb.TRAFFIC,
         "liveness": pb.LIVENESS}
# The API key prefixes (kind/) of the changes route_revision follows: TrafficRoutes and
# TrafficPolicies (a policy's locality, breakers and outlier detection steer traffic too).
_ROUTE_KEYS = ("TrafficRoute/", "TrafficPolicy/")
# ExtensionProviders decide requests (CUSTOM policies ask them): a change to one is a
# policy change too (policy_revision, what `isthmus status` checks enforcement against).
_PROVIDER_KEY = "ExtensionProvider/"
_PARSED = ("clusters", "trust")


@dataclass(eq=False)
class _Watcher:
    queue: asyncio.Queue[pb.WatchEvent | None]
    resync: bool = False
    overflows: int = 0


@dataclass
class HubStats:
    watchers: int = 0
    overflows: int = 0
    relists: int = 0
    events: int = 0
    started_at: float = field(default_factory=time.time)


class Hub:
    def __init__(self, etcd: Etcd, keys: Keys, queue_size: int = DEFAULT_QUEUE) -> None:
        self.etcd = etcd
        self.keys = keys
        self.queue_size = queue_size
        self.state: dict[bytes, tuple[int, bytes]] = {}  # valid config values (their JSON)
        self.records: dict[bytes, Record] = {}  # clusters and trust, parsed
        self.revision = 0  # every etcd event under the prefix up to it is applied
        self.config_revision = 0  # newest revision that changed the config (what watchers hold)
        self.policy_revision = 0  # newest revision that applied or deleted a policy or ExtensionProvider
        self.route_revision = 0  # newest revision that applied or deleted a TrafficRoute or TrafficPolicy
        self.ready = asyncio.Event()
        self.stats = HubStats()
        self._watchers: set[_Watcher] = set()
        self._advanced = asyncio.Event()  # replaced on every advance; waiters re-check
        self._snapshot_cache: tuple[int, bytes] = (-1, b"")
        self._snapshot_event: pb.WatchEvent | None = None
        self._revocations: tuple[int, trust.Revocations] = (-1, trust.Revocations())

    # ------------------------------------------------------------------ etcd side
    def _classify(self, key: bytes) -> tuple[int, str] | None:
        """(Kind, API key) for a config key, None for everything else."""
        split = self.keys.split(key)
        if split is None:
            return None
        family, rest = split
        if family in _KIND:
            return _KIND[family], rest
        if family == "trust" and rest in ("bundle", "crl"):
            return (pb.BUNDLE if rest == "bundle" else pb.CRL), rest
        return None

    def _read(self, kv: object) -> Record | None:
        """The validated record of a config value, None when it is bad (logged, counted)."""
        if self._classify(kv.key) is None:  # type: ignore[attr-defined]
            return None
        return read_valid(self.keys, kv)

    def _keep(self, key: bytes, rec: Record) -> None:
        # Parsed records are kept only where they are read back (caller checks, trust).
        if rec.family in _PARSED:
            self.records[key] = rec
        else:
            self.records.pop(key, None)

    async def _list(self) -> tuple[int, dict[bytes, tuple[int, bytes]], dict[bytes, Record]]:
        first = await self.etcd.get_prefix(self.keys.family(CONFIG_FAMILIES[0]))
        rev = first.header.revision
        kvs = list(first.kvs)
        for fam in CONFIG_FAMILIES[1:]:
            # Pin the other families to the same revision: one consistent cut.
            kvs += (await self.etcd.get_prefix(self.keys.family(fam), revision=rev)).kvs
        state, records = {}, {}
        for kv in kvs:
            rec = self._read(kv)
            if rec is None:
                if kv.key in self.records and kv.key.startswith(self.keys.family("trust/")):
                    state[kv.key], records[kv.key] = self.state[kv.key], self.records[kv.key]  # keep the good one
                continue
            state[kv.key] = (kv.mod_revision, rec.json)
            if rec.family in _PARSED:
                records[kv.key] = rec
        return rev, state, records

    async def _relist(self) -> None:
        rev, state, records = await self._list()
        self.records = records
        if self.ready.is_set():
            changes = [
                self._change(k, v[1]) for k, v in state.items() if self.state.get(k) != v
            ] + [self._change(k, None) for k in self.state if k not in state]
            self.stats.relists += 1
            log.warning("hub.relisted", revision=rev, changes=len(changes))
            self.state = state
            self._advance(rev, changes)
        else:
            self.state = state
            self.revision = rev
            self.config_revision = await self._last_config_change(rev, state)
            # A policy change is a config change: when unsure, the newest of those.
            self.policy_revision = min(await self._last_config_change(rev, state,
                                                                      ("policies/", "traffic/" + _PROVIDER_KEY)),
                                       self.config_revision)
            self.route_revision = min(await self._last_config_change(rev, state, tuple("traffic/" + k for k in _ROUTE_KEYS)),
                                      self.config_revision)
            self.ready.set()
            log.info("hub.listed", revision=rev, config_revision=self.config_revision, keys=len(state))

    async def _last_config_change(
        self, rev: int, state: dict[bytes, tuple[int, bytes]], families: tuple[str, ...] = CONFIG_FAMILIES
    ) -> int:
        """The revision of the newest config change, as far as a fresh replica can tell.

        The newest mod_revision is it unless a key was deleted after that; a keys-only
        range at that revision shows whether one was.  When unsure (compacted), the
        list revision: gateways then read STALE until the next change, never a false SYNCED.
        """
        prefixes = tuple(self.keys.family(f) for f in families)
        newest = max((mod for k, (mod, _) in state.items() if k.startswith(prefixes)), default=0)
        if newest == 0:
            return rev
        try:
            for fam in families:
                p = self.keys.family(fam)
                resp = await self.etcd.range(p, prefix_end(p), revision=newest, keys_only=True)
                if any(kv.key not in state for kv in resp.kvs):
                    return rev
        except Compacted:
            return rev
        return newest

    def _change(self, key: bytes, value: bytes | None) -> pb.Change:
        kind, api_key = self._classify(key)  # type: ignore[misc]
        if value is None:
            return pb.Change(kind=kind, key=api_key, deleted=True)
        return pb.Change(kind=kind, key=api_key, json=value.decode())

    def _apply(self, resp: object) -> None:
        if resp.watch_id == -1 and not resp.events:  # type: ignore[attr-defined]
            return  # an on-demand progress reply: not trustworthy on etcd < 3.5.8 (see catch_up)
        group: list[pb.Change] = []
        group_rev = 0
        for ev in resp.events:  # type: ignore[attr-defined]
            kv = ev.kv
            if kv.mod_revision != group_rev:
                if group:
                    self._advance(group_rev, group)
                group, group_rev = [], kv.mod_revision
            if self._classify(kv.key) is None:
                continue
            if ev.type == ev.DELETE:
                self.records.pop(kv.key, None)
                if self.state.pop(kv.key, None) is not None:
                    group.append(self._change(kv.key, None))
            else:
                rec = self._read(kv)
                if rec is not None:
                    self.state[kv.key] = (kv.mod_revision, rec.json)
                    self._keep(kv.key, rec)
                    group.append(self._change(kv.key, rec.json))
                elif kv.key in self.state and not kv.key.startswith(self.keys.family("trust/")):
                    # A good value replaced by a bad one: gone, as a fresh replica sees it.
                    del self.state[kv.key]
                    self.records.pop(kv.key, None)
                    group.append(self._change(kv.key, None))
        if group:
            self._advance(group_rev, group)
        # Everything up to the last event (or, for a progress notice, the header) is in.
        last = group_rev or resp.header.revision  # type: ignore[attr-defined]
        self._bump(max(last, self.revision))

    def _bump(self, rev: int) -> None:
        if rev > self.revision:
            self.revision = rev
            self._notify()

    def _notify(self) -> None:
        self._advanced.set()
        self._advanced = asyncio.Event()

    def _advance(self, rev: int, changes: list[pb.Change]) -> None:
        self.revision = max(self.revision, rev)
        if not changes:
            return
        self.config_revision = rev
        if any(c.kind == pb.POLICY or (c.kind == pb.TRAFFIC and c.key.startswith(_PROVIDER_KEY)) for c in changes):
            self.policy_revision = rev
        if any(c.kind == pb.TRAFFIC and c.key.startswith(_ROUTE_KEYS) for c in changes):
            self.route_revision = rev
        self.stats.events += 1
        event = pb.WatchEvent(revision=rev, changes=changes)
        for w in self._watchers:
            if w.resync:
                continue
            try:
                w.queue.put_nowait(event)
            except asyncio.QueueFull:
                # Drop the backlog; the sender will send a fresh snapshot instead.
                while not w.queue.empty():
                    w.queue.get_nowait()
                w.resync = True
                w.overflows += 1
                self.stats.overflows += 1
                w.queue.put_nowait(None)
                log.warning("watch.overflow", queue=self.queue_size, revision=rev)
        self._notify()

    async def run(self) -> None:
        """List, then follow etcd forever (reconnecting, resuming, re-listing)."""
        backoff = 0.1
        need_list = True
        while True:
            try:
                if need_list:
                    await self._relist()
                    need_list = False
                async for resp in self.etcd.watch(self.keys.family(""), self.revision + 1):
                    self._apply(resp)
                    backoff = 0.1
            except Compacted as exc:
                log.warning("hub.compacted", revision=self.revision, compact_revision=exc.compact_revision)
                need_list = True
            except (StoreUnavailable, FederationError) as exc:
                log.warning("hub.etcd_unavailable", error=str(exc), retry_in=round(backoff, 2))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    # ------------------------------------------------------------------ reads from memory
    def values(self, family: str) -> list[bytes]:
        p = self.keys.family(family)
        return [v for k, (_, v) in self.state.items() if k.startswith(p)]

    def clusters(self) -> list[models.ClusterRecord]:
        """The valid cluster records, by name."""
        p = self.keys.family("clusters/")
        return sorted((r.value for k, r in self.records.items() if k.startswith(p)), key=lambda c: c.name)

    def snapshot_json(self) -> tuple[int, bytes]:
        """The models.Snapshot JSON at ``config_revision``, spliced from the validated values' JSON."""
        rev, cached = self._snapshot_cache
        if rev == self.config_revision:
            return rev, cached

        def pem(name: str) -> str:
            r = self.records.get(self.keys.k("trust", name))
            return r.value if r is not None else ""

        body = b"".join(
            [
                b'{"revision":%d,"clusters":[' % self.config_revision,
                b",".join(self.values("clusters/")),
                b'],"services":[',
                b",".join(self.values("exports/")),
                b'],"policies":[',
                b",".join(self.values("policies/")),
                b'],"routes":[',
                b",".join(self.values("traffic/TrafficRoute/")),
                b'],"liveness":[',
                b",".join(self.values("liveness/")),
                b'],"traffic_policies":[',
                b",".join(self.values("traffic/TrafficPolicy/")),
                b'],"telemetry":[',
                b",".join(self.values("traffic/Telemetry/")),
                b'],"extension_providers":[',
                b",".join(self.values("traffic/ExtensionProvider/")),
                b'],"bundle_pem":',
                json.dumps(pem("bundle")).encode(),
                b',"crl_pem":',
                json.dumps(pem("crl")).encode(),
                b"}",
            ]
        )
        self._snapshot_cache = (self.config_revision, body)
        return self.config_revision, body

    def snapshot_event(self) -> pb.WatchEvent:
        # Cached per revision: a herd of (re)connecting watchers shares one message.
        rev, body = self.snapshot_json()
        cached = self._snapshot_event
        if cached is None or cached.revision != rev:
            cached = self._snapshot_event = pb.WatchEvent(revision=rev, is_snapshot=True, snapshot_json=body.decode())
        return cached

    def revocations(self) -> trust.Revocations:
        """Revoked cluster CAs, from the CRL and the CA certificates in the cluster records."""
        rev, cached = self._revocations
        if rev == self.config_revision:
            return cached
        crl = self.records.get(self.keys.k("trust", "crl"))
        bundle = self.records.get(self.keys.k("trust", "bundle"))
        p = self.keys.family("clusters/")
        # The previous CAs of re-joined clusters too: their serials are in the CRL.
        cas = [c for k, r in self.records.items() if k.startswith(p) for c in r.certs]
        try:
            # The CRL counts only if a root of the published bundle signed it.
            roots = x509.load_pem_x509_certificates(bundle.value.encode()) if bundle is not None else []
            revs = trust.Revocations.from_crl(crl.value.encode() if crl is not None else None, cas, roots)
        except (trust.TrustError, ValueError) as exc:
            log.error("hub.bad_crl", error=str(exc), revision=self.config_revision)
            return cached  # refused: the last good revocations stay
        self._revocations = (self.config_revision, revs)
        return revs

    async def wait_for(self, revision: int, timeout: float) -> bool:
        async def until() -> None:
            while self.revision < revision:
                await self._advanced.wait()

        try:
            await asyncio.wait_for(until(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # ------------------------------------------------------------------ watchers
    async def _resume_event(self, from_revision: int) -> pb.WatchEvent:
        """The delta from ``from_revision`` to now, or a snapshot when etcd compacted past it."""
        rev = self.config_revision
        if from_revision >= rev:
            return pb.WatchEvent(revision=from_revision)  # no config change since
        current = {k: v for k, v in self.state.items()}  # consistent copy at ``rev`` (no await above)
        try:
            old: set[bytes] = set()
            for fam in CONFIG_FAMILIES:
                p = self.keys.family(fam)
                resp = await self.etcd.range(p, prefix_end(p), revision=from_revision, keys_only=True)
                old.update(kv.key for kv in resp.kvs)
        except Compacted:
            log.info("watch.resume_compacted", from_revision=from_revision, revision=rev)
            return self.snapshot_event()
        changes = [self._change(k, v) for k, (mod, v) in current.items() if mod > from_revision]
        changes += [self._change(k, None) for k in old if k not in current]
        return pb.WatchEvent(revision=rev, changes=changes)

    async def catch_up(self, timeout: float = 5.0) -> bool:
        """Wait until everything etcd had committed when we were called has been applied.

        So a client that wrote something and then starts a watch sees its own write in
        the first message.  Costs one etcd read, plus one small write when we lag.
        """
        target = await self.etcd.current_revision()
        if self.revision >= target:
            return True
        # Our own write under the prefix: its event arrives after every earlier one.
        # (etcd < 3.5.8 answers on-demand progress requests even for watchers still
        # catching up, so a progress request cannot be trusted here.)
        resp = await self.etcd.put(self.keys.k("meta", "sync"), b"")
        return await self.wait_for(resp.header.revision, timeout)

    async def watch(
        self, from_revision: int = 0, progress_interval: float = 0.0
    ) -> AsyncIterator[pb.WatchEvent]:
        """Snapshot-or-resume, then deltas.  Each yielded event is newer than the last,
        except progress messages, which repeat the last revision when nothing happened."""
        interval = progress_interval or DEFAULT_PROGRESS_INTERVAL
        interval = min(max(interval, MIN_PROGRESS_INTERVAL), MAX_PROGRESS_INTERVAL)
        await self.ready.wait()
        try:
            if not await self.catch_up():
                log.warning("watch.catch_up_timeout", revision=self.revision)
        except FederationError as exc:  # etcd away: serve what we have (static stability)
            log.warning("watch.catch_up_failed", error=str(exc), revision=self.revision)
        if from_revision > self.revision:
            # The caller saw a newer revision (on another replica): let us catch up first,
            # else keys we have not seen yet would look deleted.
            await self.wait_for(from_revision, timeout=5.0)
        w = _Watcher(asyncio.Queue(self.queue_size))
        self._watchers.add(w)
        self.stats.watchers = len(self._watchers)
        try:
            if from_revision <= 0 or from_revision > self.revision:
                first = self.snapshot_event()
            else:
                first = await self._resume_event(from_revision)
            sent = first.revision
            yield first
            while True:
                try:
                    item = await asyncio.wait_for(w.queue.get(), interval)
                except asyncio.TimeoutError:
                    if not w.queue.empty():
                        continue  # a delta came as the wait timed out: send it, not a progress past it
                    # Queue empty: every change up to ``revision`` has been sent already.
                    sent = max(sent, self.config_revision)
                    yield pb.WatchEvent(revision=sent, progress=True)
                    continue
                if item is None:
                    w.resync = False
                    item = self.snapshot_event()
                    log.info("watch.resynced", revision=item.revision)
                elif item.revision <= sent:
                    continue  # already covered by a snapshot or the resume delta
                sent = item.revision
                yield item
        finally:
            self._watchers.discard(w)
            self.stats.watchers = len(self._watchers)

"""The agent's reconcile loop, on trio.

Theory of operation (the shape of linkerd's service-mirror controller):

* Pumps produce typed events and nothing else.  One pump per Kubernetes kind lists, then
  watches, in a worker thread (the official client blocks) and sends each event into a
  bounded memory channel; on restart or 410 Gone it lists again and the list *replaces*
  that kind's cache, so nothing deleted while we were away survives.  Another pump runs
  the federation watch (a :class:`~federation.client.SnapshotTracker`) the same way.
* One worker drains the channel, applies the events to dumb caches, then runs at most
  one export reconcile and one import reconcile over the whole state (level-triggered:
  a burst of events costs one pass).  The decisions come from the pure converters in
  ``_convert``; only their results are written.
* Only a :class:`RetryableError` (or an UNAVAILABLE federation) is retried, with capped
  exponential backoff and a limit; anything else is logged (and shown on the Service)
  and waits for the next change or the periodic resync.
* Imports are reconciled only once every kind has been listed *and* a federation
  snapshot has arrived: the first pass is the orphan sweep, deleting mirrors whose export
  vanished while the agent was down.  Without a snapshot (federation unreachable) the
  existing mirrors are kept as they are (static stability).
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import grpc
import structlog
import trio

from federation import models, names
from federation._errors import RemoteError
from federation.client import SnapshotTracker, WatchMessage

from . import _names as n
from ._convert import SPEC_HASH, ObjectRef, desired_exports, export_status, gateway_endpoints, key_of, plan_mirrors
from ._kube import KINDS, AgentError, Kind, Kube, KubeRefused, RetryableError, WatchExpired

log = structlog.get_logger("federation.agent")


class FederationPort(Protocol):
    """The part of :class:`federation.client.FederationClient` the agent uses."""

    def publish(self, cluster: str, services: Sequence[models.ExportedService], ttl: int = 30) -> Any: ...
    def heartbeat(self, cluster: str) -> int: ...
    def watch(self, from_revision: int = 0, stop: threading.Event | None = None) -> Iterator[WatchMessage]: ...


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    cluster: str
    dns_suffix: str = names.DNS_SUFFIX
    lease_ttl: int = 30
    resync_interval: float = 300.0
    max_retries: int = 10
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    # Renew the in-cluster gateway/agent certificates (Secrets in isthmus-system) every
    # this many seconds when due; 0: off (e.g. outside a cluster joined by join-cluster).
    rotate_interval: float = 0.0


# ---------------------------------------------------------------- events (past tense)


@dataclass(frozen=True, kw_only=True)
class ObjectsListed:
    kind: str
    items: tuple[dict[str, Any], ...]


@dataclass(frozen=True, kw_only=True)
class ObjectChanged:
    kind: str
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK
    obj: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class SnapshotReceived:
    snapshot: models.Snapshot


@dataclass(frozen=True, kw_only=True)
class LeaseLost:
    pass


@dataclass(frozen=True, kw_only=True)
class RetryDue:
    side: str  # "exports" | "imports"


@dataclass(frozen=True, kw_only=True)
class ResyncDue:
    pass


Event = ObjectsListed | ObjectChanged | SnapshotReceived | LeaseLost | RetryDue | ResyncDue


def _backoff(attempt: int, first: float, cap: float) -> float:
    return min(cap, first * math.pow(2, attempt)) * random.uniform(0.5, 1.0)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, RetryableError):
        return True
    return isinstance(exc, RemoteError) and exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class _Side:
    dirty: bool = False
    attempts: int = 0
    retry_pending: bool = False


@dataclass
class AgentState:
    """The dumb stores: what the watches last said, and what we last published/wrote."""

    caches: dict[str, dict[str, dict[str, Any]]] = field(default_factory=lambda: {k.name: {} for k in KINDS})
    listed: set[str] = field(default_factory=set)
    snapshot: models.Snapshot | None = None
    published: list[str] | None = None  # JSON of the last published export set
    export_revs: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (definition, revision)
    written_status: dict[str, str | None] = field(default_factory=dict)
    swept: bool = False
    conflicts_logged: set[str] = field(default_factory=set)
    # Mirror objects the API server refused (e.g. their namespace does not exist here), by
    # spec hash: not tried again until they change or the periodic resync.
    refused: dict[ObjectRef, str] = field(default_factory=dict)


class Agent:
    def __init__(self, cfg: AgentConfig, kube: Kube, federation: FederationPort) -> None:
        self.cfg = cfg
        self.kube = kube
        self.fed = federation
        self.state = AgentState()
        self.sides = {"exports": _Side(), "imports": _Side()}
        self.synced = trio.Event()  # set after the first full export and import pass
        self._stop = threading.Event()
        self.log = log.bind(cluster=cfg.cluster)

    # ------------------------------------------------------------------ lifecycle
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        send, recv = trio.open_memory_channel[Event](1024)  # bounded: watch threads wait when full
        try:
            async with trio.open_nursery() as nursery:
                for kind in KINDS:
                    nursery.start_soon(self._pump_kube, kind, send.clone())
                nursery.start_soon(self._pump_federation, send.clone())
                nursery.start_soon(self._heartbeat, send.clone())
                nursery.start_soon(self._ticker, send.clone())
                if self.cfg.rotate_interval > 0:
                    nursery.start_soon(self._rotate_certificates)
                task_status.started()
                await self._worker(recv, send, nursery)
        finally:
            self._stop.set()  # lets abandoned watch threads end at their next event or timeout
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ pumps
    async def _pump_kube(self, kind: Kind, send: trio.MemorySendChannel[Event]) -> None:
        attempt = 0
        while True:
            try:
                items, rv = await trio.to_thread.run_sync(self.kube.list, kind)
                await send.send(ObjectsListed(kind=kind.name, items=tuple(items)))
                attempt = 0
                while True:  # re-watch from the last version after a normal end
                    rv = await trio.to_thread.run_sync(self._watch_thread, kind, rv, send, abandon_on_cancel=True)
            except WatchExpired as exc:
                self.log.info("watch.expired", kind=kind.name, error=str(exc))
            except AgentError as exc:
                delay = _backoff(attempt, self.cfg.backoff_initial, self.cfg.backoff_max)
                attempt += 1
                self.log.warning("watch.failed", kind=kind.name, error=str(exc), retry_in=round(delay, 2))
                await trio.sleep(delay)

    def _watch_thread(self, kind: Kind, rv: str, send: trio.MemorySendChannel[Event]) -> str:
        for etype, obj in self.kube.watch(kind, rv, self._stop):
            rv = str(((obj or {}).get("metadata") or {}).get("resourceVersion") or rv)
            if etype == "BOOKMARK":
                continue
            try:
                trio.from_thread.run(send.send, ObjectChanged(kind=kind.name, type=etype, obj=obj))
            except (trio.RunFinishedError, trio.Cancelled):
                self._stop.set()
                break
        return rv

    async def _pump_federation(self, send: trio.MemorySendChannel[Event]) -> None:
        attempt = 0
        while True:
            try:
                await trio.to_thread.run_sync(self._federation_thread, send, abandon_on_cancel=True)
                return
            except Exception as exc:  # noqa: BLE001 - the watch must outlive any one failure
                # The client reconnects by itself: a RemoteError here is a refusal (auth);
                # anything else is unexpected (a bug, or a message we cannot cope with).
                # Either way: log it, back off, watch again; never end the agent.
                delay = _backoff(attempt, 1.0, self.cfg.backoff_max)
                attempt += 1
                event = "federation.watch_refused" if isinstance(exc, RemoteError) else "federation.watch_failed"
                self.log.error(event, error=str(exc) or type(exc).__name__, retry_in=round(delay, 2))
                await trio.sleep(delay)

    def _federation_thread(self, send: trio.MemorySendChannel[Event]) -> None:
        tracker = SnapshotTracker()
        for message in self.fed.watch(stop=self._stop):
            snapshot = tracker.apply(message)
            try:
                trio.from_thread.run(send.send, SnapshotReceived(snapshot=snapshot))
            except (trio.RunFinishedError, trio.Cancelled):
                self._stop.set()
                return

    async def _heartbeat(self, send: trio.MemorySendChannel[Event]) -> None:
        while True:
            await trio.sleep(max(self.cfg.lease_ttl / 3, 0.2))
            if self.state.published is None:
                continue
            try:
                await trio.to_thread.run_sync(self.fed.heartbeat, self.cfg.cluster)
            except RemoteError as exc:
                if exc.code == grpc.StatusCode.NOT_FOUND:
                    self.log.warning("lease.lost", error=str(exc))
                    await send.send(LeaseLost())
                else:
                    self.log.warning("heartbeat.failed", error=str(exc))

    async def _rotate_certificates(self) -> None:
        from ._rotate import rotate_once

        while True:
            try:
                renewed = await trio.to_thread.run_sync(rotate_once, self.kube)
                if renewed:
                    self.log.info("certificates.rotated", secrets=renewed)
            except Exception as exc:  # noqa: BLE001 - rotation must never stop the reconcile loop
                self.log.error("certificates.rotation_failed", error=str(exc))
            await trio.sleep(self.cfg.rotate_interval)

    async def _ticker(self, send: trio.MemorySendChannel[Event]) -> None:
        while True:
            await trio.sleep(self.cfg.resync_interval)
            await send.send(ResyncDue())

    # ------------------------------------------------------------------ the worker
    async def _worker(self, recv: trio.MemoryReceiveChannel[Event], send: trio.MemorySendChannel[Event], nursery: trio.Nursery) -> None:
        async for event in recv:
            batch = [event]
            while True:  # coalesce whatever else is already queued
                try:
                    batch.append(recv.receive_nowait())
                except trio.WouldBlock:
                    break
            for ev in batch:
                self.apply(ev)
            if len(self.state.listed) == len(KINDS):
                await self._attempt("exports", self.reconcile_exports, send, nursery)
                if self.state.snapshot is not None:
                    await self._attempt("imports", self.reconcile_imports, send, nursery)
                if not self.synced.is_set() and self.state.swept and not any(s.dirty for s in self.sides.values()):
                    self.synced.set()
                    self.log.info("agent.synced")

    def apply(self, ev: Event) -> None:
        """Fold one event into the caches and mark what needs reconciling."""
        st, ex, im = self.state, self.sides["exports"], self.sides["imports"]
        if isinstance(ev, ObjectsListed):
            st.caches[ev.kind] = {key_of(o): o for o in ev.items}
            st.listed.add(ev.kind)
            ex.dirty = im.dirty = True
        elif isinstance(ev, ObjectChanged):
            cache = st.caches[ev.kind]
            if ev.type == "DELETED":
                cache.pop(key_of(ev.obj), None)
            else:
                cache[key_of(ev.obj)] = ev.obj
            ex.dirty = True
            im.dirty = im.dirty or ev.kind != "serviceexports"
        elif isinstance(ev, SnapshotReceived):
            st.snapshot = ev.snapshot
            im.dirty = True
        elif isinstance(ev, LeaseLost):
            st.published = None
            ex.dirty = True
        elif isinstance(ev, RetryDue):
            self.sides[ev.side].retry_pending = False
            self.sides[ev.side].dirty = True
        elif isinstance(ev, ResyncDue):
            st.published = None  # republish: cheap (the server reports changed=0) and heals drift
            st.written_status.clear()  # re-check every status annotation against the cache
            st.refused.clear()
            st.conflicts_logged.clear()
            ex.dirty = im.dirty = True

    async def _attempt(self, side: str, fn: Any, send: trio.MemorySendChannel[Event], nursery: trio.Nursery) -> None:
        s = self.sides[side]
        if not s.dirty or s.retry_pending:
            return
        try:
            await fn()
        except Exception as exc:
            if not _retryable(exc):
                if not isinstance(exc, (AgentError, RemoteError)):
                    raise
                s.dirty, s.attempts = False, 0
                self.log.error(f"{side}.failed", error=str(exc), retry=False)
                return
            if s.attempts >= self.cfg.max_retries:
                self.log.error(f"{side}.gave_up", error=str(exc), attempts=s.attempts, next="resync")
                s.dirty, s.attempts = False, 0
                return
            delay = _backoff(s.attempts, self.cfg.backoff_initial, self.cfg.backoff_max)
            s.attempts += 1
            s.retry_pending = True
            self.log.warning(f"{side}.retrying", error=str(exc), attempt=s.attempts, retry_in=round(delay, 2))

            async def later() -> None:
                await trio.sleep(delay)
                await send.send(RetryDue(side=side))

            nursery.start_soon(later)
            return
        s.dirty, s.attempts = False, 0

    # ------------------------------------------------------------------ exports
    async def reconcile_exports(self) -> None:
        st, c = self.state, self.state.caches
        plan = desired_exports(self.cfg.cluster, c["services"].values(), c["endpointslices"].values(), c["serviceexports"].values())
        current = [plan.exports[k] for k in sorted(plan.exports)]
        body = [e.model_dump_json() for e in current]
        if body != st.published:
            result = await trio.to_thread.run_sync(self.fed.publish, self.cfg.cluster, current, self.cfg.lease_ttl)
            st.published = body
            for key, e in plan.exports.items():
                definition = e.model_dump_json(exclude={"ready_endpoints"})
                if st.export_revs.get(key, ("", 0))[0] != definition:
                    st.export_revs[key] = (definition, result.revision)
            for key in set(st.export_revs) - set(plan.exports):
                del st.export_revs[key]
            self.log.info("exports.published", services=len(current), revision=result.revision, changed=result.changed)

        first_error: Exception | None = None
        wanted: dict[str, tuple[str | None, str, str, bool]] = {}
        for key in plan.exports:
            status = export_status(st.export_revs[key][1], None)
            wanted[key] = (status, "Exported", f"exported to the federation ({status})", False)
        for key, why in plan.refused.items():
            wanted[key] = (export_status(None, why), "ExportRefused", f"not exported: {why}", True)
        for key, svc in c["services"].items():
            if key not in wanted and n.EXPORT_STATUS in ((svc.get("metadata") or {}).get("annotations") or {}):
                wanted[key] = (None, "ExportWithdrawn", "withdrawn from the federation", False)
        for key in set(st.written_status) - set(wanted) - set(c["services"]):
            del st.written_status[key]  # the Service is gone
        for key, (status, reason, message, warning) in sorted(wanted.items()):
            svc = c["services"].get(key)
            have = ((svc or {}).get("metadata") or {}).get("annotations", {}) or {}
            current_status = have.get(n.EXPORT_STATUS)
            if current_status == status or (key in st.written_status and st.written_status[key] == status):
                continue
            ns, name = key.split("/", 1)
            try:
                await trio.to_thread.run_sync(self.kube.set_export_status, ns, name, status)
                st.written_status[key] = status
                if _status_kind(current_status) != _status_kind(status):
                    await trio.to_thread.run_sync(self.kube.record_event, ns, svc, name, reason, message, warning)
                self.log.info("export.status", service=key, status=status or "(removed)")
            except RetryableError as exc:
                first_error = first_error or exc
            except KubeRefused as exc:
                self.log.error("export.status_refused", service=key, error=str(exc))
        if first_error is not None:
            raise first_error

    # ------------------------------------------------------------------ imports
    async def reconcile_imports(self) -> None:
        st, c = self.state, self.state.caches
        assert st.snapshot is not None
        plan = plan_mirrors(
            st.snapshot,
            self.cfg.cluster,
            c["services"].values(),
            c["endpointslices"].values(),
            gateway_endpoints(c["endpointslices"].values()),
            self.cfg.dns_suffix,
        )
        first_error: Exception | None = None
        for text in plan.conflicts:
            if text not in st.conflicts_logged:
                st.conflicts_logged.add(text)
                self.log.warning("mirror.conflict", detail=text)
        for obj in plan.upserts:
            ref = ObjectRef(kind=obj["kind"], namespace=obj["metadata"]["namespace"], name=obj["metadata"]["name"])
            spec_hash = obj["metadata"]["annotations"][SPEC_HASH]
            if st.refused.get(ref) == spec_hash:
                continue
            try:
                await trio.to_thread.run_sync(self.kube.upsert, obj)
                self._cache_for(ref.kind)[f"{ref.namespace}/{ref.name}"] = obj  # don't re-plan it before the watch says so
                self.log.info("mirror.applied", object=str(ref), source=obj["metadata"]["labels"][n.MIRRORED_FROM])
            except RetryableError as exc:
                first_error = first_error or exc
            except KubeRefused as exc:
                st.refused[ref] = spec_hash
                self.log.error("mirror.refused", object=str(ref), error=str(exc))
        for ref in plan.deletes:
            try:
                await trio.to_thread.run_sync(self.kube.delete, ref.kind, ref.namespace, ref.name)
                self._cache_for(ref.kind).pop(f"{ref.namespace}/{ref.name}", None)
                self.log.info("mirror.deleted", object=str(ref), sweep=not st.swept)
            except RetryableError as exc:
                first_error = first_error or exc
            except KubeRefused as exc:
                self.log.error("mirror.delete_refused", object=str(ref), error=str(exc))
        if first_error is not None:
            raise first_error
        if not st.swept:
            st.swept = True
            self.log.info("mirrors.swept", deleted=len(plan.deletes), revision=st.snapshot.revision)

    def _cache_for(self, kind: str) -> dict[str, dict[str, Any]]:
        return self.state.caches["services" if kind == "Service" else "endpointslices"]


def _status_kind(status: str | None) -> str:
    return "none" if status is None else status.split(" ", 1)[0]

"""A history checker for the federation's watch streams, in the spirit of Jepsen's etcd analysis.

Theory of operation.  Three parts, all over real gRPC and a real etcd:

* :class:`EtcdHistory` is the reference: etcd's own history of the config keys, read
  straight from etcd (not through the federation) as a watch over a revision range that
  starts at a consistent snapshot (a range read at revision ``r0``) and follows every
  event from ``r0 + 1`` on, resuming from the last revision it holds when a member dies.
  If etcd compacted past that revision before the resume, the reference has a gap and
  says so (:attr:`EtcdHistory.gaps`): the check then fails as unverifiable rather than
  pass on a history it does not know.
* :class:`Watcher` is one watch client (:class:`federation.client.FederationClient`
  in a thread, raw messages) that records every message it applied: revision, kind
  (snapshot, delta, progress), the keys and values, and which stream it came on
  (``on_stream``: each reconnect opens a new one).
* :func:`check` replays each watcher's record against the reference and returns the
  problems, each naming the watcher, the message and what is wrong:

  - order: a delta with changes carries a revision newer than everything before it
    (none seen twice, none out of order); a snapshot or progress never goes back;
  - no missed change: after every message the watcher's state equals etcd's state at
    that revision; within one stream a delta is exactly the next revision that changed
    config (a resumed stream's first message may cover several, by design); a progress
    message at ``r`` claims there is no change up to ``r`` that the watcher lacks;
  - final state: the last state equals etcd's, read again at the end (:func:`etcd_state`).

State is compared as ``{(kind, key): value}`` with the API's kinds and keys (``service``
``east/default/web``), values as parsed JSON (``pem`` text for the trust bundle and CRL),
so a snapshot, a delta and an etcd value of the same record compare equal.

    ref = EtcdHistory(etcd_endpoints).start()
    watchers = [Watcher(address_list, cert_dir).start() for _ in range(10)]
    ...load and faults...
    wait_caught_up(watchers, ref)
    report = check(watchers, ref, final=etcd_state(etcd_endpoints))
    assert report.ok, report.describe()
"""

from __future__ import annotations

import asyncio
import bisect
import json
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federation.client import FederationClient
from federation.proto import federation_pb2 as pb
from federation.server import Etcd, Keys

Key = tuple[str, str]  # (kind, API key)
State = dict[Key, Any]
_KIND = {pb.CLUSTER: "cluster", pb.SERVICE: "service", pb.POLICY: "policy", pb.BUNDLE: "bundle", pb.CRL: "crl",
         pb.TRAFFIC: "traffic", pb.LIVENESS: "liveness"}
_FAMILY = {"clusters": "cluster", "exports": "service", "policies": "policy", "traffic": "traffic",
           "liveness": "liveness"}


def api_key(keys: Keys, etcd_key: bytes) -> Key | None:
    """The (kind, key) the watch API uses for an etcd key; None for non-config keys."""
    split = keys.split(etcd_key)
    if split is None:
        return None
    family, rest = split
    if family in _FAMILY:
        return _FAMILY[family], rest
    if family == "trust" and rest in ("bundle", "crl"):
        return rest, rest
    return None


def _value(kind: str, raw: str | bytes) -> Any:
    obj = json.loads(raw)
    return obj["pem"] if kind in ("bundle", "crl") else obj


def snapshot_state(snapshot_json: str) -> State:
    doc = json.loads(snapshot_json)
    state: State = {}
    for c in doc.get("clusters", []):
        state[("cluster", c["name"])] = c
    for s in doc.get("services", []):
        state[("service", f"{s['cluster']}/{s['namespace']}/{s['name']}")] = s
    for p in doc.get("policies", []):
        state[("policy", f"{p['kind']}/{p['name']}")] = p
    for r in doc.get("routes", []):
        state[("traffic", f"TrafficRoute/{r['name']}")] = r
    for lv in doc.get("liveness", []):
        state[("liveness", lv["cluster"])] = lv
    for kind in ("bundle", "crl"):
        if doc.get(f"{kind}_pem"):
            state[(kind, kind)] = doc[f"{kind}_pem"]
    return state


# ---------------------------------------------------------------------- the reference


class EtcdHistory:
    """etcd's history of the config keys from a consistent start, followed live."""

    def __init__(self, endpoints: str | Sequence[str], prefix: str = "/isthmus/") -> None:
        self.endpoints = endpoints
        self.keys = Keys(prefix)
        self.start_revision = 0
        self.config_start = 0  # the newest config change at or before start_revision
        self.initial: State = {}
        self.events: list[tuple[int, Key, Any]] = []  # (revision, key, value or None), in order
        self.revision = 0  # every event up to here is in ``events``
        self.gaps: list[tuple[int, int]] = []  # (resume revision, compact revision)
        self.resumes = 0
        self._changed: list[int] = []  # sorted revisions that changed config
        self._states: dict[tuple[int, int], State] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @classmethod
    def recorded(cls, start_revision: int, initial: State, events: Sequence[tuple[int, Key, Any]]) -> EtcdHistory:
        """A reference from a history already known (the checker's own tests)."""
        ref = cls([])
        ref.start_revision = start_revision
        ref.initial = dict(initial)
        for rev, k, v in events:
            ref.events.append((rev, k, v))
            if not ref._changed or ref._changed[-1] != rev:
                ref._changed.append(rev)
        ref.revision = max([start_revision, *(e[0] for e in events)])
        return ref

    def start(self, timeout: float = 20.0) -> EtcdHistory:
        self._thread = threading.Thread(target=self._run, name="etcd-history", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError("etcd history: could not read etcd's starting state")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._task is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:
                pass  # it closed meanwhile: the follower has ended (an error or a gap, reported)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._follow())
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported by start()/check()
            self._error = exc
            self._started.set()
        finally:
            self._loop.close()

    async def _follow(self) -> None:
        from federation import FederationError, StoreUnavailable
        from federation._errors import Compacted

        async with Etcd(self.endpoints) as etcd:
            prefix = self.keys.family("")
            for _ in range(100):
                try:
                    first = await etcd.get_prefix(prefix)
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.2)
            self.start_revision = self.revision = first.header.revision
            newest = 0
            for kv in first.kvs:
                k = api_key(self.keys, kv.key)
                if k is not None:
                    self.initial[k] = _value(k[0], kv.value)
                    newest = max(newest, kv.mod_revision)
            # The stream tags messages with config revisions (the newest config change), not
            # etcd's: a snapshot of this state may carry the newest config key's revision.
            # (A config delete after it would be missed here: none happens before a test starts.)
            self.config_start = newest or self.start_revision
            self._started.set()
            while True:
                try:
                    async for resp in etcd.watch(prefix, self.revision + 1):
                        self._take(resp)
                except Compacted as exc:
                    self.gaps.append((self.revision + 1, exc.compact_revision))
                    return
                except FederationError:  # the stream broke (unavailable, or grpc's own INTERNAL): resume
                    self.resumes += 1
                    await asyncio.sleep(0.1)

    def _take(self, resp: Any) -> None:
        with self._lock:
            last = 0
            for ev in resp.events:
                rev = ev.kv.mod_revision
                last = rev
                k = api_key(self.keys, ev.kv.key)
                if k is None:
                    continue
                value = None if ev.type == ev.DELETE else _value(k[0], ev.kv.value)
                self.events.append((rev, k, value))
                if not self._changed or self._changed[-1] != rev:
                    self._changed.append(rev)
            if resp.watch_id == -1 and not resp.events:
                return  # an on-demand progress reply (not trusted before etcd 3.5.8)
            self.revision = max(self.revision, last or resp.header.revision)

    # ------------------------------------------------------------------ queries
    def state_at(self, revision: int) -> State:
        """The config as etcd had it at ``revision`` (>= the start revision).  Do not
        mutate the result: it is cached (many watchers ask for the same revisions)."""
        with self._lock:
            key = (revision, len(self.events))
            cached = self._states.get(key)
            if cached is not None:
                return cached
            state = dict(self.initial)
            for rev, k, value in self.events:
                if rev > revision:
                    break
                if value is None:
                    state.pop(k, None)
                else:
                    state[k] = value
            if len(self._states) > 4096:
                self._states.clear()
            self._states[key] = state
            return state

    def changes_between(self, after: int, upto: int) -> list[int]:
        """The revisions in (after, upto] that changed config."""
        with self._lock:
            lo = bisect.bisect_right(self._changed, after)
            hi = bisect.bisect_right(self._changed, upto)
            return self._changed[lo:hi]

    @property
    def last_change(self) -> int:
        with self._lock:
            return self._changed[-1] if self._changed else (self.config_start or self.start_revision)

    def wait_for(self, revision: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.revision < revision:
            if self.gaps or self._error is not None:
                raise RuntimeError(f"etcd history stopped: gaps {self.gaps}, error {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd history reached {self.revision}, not {revision}, in {timeout:.0f}s")
            time.sleep(0.05)


def etcd_state(endpoints: str | Sequence[str], prefix: str = "/isthmus/") -> tuple[int, State]:
    """(revision, config) read from etcd now, independently of any recorder."""

    async def read() -> tuple[int, State]:
        keys = Keys(prefix)
        async with Etcd(endpoints, timeout=10.0) as etcd:
            resp = await etcd.get_prefix(keys.family(""))
        state: State = {}
        for kv in resp.kvs:
            k = api_key(keys, kv.key)
            if k is not None:
                state[k] = _value(k[0], kv.value)
        return resp.header.revision, state

    return asyncio.run(read())


def etcd_revision(endpoints: str | Sequence[str]) -> int:
    async def read() -> int:
        async with Etcd(endpoints, timeout=10.0) as etcd:
            return await etcd.current_revision()

    return asyncio.run(read())


# ---------------------------------------------------------------------- watchers


@dataclass(frozen=True)
class Applied:
    """One message a watcher applied."""

    revision: int
    kind: str  # "snapshot" | "delta" | "progress"
    changes: tuple[tuple[Key, Any], ...]  # a snapshot: its whole state; a delta: (key, value or None)
    stream: int  # which stream (1, 2, ...) it arrived on
    first_of_stream: bool
    at: float


@dataclass
class Recording:
    """What :func:`check` reads of a watcher (a :class:`Watcher` is one)."""

    name: str
    applied: list[Applied] = field(default_factory=list)
    error: BaseException | None = None
    streams: int = 1

    @property
    def revision(self) -> int:
        return max((a.revision for a in self.applied), default=0)


class Watcher:
    """A watch client in a thread that records every message it applies."""

    def __init__(self, addresses: Sequence[str], cert_dir: str | Path, name: str = "", progress_interval: float = 1.0) -> None:
        self.name = name or f"watcher@{id(self):x}"
        self.addresses, self.cert_dir = list(addresses), cert_dir
        self.client = FederationClient(self.addresses, cert_dir, timeout=5.0)
        self.progress_interval = progress_interval
        self.applied: list[Applied] = []
        self.state: State = {}
        self.revision = 0
        self.streams = 0
        self.resumed_from: list[int] = []
        self.error: BaseException | None = None
        self._fresh_stream = False
        self._pause = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.client.close()
        self._thread.join(10)

    def bounce(self, pause: float) -> None:
        """Drop the watch and, ``pause`` seconds later, resume it from the revision held,
        with a new client: what a restarted gateway does from its last-known-good file."""
        self._pause = pause
        self.client.close()

    def _on_stream(self, revision: int) -> None:
        self.streams += 1
        self.resumed_from.append(revision)
        self._fresh_stream = True

    def _run(self) -> None:
        try:
            while True:
                for event in self.client.watch(from_revision=self.revision, stop=self._stop, raw=True,
                                               progress_interval=self.progress_interval, on_stream=self._on_stream):
                    self._record(event)  # type: ignore[arg-type]
                if self._stop.wait(self._pause):  # the watch ended: stopped, or bounced
                    return
                self.client = FederationClient(self.addresses, self.cert_dir, timeout=5.0)
        except BaseException as exc:  # noqa: BLE001 - the check reports it
            if not self._stop.is_set():
                self.error = exc

    def _record(self, event: pb.WatchEvent) -> None:
        first, self._fresh_stream = self._fresh_stream, False
        now = time.monotonic()
        if event.is_snapshot:
            state = snapshot_state(event.snapshot_json)
            self.applied.append(Applied(event.revision, "snapshot", tuple(state.items()), self.streams, first, now))
            self.state = state
        elif event.progress:
            self.applied.append(Applied(event.revision, "progress", (), self.streams, first, now))
        else:
            changes = []
            for c in event.changes:
                k = (_KIND.get(c.kind, "unknown"), c.key)
                changes.append((k, None if c.deleted else _value(k[0], c.json)))
            self.applied.append(Applied(event.revision, "delta", tuple(changes), self.streams, first, now))
            for k, v in changes:
                if v is None:
                    self.state.pop(k, None)
                else:
                    self.state[k] = v
        self.revision = max(self.revision, event.revision)


def wait_caught_up(watchers: Iterable[Watcher], revision: int, timeout: float = 30.0) -> None:
    """Wait until every watcher has applied (or been told by progress) ``revision``."""
    deadline = time.monotonic() + timeout
    pending = list(watchers)
    while pending:
        pending = [w for w in pending if w.revision < revision and w.error is None]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} watchers short of revision {revision}: "
                               + ", ".join(f"{w.name}@{w.revision}" for w in pending[:5]))
        time.sleep(0.1)


# ---------------------------------------------------------------------- the check


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    watchers: int = 0
    messages: int = 0
    deltas: int = 0
    snapshots: int = 0
    progress: int = 0
    streams: int = 0
    resumes_covering_several: int = 0  # a resumed stream's first message covered > 1 change
    reference_events: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self, limit: int = 20) -> str:
        head = (f"{self.watchers} watchers, {self.messages} messages ({self.deltas} deltas, {self.snapshots} snapshots, "
                f"{self.progress} progress) on {self.streams} streams; {self.reference_events} etcd events")
        if self.ok:
            return "history OK: " + head
        more = f"\n  ... and {len(self.problems) - limit} more" if len(self.problems) > limit else ""
        return f"history violated ({len(self.problems)} problems): {head}\n  " + "\n  ".join(self.problems[:limit]) + more


def _diff(have: State, want: State) -> str:
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    differ = [k for k in want if k in have and have[k] != want[k]]
    parts = []
    for label, ks in (("missing", missing), ("extra", extra), ("stale", differ)):
        if ks:
            parts.append(f"{label} {', '.join('/'.join(k) for k in sorted(ks)[:3])}" + (" ..." if len(ks) > 3 else ""))
    return "; ".join(parts)


def check(watchers: Sequence[Watcher | Recording], ref: EtcdHistory, final: tuple[int, State] | None = None) -> Report:
    """Replay every watcher's record against etcd's history; see the module docstring."""
    report = Report(watchers=len(watchers), reference_events=len(ref.events))
    if ref.gaps:
        report.problems.append(f"reference: etcd compacted past the history before it resumed {ref.gaps}: unverifiable")
    for w in watchers:
        if w.error is not None:
            report.problems.append(f"{w.name}: the watch failed: {w.error!r}")
        report.streams += w.streams
        state: State = {}
        last = 0  # newest revision applied or confirmed by progress
        last_change = 0  # newest revision whose state the watcher holds
        started = False
        for i, m in enumerate(w.applied):
            report.messages += 1
            where = f"{w.name} message {i} ({m.kind} rev {m.revision}, stream {m.stream})"
            floor = ref.config_start or ref.start_revision
            if m.revision < floor:
                report.problems.append(f"{where}: older than the reference's start {floor}")
                continue
            if m.kind == "progress":
                report.progress += 1
                if m.revision < last:
                    report.problems.append(f"{where}: progress went back from {last}")
                missed = ref.changes_between(last_change, m.revision) if started else []
                if missed:
                    report.problems.append(f"{where}: progress claims rev {m.revision} but changes at {missed[:5]} never arrived")
                last = max(last, m.revision)
                last_change = max(last_change, m.revision) if not missed else last_change
                continue
            if m.kind == "snapshot":
                report.snapshots += 1
                if m.revision < last:
                    report.problems.append(f"{where}: snapshot older than revision {last} already applied")
                state = dict(m.changes)
            else:
                report.deltas += 1
                if m.changes and m.revision <= last:
                    report.problems.append(f"{where}: revision {m.revision} not newer than {last} (seen twice or out of order)")
                elif not m.changes and m.revision < last:
                    report.problems.append(f"{where}: empty delta went back from {last}")
                if not started:
                    report.problems.append(f"{where}: a delta before any snapshot")
                covered = ref.changes_between(last_change, m.revision)
                if m.changes and not m.first_of_stream and covered != [m.revision]:
                    report.problems.append(
                        f"{where}: mid-stream delta should carry exactly the next change after {last_change}; "
                        f"etcd changed config at {covered[:5]}")
                if m.first_of_stream and len(covered) > 1:
                    report.resumes_covering_several += 1
                for k, v in m.changes:
                    if v is None:
                        state.pop(k, None)
                    else:
                        state[k] = v
            started = True
            want = ref.state_at(m.revision)
            if state != want:
                report.problems.append(f"{where}: state differs from etcd's at that revision: {_diff(state, want)}")
            last = max(last, m.revision)
            last_change = max(last_change, m.revision)
        if final is not None:
            rev, want = final
            if w.revision < ref.last_change:
                report.problems.append(f"{w.name}: ended at revision {w.revision}, before etcd's last change {ref.last_change}")
            elif state != want:
                report.problems.append(f"{w.name}: final state differs from etcd's (rev {rev}): {_diff(state, want)}")
    if final is not None:
        rev, want = final
        if ref.revision >= rev and ref.state_at(rev) != want:
            report.problems.append(f"reference: its state at {rev} differs from etcd's: {_diff(ref.state_at(rev), want)}")
    return report

"""Where the gateway's config comes from, off the data path's event loop.

Theory of operation.

* File only (no ``federation.address``): the config file's ``static`` snapshot, else the
  last-known-good file if one exists.
* Federation: the last-known-good file is applied first (static stability: a gateway
  restarted while the federation is down serves the last config it knew), then the
  federation watch — a blocking grpcio stream in a worker thread — delivers snapshots and
  deltas; a :class:`federation.client.SnapshotTracker` keeps the current snapshot; the trio
  side applies the newest one (bursts coalesce) and saves it as last-known-good (atomic
  rename) in a task of its own: a write serialises the whole config, so it never delays
  the next apply, and writes coalesce to the newest snapshot while one runs.  A quiet
  stream carries progress messages (every few seconds): they confirm the current config
  (staleness stays small).
* Workers (``--workers N``): each worker process runs the federation watch too (deltas,
  as above), without reporting or saving; the supervisor's control process reports what
  is in force and writes the last-known-good file, which a worker reads when it starts.

Nothing on the control path may stop the data path.  The watch thread restarts with
capped backoff, forever, whatever ends it (refused credentials, unreadable files, a bug);
meanwhile the gateway keeps serving what it has and stays ready, and the staleness shows
in ``isthmus_config_staleness_seconds``, ``isthmus_federation_connected`` and in
``isthmus status`` (CONFIRMED).  A snapshot the gateway cannot build is reported as
rejected (:meth:`Control.rejected`) and the previous config stays.  A failed
last-known-good write (disk full, read-only) is logged and counted, never raised.

A reporter task tells the federation what is in force (ReportApplied) after each change
and at least every :data:`REPORT_INTERVAL`, which also renews the status entry's lease;
another pushes the per-edge traffic summaries (ReportTraffic, :mod:`gateway._traffic_push`).

The last-known-good file is ``{"isthmus_last_known_good": 1, "cluster", "federation",
"snapshot"}``: the snapshot's JSON (``federation.models.Snapshot``) and whose it is —
the cluster and the pins of the federation's roots.  A file of another cluster or
federation is refused at start.  Its default path is per cluster (:func:`lkg_path`).
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio
from prometheus_client import Counter, Gauge

import trust
from federation import FederationError, names
from federation.client import read_snapshot
from federation.models import Snapshot

from ._config import REPORT_INTERVAL
from ._traffic_push import push_traffic

if TYPE_CHECKING:
    from federation.client import FederationClient

    from ._gateway import Gateway

log = structlog.get_logger("isthmus.gateway")

LKG_FORMAT = 1
WATCH_BACKOFF = (0.5, 30.0)  # first and longest wait between watch restarts


# ---------------------------------------------------------------------- metrics


class ControlMetrics:
    """The control path's metrics, in the gateway's own registry."""

    def __init__(self, gw: Gateway) -> None:
        r = gw.metrics.registry
        self.last_message = 0.0  # monotonic time of the last watch message; 0: none yet
        self.connected_within = 15.0
        self.connected = Gauge("isthmus_federation_connected",
                               "1 while the federation watch delivers (progress at least every few "
                               "seconds), else 0: the config in force may be stale", registry=r)
        self.connected.set_function(
            lambda: 1.0 if self.last_message and time.monotonic() - self.last_message < self.connected_within else 0.0)
        self.watch_restarts = Counter("isthmus_federation_watch_restarts",
                                      "Federation watches restarted after they failed", registry=r)
        self.invalid_records = Counter("isthmus_config_invalid_records",
                                       "Records from the federation skipped (or enforced as DENY) "
                                       "because they did not validate", ("kind",), registry=r)
        self.lkg_write_failures = Counter("isthmus_config_lkg_write_failures",
                                          "Failed writes of the last-known-good file", registry=r)


_METRICS: weakref.WeakKeyDictionary[Any, ControlMetrics] = weakref.WeakKeyDictionary()


def control_metrics(gw: Gateway) -> ControlMetrics:
    m = _METRICS.get(gw)
    if m is None:
        m = _METRICS[gw] = ControlMetrics(gw)
    return m


# ---------------------------------------------------------------------- last known good


def lkg_path(gw: Gateway) -> Path:
    """The last-known-good file: as configured, else per cluster under the default folder
    (two gateways on one host must never read each other's)."""
    cfg = gw.cfg
    if "last_known_good" in cfg.model_fields_set:
        return cfg.last_known_good
    return cfg.last_known_good.parent / gw.cluster / cfg.last_known_good.name


def federation_pins(gw: Gateway) -> list[str]:
    """Pins of the roots in the gateway's bundle: which federation it belongs to."""
    try:
        return sorted({trust.ca_pin(c) for c in trust.load_certs(gw.cfg.tls.bundle_file)})
    except (OSError, ValueError, trust.TrustError):
        return []


def _pins_of(bundle_pem: str) -> set[str]:
    from cryptography import x509

    try:
        return {trust.ca_pin(c) for c in x509.load_pem_x509_certificates(bundle_pem.encode())}
    except ValueError:
        return set()


def load_lkg(path: Path, cluster: str = "", pins: list[str] | None = None) -> Snapshot | None:
    """The snapshot in a last-known-good file, None when there is none we may use.

    With ``cluster`` and ``pins``, a file written for another cluster or federation is
    refused (logged as ``config.lkg_refused``).  Records in it that do not validate any
    more are skipped; files of earlier versions (a bare snapshot) are checked by content.
    """
    try:
        doc = json.loads(path.read_bytes())
        if isinstance(doc, dict) and "isthmus_last_known_good" in doc:
            owner = (str(doc.get("cluster", "")), set(doc.get("federation") or ()))
            body = json.dumps(doc.get("snapshot"))
        else:  # written before the file said whose it is: judge by what it holds
            owner = ("", set())
            body = path.read_text()
        snap, _ = read_snapshot(body, on_invalid=lambda kind, key, error: log.warning(
            "config.lkg_record_skipped", path=str(path), kind=kind, key=key, error=error[:200]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("config.lkg_unreadable", path=str(path), error=str(exc)[:200])
        return None
    if cluster or pins:
        file_cluster, file_pins = owner
        if not file_cluster:  # an earlier version's file
            file_cluster = cluster if any(c.name == cluster for c in snap.clusters) else "(unknown)"
            file_pins = _pins_of(snap.bundle_pem)
        problem = ""
        if cluster and file_cluster != cluster:
            problem = f"it was written by the gateway of cluster {file_cluster!r}, this is {cluster!r}"
        elif pins and file_pins and not file_pins & set(pins):
            problem = "it was written in another federation (none of its roots is in tls.bundle_file)"
        if problem:
            log.error("config.lkg_refused", path=str(path), problem=problem,
                      message=f"last-known-good file {path} refused: {problem}; give each gateway its own "
                              "last_known_good path (the default is per cluster) or delete the file")
            return None
    return snap


def save_lkg(path: Path, snap: Snapshot, cluster: str = "", pins: list[str] | None = None) -> None:
    # The snapshot's JSON is spliced in as pydantic writes it (not parsed and written
    # again): one serialisation of the whole config per write.
    head = json.dumps({"isthmus_last_known_good": LKG_FORMAT, "cluster": cluster, "federation": pins or []},
                      separators=(",", ":"))
    body = b"".join((head[:-1].encode(), b',"snapshot":', snap.model_dump_json().encode(), b"}"))
    trust.atomic_write(path, body, 0o600)


def initial_config(gw: Gateway) -> None:
    """Apply what we have before any network: static snapshot or last-known-good."""
    cfg = gw.cfg
    if cfg.static is not None and not cfg.federation.address:
        return  # already applied by Gateway.__init__
    snap = load_lkg(lkg_path(gw), gw.cluster, federation_pins(gw))
    if snap is not None and (gw.snapshot is None or snap.revision >= gw.snapshot.revision):
        if not gw.apply_snapshot(snap, source="last-known-good"):  # never fatal: logged, counted
            log.error("config.lkg_rejected", path=str(lkg_path(gw)), revision=snap.revision,
                      reason=gw.last_rejected.reason[:300] if gw.last_rejected else "")


def gateway_instance_id(gw: Gateway) -> str:
    """This process's name in ``isthmus status``: ``<cluster>/<host>-<pid>`` (federation.names)."""
    return names.gateway_name(gw.cluster, names.gateway_instance(socket.gethostname(), os.getpid()))


# ---------------------------------------------------------------------- following the federation


@dataclass
class _Report:
    revision: int = 0
    rejected_revision: int = 0
    rejected_reason: str = ""


class Control:
    """The federation side of one gateway: applies snapshots, saves and reports them."""

    def __init__(self, gw: Gateway, client: FederationClient, *, save: bool = True) -> None:
        self.gw = gw
        self.client = client
        self.save = save
        self.instance = gateway_instance_id(gw)
        self.metrics = control_metrics(gw)
        self.path = lkg_path(gw)
        self.pins = federation_pins(gw)
        self.report = _Report()
        self._report_due = trio.Event()
        self._lkg_error = ""
        # The newest snapshot not yet saved (see run_lkg_writer).
        self._lkg_pending: Snapshot | None = None
        self._lkg_due = trio.Event()

    def rejected(self, revision: int, reason: str) -> None:
        """A snapshot could not be built: the previous config stays; tell the federation.

        The hook for :class:`gateway.Gateway` (``on_rejected``); call it on the trio loop.
        """
        self.report.rejected_revision, self.report.rejected_reason = revision, reason[:500]
        self._report_due.set()

    async def apply(self, snap: Snapshot) -> bool:
        """Build ``snap`` off the loop and swap it in; False when the gateway rejected it
        (it then called :meth:`rejected` and kept the previous config)."""
        if not await self.gw.update(snap, source="federation"):
            return False
        current = self.gw.snapshot.revision if self.gw.snapshot is not None else 0
        if current >= self.report.rejected_revision:
            self.report.rejected_revision, self.report.rejected_reason = 0, ""
        self._report_due.set()
        return True

    async def write_lkg(self, snap: Snapshot) -> None:
        """Save the last-known-good file; a failure is logged and counted."""
        if not self.save:
            return
        try:
            await trio.to_thread.run_sync(save_lkg, self.path, snap, self.gw.cluster, self.pins)
        except (OSError, trust.TrustError) as exc:
            self.metrics.lkg_write_failures.inc()
            error = str(exc)[:200]
            if error != self._lkg_error:  # one line per distinct problem, not one per write
                log.error("config.lkg_write_failed", path=str(self.path), error=error,
                          message="serving on; the last-known-good file is not updated")
            self._lkg_error = error
        else:
            self._lkg_error = ""

    def save_later(self, snap: Snapshot) -> None:
        """Have :meth:`run_lkg_writer` save ``snap``, off the apply path: a write
        serialises the whole config, which a delta must not wait for.  Writes coalesce:
        while one runs, only the newest snapshot waits for the next."""
        self._lkg_pending = snap
        self._lkg_due.set()

    async def run_lkg_writer(self) -> None:
        """Write what :meth:`save_later` left, newest first, one write at a time (each one
        atomic: :func:`save_lkg`), and then rest: at least :data:`LKG_MIN_INTERVAL`, and
        long enough that writing takes at most :data:`LKG_DUTY` of the time.  A write
        costs the whole config (~0.3 s of CPU at 50,000 services) however small the
        change, so a burst of changes is saved once, at its end; the file is seconds old
        at worst, and a gateway started from it resyncs with the federation anyway."""
        while True:
            await self._lkg_due.wait()
            self._lkg_due = trio.Event()
            snap, self._lkg_pending = self._lkg_pending, None
            if snap is not None:
                started = trio.current_time()
                await self.write_lkg(snap)
                await trio.sleep(max(LKG_MIN_INTERVAL, (trio.current_time() - started) / LKG_DUTY))

    def on_invalid(self, kind: str, key: str, error: str) -> None:
        """Called from the watch thread for each record skipped (or enforced as DENY)."""
        self.metrics.invalid_records.labels(kind=kind).inc()
        log.warning("config.invalid_record", kind=kind, key=key, error=error[:300])

    async def run_reporter(self, interval: float = REPORT_INTERVAL) -> None:
        """Report what is in force after every change, and at least every ``interval``."""
        while True:
            with trio.move_on_after(interval):
                await self._report_due.wait()
            self._report_due = trio.Event()
            snap = self.gw.snapshot
            if snap is None:
                continue
            r = self.report
            try:
                await trio.to_thread.run_sync(lambda: self.client.report_applied(
                    self.instance, snap.revision, confirmed_at=self.gw.last_confirmed,
                    rejected_revision=r.rejected_revision, rejected_reason=r.rejected_reason))
            except Exception as exc:  # reporting is best effort
                log.info("federation.report_failed", error=str(exc)[:200])


# The last-known-good writer's rest after each write (Control.run_lkg_writer).
LKG_MIN_INTERVAL = 1.0  # seconds
LKG_DUTY = 0.1  # of the time spent writing, at most


def _backoff(n: int) -> float:
    first, cap = WATCH_BACKOFF
    return min(cap, first * 2**n) * random.uniform(0.5, 1.0)


async def follow_federation(
    gw: Gateway, *, save: bool = True, report: bool = True, progress_interval: float = 5.0,
    report_interval: float | None = None,
    task_status: trio.TaskStatus[Control] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the federation watch in a thread (restarted forever); apply its snapshots here.

    ``progress_interval``: how often a quiet watch confirms that nothing changed;
    ``report_interval``: how often to report at least (default: ``federation.report_interval``).
    Started with ``nursery.start`` it returns the :class:`Control`, whose
    :meth:`Control.rejected` is the gateway's hook for snapshots it cannot build.
    """
    from federation.client import FederationClient, SnapshotTracker

    cfg = gw.cfg
    fed = cfg.federation
    client = FederationClient(fed.address,
                              cert_file=fed.cert_file or cfg.tls.cert_file,
                              key_file=fed.key_file or cfg.tls.key_file,
                              bundle_file=fed.bundle_file or cfg.tls.bundle_file)
    control = Control(gw, client, save=save)
    previous_hook, gw.on_rejected = gw.on_rejected, control.rejected
    control.metrics.connected_within = 3 * progress_interval + 1.0
    # None: a progress message (nothing changed, the stream is alive).
    send, receive = trio.open_memory_channel[Snapshot | None](64)
    stop = threading.Event()
    token = trio.lowlevel.current_trio_token()

    def watch() -> None:
        tracker = SnapshotTracker()
        failures = 0
        try:
            while not stop.is_set():
                try:
                    for message in client.watch(tracker.revision, stop=stop, progress_interval=progress_interval,
                                                on_invalid=control.on_invalid):
                        failures = 0
                        control.metrics.last_message = time.monotonic()
                        snap = tracker.apply(message)
                        trio.from_thread.run(send.send, None if message.progress else snap, trio_token=token)
                    return  # only ends when stopped
                except (trio.RunFinishedError, trio.Cancelled, trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                except Exception as exc:  # the watch must never end for good: restart it
                    wait = _backoff(failures)
                    failures += 1
                    control.metrics.watch_restarts.inc()
                    control.metrics.last_message = 0.0
                    log.error("federation.watch_failed", error=f"{type(exc).__name__}: {str(exc)[:200]}",
                              retry_in=round(wait, 2), serving_revision=gw.snapshot.revision if gw.snapshot else None)
                    if not isinstance(exc, FederationError):
                        tracker = SnapshotTracker()  # unknown state: start over from a snapshot
                    if stop.wait(wait):
                        return
        finally:
            client.close()

    thread = threading.Thread(target=watch, daemon=True, name="federation-watch")
    thread.start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(control.run_lkg_writer)
            if report:
                nursery.start_soon(control.run_reporter, report_interval or fed.report_interval)
                nursery.start_soon(push_traffic, gw, client, control.instance)
            task_status.started(control)
            async with receive:
                async for item in receive:
                    # Coalesce a burst of deltas: only the newest snapshot matters.
                    snap = item
                    while True:
                        try:
                            item = receive.receive_nowait()
                        except trio.WouldBlock:
                            break
                        snap = item if item is not None else snap
                    if snap is None:  # only progress: what we hold is current
                        gw.confirm_current()
                        continue
                    if await control.apply(snap):
                        control.save_later(snap)
            nursery.cancel_scope.cancel()
    finally:
        gw.on_rejected = previous_hook
        stop.set()
        client.close()

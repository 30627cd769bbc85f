"""Where the gateway's config comes from, off the data path's event loop.

* File only (no ``federation.address``): the config file's ``static`` snapshot, else the
  last-known-good file if one exists.
* Federation: the last-known-good file is applied first (static stability: a gateway
  restarted while the federation is down serves the last config it knew), then the
  federation watch — a blocking grpcio stream in a worker thread — delivers snapshots and
  deltas; a :class:`federation.client.SnapshotTracker` keeps the current snapshot; the trio
  side applies the newest one (bursts coalesce), saves it as last-known-good (atomic
  rename) and reports the applied revision back.  A quiet stream carries progress
  messages (every few seconds): they confirm the current config (staleness stays small)
  and touch the last-known-good file so that followers confirm it too.
* Follower (``--workers N``): the supervisor runs the federation client and writes the
  last-known-good file; each worker process follows that file.

The last-known-good file is the snapshot's JSON (``federation.models.Snapshot``), so it is
as stable as that model.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import trio

import trust
from federation.models import Snapshot

if TYPE_CHECKING:
    from ._gateway import Gateway

log = structlog.get_logger("isthmus.gateway")


def load_lkg(path: Path) -> Snapshot | None:
    try:
        return Snapshot.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("config.lkg_unreadable", path=str(path), error=str(exc)[:200])
        return None


def save_lkg(path: Path, snap: Snapshot) -> None:
    trust.atomic_write(path, snap.model_dump_json().encode(), 0o600)


def initial_config(gw: Gateway) -> None:
    """Apply what we have before any network: static snapshot or last-known-good."""
    cfg = gw.cfg
    if cfg.static is not None and not cfg.federation.address:
        return  # already applied by Gateway.__init__
    snap = load_lkg(cfg.last_known_good)
    if snap is not None and (gw.snapshot is None or snap.revision >= gw.snapshot.revision):
        gw.apply_snapshot(snap, source="last-known-good")


def gateway_instance_id(gw: Gateway) -> str:
    return f"{gw.identity}#{socket.gethostname()}"


async def follow_federation(
    gw: Gateway, *, save: bool = True, report: bool = True, progress_interval: float = 5.0
) -> None:
    """Run the federation watch in a thread; apply its snapshots on this loop.

    ``progress_interval``: how often a quiet watch confirms that nothing changed.
    """
    from federation.client import FederationClient, SnapshotTracker

    cfg = gw.cfg
    fed = cfg.federation
    client = FederationClient(fed.address,
                              cert_file=fed.cert_file or cfg.tls.cert_file,
                              key_file=fed.key_file or cfg.tls.key_file,
                              bundle_file=fed.bundle_file or cfg.tls.bundle_file)
    # None: a progress message (nothing changed, the stream is alive).
    send, receive = trio.open_memory_channel[Snapshot | None](64)
    stop = threading.Event()
    token = trio.lowlevel.current_trio_token()
    instance = gateway_instance_id(gw)

    def watch() -> None:
        tracker = SnapshotTracker()
        try:
            for message in client.watch(stop=stop, progress_interval=progress_interval):
                snap = tracker.apply(message)
                try:
                    trio.from_thread.run(send.send, None if message.progress else snap, trio_token=token)
                except (trio.RunFinishedError, trio.Cancelled, trio.ClosedResourceError):
                    return
        except Exception as exc:  # the watch thread must never die silently
            log.error("federation.watch_failed", error=str(exc))
        finally:
            client.close()

    thread = threading.Thread(target=watch, daemon=True, name="federation-watch")
    thread.start()
    try:
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
                    if save:
                        await trio.to_thread.run_sync(_touch, cfg.last_known_good)
                    continue
                if not await gw.update(snap, source="federation"):
                    continue  # rejected: not saved, not reported as applied
                if save:
                    await trio.to_thread.run_sync(save_lkg, cfg.last_known_good, snap)
                if report:
                    try:
                        await trio.to_thread.run_sync(client.report_applied, instance, snap.revision)
                    except Exception as exc:  # reporting is best effort
                        log.info("federation.report_failed", error=str(exc)[:200])
    finally:
        stop.set()
        client.close()


def _touch(path: Path) -> None:
    # A new mtime tells follow_file (workers) that the config was confirmed.
    try:
        os.utime(path)
    except OSError:
        pass  # no file yet (nothing applied): nothing to confirm


async def follow_file(gw: Gateway, interval: float = 0.5) -> None:
    """Apply the last-known-good file whenever it changes (workers under a supervisor)."""
    path = gw.cfg.last_known_good
    stamp = None
    while True:
        try:
            st = path.stat()
            cur = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            cur = None
        if cur is not None and cur != stamp:
            stamp = cur
            snap = await trio.to_thread.run_sync(load_lkg, path)
            if snap is not None and (gw.snapshot is None or snap.revision != gw.snapshot.revision):
                await gw.update(snap, source="last-known-good")
            elif snap is not None:
                gw.confirm_current()
        await trio.sleep(interval)

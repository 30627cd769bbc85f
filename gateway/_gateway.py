"""The gateway: the parts wired together, their lifecycle, and config swaps (trio shell).

A :class:`Gateway` owns:

* :class:`~gateway._tls.GatewayTls` — its certificate, identity and TLS contexts;
* the :class:`~gateway._state.ConfigState` in force (``state``), replaced whole by
  :meth:`Gateway.apply_snapshot` (built on the calling thread) or :meth:`Gateway.update`
  (built in a worker thread, only the swap on the event loop);
* :class:`~gateway._listeners.Listeners` (sockets, admission), the request
  :class:`~gateway._handlers.Handlers`, and the :class:`~gateway._dialer.Dialer`
  (pools of upstream connections);
* telemetry (:class:`~gateway._telemetry.Metrics`) and the admin endpoint
  (:mod:`gateway._admin`);
* the HTTP/2 core its connections run on (:class:`~gateway._h2.ConnectionFactory`,
  chosen once at construction: ``core`` or ``$ISTHMUS_HTTP2_CORE``, else nghttp2 where
  it loads, else h2), shown in ``/config`` as ``http2_core`` and in the
  ``isthmus_http2_core{core=...}`` gauge.

A snapshot that cannot be built is rejected, never fatal: the state in force stays, the
rejection is logged (``config.rejected``), counted (``isthmus_config_rejected_total``),
shown in ``/config`` as ``last_rejected`` and passed to the ``on_rejected(revision,
reason)`` hook.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import structlog
import trio

from federation.models import Snapshot
from federation.traffic import Request

from ._abuse import Shield
from ._admin import AdminView, serve_admin
from ._authz import Authz
from ._extauthz_io import ExtAuthzClients
from ._config import GatewayConfig, config_json
from ._deadlines import Deadlines
from ._decision import Authorizer, Decision, allow_all
from ._dialer import Dialer
from ._errors import ConfigError, SnapshotRejected
from ._h2 import start_core
from ._guards import Guards
from ._handlers import Handlers
from ._listeners import ConnectionGuard, Listeners, listen
from ._normalize import PathOptions
from ._relay import H2Endpoint
from ._state import ConfigState, Rejected, build_state, empty_state, retire
from ._telemetry import Metrics, Recorder
from ._tls import GatewayTls
from ._tracing import Tracing, TracingSettings

log = structlog.get_logger("isthmus.gateway")

# Called with (revision, reason) when a snapshot is rejected.
RejectedHook = Callable[[int, str], None]


async def _decide_in_thread(pending: Callable[[], Decision]) -> Decision:
    return await trio.to_thread.run_sync(pending, abandon_on_cancel=True)


# While a config builds in a worker thread the event loop must keep running:
#
# * the loop thread waits for the GIL up to the interpreter's switch interval (5 ms by
#   default) each time it wakes: a shorter one while a build runs keeps those waits short;
# * a cyclic-GC pass stops every thread, and the passes a build's allocations trigger
#   would scan the half-built state (tens of thousands of objects): the collector is
#   paused for the build.  The new state is immutable and acyclic (freed by reference
#   counting when replaced), so it is then frozen out of the collector's reach instead of
#   being rescanned by every later pass.  Young garbage is collected before the build,
#   so what is frozen is (nearly) all live.
BUILD_SWITCH_INTERVAL = 0.0005
_build_lock = threading.Lock()
_builds = 0
_saved_interval = 0.0
_gc_was_enabled = False
_frozen_at_start = False


def _freeze_startup_objects() -> None:
    """Move what start-up allocated (modules, TLS contexts, the first config) out of the
    collector's reach, once per process: a full collection stops every thread, and
    rescanning those objects would make each one stall the loop for tens of ms."""
    global _frozen_at_start
    if not _frozen_at_start:
        _frozen_at_start = True
        gc.collect()
        gc.freeze()


@contextlib.contextmanager
def quiet_build() -> Iterator[None]:
    """Around a config build in a worker thread (and the swap): see the comment above."""
    global _builds, _saved_interval, _gc_was_enabled
    with _build_lock:
        if _builds == 0:
            _gc_was_enabled = gc.isenabled()
            if _gc_was_enabled:
                gc.collect(1)
                gc.disable()
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved_interval, BUILD_SWITCH_INTERVAL))
        _builds += 1
    try:
        yield
    finally:
        with _build_lock:
            _builds -= 1
            if _builds == 0:
                sys.setswitchinterval(_saved_interval)
                if _gc_was_enabled:
                    gc.freeze()
                    gc.enable()


class Gateway:
    """One cluster's east-west gateway."""

    def __init__(self, cfg: GatewayConfig, *, authorize: Authorizer = allow_all,
                 jwks_store: Any = None, guard: ConnectionGuard | None = None,
                 reuse_port: bool = False, on_rejected: RejectedHook | None = None,
                 core: str | None = None) -> None:
        self.cfg = cfg
        self.limits = cfg.limits
        self.reuse_port = reuse_port
        self.tls = GatewayTls(cfg.tls, cfg.limits.handshake_timeout)
        self.identity = self.tls.identity
        self.trust_domain = self.tls.trust_domain
        self.cluster = cfg.cluster or self.trust_domain.split(".", 1)[0]
        self.metrics = Metrics(self.cluster)
        self.metrics.cert_expiry.set_function(self.tls.leaf_expiry)
        self.http2 = start_core(self.limits, core, on_change=self._core_changed)
        self._core_changed(self.http2.info)
        t = cfg.tracing
        self.tracing_base = TracingSettings(t.collector, t.protocol, t.random_sampling_percentage,
                                            t.max_queue_size, t.max_export_batch_size,
                                            t.schedule_delay, t.export_timeout)
        # Spans over OTLP (see _tracing); the federation's Telemetry changes them live.
        self.tracing = Tracing(self.cluster, self.metrics.registry, self.tracing_base)
        self.recorder = Recorder(self.metrics, cfg.access_log, self.tracing)
        # Abuse containment: per-IP / per-peer caps, memory shedding (see _abuse).
        self.shield = Shield(self.limits, self.metrics.overload)
        # Federation AuthorizationPolicy + JWT; ``authorize`` runs after it (see _authz).
        # CUSTOM policies' external authorizers (gateway/_extauthz.py): channels kept across revisions.
        self.ext_authz = ExtAuthzClients(self.cluster, str(self.identity), self.metrics.ext_authz)
        self.authz = Authz(authorize, jwks_store, cluster=self.cluster, ext_authz=self.ext_authz)
        self.state: ConfigState = empty_state(self.cluster, cfg.dns_suffix, self.authz)
        self.last_rejected: Rejected | None = None
        self.on_rejected = on_rejected
        self.last_confirmed = time.time()
        self.metrics.config_staleness.set_function(lambda: time.time() - self.last_confirmed)
        self.ports: dict[str, int] = {}
        self.deadlines = Deadlines()
        self.endpoints: set[H2Endpoint] = set()  # every live HTTP/2 connection
        self._nursery: trio.Nursery | None = None
        self._updating = trio.Lock()
        self.dialer = Dialer(self.limits, self.tls, self._current, self.metrics, self.recorder,
                             self.endpoints, self.http2)
        # Breakers, retry budgets, outlier detection: state that outlives config changes.
        self.guards = Guards(self.metrics.registry, trio.current_time, self.dialer.health)
        self.handlers = Handlers(
            cluster=self.cluster, identity=str(self.identity), limits=self.limits,
            recorder=self.recorder, state=self._current, upstreams=self.dialer,
            clock=trio.current_time, spawn=self._spawn, in_thread=_decide_in_thread,
            add_deadline=self.deadlines.add, guards=self.guards,
            paths=PathOptions(cfg.path_normalization.merge_slashes,
                              cfg.path_normalization.escaped_slashes))
        self.listeners = Listeners(cfg, self.tls, self._current, self.handlers, self.shield,
                                   self.metrics, guard, self.endpoints, self.http2)
        if cfg.static is not None:
            try:
                self._install(self._build(cfg.static, "file"))
            except SnapshotRejected as exc:
                raise ConfigError(f"invalid gateway config: static: {exc}") from None

    # -- config ---------------------------------------------------------------------------
    def _current(self) -> ConfigState:
        return self.state

    @property
    def ready(self) -> bool:
        return self.state.ready

    @property
    def snapshot(self) -> Snapshot | None:
        return self.state.snapshot

    def _build(self, snap: Snapshot, source: str) -> ConfigState:
        return build_state(snap, source, cluster=self.cluster, dns_suffix=self.cfg.dns_suffix,
                           crl_file=self.cfg.tls.crl_file, authz=self.authz,
                           previous=self.state, bundle_file=self.cfg.tls.bundle_file,
                           tracing=self.tracing_base)

    def apply_snapshot(self, snap: Snapshot, source: str = "federation") -> bool:
        """Build the state of ``snap`` on this thread and swap it in; False if rejected.

        New requests use the new state; streams in flight keep theirs.
        """
        try:
            state = self._build(snap, source)
        except Exception as exc:  # noqa: BLE001 - never fatal: see _rejected
            self._rejected(snap.revision, source, exc)
            return False
        self._install(state)
        return True

    async def update(self, snap: Snapshot, source: str = "federation") -> bool:
        """Like :meth:`apply_snapshot`, but built in a worker thread: the event loop only
        swaps, so a large config change does not stall the streams in flight."""
        async with self._updating:
            with quiet_build():
                try:
                    state = await trio.to_thread.run_sync(self._build, snap, source)
                except Exception as exc:  # noqa: BLE001 - never fatal: see _rejected
                    self._rejected(snap.revision, source, exc)
                    return False
                retired = [self.state]
                self._install(state)
                # Freeing the old state (tens of thousands of objects) is work too: not
                # here, and in small steps (see retire).
                await trio.to_thread.run_sync(retire, retired)
            return True

    def _install(self, state: ConfigState) -> None:
        # One assignment: every request reads routes, policies and revocations of one state.
        self.state = state
        self.authz.adopt(state.policy)
        self.tracing.apply(state.tracing or self.tracing_base)
        m = self.metrics
        m.policy_revision.set(state.policy.revision)
        m.policy_errors.set(len(state.policy.failed))
        m.config_revision.set(state.revision)
        self.last_confirmed = time.time()
        routes = state.routes
        log.info("config.applied", revision=state.revision, source=state.source,
                 imported=len(routes.outbound), exported=len(routes.inbound),
                 peers=len(routes.peers_by_td), traffic_routes=len(state.traffic))

    def _rejected(self, revision: int, source: str, exc: Exception) -> None:
        if isinstance(exc, SnapshotRejected):
            reason = str(exc)
            log.error("config.rejected", revision=revision, source=source, reason=reason,
                      kept=self.state.revision)
        else:  # a snapshot our builder could not cope with: a bug, or data we don't expect
            reason = f"cannot build the config: {type(exc).__name__}: {exc}"
            log.error("config.rejected", revision=revision, source=source, reason=reason,
                      kept=self.state.revision, exc_info=True)
        self.metrics.config_rejected.inc()
        self.last_rejected = Rejected(revision, reason, source, time.time())
        if self.on_rejected is not None:
            try:
                self.on_rejected(revision, reason)
            except Exception:  # noqa: BLE001 - a reporting hook must not take the gateway down
                log.error("config.rejected_hook_failed", exc_info=True)

    def _core_changed(self, info: Any) -> None:
        for name in ("nghttp2", "h2"):
            self.metrics.http2_core.labels(name).set(1 if name == info.name else 0)

    def confirm_current(self) -> None:
        self.last_confirmed = time.time()

    def config_document(self) -> dict[str, object]:
        """The admin endpoint's ``/config``: one state, read once."""
        state, rejected = self.state, self.last_rejected
        return {
            "cluster": self.cluster,
            "identity": str(self.identity),
            **state.document(),
            "resilience": self._guards_document(state),
            "staleness_seconds": round(time.time() - self.last_confirmed, 3),
            "last_rejected": None if rejected is None else {
                "revision": rejected.revision, "reason": rejected.reason,
                "source": rejected.source},
            "ports": self.ports,
            "http2_core": self.http2.info.as_dict(),
            "tracing": self.tracing.document(),
            "config": config_json(self.cfg),
        }

    def _guards_document(self, state: ConfigState) -> dict[str, Any]:
        self.guards.sync(state.guards)
        return self.guards.document()

    def explain(self, host: str, method: str = "GET", path: str = "/",
                headers: list[tuple[str, str]] | None = None, tcp: bool = False) -> dict[str, Any]:
        """Where a request to ``host`` would go from here, and why (the admin ``/explain``):
        this gateway's routes and its live peer health, as selection sees them."""
        state = self.state
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers or ()]
        self.guards.sync(state.guards)
        doc = state.traffic.explain(host, Request(method, path, raw=raw, tcp=tcp), self.guards.health)
        doc["ejections"] = [e.as_dict(trio.current_time()) for e in self.guards.outlier.ejections()]
        return {"source": "gateway", "cluster": self.cluster, "applied_revision": state.revision,
                "config_source": state.source, **doc}

    def buffered_bytes(self) -> int:
        """Bytes held by the relay right now (queued in halves + h2 output buffers)."""
        return sum(ep.buffered_bytes() for ep in self.endpoints)

    # -- lifecycle ------------------------------------------------------------------------
    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def run(self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
                  extra: Callable[[Gateway, trio.Nursery], None] | None = None) -> None:
        cfg = self.cfg
        inbound = listen(cfg.inbound.host, cfg.inbound.port, self.reuse_port)
        outbound = listen(cfg.outbound.host, cfg.outbound.port, self.reuse_port)
        admin = listen(cfg.admin.host, cfg.admin.port, self.reuse_port)
        tcp = [(t, listen(t.host, t.port, self.reuse_port)) for t in cfg.tcp_ports]
        self.ports["inbound"] = inbound.socket.getsockname()[1]
        self.ports["outbound"] = outbound.socket.getsockname()[1]
        self.ports["admin"] = admin.socket.getsockname()[1]
        for t, lst in tcp:
            self.ports[f"tcp:{t.target}"] = lst.socket.getsockname()[1]
        view = AdminView(ready=lambda: self.ready, config=self.config_document,
                         registry=self.metrics.registry, explain=self.explain)
        _freeze_startup_objects()
        try:
            await self._serve(inbound, outbound, admin, tcp, view, extra, task_status)
        finally:
            with trio.CancelScope(shield=True):
                await self.ext_authz.aclose()

    async def _serve(self, inbound: Any, outbound: Any, admin: Any, tcp: Any, view: AdminView,
                     extra: Callable[[Gateway, trio.Nursery], None] | None,
                     task_status: trio.TaskStatus[Gateway]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.dialer.start(nursery)
            nursery.start_soon(run_timers, self.deadlines)
            nursery.start_soon(self.shield.memory.run)
            nursery.start_soon(self._refresh_jwks)
            serve = self.listeners
            nursery.start_soon(serve.accept, inbound, serve.inbound, nursery)
            nursery.start_soon(serve.accept, outbound, serve.outbound, nursery)
            for t, tl in tcp:
                nursery.start_soon(serve.accept, tl, functools.partial(serve.tcp_port, t.target),
                                   nursery)
            nursery.start_soon(serve_admin, view, admin)
            if extra is not None:
                extra(self, nursery)
            log.info("gateway.started", cluster=self.cluster, identity=str(self.identity),
                     **{f"port_{k.split(':')[0]}": v for k, v in self.ports.items()})
            task_status.started(self)

    def stop(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        self.tracing.apply(TracingSettings())  # the queued spans are flushed in a thread

    async def _refresh_jwks(self) -> None:
        """Refresh due JWKS key sets in a worker thread: at start, after a snapshot naming
        a new jwks_uri, and every ``check_interval`` seconds."""
        authz = self.authz
        while True:
            kick = trio.Event()
            authz.kick = kick.set
            if authz.refresh_due():
                # A fetch blocks for up to fetch_timeout per URI: a thread, never the loop.
                await trio.to_thread.run_sync(authz.refresh, abandon_on_cancel=True)
            with trio.move_on_after(authz.check_interval):
                await kick.wait()


async def run_timers(deadlines: Deadlines) -> NoReturn:
    """Fire ``deadlines``' timers as they fall due: the gateway's one timer task."""
    while True:
        changed = trio.Event()
        deadlines.wake = changed.set
        at = deadlines.next_at()
        if at is None:
            await changed.wait()
        else:
            with trio.move_on_at(at):
                await changed.wait()
        deadlines.fire(trio.current_time())


__all__ = ["Gateway", "RejectedHook", "quiet_build"]

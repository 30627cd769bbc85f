"""``isthmus gateway``: run one cluster's east-west gateway.

    isthmus gateway run --config gateway.yaml [--workers N]
    isthmus gateway run --check-core
    isthmus gateway check-config gateway.yaml

``--check-core`` prints the HTTP/2 core a gateway would run on (``$ISTHMUS_HTTP2_CORE``
is honoured), its version and nghttp2's self-test result, and exits 0 when that core is
the one asked for (nghttp2 by default), 1 when it fell back to h2.

With ``--workers N`` a supervisor starts N worker processes that each bind the listeners
with SO_REUSEPORT (the kernel spreads connections across them).  Each worker watches the
federation and applies its deltas itself; the supervisor's control process (its own
process, restarted with backoff when it exits, while the workers keep serving) reports
what is in force and writes the last-known-good file, which a worker that starts, or
restarts while the federation is down, serves first.  Worker *i* serves its admin endpoint on
``admin.port + i`` so that every worker's metrics can be scraped.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import structlog
import trio

from federation.cli import register_error_root

from ._config import GatewayConfig, config_json, load_config
from ._errors import GatewayError

# A GatewayError (a bad config, a port in use) is one line at the CLI's error boundary.
register_error_root(GatewayError)


def configure_logging(level: str = "info") -> None:
    """JSON lines on stdout: one per access-log entry and per operational event."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )


def _load(path: str) -> GatewayConfig:
    # A ConfigError reaches the CLI's one error boundary: one line, exit 2.
    return load_config(path)


async def serve(cfg: GatewayConfig, follow: str, reuse_port: bool = False) -> None:
    """Run a gateway until SIGINT/SIGTERM.  ``follow``: federation | worker | none.

    A worker (``--workers N``) watches the federation itself, as the gateway of one
    process does, so that a change costs it what it changes (a delta, not the whole
    last-known-good file read and built again); it neither reports nor saves: the
    supervisor's control process does both, once for the gateway."""
    from ._control import follow_federation, initial_config
    from ._gateway import Gateway

    gw = Gateway(cfg, reuse_port=reuse_port)
    initial_config(gw)
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.run)
        if follow == "federation":
            nursery.start_soon(_keep_running, follow_federation, gw)
        elif follow == "worker":
            from ._control import gateway_instance_id
            from ._traffic_push import push_worker_traffic

            nursery.start_soon(_keep_running, lambda g: follow_federation(g, save=False, report=False), gw)
            # Its own traffic summaries: the control process sees none of its requests.
            nursery.start_soon(_keep_running, lambda g: push_worker_traffic(g, gateway_instance_id(g)), gw)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                structlog.get_logger("isthmus.gateway").info("gateway.stopping")
                nursery.cancel_scope.cancel()
                break


async def _keep_running(follow: Any, gw: Any) -> None:
    """Run a config follower forever: whatever it raises must not reach the data path's
    nursery (it would stop the listeners); log it and start it again, with backoff."""
    log = structlog.get_logger("isthmus.gateway")
    failures = 0
    while True:
        started = trio.current_time()
        try:
            await follow(gw)
            error = "returned"
        except Exception as exc:  # noqa: BLE001 - the boundary that reports it
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
        if trio.current_time() - started > 60:
            failures = 0
        wait = min(30.0, 0.5 * 2**failures)
        failures += 1
        log.error("config.follower_failed", error=error, retry_in=wait)
        await trio.sleep(wait)


async def _supervise_control(cfg: GatewayConfig) -> None:
    from ._control import follow_federation, initial_config
    from ._gateway import Gateway

    # A data-path-less Gateway object: only its config state is used.
    gw = Gateway(cfg)
    initial_config(gw)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_keep_running, follow_federation, gw)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


@click.group()
def gateway() -> None:
    """The east-west gateway (data path)."""


@gateway.command("run")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
              help="Gateway config (YAML); required unless --check-core.")
@click.option("--workers", "-w", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Worker processes sharing the listeners (SO_REUSEPORT).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--worker-index", type=int, default=None, hidden=True)
@click.option("--check-core", is_flag=True,
              help="Print which HTTP/2 core would run and why, then exit (0: nghttp2 or the "
                   "core ISTHMUS_HTTP2_CORE asks for; 1: fell back to h2).")
def run(config_path: str | None, workers: int, log_level: str, worker_index: int | None,
        check_core: bool) -> None:
    """Run the gateway described by --config until SIGINT/SIGTERM."""
    if check_core:
        sys.exit(_check_core())
    if not config_path:
        raise click.UsageError("Missing option '--config' / '-c' (or give --check-core).")
    configure_logging(log_level)
    cfg = _load(config_path)
    if worker_index is not None:
        admin = cfg.admin.model_copy(update={"port": cfg.admin.port + worker_index
                                             if cfg.admin.port else 0})
        cfg = cfg.model_copy(update={"admin": admin})
        follow = "worker" if cfg.federation.address else "none"
        _trio_run(serve, cfg, follow, True)
        return
    if workers == 1:
        _trio_run(serve, cfg, "federation" if cfg.federation.address else "none", False)
        return
    _supervise(config_path, cfg, workers, log_level)


def _check_core() -> int:
    from .h2core import select_core

    info = select_core()  # a required core that cannot run: GatewayError, one line, exit 1
    click.echo(f"core: {info.name} {info.version}")
    click.echo(f"reason: {info.reason}")
    click.echo(f"self-test: {info.self_test}")
    if info.library:
        click.echo(f"library: {info.library}")
    for name, present in sorted(info.protections.items()):
        click.echo(f"protection {name}: {'yes' if present else 'no'}")
    return 1 if info.reason.startswith("fallback:") else 0


def _trio_run(*args: object) -> None:
    # Errors, and the ExceptionGroups trio wraps them in, reach the CLI's one error
    # boundary (federation/_errorboundary.py): one line, exit 1.
    try:
        trio.run(*args)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        pass


def _supervise(config_path: str, cfg: GatewayConfig, workers: int, log_level: str) -> None:
    log = structlog.get_logger("isthmus.gateway")
    cmd = [sys.executable, "-c", "from federation.cli import main; main()", "gateway", "run",
           "--config", str(Path(config_path).resolve()), "--log-level", log_level]
    procs: dict[int, subprocess.Popen[bytes]] = {}
    control: subprocess.Popen[bytes] | None = None
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    control_cmd = [sys.executable, "-c", "import sys; from gateway._cli import _control_main; "
                   "_control_main(sys.argv[1])", str(Path(config_path).resolve())]
    control_restart = _Restarts()
    if cfg.federation.address:
        # The control client gets its own process (and loop): never on a data path.
        control = subprocess.Popen(control_cmd)
    restarts: dict[int, float] = {}
    for i in range(workers):
        procs[i] = subprocess.Popen([*cmd, "--worker-index", str(i)])
    log.info("gateway.supervisor_started", workers=workers)
    while not stopping:
        time.sleep(0.2)
        if control is not None and control.poll() is not None and not stopping:
            # The workers serve the last-known-good config meanwhile (static stability).
            wait = control_restart.exited()
            log.warning("gateway.control_exited", code=control.returncode, restart_in=round(wait, 1))
            control = None
        if control is None and cfg.federation.address and control_restart.due() and not stopping:
            control = subprocess.Popen(control_cmd)
            log.info("gateway.control_restarted", restarts=control_restart.count)
        for i, p in list(procs.items()):
            if p.poll() is not None and not stopping:
                # Crash-looping workers restart at most once a second.
                wait = max(0.0, restarts.get(i, 0) + 1.0 - time.monotonic())
                log.warning("gateway.worker_exited", worker=i, code=p.returncode)
                time.sleep(wait)
                restarts[i] = time.monotonic()
                procs[i] = subprocess.Popen([*cmd, "--worker-index", str(i)])
    for p in [*procs.values(), *([control] if control else [])]:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in [*procs.values(), *([control] if control else [])]:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


class _Restarts:
    """Capped exponential backoff for a supervised process (1 s .. 30 s); a process that
    ran for a minute is forgiven its earlier exits."""

    def __init__(self, first: float = 1.0, cap: float = 30.0, forgive_after: float = 60.0) -> None:
        self.first, self.cap, self.forgive_after = first, cap, forgive_after
        self.count = 0
        self._streak = 0
        self._started = time.monotonic()
        self._next = 0.0

    def exited(self) -> float:
        now = time.monotonic()
        if now - self._started >= self.forgive_after:
            self._streak = 0
        wait = min(self.cap, self.first * 2**self._streak)
        self._streak += 1
        self._next = now + wait
        return wait

    def due(self) -> bool:
        if time.monotonic() < self._next:
            return False
        self.count += 1
        self._started = time.monotonic()
        return True


def _control_main(config_path: str) -> None:
    configure_logging()
    try:
        trio.run(_supervise_control, load_config(config_path))
    except GatewayError as exc:  # the supervisor restarts us with backoff
        structlog.get_logger("isthmus.gateway").error("gateway.control_failed", error=str(exc))
        sys.exit(1)
    except KeyboardInterrupt:
        pass


@gateway.command("check-config")
@click.argument("config_path", type=click.Path(dir_okay=False))
def check_config(config_path: str) -> None:
    """Validate a gateway config and the files it names (TLS certificate, key, bundle,
    CRL, last-known-good), then print it with every default filled in and every
    relative file name resolved against the config's folder. Exit 2 when anything is wrong."""
    from ._config import check_files
    from ._errors import ConfigError

    cfg = _load(config_path)
    problems = check_files(cfg)
    if problems:
        raise ConfigError(f"invalid gateway config {config_path}: " + "".join(f"\n  {p}" for p in problems))
    click.echo(json.dumps(config_json(cfg), indent=2))

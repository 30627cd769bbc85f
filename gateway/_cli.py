"""``isthmus gateway``: run one cluster's east-west gateway.

    isthmus gateway run --config gateway.yaml [--workers N]
    isthmus gateway check-config gateway.yaml

With ``--workers N`` a supervisor starts N worker processes that each bind the listeners
with SO_REUSEPORT (the kernel spreads connections across them); the supervisor alone runs
the federation client (in a thread of its own loop, not on any data path) and writes the
last-known-good file, which the workers follow.  Worker *i* serves its admin endpoint on
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

import click
import structlog
import trio

from ._config import GatewayConfig, config_json, load_config


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
    """Run a gateway until SIGINT/SIGTERM.  ``follow``: federation | file | none."""
    from ._control import follow_federation, follow_file, initial_config
    from ._gateway import Gateway

    gw = Gateway(cfg, reuse_port=reuse_port)
    initial_config(gw)
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.run)
        if follow == "federation":
            nursery.start_soon(follow_federation, gw)
        elif follow == "file":
            nursery.start_soon(follow_file, gw)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                structlog.get_logger("isthmus.gateway").info("gateway.stopping")
                nursery.cancel_scope.cancel()
                break


async def _supervise_control(cfg: GatewayConfig) -> None:
    from ._control import follow_federation, initial_config
    from ._gateway import Gateway

    # A data-path-less Gateway object: only its config state is used.
    gw = Gateway(cfg)
    initial_config(gw)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow_federation, gw)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


@click.group()
def gateway() -> None:
    """The east-west gateway (data path)."""


@gateway.command("run")
@click.option("--config", "-c", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Gateway config (YAML).")
@click.option("--workers", "-w", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Worker processes sharing the listeners (SO_REUSEPORT).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--worker-index", type=int, default=None, hidden=True)
def run(config_path: str, workers: int, log_level: str, worker_index: int | None) -> None:
    """Run the gateway described by --config until SIGINT/SIGTERM."""
    configure_logging(log_level)
    cfg = _load(config_path)
    if worker_index is not None:
        admin = cfg.admin.model_copy(update={"port": cfg.admin.port + worker_index
                                             if cfg.admin.port else 0})
        cfg = cfg.model_copy(update={"admin": admin})
        follow = "file" if cfg.federation.address else "none"
        _trio_run(serve, cfg, follow, True)
        return
    if workers == 1:
        _trio_run(serve, cfg, "federation" if cfg.federation.address else "none", False)
        return
    _supervise(config_path, cfg, workers, log_level)


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
    if cfg.federation.address:
        # The control client gets its own process (and loop): never on a data path.
        control = subprocess.Popen([sys.executable, "-c",
                                    "import sys; from gateway._cli import _control_main; "
                                    "_control_main(sys.argv[1])", str(Path(config_path).resolve())])
    restarts: dict[int, float] = {}
    for i in range(workers):
        procs[i] = subprocess.Popen([*cmd, "--worker-index", str(i)])
    log.info("gateway.supervisor_started", workers=workers)
    while not stopping:
        time.sleep(0.2)
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


def _control_main(config_path: str) -> None:
    configure_logging()
    cfg = load_config(config_path)
    try:
        trio.run(_supervise_control, cfg)
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

"""``isthmus export``: keep a file's services exported — the agent for clusters without Kubernetes.

VMs, bare-metal sites and ``isthmus demo`` have no Services to annotate.  This command
reads an exports file, publishes it for the cluster under an etcd lease, heartbeats the
lease, and republishes whenever the file changes (removing an entry withdraws it).  When
it stops — or is killed, or loses its network — the lease lapses and the exports vanish
from every other cluster after the TTL, exactly as with the Kubernetes agent.

The exports file (YAML)::

    services:
      - namespace: default
        name: web
        export_to: [west]            # optional; default: every other cluster
        ports:
          - {port: 8080, protocol: HTTP, target: 10.0.0.5:8080}   # target: where the gateway sends it
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import click
import structlog
import yaml
from pydantic import ValidationError

from ._cli_common import connection_options, handle_errors, log_level_option, make_client, setup_logging
from ._errors import FederationError, RemoteError
from .models import ExportedService

log = structlog.get_logger("isthmus.export")


class ExportsFileError(FederationError):
    """The exports file is missing or invalid."""


def load_exports(path: Path, cluster: str) -> list[ExportedService]:
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ExportsFileError(f"exports file {path}: cannot read it: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ExportsFileError(f"exports file {path}: not YAML: {exc}") from None
    if doc is None:
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("services", []), list):
        raise ExportsFileError(f"exports file {path}: expected a mapping with a 'services' list")
    out = []
    for i, entry in enumerate(doc.get("services") or []):
        if not isinstance(entry, dict):
            raise ExportsFileError(f"exports file {path}: services[{i}]: expected a mapping")
        try:
            out.append(ExportedService.model_validate({**entry, "cluster": cluster}))
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
            raise ExportsFileError(f"exports file {path}: services[{i}]{loc}: {err['msg']}") from None
    return out


def run_exporter(client: Any, cluster: str, path: Path, stop: threading.Event, ttl: int, poll: float = 0.5) -> None:
    """Publish ``path``'s services, heartbeat, republish on change, until ``stop``."""
    published: list[str] | None = None
    stamp: tuple[int, int] | None = None
    services: list[ExportedService] = []
    next_beat = 0.0
    backoff = 0.2
    while not stop.is_set():
        try:
            st = path.stat()
            if (st.st_mtime_ns, st.st_size) != stamp:
                try:
                    services = load_exports(path, cluster)
                    stamp = (st.st_mtime_ns, st.st_size)
                except ExportsFileError as exc:
                    # Keep serving the last good set; say why the new one was refused.
                    log.error("export.file_invalid", error=str(exc))
                    stamp = (st.st_mtime_ns, st.st_size)
            body = [s.model_dump_json() for s in services]
            now = time.monotonic()
            if body != published:
                r = client.publish(cluster, services, ttl)
                published, next_beat = body, now + ttl / 3
                log.info("export.published", cluster=cluster, services=len(services), revision=r.revision)
            elif now >= next_beat:
                client.heartbeat(cluster)
                next_beat = now + ttl / 3
            backoff = 0.2
            stop.wait(poll)
        except RemoteError as exc:
            if exc.code.name == "NOT_FOUND":  # the lease lapsed while we were away
                published = None
                continue
            log.warning("export.keepalive_failed", cluster=cluster, error=f"{exc.code.name}: {exc.details}")
            stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)
        except FileNotFoundError:
            log.error("export.file_missing", path=str(path))
            stop.wait(1.0)


@click.command("export")
@click.option("--cluster", required=True, envvar="ISTHMUS_CLUSTER", help="This cluster's name. Env: ISTHMUS_CLUSTER.")
@click.option("-f", "--file", "file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Exports file (YAML, see `isthmus export --help`).")
@click.option("--lease-ttl", default=30, show_default=True, type=click.IntRange(2, 3600),
              help="Seconds the exports outlive this process when it stops heartbeating.")
@click.option("--once", is_flag=True, help="Validate and publish once, then exit (the lease then lapses after the TTL).")
@log_level_option
@connection_options(cert_dir_help="The cluster's agent (or gateway) credentials: DIR/agent from "
                    "`isthmus federation join` (cert.pem, key.pem, bundle.pem). Env: ISTHMUS_CERT_DIR.")
@handle_errors
def export(cluster: str, file: Path, lease_ttl: int, once: bool, log_level: str,
           federation_addr: str | None, cert_dir: str | None) -> None:
    """Keep the services in FILE exported for CLUSTER (clusters without Kubernetes).

    Uses the cluster's agent (or gateway) certificate: --cert-dir DIR/agent from
    `isthmus federation join`. Runs until SIGINT/SIGTERM; editing FILE republishes,
    removing an entry withdraws it.

    \b
    services:
      - namespace: default
        name: web
        export_to: [west]      # optional
        ports:
          - {port: 8080, protocol: HTTP, target: 10.0.0.5:8080}
    """
    setup_logging(log_level)
    services = load_exports(file, cluster)  # fail fast on a bad file
    client = make_client(federation_addr, cert_dir)
    with client:
        if once:
            r = client.publish(cluster, services, lease_ttl)
            click.echo(f"published {len(services)} service(s) for {cluster} at revision {r.revision} "
                       f"(lease {lease_ttl}s)")
            return
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        run_exporter(client, cluster, file, stop, lease_ttl)

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
from pydantic import BaseModel

from ._common import connection_options, handle_errors, log_level_option, make_client, setup_logging
from .._errors import FederationError, InvalidInput, RemoteError
from .._hostport import split_host_port
from .._strict import unknown_keys
from ..models import ExportedService, parse_input

log = structlog.get_logger("isthmus.export")


class ExportsFileError(FederationError, ValueError):
    """The exports file is missing or invalid (every problem is listed, with its key path)."""


TOP_LEVEL_KEYS = ("services",)


def load_exports(path: Path, cluster: str) -> list[ExportedService]:
    """Read and check an exports file as strictly as a writer must: unknown keys at any
    level, a ``target`` without a port or with one outside 1-65535, a service listed twice
    are all refused, each named by its path (``services[0].ports[0].target``)."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ExportsFileError(f"exports file {path}: cannot read it: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ExportsFileError(f"exports file {path}: not YAML: {exc}") from None
    if doc is None:
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("services", []), (list, type(None))):
        raise ExportsFileError(f"exports file {path}: expected a mapping with a 'services' list")
    problems = unknown_keys(doc, _ExportsFile)  # every level: the entries' keys too
    reported = {p.partition(": ")[0] for p in problems}  # field paths named already
    out: list[ExportedService] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(doc.get("services") or []):
        where = f"services[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping")
            continue
        if entry.get("cluster", cluster) != cluster:
            problems.append(f"{where}.cluster: {entry['cluster']!r} is not {cluster!r}: the cluster is --cluster's; "
                            "drop the key")
        key = f"{entry.get('namespace')}/{entry.get('name')}"
        if key in seen:
            problems.append(f"{where}: {key} is listed already, as services[{seen[key]}]")
        seen.setdefault(key, i)
        ports = entry.get("ports")
        for j, port in enumerate(ports if isinstance(ports, list) else []):
            target = port.get("target") if isinstance(port, dict) else None
            if isinstance(target, str) and target:
                try:
                    split_host_port(target)
                except ValueError as exc:
                    problems.append(f"{where}.ports[{j}].target: {exc}")
                    reported.add(f"{where}.ports[{j}].target")
        try:
            svc = parse_input(ExportedService, {**entry, "cluster": cluster})
        except InvalidInput as exc:
            # models.parse_input names every field path; the unknown keys and the targets
            # were named above (with a hint, and the reason), so they are not repeated.
            for field, msg in exc.problems:
                full = f"{where}.{field}" if field else where
                if full not in reported:
                    problems.append(f"{full}: {msg}")
            continue
        out.append(svc)
    if problems:
        raise ExportsFileError(f"exports file {path}: " + ("\n  ".join(["", *problems]) if len(problems) > 1
                                                           else problems[0]))
    return out


class _ExportsFile(BaseModel):
    """The file's top level (its entries are :class:`ExportedService` without ``cluster``)."""

    services: list[ExportedService] | None = None


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
@click.option("--dry-run", is_flag=True,
              help="Validate FILE and print what would be published, without contacting the federation "
                   "(exit 0 when valid, 2 with the reasons when not).")
@log_level_option
@connection_options(cert_dir_help="The cluster's agent (or gateway) credentials: DIR/agent from "
                    "`isthmus federation join` (cert.pem, key.pem, bundle.pem). Env: ISTHMUS_CERT_DIR.")
@handle_errors
def export(cluster: str, file: Path, lease_ttl: int, once: bool, dry_run: bool, log_level: str,
           federation_addr: str | None, cert_dir: str | None) -> None:
    """Keep the services in FILE exported for CLUSTER (clusters without Kubernetes).

    Uses the cluster's agent (or gateway) certificate: --cert-dir DIR/agent from
    `isthmus federation join`. Runs until SIGINT/SIGTERM; editing FILE republishes,
    removing an entry withdraws it. Check a file first with --dry-run.

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
    if dry_run:
        click.echo(f"{file}: valid; would publish {len(services)} service(s) for {cluster} (dry run: nothing sent)")
        for s in services:
            ports = ", ".join(f"{p.port}/{p.protocol} -> {p.target or f'{s.hostname}:{p.port}'}" for p in s.ports)
            to = ",".join(s.export_to) or "every other cluster"
            click.echo(f"  {s.namespace}/{s.name}  {ports or 'no ports'}  to: {to}")
        return
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

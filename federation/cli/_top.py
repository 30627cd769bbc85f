"""``isthmus top``: the federation's edges, live, from the gateways' traffic summaries.

One row per edge — source cluster → namespace/service@cluster — with req/s, success
rate, p50 and p99 over the last minute, TCP connections opened per second and open now, like
``linkerd viz stat``.  The figures are the federation's (``GetTraffic``: every gateway's
pushes of the last minute, ``federation/topology.py``), the same the topology page shows.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from ._common import connection_options, handle_errors, make_client, output_option, print_json, setup_logging

SORTS = {
    # key, descending
    "rps": (lambda e: e["rps"], True),
    "success": (lambda e: -1.0 if e["success_rate"] is None else e["success_rate"], False),
    "p50": (lambda e: e["p50_ms"] or 0.0, True),
    "p99": (lambda e: e["p99_ms"] or 0.0, True),
    "tcp": (lambda e: e["tcp_active"], True),
    "name": (lambda e: (e["source_cluster"], e["namespace"], e["service"], e["destination_cluster"]), False),
}


def _service(value: str) -> tuple[str, str] | None:
    if not value:
        return None
    ns, sep, name = value.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise click.BadParameter(f"{value!r}: expected NAMESPACE/NAME, e.g. shop/cart", param_hint="--service")
    return ns, name


def select(edges: list[dict[str, Any]], sort: str, service: tuple[str, str] | None) -> list[dict[str, Any]]:
    """The edges to show (to ``service`` only, when given), in ``sort`` order (ties by name)."""
    key, desc = SORTS[sort]
    name = SORTS["name"][0]
    rows = [e for e in edges if service is None or (e["namespace"], e["service"]) == service]
    rows.sort(key=name)
    rows.sort(key=key, reverse=desc)
    return rows


def _fmt(v: float | None, unit: str) -> str:
    return "-" if v is None else f"{v:.1f}{unit}"


def table(rows: list[dict[str, Any]], window: float) -> Any:
    from rich.table import Table

    t = Table(title=f"federation edges (last {int(window)} s)", show_lines=False)
    for c, justify in (("EDGE", "left"), ("REQ/S", "right"), ("SUCCESS", "right"), ("P50", "right"),
                       ("P99", "right"), ("CONN/S", "right"), ("TCP", "right")):
        t.add_column(c, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for e in rows:
        sr = e["success_rate"]
        t.add_row(f"{e['source_cluster']} → {e['namespace']}/{e['service']}@{e['destination_cluster']}",
                  f"{e['rps']:.2f}", "-" if sr is None else f"{sr * 100:.1f}%", _fmt(e["p50_ms"], " ms"),
                  _fmt(e["p99_ms"], " ms"), f"{e.get('cps', 0.0):.2f}", str(e["tcp_active"]))
    return t


@click.command("top")
@click.option("--sort", "sort", type=click.Choice(sorted(SORTS)), default="rps", show_default=True,
              help="Order of the rows (success: the worst first).")
@click.option("--service", default="", metavar="NAMESPACE/NAME", help="Only the edges to this service.")
@click.option("--once", is_flag=True, help="Print once and exit (for scripts: with -o json).")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(0.5, 60),
              help="Seconds between refreshes.")
@connection_options
@output_option
@handle_errors
def top(sort: str, service: str, once: bool, interval: float, federation_addr: str | None, cert_dir: str | None,
        output: str) -> None:
    """Live per-edge traffic between clusters: req/s, success rate, p50/p99, open TCP
    connections over the last minute (from the gateways' 5-second summaries)."""
    setup_logging("warning")
    wanted = _service(service)
    with make_client(federation_addr, cert_dir) as client:
        if output == "json":
            while True:
                doc = client.traffic()
                print_json({"window_seconds": doc["window_seconds"], "generated_at": doc["now"],
                            "edges": select(doc["edges"], sort, wanted)})
                if once:
                    return
                time.sleep(interval)
        from rich.console import Console

        out = sys.stdout
        console = Console(file=out) if out.isatty() else Console(file=out, width=200, color_system=None)
        doc = client.traffic()
        if once or not out.isatty():
            console.print(table(select(doc["edges"], sort, wanted), doc["window_seconds"]))
            return
        from rich.live import Live

        with Live(table(select(doc["edges"], sort, wanted), doc["window_seconds"]), console=console,
                  refresh_per_second=4) as live:
            try:
                while True:
                    time.sleep(interval)
                    doc = client.traffic()
                    live.update(table(select(doc["edges"], sort, wanted), doc["window_seconds"]))
            except KeyboardInterrupt:
                return

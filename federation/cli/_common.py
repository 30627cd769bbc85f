"""What the federation CLI verbs share: logging setup, finding the federation and credentials, output."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
import structlog

from .._errors import FederationError

F = TypeVar("F", bound=Callable[..., Any])


def setup_logging(level: str = "info") -> None:
    """structlog to stderr (stdout is for command output); JSON when ISTHMUS_LOG_FORMAT=json."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if os.environ.get("ISTHMUS_LOG_FORMAT") == "json" or not sys.stderr.isatty()
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


LOG_LEVELS = ("debug", "info", "warning", "error")
ADMIN_CERT_DIR_HELP = ("Folder with cert.pem, key.pem, bundle.pem (an admin's, from `isthmus trust issue-admin`). "
                       "Env: ISTHMUS_CERT_DIR.")


def log_level_option(f: F) -> F:
    return click.option("--log-level", default="info", show_default=True,
                        type=click.Choice(LOG_LEVELS, case_sensitive=False), help="Log level (stderr).")(f)


class AddressList(click.ParamType):
    """HOST:PORT[,HOST:PORT...], every port 1-65535 (what ``client.parse_addresses`` accepts)."""

    name = "HOST:PORT[,...]"

    def __init__(self, single: bool = False) -> None:
        self.single = single
        if single:
            self.name = "HOST:PORT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from ..client import parse_addresses

        try:
            addresses = parse_addresses(value)
        except FederationError as exc:
            self.fail(str(exc), param, ctx)
        if self.single and len(addresses) != 1:
            self.fail(f"{value!r}: give one HOST:PORT", param, ctx)
        return value


def connection_options(f: F | None = None, *, cert_dir_help: str = ADMIN_CERT_DIR_HELP) -> Any:
    """``--federation`` and ``--cert-dir`` (or ISTHMUS_FEDERATION / ISTHMUS_CERT_DIR).

    ``@connection_options`` for admin commands; ``@connection_options(cert_dir_help=...)``
    where another identity is meant.
    """

    def decorate(f: F) -> F:
        f = click.option("--cert-dir", envvar="ISTHMUS_CERT_DIR", type=click.Path(file_okay=False),
                         help=cert_dir_help)(f)
        f = click.option(
            "--federation",
            "federation_addr",
            envvar="ISTHMUS_FEDERATION",
            type=AddressList(),
            help="Federation address(es), HOST:PORT[,HOST:PORT...]. Env: ISTHMUS_FEDERATION.",
        )(f)
        return f

    return decorate(f) if f is not None else decorate


def output_option(f: F) -> F:
    return click.option(
        "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True, help="Output format."
    )(f)


def make_client(federation_addr: str | None, cert_dir: str | None) -> Any:
    from .._credentials import check_cert_dir
    from .._errorboundary import note_target
    from ..client import FederationClient

    if not federation_addr:
        raise click.UsageError("no federation address: pass --federation HOST:PORT or set ISTHMUS_FEDERATION")
    if not cert_dir:
        raise click.UsageError(
            "no credentials: pass --cert-dir DIR or set ISTHMUS_CERT_DIR (a folder with cert.pem, key.pem, bundle.pem; "
            "make one with `isthmus trust issue-admin`)"
        )
    check_cert_dir(cert_dir)  # expired, mismatched or foreign credentials: say so before any call
    client = FederationClient(federation_addr, cert_dir)
    note_target(client.addresses, client.creds)
    return client


def handle_errors(f: F) -> F:
    """Our errors become one line and exit 2 (bad input) or 1 (see _errorboundary)."""
    from .._errorboundary import guarded

    return guarded(f)  # type: ignore[return-value]


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*(str(x) for x in r))
    # Piped output (grep, files) must not be cut at 80 columns.
    out = sys.stdout
    console = Console(file=out) if out.isatty() else Console(file=out, width=250, color_system=None)
    console.print(table)

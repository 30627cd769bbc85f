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

from .._errors import FederationError, RemoteError

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


def connection_options(f: F) -> F:
    """``--federation`` and ``--cert-dir`` (or ISTHMUS_FEDERATION / ISTHMUS_CERT_DIR)."""
    f = click.option(
        "--cert-dir",
        envvar="ISTHMUS_CERT_DIR",
        type=click.Path(file_okay=False),
        help="Folder with cert.pem, key.pem, bundle.pem (an admin's, from `isthmus trust issue-admin`). "
        "Env: ISTHMUS_CERT_DIR.",
    )(f)
    f = click.option(
        "--federation",
        "federation_addr",
        envvar="ISTHMUS_FEDERATION",
        help="Federation address(es), HOST:PORT[,HOST:PORT...]. Env: ISTHMUS_FEDERATION.",
    )(f)
    return f


def output_option(f: F) -> F:
    return click.option(
        "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True, help="Output format."
    )(f)


def make_client(federation_addr: str | None, cert_dir: str | None) -> Any:
    from ..client import FederationClient

    if not federation_addr:
        raise click.UsageError("no federation address: pass --federation HOST:PORT or set ISTHMUS_FEDERATION")
    if not cert_dir:
        raise click.UsageError(
            "no credentials: pass --cert-dir DIR or set ISTHMUS_CERT_DIR (a folder with cert.pem, key.pem, bundle.pem; "
            "make one with `isthmus trust issue-admin`)"
        )
    return FederationClient(federation_addr, cert_dir)


def fail(exc: Exception) -> None:
    """Print a clear one-line error and exit 1 (no traceback for expected failures)."""
    if isinstance(exc, RemoteError):
        raise click.ClickException(f"{exc.code.name}: {exc.details}")
    raise click.ClickException(str(exc))


def handle_errors(f: F) -> F:
    import functools

    import trust

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except (FederationError, trust.TrustError) as exc:
            fail(exc)

    return wrapper  # type: ignore[return-value]


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
    out = click.get_text_stream("stdout")
    console = Console(file=out) if out.isatty() else Console(file=out, width=250, color_system=None)
    console.print(table)

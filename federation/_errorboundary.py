"""The one place where the ``isthmus`` command turns an exception into one line and an exit status.

Every command runs inside :func:`boundary` (the root group's ``invoke`` and the
``handle_errors`` decorator call it), so no traceback and no ``ExceptionGroup`` ever
reaches the user: trio nurseries and asyncio task groups raise groups, and the group is
unwrapped here into its leaves, each described on one line.

Exit status, the same for every command:

* 2 — bad input: click usage errors, and our errors that are also ``ValueError``
  (``InvalidRequest``, ``PolicyError``, ``ConfigError``, ``InvalidName``, ...), a bad
  file (``trust.BadFile``), bad credentials, or a request the federation refused as
  ``INVALID_ARGUMENT``.
* 1 — a runtime failure: anything else (federation unreachable, permission denied,
  port in use, an unexpected error).

The classification is by exception type, never by message text.  An unexpected error is
one line too; ``ISTHMUS_DEBUG=1`` prints its traceback as well.

:func:`prepare_process` runs first in every ``isthmus`` process: it silences gRPC's C-core
logger before grpc is imported (its ``E0000 ... ssl_transport_security.cc`` lines would
otherwise reach the terminal) and sends library logs (structlog) to stderr, warnings
and up, until a command configures its own level.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import click

EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2

# A failed connection gets one look at why (see _credentials.diagnose); the CLI's client
# factory records what it connected to.
_targets: list[tuple[list[str], Any]] = []


def note_target(addresses: list[str], creds: Any) -> None:
    """Remember the federation addresses and credentials a command is using."""
    _targets.append((addresses, creds))


def prepare_process() -> None:
    """Process-wide settings for the CLI; call before anything imports grpc."""
    # gRPC's C core reads these once, when grpc is imported; a user who wants the
    # C-core log back sets them explicitly.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    os.environ.setdefault("GRPC_TRACE", "")
    import structlog

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


class CliError(click.ClickException):
    """One line on stderr and an exit status (1 or 2)."""

    def __init__(self, message: str, exit_code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside ``exc`` (``exc`` itself when it is not a group)."""
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for e in exc.exceptions:
            out.extend(leaves(e))
        return out
    return [exc]


# Error roots registered by command modules of other packages (the gateway's CLI registers
# GatewayError when it loads): library code here never imports the gateway (it would pull
# in trio and h2 for every command; imports point one way, trust <- federation <- gateway).
_registered: list[type[BaseException]] = []


def register_error_root(cls: type[BaseException]) -> None:
    """Report ``cls`` (and its subclasses) as one line: exit 2 if it is a ValueError, else 1."""
    if cls not in _registered:
        _registered.append(cls)


def _error_roots() -> tuple[type[BaseException], ...]:
    import trust

    from ._errors import FederationError

    return (FederationError, trust.TrustError, *_registered)


def _describe(exc: BaseException) -> tuple[int, str] | None:
    """(exit status, one-line message) for one leaf; None for exceptions click handles."""
    import trust

    from ._errors import RemoteError

    if isinstance(exc, click.ClickException):
        return exc.exit_code, exc.format_message()
    if isinstance(exc, RemoteError):
        code = EXIT_BAD_INPUT if exc.code.name == "INVALID_ARGUMENT" else EXIT_RUNTIME
        message = f"{exc.code.name}: {exc.details}"
        if exc.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            message = _with_diagnosis(message)
        return code, message
    if isinstance(exc, _error_roots()):
        bad = isinstance(exc, (ValueError, trust.BadFile))
        return (EXIT_BAD_INPUT if bad else EXIT_RUNTIME), str(exc) or type(exc).__name__
    if isinstance(exc, BrokenPipeError):
        return EXIT_RUNTIME, ""  # stdout went away (`| head`): nothing to say, nowhere to say it
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return EXIT_RUNTIME, f"{where}{exc.strerror or exc}"
    if isinstance(exc, Exception):
        if os.environ.get("ISTHMUS_DEBUG"):
            traceback.print_exception(exc)
        hint = "" if os.environ.get("ISTHMUS_DEBUG") else " (ISTHMUS_DEBUG=1 shows the traceback)"
        return EXIT_RUNTIME, f"internal error: {type(exc).__name__}: {exc}{hint}"
    return None


def _with_diagnosis(message: str) -> str:
    if not _targets:
        return message
    from ._credentials import diagnose

    addresses, creds = _targets[-1]
    reason = diagnose(addresses, creds)
    return f"{message}\n  {reason}" if reason else message


def to_click(exc: BaseException) -> BaseException:
    """The exception to raise in place of ``exc``: a :class:`CliError` (or click's own,
    unchanged) for what the boundary describes, else ``exc`` itself (SystemExit,
    KeyboardInterrupt, click's Exit and Abort)."""
    if isinstance(exc, (click.exceptions.Exit, click.Abort, SystemExit, KeyboardInterrupt)):
        return exc
    parts = leaves(exc)
    if isinstance(exc, BaseExceptionGroup):
        # A Ctrl-C that surfaced inside a nursery is still a Ctrl-C.
        for leaf in parts:
            if isinstance(leaf, (KeyboardInterrupt, SystemExit, click.exceptions.Exit, click.Abort)):
                return leaf
    if len(parts) == 1 and isinstance(parts[0], click.ClickException):
        return parts[0]
    described = [d for d in (_describe(p) for p in parts) if d is not None]
    if not described:
        return exc
    if all(not m for _, m in described):
        _silence_stdout()
        return click.exceptions.Exit(EXIT_RUNTIME)
    messages: list[str] = []
    for _, m in described:
        if m and m not in messages:
            messages.append(m)
    code = EXIT_RUNTIME if any(c == EXIT_RUNTIME for c, _ in described) else EXIT_BAD_INPUT
    return CliError("; ".join(messages), code)


@contextlib.contextmanager
def boundary() -> Iterator[None]:
    """Run a command body; convert whatever escapes it (see the module docstring)."""
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - this is the boundary
        converted = to_click(exc)
        if converted is exc:
            raise
        raise converted from None


def guarded(f: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator form of :func:`boundary`."""
    import functools

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with boundary():
            return f(*args, **kwargs)

    return wrapper


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush is quiet."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def run(command: click.Command, argv: list[str] | None, prog_name: str) -> None:
    """The process entry point of every ``isthmus`` command."""
    prepare_process()
    try:
        command.main(args=argv, prog_name=prog_name)
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(EXIT_RUNTIME)

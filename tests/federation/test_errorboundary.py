"""The CLI's error boundary, as a table: what escapes a command -> exit status and line."""

from __future__ import annotations

import click
import grpc
import pytest

import trust
from federation._errorboundary import CliError, to_click
from federation._errors import FederationError, InvalidRequest, RemoteError


@pytest.mark.parametrize("exc, code, line", [
    (InvalidRequest("invalid policy: kind: missing"), 2, "invalid policy: kind: missing"),
    (trust.InvalidName("bad name"), 2, "bad name"),
    (trust.BadFile("/x/cert.pem", "no PEM certificate found"), 2, "/x/cert.pem: no PEM certificate found"),
    (FederationError("cannot listen on 0.0.0.0:7443 (mtls)"), 1, "cannot listen on 0.0.0.0:7443 (mtls)"),
    (RemoteError(grpc.StatusCode.PERMISSION_DENIED, "admins only"), 1, "PERMISSION_DENIED: admins only"),
    (RemoteError(grpc.StatusCode.INVALID_ARGUMENT, "invalid X"), 2, "INVALID_ARGUMENT: invalid X"),
    (PermissionError(13, "Permission denied", "/etc/isthmus/key.pem"), 1, "/etc/isthmus/key.pem: Permission denied"),
    (ExceptionGroup("nursery", [FederationError("cannot listen on 127.0.0.1:1: Address already in use")]), 1,
     "cannot listen on 127.0.0.1:1: Address already in use"),
    (ExceptionGroup("outer", [ExceptionGroup("inner", [InvalidRequest("a"), InvalidRequest("a")])]), 2, "a"),
    (ExceptionGroup("two", [InvalidRequest("bad input"), FederationError("and a failure")]), 1,
     "bad input; and a failure"),
    (ZeroDivisionError("division by zero"), 1, "internal error: ZeroDivisionError: division by zero"),
])
def test_what_escapes_becomes_one_line_and_a_status(exc: BaseException, code: int, line: str) -> None:
    out = to_click(exc)
    assert isinstance(out, CliError)
    assert out.exit_code == code and out.format_message().startswith(line)
    assert "\n" not in out.format_message()


def test_click_errors_and_interrupts_pass_through() -> None:
    usage = click.UsageError("no federation address")
    assert to_click(usage) is usage
    assert to_click(ExceptionGroup("g", [usage])) is usage
    interrupt = KeyboardInterrupt()
    assert to_click(BaseExceptionGroup("g", [interrupt, FederationError("x")])) is interrupt
    assert isinstance(to_click(SystemExit(3)), SystemExit)


def test_a_traceback_only_when_asked(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    to_click(ZeroDivisionError("x"))
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("ISTHMUS_DEBUG", "1")
    try:
        raise ZeroDivisionError("x")
    except ZeroDivisionError as exc:
        to_click(exc)
    assert "Traceback" in capsys.readouterr().err

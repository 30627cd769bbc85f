"""Run the ``isthmus`` command as a user does (a real process, real stdout and stderr) and
check what reaches the terminal: never a traceback, an ExceptionGroup or a gRPC C-core
log line (``E1201 12:00:00.000 ... ssl_transport_security.cc:1558] ...``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

C_CORE_LINE = re.compile(r"^[EWID]\d{4} ", re.MULTILINE)


def isthmus_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ISTHMUS_", "GRPC_"))}
    env.update(extra or {})
    return env


def isthmus(*args: str, env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
            timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """``isthmus ARGS...`` in a fresh process (the console script's entry point)."""
    return subprocess.run([sys.executable, "-m", "federation.cli", *args], capture_output=True, text=True,
                          env=isthmus_env(env), cwd=cwd, timeout=timeout, input=input)


def assert_clean(r: subprocess.CompletedProcess[str]) -> None:
    """No traceback, no exception group, no C-core line on stdout or stderr."""
    for name, text in (("stdout", r.stdout), ("stderr", r.stderr)):
        assert "Traceback" not in text, f"{name}:\n{text}"
        assert "ExceptionGroup" not in text, f"{name}:\n{text}"
        assert not C_CORE_LINE.search(text), f"{name}:\n{text}"


def expect(r: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Assert the exit status, a clean terminal and that stderr+stdout say each needle."""
    out = r.stdout + r.stderr
    assert r.returncode == code, f"exit {r.returncode}, expected {code}:\n{out}"
    assert_clean(r)
    for n in needles:
        assert n in out, f"{n!r} not in:\n{out}"
    return out

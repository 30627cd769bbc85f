"""Suite-wide fixtures, and the CI rule that no test may skip unseen."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import structlog

pytest_plugins = ["pytester"]

# Tests that may skip under CI=true, each with the reason it is allowed to: node id ->
# why. Empty on purpose: CI installs everything the suite needs (tests/run.sh), so a
# skip there means a missing install step or a broken probe, and must fail the run.
ALLOWED_CI_SKIPS: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """CLI commands run in-process (click's CliRunner) configure structlog globally, e.g.
    with a level filter; reset it so every test starts from structlog's defaults and
    ``structlog.testing.capture_logs()`` sees every event."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unexpected_skips(config: pytest.Config) -> list[pytest.TestReport]:
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is None:
        return []
    return [r for r in tr.stats.get("skipped", []) if r.nodeid not in ALLOWED_CI_SKIPS]


def _scratch_left(config: pytest.Config) -> tuple[str, int] | None:
    factory = getattr(config, "_tmp_path_factory", None)
    base = getattr(factory, "_basetemp", None) if factory is not None else None
    if base is None or not os.path.isdir(base):
        return None
    total = 0
    for root, _dirs, files in os.walk(base):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return str(base), total


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    skips = terminalreporter.stats.get("skipped", [])
    terminalreporter.write_sep("-", f"skip summary: {len(skips)} skipped")
    for r in skips:
        reason = r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
        allowed = " (allowed: " + ALLOWED_CI_SKIPS[r.nodeid] + ")" if r.nodeid in ALLOWED_CI_SKIPS else ""
        terminalreporter.write_line(f"SKIPPED {r.nodeid}: {reason}{allowed}")
    left = _scratch_left(config)
    if left is not None:
        terminalreporter.write_line(f"scratch left under {left[0]}: {left[1] / 2**20:.0f} MiB "
                                    "(a passing test's folders are removed: tests/scratch.py)")
    if _ci() and _unexpected_skips(config):
        terminalreporter.write_sep("!", "CI=true: a test skipped; install what it needs (tests/run.sh) "
                                        "or list it in tests/conftest.py ALLOWED_CI_SKIPS with a reason", red=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _ci() and exitstatus == pytest.ExitCode.OK and _unexpected_skips(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

"""Suite-wide fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """CLI commands run in-process (click's CliRunner) configure structlog globally, e.g.
    with a level filter; reset it so every test starts from structlog's defaults and
    ``structlog.testing.capture_logs()`` sees every event."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()

"""Scratch folders for module- and session-scoped fixtures, removed when they end.

A function's ``tmp_path`` is removed after it passes (``tmp_path_retention_policy`` in
pyproject.toml), but a folder from ``tmp_path_factory.mktemp`` lives until the session
ends, and every etcd the suite starts preallocates a 64 MiB write-ahead log in one: kept
for the whole run, they add up to tens of GiB and fill a small disk part-way through
(every later test then errors).  ``scratch_dir`` removes its folder after the fixture's
own teardown, unless a test failed meanwhile (then it stays, to be read).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def scratch_dir(request: pytest.FixtureRequest, factory: pytest.TempPathFactory, name: str) -> Path:
    d = factory.mktemp(name)
    failed_before = request.session.testsfailed

    def remove() -> None:
        if request.session.testsfailed == failed_before:
            shutil.rmtree(d, ignore_errors=True)

    # Added before the fixture yields, so it runs after the fixture's teardown (LIFO).
    request.addfinalizer(remove)
    return d

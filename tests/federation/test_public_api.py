"""The federation package's public surface, and that importing it stays cheap."""

from __future__ import annotations

import subprocess
import sys

from .fixtures import REPO


def test_public_names() -> None:
    import federation

    assert federation.__all__ == sorted(
        ["Change", "FederationClient", "FederationError", "GatewayStatus", "PinMismatch", "RemoteError",
         "SnapshotTracker", "Status", "StoreUnavailable", "WatchMessage", "join"]
    )  # fmt: skip
    for name in federation.__all__:
        assert getattr(federation, name) is not None
    assert issubclass(federation.RemoteError, federation.FederationError)


def test_importing_the_cli_does_not_import_grpc() -> None:
    """`isthmus trust ...` must not pay for grpc: the CLI root imports this package."""
    code = "import sys, federation, federation.cli; print('grpc' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.stdout.strip() == "False", r.stderr

"""The federation server's state folder: scoped to its federation, held by one server.

* Scope.  Without ``--data-dir`` the state (embedded etcd, server TLS) lives in
  ``<user data dir>/isthmus/federation/<root>``, ``<root>`` being the first 16 hex digits
  of the SHA-256 fingerprint of the federation's root.  A second federation made with
  ``isthmus trust init`` gets a new root and so a new, empty folder: it never sees the
  first one's clusters, policies or exports.  A rotated root keeps its folder: the
  folder of any root the trust folder still knows (the bundle, ``roots/``) is reused.
* Ownership.  A running server holds an exclusive ``flock`` on ``<data dir>/serve.lock``
  (which records its pid) for as long as it runs; a second server on the same folder is
  refused at once, naming that pid, instead of waiting for etcd's own file lock.  The
  kernel drops the lock when the process dies, however it dies.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import trust

from .._errors import FederationError

LOCK_NAME = "serve.lock"


class DataDirInUse(FederationError):
    """Another server holds the data dir."""


def default_data_dir(trust_dir: str | os.PathLike[str], base: Path | None = None) -> Path:
    import platformdirs

    td = trust.TrustDir(trust_dir)
    if not td.exists():
        raise FederationError(
            f"trust folder {trust_dir} has no root: run `isthmus trust init --dir {trust_dir}` first"
        )
    base = base or Path(platformdirs.user_data_dir("isthmus")) / "federation"
    current = trust.fingerprint(td.root_cert)
    known = [current, *(trust.fingerprint(c) for c in td.bundle())]
    known += sorted(p.stem for p in (td.path / "roots").glob("*.crt"))
    for fp in known:
        if (base / fp[:16]).is_dir():
            return base / fp[:16]
    return base / current[:16]


class DataDirLock:
    """An exclusive hold on a data dir for this process's lifetime (or until :meth:`release`)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(
                f"data dir {self.data_dir} is in use by pid {holder} (another `isthmus federation serve`?): "
                "stop that server, or give this one its own --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

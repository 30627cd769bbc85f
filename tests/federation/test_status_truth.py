"""`isthmus status` tells the truth (issue 12): one revision notion, liveness that counts
gateway reports, READY unknown shown as "-", a crashed gateway going STALE and then
disappearing, and gateway names that are valid identifiers.

Everything is real: etcd, the federation as a process (with a short ``--status-ttl``),
gateways as ``isthmus gateway run`` processes, and ``isthmus status`` / ``isthmus
services`` run as a user runs them (a process; exit code and a clean terminal checked).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from federation import names
from federation.models import ExportedService, ServicePort
from federation.server import free_port
from tests.clirun import expect, isthmus

from .fixtures import REPO, FederationProcess, JoinedCluster, Pki, join_cluster, make_pki, start_etcd, start_federation
from tests.scratch import scratch_dir

# A gateway that stops reporting is STALE after 2/3 of this (8 s) and gone after it:
# long enough for a few `isthmus status` processes to see each state on a loaded machine.
STATUS_TTL = 12
REPORT_INTERVAL = 1.0  # under a third of STATUS_TTL


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FederationProcess, Pki, Path]]:
    tmp = scratch_dir(request, tmp_path_factory, "status")
    etcd = start_etcd(tmp)
    fed = None
    try:
        pki = make_pki(tmp)
        fed = start_federation(pki, etcd.endpoint, tmp, extra=("--status-ttl", str(STATUS_TTL)))
        yield fed, pki, tmp
    finally:
        if fed is not None:
            fed.stop()
        etcd.stop()


_names = itertools.count()


def _join(world: tuple[FederationProcess, Pki, Path], prefix: str) -> JoinedCluster:
    fed, pki, tmp = world
    return join_cluster(fed, pki, f"{prefix}{next(_names)}", tmp)


def _conn(world: tuple[FederationProcess, Pki, Path]) -> tuple[str, ...]:
    fed, pki, _ = world
    return ("--federation", fed.address, "--cert-dir", str(pki.admin_dir))


def _status(world: tuple[FederationProcess, Pki, Path]) -> dict[str, Any]:
    return json.loads(expect(isthmus("status", "-o", "json", *_conn(world)), 0))


def _table(world: tuple[FederationProcess, Pki, Path], *verb: str) -> str:
    return expect(isthmus(*verb, *_conn(world)), 0)


def _row(table: str, *cells: str) -> list[str]:
    """The table row whose cells include all of ``cells`` (rich's box lines split on │)."""
    for line in table.splitlines():
        parts = [p.strip() for p in line.split("│")]
        if all(c in parts for c in cells):
            return parts
    raise AssertionError(f"no row with {cells} in:\n{table}")


def _wait(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


class Gateway:
    """``isthmus gateway run`` for a joined cluster, following the federation."""

    def __init__(self, cluster: JoinedCluster, fed: FederationProcess, tmp: Path) -> None:
        gdir = cluster.gateway_dir
        self.admin = free_port()
        cfg = {
            "cluster": cluster.name,
            "inbound": {"host": "127.0.0.1", "port": free_port()},
            "outbound": {"host": "127.0.0.1", "port": free_port()},
            "admin": {"host": "127.0.0.1", "port": self.admin},
            "tls": {"cert_file": str(gdir / "cert.pem"), "key_file": str(gdir / "key.pem"),
                    "bundle_file": str(gdir / "bundle.pem")},
            "federation": {"address": fed.address, "report_interval": REPORT_INTERVAL},
            "last_known_good": str(tmp / f"{cluster.name}-lkg.json"),
        }
        path = tmp / f"{cluster.name}-gateway.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / f"{cluster.name}-gateway.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "federation.cli", "gateway", "run", "--config", str(path)],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                         env={**os.environ, "PYTHONPATH": str(REPO)})
        self.name = names.gateway_name(cluster.name, names.gateway_instance(socket.gethostname(), self.proc.pid))

    def config(self) -> dict[str, Any] | None:
        assert self.proc.poll() is None, self.log_path.read_text(errors="replace")[-3000:]
        try:
            return httpx.get(f"http://127.0.0.1:{self.admin}/config", timeout=2).json()
        except httpx.HTTPError:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _gateway_row(st: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((g for g in st["gateways"] if g["gateway_id"] == name), None)


def _cluster_row(st: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in st["clusters"] if c["cluster"] == name)


def test_a_gateway_holds_the_latest_revision_its_config_shows_and_a_cluster_without_exporter_is_live(
    world: tuple[FederationProcess, Pki, Path],
) -> None:
    fed, pki, tmp = world
    east, west = _join(world, "east"), _join(world, "west")
    with fed.client(pki.admin_dir) as admin:
        admin.apply_policy({"kind": "AuthorizationPolicy", "name": "p1", "selector": {"namespace": "default"},
                            "action": "ALLOW", "rules": [{"from": [{"clusters": [east.name]}]}]})
        gw = Gateway(east, fed, tmp)
        try:
            # Config changes after the policy, then writes that move etcd but not the config
            # (join tokens; the gateway's own status reports do the same all the time).
            with fed.client(west.agent_dir) as agent:
                agent.publish(west.name, [ExportedService(cluster=west.name, namespace="default", name="web",
                                                          ports=(ServicePort(port=80, target="127.0.0.1:1"),))],
                              ttl=600)  # outlives the test: no config change behind its back
            for _ in range(3):
                admin.create_token(60, "later")

            def synced() -> dict[str, Any] | None:
                st = _status(world)
                row = _gateway_row(st, gw.name)
                return st if row is not None and row["state"] == "SYNCED" else None

            st = _wait("the gateway to report the latest config", synced)
            doc = gw.config()
            assert doc is not None
            row = _gateway_row(st, gw.name)
            assert row is not None
            # One notion: what the gateway's /config holds is what status calls APPLIED and,
            # in sync, LATEST; the newest policy change is at or below it.
            assert doc["revision"] == row["applied_revision"] == st["config_revision"], (doc["revision"], st)
            assert 0 < st["policy_revision"] < st["config_revision"] and row["enforces_policy"]
            assert doc["policy_revision"] >= st["policy_revision"]
            # A valid identifier: <cluster>/<host>-<pid>, the same everywhere.
            assert names.parse_gateway_name(row["gateway_id"]) == (east.name, gw.name.split("/")[1])
            assert row["gateway_id"].endswith(f"-{gw.proc.pid}") and "spiffe" not in row["gateway_id"]
            # East has a gateway but no exporter: LIVE, with no exports (not EXPIRED).
            c = _cluster_row(st, east.name)
            assert c["state"] == "LIVE" and c["exports"] == 0 and c["lease_ttl"] == 0 and c["gateways"] == 1, c
            assert east.name not in st["clusters_without_report"] and west.name in st["clusters_without_report"]

            table = _table(world, "status")
            assert (f"latest config revision {st['config_revision']}; newest policy change: revision "
                    f"{st['policy_revision']}") in " ".join(table.split()), table
            r = _row(table, gw.name)
            assert r[r.index(gw.name) + 1] == r[r.index(gw.name) + 2] == str(st["config_revision"])  # APPLIED = LATEST
            assert "SYNCED" in r and "yes" in r, r
            assert {"LIVE", "no exports"} <= set(_row(table, east.name, "LIVE")), table
            assert "EXPIRED" not in _row(table, east.name, "LIVE")
            clusters = _table(world, "clusters")
            assert "LIVE" in _row(clusters, east.name) and "no exports" in _row(clusters, east.name), clusters
        finally:
            gw.stop()


def test_a_gateway_ahead_of_this_replica_is_synced_ahead_and_one_behind_is_stale(
    world: tuple[FederationProcess, Pki, Path],
) -> None:
    fed, pki, _ = world
    north = _join(world, "north")
    with fed.client(pki.admin_dir) as admin, fed.client(north.gateway_dir) as g:
        latest = admin.status().config_revision
        admin.create_token(60, "later")  # etcd moves on; the config does not

        def report() -> None:
            # What a gateway reports after another replica streamed it a change this one
            # has not seen yet: any revision up to etcd's is accepted.  Reported again
            # before each look: these "gateways" have no reporter of their own.
            g.report_applied(f"{north.name}/ahead-1", latest + 1)
            g.report_applied(f"{north.name}/behind-1", latest - 1)
            g.report_applied(f"{north.name}/current-1", latest)

        report()
        st = _status(world)
        by = {r["gateway_id"]: r for r in st["gateways"] if r["cluster"] == north.name}
        assert by[f"{north.name}/current-1"]["state"] == "SYNCED"
        assert by[f"{north.name}/ahead-1"]["state"] == "SYNCED (ahead)" and by[f"{north.name}/ahead-1"]["synced"]
        assert by[f"{north.name}/behind-1"]["state"] == "STALE" and not by[f"{north.name}/behind-1"]["synced"]
        report()
        table = _table(world, "status")
    r = _row(table, f"{north.name}/ahead-1")
    i = r.index(f"{north.name}/ahead-1")
    assert int(r[i + 1]) > int(r[i + 2]) and r[i + 3] == "SYNCED (ahead)", r


def test_ready_is_a_dash_where_the_exporter_does_not_know_it(
    world: tuple[FederationProcess, Pki, Path], tmp_path: Path,
) -> None:
    fed, _, _ = world
    south = _join(world, "south")
    exports = tmp_path / "exports.yaml"
    exports.write_text(yaml.safe_dump({"services": [
        {"namespace": "default", "name": "files", "ports": [{"port": 8080, "protocol": "HTTP", "target": "127.0.0.1:1"}]},
    ]}))
    expect(isthmus("export", "--cluster", south.name, "-f", str(exports), "--once", "--federation", fed.address,
                   "--cert-dir", str(south.agent_dir)), 0)
    table = _table(world, "services", "--cluster", south.name)
    assert _row(table, "default/files")[-2] == "-", table  # file exports: unknown, not 0
    with fed.client(south.agent_dir) as agent:  # what the Kubernetes agent publishes: counts
        agent.publish(south.name, [
            ExportedService(cluster=south.name, namespace="default", name="counted", ready_endpoints=3,
                            endpoints_known=True, ports=(ServicePort(port=80, target="127.0.0.1:1"),)),
            ExportedService(cluster=south.name, namespace="default", name="none-ready", ready_endpoints=0,
                            endpoints_known=True, ports=(ServicePort(port=80, target="127.0.0.1:1"),)),
        ])
    table = _table(world, "services", "--cluster", south.name)
    assert _row(table, "default/counted")[-2] == "3" and _row(table, "default/none-ready")[-2] == "0", table


def test_a_killed_gateway_goes_stale_then_disappears_and_so_does_its_cluster(
    world: tuple[FederationProcess, Pki, Path],
) -> None:
    fed, _, tmp = world
    west = _join(world, "west")
    gw = Gateway(west, fed, tmp)
    try:
        _wait("the gateway to report", lambda: (r := _gateway_row(_status(world), gw.name)) and r["state"] == "SYNCED")
        gw.proc.send_signal(signal.SIGKILL)  # no goodbye: only its lease tells
        gw.proc.wait()
        killed = time.monotonic()
        seen: list[tuple[str, str]] = []
        while time.monotonic() - killed < STATUS_TTL + 20:
            st = _status(world)
            row = _gateway_row(st, gw.name)
            now = (row["state"] if row else "GONE", _cluster_row(st, west.name)["state"])
            if not seen or seen[-1] != now:
                seen.append(now)
            if now == ("GONE", "EXPIRED"):
                break
            time.sleep(0.2)
        # It was SYNCED when killed (waited for above); by the first look the config may have
        # moved on already (another cluster of this module turning STALE), so it is behind.
        assert seen[0] in (("SYNCED", "LIVE"), ("STALE", "LIVE")) and seen[-1] == ("GONE", "EXPIRED"), seen
        assert ("STALE (no report)", "STALE") in seen, seen
        gone = seen.index(("STALE (no report)", "STALE"))
        # never a false state: SYNCED until its report ages, or STALE (behind) when the config
        # moved on meanwhile (other clusters of this module's federation turning STALE are
        # config changes: their liveness records)
        assert all(g in ("SYNCED", "STALE", "STALE (no report)") for g, _ in seen[:gone]), seen
        assert all(g != "SYNCED" for g, _ in seen[seen.index(next(x for x in seen if x[0] != "SYNCED")):]), seen
        table = _table(world, "status")
        assert gw.name not in table and "NO REPORT" in _row(table, west.name, "NO REPORT")
    finally:
        gw.stop()


def test_status_ttl_and_report_interval_are_checked_where_they_are_given(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    expect(isthmus("federation", "serve", "--trust-dir", str(pki.trust_dir), "--data-dir", str(tmp_path / "d"),
                   "--status-ttl", "2"), 2, "invalid --status-ttl 2: use between 5 and 3600 seconds")
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({"federation": {"address": "127.0.0.1:1", "report_interval": 0}}))
    out = expect(isthmus("gateway", "check-config", str(cfg)), 2, "federation.report_interval")
    assert re.search(r"greater than or equal to 0\.2", out), out


@pytest.mark.parametrize(
    ("applied", "latest", "synced", "rejected", "no_report", "state"),
    [
        (16, 16, True, 0, False, "SYNCED"),
        (17, 16, True, 0, False, "SYNCED (ahead)"),  # another replica streamed it a newer change
        (15, 16, False, 0, False, "STALE"),
        (16, 16, False, 0, False, "STALE (no report)"),  # an older federation: current, not synced
        (15, 16, False, 0, True, "STALE (no report)"),  # its reports stopped, and config moved on
        (16, 16, True, 18, False, "REJECTED rev 18: bad"),
    ],
)
def test_gateway_state_reads_one_revision_notion(applied: int, latest: int, synced: bool, rejected: int,
                                                 no_report: bool, state: str) -> None:
    from federation.client import GatewayStatus

    g = GatewayStatus("east", "east/gw-1", applied, 0.0, synced, True, rejected, "bad" if rejected else "",
                      0.0, latest, no_report=no_report)
    assert g.state == state


def test_status_help_and_readme_name_every_state() -> None:
    """What `isthmus status` can show is explained where a user looks: --help and README."""
    out = " ".join(expect(isthmus("status", "--help"), 0).split())
    readme = " ".join((REPO / "README.md").read_text().split())
    for text in ("SYNCED (ahead)", "STALE (no report)", "REJECTED rev N: reason", "no exports", "<cluster>/<host>-<pid>",
                 "--status-ttl"):
        assert text in out, text
        assert text in readme, text
    assert "newest policy change" in out and "LATEST" in out and "/config" in out
    services = " ".join(expect(isthmus("services", "--help"), 0).split())
    assert 'READY is the exporter\'s count of ready endpoints, or "-"' in services

"""Cluster liveness from etcd leases: LIVE, then STALE while a silent cluster's exports are
still routed, then EXPIRED once the lease lapses and the exports are gone everywhere."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from federation.server._store import Liveness, liveness_state, report_is_recent

from .fixtures import Pki, join_cluster
from .test_cli import admin_env, run
from .test_exports import svc
from .test_watch import Watcher


@pytest.mark.parametrize(
    ("ttl", "remaining", "revoked", "state"),
    [
        (30, 30, False, "LIVE"),
        (30, 20, False, "LIVE"),  # one beat (ttl/3) missed: still live
        (30, 9, False, "STALE"),  # more than two beats missed
        (3, 1, False, "LIVE"),
        (3, 0, False, "STALE"),
        (0, -1, False, "EXPIRED"),
        (30, 30, True, "REVOKED"),
    ],
)
def test_liveness_state(ttl: int, remaining: int, revoked: bool, state: str) -> None:
    assert liveness_state(ttl, remaining, revoked) == state


@pytest.mark.parametrize(
    ("lease", "live", "silent", "state"),
    [
        ((30, 30), 0, 0, "LIVE"),
        ((0, -1), 1, 0, "LIVE"),  # a gateway reports, no exporter: not EXPIRED (issue 12)
        ((30, 9), 1, 0, "LIVE"),  # the exporter is stale, the gateway is not
        ((30, 9), 0, 1, "STALE"),
        ((0, -1), 0, 1, "STALE"),  # a silent gateway, not gone yet
        ((0, -1), 0, 0, "EXPIRED"),
    ],
)
def test_cluster_state_counts_gateway_reports_too(lease: tuple[int, int], live: int, silent: int, state: str) -> None:
    lv = Liveness("east", *lease, gateways_live=live, gateways_silent=silent)
    assert lv.state == state and lv.lease_state == liveness_state(*lease)
    assert Liveness("east", *lease, revoked=True, gateways_live=live).state == "REVOKED"


def test_a_report_is_recent_for_two_thirds_of_the_status_lease() -> None:
    assert report_is_recent(100.0, 100.0 + 40, 60) and not report_is_recent(100.0, 100.0 + 40.5, 60)
    assert report_is_recent(100.0, 108.0, 12) and not report_is_recent(100.0, 108.1, 12)


def test_heartbeat_age_is_derived_from_the_lease() -> None:
    assert Liveness("east", 30, 30).last_heartbeat_age == 0.0
    assert Liveness("east", 30, 20).last_heartbeat_age == 9.5  # etcd rounds down: midpoint
    assert Liveness("east").last_heartbeat_age == -1.0


# A TTL long enough that each state lasts seconds (LIVE for 8 s, STALE for 4 s): the
# polls below see every state even when a status call takes a second on a loaded machine,
# and the federation's liveness job (every 2 s) streams the STALE state while it lasts.
SILENT_TTL = 12


def test_silent_cluster_is_stale_before_its_exports_vanish(fed, admin, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    east = join_cluster(fed, pki, "east", tmp_path)
    west = join_cluster(fed, pki, "west", tmp_path)
    gateway = Watcher(fed.client(west.gateway_dir))  # what west's gateway is streamed
    with fed.client(east.agent_dir) as e, fed.client(west.agent_dir) as w:
        e.publish("east", [svc("east", "web"), svc("east", "api")], ttl=SILENT_TTL)
        w.publish("west", [svc("west", "db")], ttl=60)
        live = {lv.cluster: lv for lv in admin.status().liveness}
        assert live["east"].state == "LIVE" and live["east"].exports == 2 and live["east"].lease_ttl == SILENT_TTL
        assert 0 <= live["east"].last_heartbeat_age <= 3 and live["east"].published_at > time.time() - 10
        assert live["west"].state == "LIVE" and live["west"].exports == 1

        # east stops heartbeating: watch its state go by.
        seen: list[tuple[str, int, bool]] = []
        streamed: list[tuple[str, bool]] = []  # (state, east streamed as STALE)
        deadline = time.monotonic() + SILENT_TTL + 20
        while time.monotonic() < deadline:
            lv = {x.cluster: x for x in admin.status().liveness}["east"]
            routed = any(s.cluster == "east" for s in w.list_services())  # west's view
            seen.append((lv.state, lv.exports, routed))
            streamed.append((lv.state, any(x.cluster == "east" and x.state == "STALE"
                                           for x in gateway.tracker.snapshot().liveness)))
            assert {x.cluster: x for x in admin.status().liveness}["west"].state == "LIVE"
            if lv.state == "EXPIRED":
                break
            time.sleep(0.15)
        states = [s for s, _, _ in seen]
        assert "STALE" in states, seen
        first_stale = states.index("STALE")
        assert states[:first_stale] and set(states[:first_stale]) == {"LIVE"}, seen
        assert all(n == 2 for s, n, _ in seen if s == "STALE"), seen  # stale but still exported
        assert states[-1] == "EXPIRED", seen
        # Gone for every other cluster (etcd deleted the keys with the lease).
        deadline = time.monotonic() + 15
        while any(s.cluster == "east" for s in w.list_services()):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # Gateways were streamed east's STALE state while it lasted (never while LIVE), and
        # the record goes once east is EXPIRED (its exports are gone: nothing to leave out).
        assert any(flag for state, flag in streamed if state == "STALE"), streamed
        assert not any(flag for state, flag in streamed[:first_stale]), streamed
        snap = gateway.wait_for(lambda s: not s.liveness, 15)
        assert snap.liveness == ()
        gateway.close()

    env = admin_env(fed, pki)
    status = json.loads(run("status", "-o", "json", env=env).output)
    by = {c["cluster"]: c for c in status["clusters"]}
    assert by["east"]["state"] == "EXPIRED" and by["east"]["exports"] == 0 and by["east"]["lease_remaining"] == -1
    assert by["west"]["state"] == "LIVE" and by["west"]["lease_ttl"] == 60 and by["west"]["exports"] == 1
    clusters = {c["name"]: c for c in json.loads(run("clusters", "-o", "json", env=env).output)}
    assert clusters["east"]["state"] == "EXPIRED" and clusters["west"]["state"] == "LIVE"
    assert "ca_cert_pem" not in clusters["east"]
    table = run("status", env=env).output
    assert "EXPIRED" in table and "LIVE" in table and "60s" in table


def test_heartbeat_keeps_a_cluster_live(fed, admin, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    east = join_cluster(fed, pki, "east", tmp_path)
    ttl = 6  # LIVE until about 4.5 s after a beat: seconds of margin per status call
    with fed.client(east.agent_dir) as e:
        e.publish("east", [svc("east", "web")], ttl=ttl)
        t0 = time.monotonic()
        while time.monotonic() - t0 < ttl + 2:  # past the TTL: a silent cluster would be EXPIRED
            time.sleep(0.5)
            e.heartbeat("east")
            lv = {x.cluster: x for x in admin.status().liveness}["east"]
            assert lv.state == "LIVE" and lv.exports == 1 and lv.last_heartbeat_age <= ttl / 2, lv

"""Exports come and go everywhere; clusters join at run time; silent clusters vanish."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from federation.demo.harness import LocalFederation

from .conftest import logs_of

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_withdrawing_an_export_removes_the_route_everywhere(federation: LocalFederation) -> None:
    lf = federation
    assert lf.wait_for(lambda: lf.call_grpc("east", "west"), 30).ok
    west = lf.clusters["west"]
    keep = [s for s in lf.default_exports(west) if s["name"] != "greeter"]
    lf.write_exports("west", keep)
    try:
        gone = lf.wait_for(lambda: lf.call_grpc("east", "west"), 20, want_ok=False)
        assert not gone.ok and gone.status in ("UNAVAILABLE", "UNIMPLEMENTED", "NOT_FOUND"), gone
        # the other exports are untouched
        assert lf.call_tcp("east", "west").ok
    finally:
        lf.write_exports("west", lf.default_exports(west))
    assert lf.wait_for(lambda: lf.call_grpc("east", "west"), 30).ok, logs_of(lf)


@pytest.mark.lease_ttl(15)  # STALE lasts ~5 s: each poll below is a process, slow when loaded
def test_third_cluster_joins_at_run_time_and_a_silent_exporters_exports_vanish(fresh_federation: LocalFederation) -> None:
    lf = fresh_federation
    assert lf.wait_for(lambda: lf.call_grpc("east", "west"), 30).ok, logs_of(lf)
    lf.add_cluster("central")
    for src in ("east", "west"):
        r = lf.wait_for(lambda: lf.call_grpc(src, "central"), 30)
        assert r.ok and r.body == f"hello {src} from central", (r, logs_of(lf))
    r = lf.wait_for(lambda: lf.call_grpc("central", "east"), 30)
    assert r.ok and r.body == "hello central from east", r

    # central's exporter dies without a word: its export lease runs down (STALE: the
    # exports are still routed) and lapses after the TTL (15 s), and its exports vanish
    # everywhere.  The cluster itself stays LIVE in `isthmus status`: its gateway still
    # reports (issue 12: liveness counts gateway reports too).
    lf.clusters["central"].procs["exporter"].kill()
    t0 = time.monotonic()
    with lf.admin() as admin:
        assert any(s.cluster == "central" for s in admin.list_services())
    seen = []
    while time.monotonic() - t0 < 60:
        r = subprocess.run([sys.executable, "-m", "federation.cli", "status", "-o", "json", "--federation",
                            lf.fed_address, "--cert-dir", str(lf.admin_dir)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        [central] = [c for c in json.loads(r.stdout)["clusters"] if c["cluster"] == "central"]
        seen.append((central["state"], central["lease_ttl"], central["lease_remaining"], central["exports"]))
        if central["lease_ttl"] == 0:
            break
        time.sleep(0.3)
    assert {state for state, *_ in seen} == {"LIVE"} and central["gateways"] >= 1, seen
    assert any(ttl and (left + 0.5) * 3 < ttl and n for _, ttl, left, n in seen), seen  # a stale lease, still routed
    assert seen[-1][1:] == (0, -1, 0), seen  # then no lease, no exports
    gone = lf.wait_for(lambda: lf.call_grpc("east", "central"), 20, want_ok=False)
    elapsed = time.monotonic() - t0
    assert not gone.ok, gone
    assert elapsed < 60, elapsed
    with lf.admin() as admin:
        assert not any(s.cluster == "central" for s in admin.list_services())
    # the others are unaffected
    assert lf.call_grpc("east", "west").ok

"""Exports come and go everywhere; clusters join at run time; silent clusters vanish."""

from __future__ import annotations

import time

import pytest

from federation.demo.harness import LocalFederation

from .conftest import logs_of


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


@pytest.mark.lease_ttl(3)
def test_third_cluster_joins_at_run_time_and_a_silent_cluster_vanishes(fresh_federation: LocalFederation) -> None:
    lf = fresh_federation
    assert lf.wait_for(lambda: lf.call_grpc("east", "west"), 30).ok, logs_of(lf)
    lf.add_cluster("central")
    for src in ("east", "west"):
        r = lf.wait_for(lambda: lf.call_grpc(src, "central"), 30)
        assert r.ok and r.body == f"hello {src} from central", (r, logs_of(lf))
    r = lf.wait_for(lambda: lf.call_grpc("central", "east"), 30)
    assert r.ok and r.body == "hello central from east", r

    # central's exporter dies without a word: its lease lapses after the TTL (3 s)
    lf.clusters["central"].procs["exporter"].kill()
    t0 = time.monotonic()
    with lf.admin() as admin:
        assert any(s.cluster == "central" for s in admin.list_services())
    gone = lf.wait_for(lambda: lf.call_grpc("east", "central"), 20, want_ok=False)
    elapsed = time.monotonic() - t0
    assert not gone.ok, gone
    assert elapsed < 15, elapsed
    with lf.admin() as admin:
        assert not any(s.cluster == "central" for s in admin.list_services())
    # the others are unaffected
    assert lf.call_grpc("east", "west").ok

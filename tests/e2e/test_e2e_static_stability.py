"""Static stability: the data path outlives the control plane."""

from __future__ import annotations

import time

import pytest

from federation.demo.harness import LocalFederation

from .conftest import logs_of

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_traffic_flows_with_etcd_then_federation_down_and_a_restart_serves_last_good(fresh_federation: LocalFederation) -> None:
    lf = fresh_federation
    assert lf.wait_for(lambda: lf.call_grpc("east", "west"), 30).ok, logs_of(lf)
    revision = lf.gateway_config("east")["revision"]

    lf.stop_etcd()
    for _ in range(3):
        assert lf.call_grpc("east", "west").ok
        assert lf.call_tcp("west", "east").ok

    lf.stop_federation()
    for _ in range(3):
        assert lf.call_grpc("east", "west").ok
        assert lf.call_grpc("west", "east").ok

    # a gateway restarted while the federation is down serves its last good config from disk
    lf.stop_gateway("east")
    lf.start_gateway("east")
    cfg = lf.gateway_config("east")
    assert cfg["source"] == "last-known-good" and cfg["revision"] == revision, cfg
    r = lf.wait_for(lambda: lf.call_grpc("east", "west"), 15)
    assert r.ok, (r, logs_of(lf))

    # everything resyncs when etcd and the federation return
    lf.start_etcd()
    lf.start_federation()
    lf.write_exports("west", [s for s in lf.default_exports(lf.clusters["west"]) if s["name"] != "echo"])
    deadline = time.monotonic() + 30
    while True:
        cfg = lf.gateway_config("east")
        if cfg["source"] == "federation" and cfg["revision"] > revision:
            break
        assert time.monotonic() < deadline, (cfg["source"], cfg["revision"], logs_of(lf))
        time.sleep(0.3)
    gone = lf.wait_for(lambda: lf.call_tcp("east", "west"), 30, want_ok=False)
    assert not gone.ok, gone
    assert lf.call_grpc("east", "west").ok

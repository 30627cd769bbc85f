"""Traffic crosses clusters only through the gateways, over every protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import trust

from federation.demo.harness import LocalFederation

from .conftest import logs_of

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_service_unreachable_directly_but_reachable_through_the_gateways(federation: LocalFederation) -> None:
    lf = federation
    direct = lf.call_direct("east", "west")
    assert not direct.ok and "unreachable" in direct.body.lower(), direct
    # and not through west's WAN address either: the service listens on the internal network only
    w = lf.clusters["west"]
    around = lf.http("east", f"http://{w.wan_address}:{w.ports['http']}/", timeout=2)
    assert not around.ok, around

    first = lf.wait_for(lambda: lf.call_grpc("east", "west"), 30)
    assert first.ok and first.body == "hello east from west", logs_of(lf)


def test_http1_and_http2_across(federation: LocalFederation) -> None:
    lf = federation
    for src, dst in (("east", "west"), ("west", "east")):
        r1 = lf.wait_for(lambda: lf.call_http(src, dst), 30)
        assert r1.ok and r1.body == f"hello from {dst}\n", (r1, logs_of(lf))
        # a trace context crossed the hop; a plain-text caller has no identity to assert
        assert r1.headers.get("x-served-by") == dst
        assert r1.headers.get("x-seen-traceparent", "").startswith("00-")
        assert "x-seen-source-identity" not in r1.headers, r1.headers
        r2 = lf.call_http(src, dst, http2=True)
        assert r2.ok and r2.body == f"hello from {dst}\n", r2


def test_an_mtls_callers_identity_crosses_the_hop(federation: LocalFederation, tmp_path: Path) -> None:
    """A workload with an SVID of east calls its gateway over mTLS: west's service sees
    that identity, asserted by east's gateway (whatever the workload itself sent)."""
    lf = federation
    east = lf.clusters["east"]
    svid = tmp_path / "cart"
    trust.ClusterCA(east.dir / "join" / "ca").issue(trust.workload_id("east.isthmus.local", "shop", "cart"), svid)
    r = lf.wait_for(lambda: lf.http("east", f"https://{east.outbound}/", host="web.default.west.isthmus.local:8080",
                                    cert_dir=svid, headers={"isthmus-source-identity": "spiffe://west.isthmus.local/ns/x/sa/y"}), 30)
    assert r.ok and r.body == "hello from west\n", (r, logs_of(lf))
    assert r.headers.get("x-seen-source-identity") == "spiffe://east.isthmus.local/ns/shop/sa/cart", r.headers


def test_grpc_unary_streaming_and_federated_name(federation: LocalFederation) -> None:
    lf = federation
    r = lf.wait_for(lambda: lf.call_grpc("west", "east"), 30)
    assert r.ok and r.body == "hello west from east", r
    s = lf.call_grpc("east", "west", stream=3)
    assert s.ok and json.loads(s.body) == [f"east-{i} [west]" for i in range(3)], s
    fed = lf.call_grpc("east", None)  # greeter.default.isthmus.local: any cluster exporting it
    assert fed.ok and fed.body == "hello east from west", fed


def test_tcp_through_connect(federation: LocalFederation) -> None:
    lf = federation
    r = lf.wait_for(lambda: lf.call_tcp("east", "west", data="x" * 5000), 30)
    assert r.ok and r.body == "x" * 5000, r


def test_unexported_name_is_not_routed(federation: LocalFederation) -> None:
    lf = federation
    r = lf.http("east", f"http://{lf.clusters['east'].outbound}/", host="secret.default.west.isthmus.local:8080")
    assert r.status == 404 and not r.ok, r  # no such name: not found, not "unavailable"

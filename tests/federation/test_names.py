"""federation.names: the one home of service names, ports and cluster identities."""

from __future__ import annotations

import pytest

import trust
from federation import names


def test_cluster_identities_are_the_ids_trust_mints() -> None:
    td = trust.cluster_trust_domain("east", "isthmus.local")
    assert trust.gateway_id(td).path == names.GATEWAY_PATH == "/ns/isthmus-system/sa/isthmus-gateway"
    assert trust.agent_id(td).path == names.AGENT_PATH == "/ns/isthmus-system/sa/isthmus-agent"
    assert names.CLUSTER_IDENTITY_PATHS == (names.GATEWAY_PATH, names.AGENT_PATH)


def test_outbound_names_per_cluster_and_federated() -> None:
    assert names.outbound_host("web", "shop", "west") == "web.shop.west.isthmus.local"
    assert names.outbound_host("web", "shop") == "web.shop.isthmus.local"
    assert names.outbound_host("web", "shop", "west", "mesh.example") == "web.shop.west.mesh.example"
    assert names.local_host("web", "shop") == "web.shop.svc.cluster.local"


def test_mirror_names_and_the_hosts_a_workload_calls_them_by() -> None:
    assert names.mirror_name("web", "west") == "web--west"
    assert names.mirror_name("web", None) == "web--isthmus"
    assert names.mirror_hosts("web", "shop", "west") == (
        "web--west.shop.svc.cluster.local", "web--west.shop.svc", "web--west.shop")
    with pytest.raises(ValueError, match="reserved"):
        names.mirror_name("web", names.FEDERATED_SUFFIX)
    assert names.mirror_hosts("web", "shop", names.FEDERATED_SUFFIX) == ()


def test_long_mirror_names_are_hashed_stable_and_distinct() -> None:
    a, b = names.mirror_name("a" * 70, "west"), names.mirror_name("a" * 71, "west")
    assert len(a) <= 63 and len(b) <= 63 and a != b
    assert a == names.mirror_name("a" * 70, "west")
    assert not a.endswith("-") and a[-9] == "-"


def test_default_ports() -> None:
    assert (names.GATEWAY_OUTBOUND_PORT, names.GATEWAY_INBOUND_PORT, names.GATEWAY_ADMIN_PORT) == (15001, 15443, 15000)


def test_gateway_names_are_cluster_slash_dns_label() -> None:
    assert names.gateway_instance("gw-7d9f", 1) == "gw-7d9f-1"
    assert names.gateway_instance("VM_3.Example.COM", 4242) == "vm-3-example-com-4242"
    assert names.gateway_instance("", 7) == "gateway-7"
    long = names.gateway_instance("h" * 100, 123456)
    assert len(long) == 63 and long.endswith("-123456")
    assert names.gateway_instance("gw-1") == "gw-1"  # a valid instance stays as it is
    assert names.gateway_name("east", "gw-1") == "east/gw-1"
    assert names.parse_gateway_name("east/gw-1") == ("east", "gw-1")
    for bad in ("east", "east/", "/gw", "east/gw/1", "east/GW", "east/-gw", "east/gw-", "spiffe://east/x#h",
                "east/" + "x" * 64):
        with pytest.raises(ValueError, match="must be <cluster>/<instance>"):
            names.parse_gateway_name(bad)

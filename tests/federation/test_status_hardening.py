"""Gateway status cannot be spoofed, is bounded, lapses with its gateway, and shows rejected
snapshots (issue 11, sections 5 and 7).  A real federation, real etcd, mTLS clients."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from aetcd.rpc import rpc_pb2 as etcd_pb
from click.testing import CliRunner

from federation._errors import RemoteError
from federation.server._etcd import Etcd
from federation.server._store import MAX_GATEWAYS_PER_CLUSTER, STATUS_TTL, Keys
from federation.cli import cli

from .fixtures import Pki, join_cluster
from .test_exports import svc

EAST_GW = "spiffe://east.isthmus.local/ns/isthmus-system/sa/isthmus-gateway"
WEST_GW = "spiffe://west.isthmus.local/ns/isthmus-system/sa/isthmus-gateway"


def refused(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(RemoteError) as err:
        call()
    return err.value.code


def test_report_applied_is_bound_to_the_callers_identity_and_the_federations_revision(
    fed, admin, pki: Pki, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    east = join_cluster(fed, pki, "east", tmp_path)
    join_cluster(fed, pki, "west", tmp_path)
    rev = admin.status().config_revision
    with fed.client(east.gateway_dir) as e:
        # East's certificate cannot speak for west's gateways, in either form ...
        assert refused(lambda: e.report_applied("west/gw-1", rev)) == grpc.StatusCode.PERMISSION_DENIED
        assert refused(lambda: e.report_applied(WEST_GW, rev)) == grpc.StatusCode.PERMISSION_DENIED
        assert refused(lambda: e.report_applied(EAST_GW + "#", rev)) == grpc.StatusCode.PERMISSION_DENIED
        assert refused(lambda: e.report_applied(EAST_GW + "#" + "x" * 300, rev)) == grpc.StatusCode.PERMISSION_DENIED
        # ... nor report under a name that is not <cluster>/<DNS label> ...
        for bad in ("west", "east/", "east/Gw_1", "east/gw/1", "east/" + "x" * 64, "east/-gw", "east/gw 1"):
            assert refused(lambda: e.report_applied(bad, rev)) == grpc.StatusCode.INVALID_ARGUMENT, bad
        # ... nor claim a revision the federation has not reached.
        assert refused(lambda: e.report_applied("", 999_999)) == grpc.StatusCode.INVALID_ARGUMENT
        assert refused(lambda: e.report_applied("", rev, rejected_revision=999_999, rejected_reason="x")) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert admin.status().gateways == ()
        e.report_applied("", rev)
        e.report_applied("east/host-2", rev)
        e.report_applied(EAST_GW + "#VM_3.example", rev)  # what older gateways send
    st = admin.status()
    assert sorted((g.cluster, g.gateway_id, g.state) for g in st.gateways) == [
        ("east", "east/gateway", "SYNCED"), ("east", "east/host-2", "SYNCED"), ("east", "east/vm-3-example", "SYNCED"),
    ]  # fmt: skip


def test_status_keys_are_capped_per_cluster_and_lapse_with_their_lease(
    fed, admin, pki: Pki, etcd, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    east = join_cluster(fed, pki, "east", tmp_path)
    rev = admin.status().config_revision
    with fed.client(east.gateway_dir) as e:
        for i in range(MAX_GATEWAYS_PER_CLUSTER):
            e.report_applied(f"east/gw-{i}", rev)
        assert refused(lambda: e.report_applied("east/one-too-many", rev)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        e.report_applied("east/gw-0", rev)  # an existing one still reports
    assert len(admin.status().gateways) == MAX_GATEWAYS_PER_CLUSTER

    async def lease_of_0() -> tuple[int, int]:
        async with Etcd(etcd.endpoint) as c:
            kv = await c.get(Keys().status("east", "gw-0"))
            assert kv is not None and kv.lease
            ttl = await c.lease.LeaseTimeToLive(etcd_pb.LeaseTimeToLiveRequest(ID=kv.lease))
            await c.revoke(kv.lease)  # what the lease's expiry does when the gateway is gone
            return ttl.grantedTTL, ttl.TTL

    granted, left = asyncio.run(lease_of_0())
    assert granted == STATUS_TTL and 0 < left <= STATUS_TTL
    ids = {g.gateway_id for g in admin.status().gateways}
    assert "east/gw-0" not in ids and len(ids) == MAX_GATEWAYS_PER_CLUSTER - 1


def test_a_rejected_snapshot_is_reported_and_status_shows_it(fed, admin, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    east = join_cluster(fed, pki, "east", tmp_path)
    env = {"ISTHMUS_FEDERATION": fed.address, "ISTHMUS_CERT_DIR": str(pki.admin_dir)}
    with fed.client(east.gateway_dir) as e:
        good = admin.status().config_revision
        bad = e.publish("east", [svc("east", "web")]).revision
        reason = "services.0.ports.0: [bold]no route[/bold]\x1b[31m"
        e.report_applied("", good, rejected_revision=bad, rejected_reason=reason, confirmed_at=1.0)
        [g] = admin.status().gateways
        assert g.applied_revision == good and g.rejected_revision == bad
        assert g.state == f"REJECTED rev {bad}: services.0.ports.0: [bold]no route[/bold] [31m"
        out = CliRunner().invoke(cli, ["status"], env=env).output
        assert f"REJECTED rev {bad}: services.0.ports.0: [bold]no route[/bold]" in " ".join(out.split()), out
        body = json.loads(CliRunner().invoke(cli, ["status", "-o", "json"], env=env).output)
        assert body["gateways"][0]["rejected_revision"] == bad and body["gateways"][0]["state"].startswith("REJECTED")
        assert body["gateways"][0]["confirmed_at"] == 1.0  # how stale its config may be
        assert "CONFIRMED" in out
        # Once a newer snapshot applies, the rejection is history.
        e.report_applied("", bad)
        [g] = admin.status().gateways
        assert g.state == "SYNCED" and g.rejected_revision == 0 and g.rejected_reason == ""

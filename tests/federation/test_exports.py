"""Publishing exports: authorization, replace semantics, leases, heartbeats, withdraw."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest

from federation import models
from federation._errors import RemoteError

from .fixtures import Pki, join_cluster


def svc(cluster: str, name: str, port: int = 80, ns: str = "default") -> models.ExportedService:
    return models.ExportedService(cluster=cluster, namespace=ns, name=name, ports=(models.ServicePort(port=port),))


def wait_until(pred, timeout: float = 10.0, step: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


@pytest.fixture
def clusters(fed, pki: Pki, tmp_path: Path):  # type: ignore[no-untyped-def]
    return join_cluster(fed, pki, "east", tmp_path), join_cluster(fed, pki, "west", tmp_path)


def test_cluster_cannot_write_another_clusters_exports(fed, admin, clusters) -> None:  # type: ignore[no-untyped-def]
    east, west = clusters
    with fed.client(west.gateway_dir) as w:
        w.publish("west", [svc("west", "db")])
    with fed.client(east.gateway_dir) as e:
        for attempt in (
            lambda: e.publish("west", [svc("west", "evil")]),  # publish as west
            lambda: e.publish("east", [svc("west", "evil")]),  # smuggle west's record in east's set
            lambda: e.withdraw("west"),
            lambda: e.withdraw("west", "default", "db"),
            lambda: e.heartbeat("west"),
        ):
            with pytest.raises(RemoteError) as err:
                attempt()
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert [(s.cluster, s.name) for s in admin.list_services()] == [("west", "db")]
    assert fed.log_text().count('"rpc.refused"') >= 5
    assert "spiffe://east.isthmus.local/ns/isthmus-system/sa/isthmus-gateway may not write cluster 'west'" in fed.log_text()


def test_publish_replaces_the_set_and_is_idempotent(fed, admin, clusters) -> None:  # type: ignore[no-untyped-def]
    east, _ = clusters
    with fed.client(east.agent_dir) as e:
        r1 = e.publish("east", [svc("east", "a"), svc("east", "b")])
        assert r1.changed == 2
        r2 = e.publish("east", [svc("east", "a"), svc("east", "b")])
        assert r2.changed == 0 and r2.lease_id == r1.lease_id
        r3 = e.publish("east", [svc("east", "b", port=8080), svc("east", "c")])
        assert r3.changed == 3  # a deleted, b changed, c added
    got = {s.name: s.ports[0].port for s in admin.list_services("east")}
    assert got == {"b": 8080, "c": 80}


def test_large_publish_spans_several_transactions(fed, admin, clusters) -> None:  # type: ignore[no-untyped-def]
    east, _ = clusters
    many = [svc("east", f"s{i:04d}") for i in range(250)]  # > etcd's default 128 ops per txn
    with fed.client(east.agent_dir) as e:
        assert e.publish("east", many).changed == 250
    assert len(admin.list_services("east")) == 250


def test_lease_expiry_removes_a_silent_clusters_exports(fed, admin, clusters) -> None:  # type: ignore[no-untyped-def]
    east, west = clusters
    with fed.client(east.agent_dir) as e, fed.client(west.agent_dir) as w:
        # east's short lease lapses; west's (10 s, renewed every 0.5 s: a 20x margin on a
        # loaded machine) is kept by its heartbeats.
        e.publish("east", [svc("east", "web")], ttl=2)
        w.publish("west", [svc("west", "db")], ttl=10)
        deadline = time.monotonic() + 30
        while True:  # until etcd expires east's lease, however late it runs
            assert w.heartbeat("west") > 0
            clusters = sorted(s.cluster for s in admin.list_services())
            assert "west" in clusters
            if clusters == ["west"]:
                break
            assert time.monotonic() < deadline, "east's lease never lapsed"
            time.sleep(0.5)
        with pytest.raises(RemoteError) as err:
            e.heartbeat("east")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        # Publishing again brings the exports back under a fresh lease.
        e.publish("east", [svc("east", "web")], ttl=2)
    assert sorted(s.cluster for s in admin.list_services()) == ["east", "west"]


def test_keep_published_survives_a_lapsed_lease(fed, admin, clusters, etcd) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from federation.server import Etcd

    east, _ = clusters
    stop = threading.Event()
    services = [svc("east", "web")]
    with fed.client(east.agent_dir) as e:
        t = threading.Thread(target=e.keep_published, args=("east", lambda: services, stop), kwargs={"ttl": 3})
        t.start()
        try:
            assert wait_until(lambda: len(admin.list_services("east")) == 1)

            async def lease() -> int:
                async with Etcd(etcd.endpoint) as cli:
                    kv = await cli.get(b"/isthmus/leases/east")
                    return json.loads(kv.value)["lease"] if kv is not None else 0

            async def revoke(lease_id: int) -> None:  # simulate the lease lapsing (e.g. a long partition)
                async with Etcd(etcd.endpoint) as cli:
                    await cli.revoke(lease_id)

            old = asyncio.run(lease())
            asyncio.run(revoke(old))
            # keep_published notices on its next heartbeat and republishes under a new lease.
            assert wait_until(lambda: asyncio.run(lease()) not in (0, old), timeout=5)
            assert wait_until(lambda: len(admin.list_services("east")) == 1, timeout=5)
            services.append(svc("east", "api"))
            assert wait_until(lambda: len(admin.list_services("east")) == 2, timeout=5)
        finally:
            stop.set()
            t.join(5)


def test_withdraw_one_and_all(fed, admin, clusters) -> None:  # type: ignore[no-untyped-def]
    east, _ = clusters
    with fed.client(east.gateway_dir) as e:
        e.publish("east", [svc("east", "a"), svc("east", "b"), svc("east", "c")])
        assert e.withdraw("east", "default", "a") == 1
        assert sorted(s.name for s in admin.list_services()) == ["b", "c"]
        assert e.withdraw("east") == 2
        with pytest.raises(RemoteError) as err:
            e.withdraw("east", "default", "")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert admin.list_services() == []


def test_invalid_service_is_rejected_with_field_path(fed, clusters) -> None:  # type: ignore[no-untyped-def]
    from federation.proto import federation_pb2 as pb

    east, _ = clusters
    with fed.client(east.gateway_dir) as e:
        bad = '{"cluster":"east","namespace":"default","name":"web","ports":[{"port":70000}]}'
        with pytest.raises(RemoteError) as err:
            e._call("PublishExports", pb.PublishExportsRequest(cluster="east", services_json=[bad]))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid exported service: ports[0].port: " in err.value.details


def test_unjoined_cluster_cannot_publish(fed, admin) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RemoteError) as err:
        admin.publish("ghost", [svc("ghost", "x")])
    assert err.value.code == grpc.StatusCode.NOT_FOUND

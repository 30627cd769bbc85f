"""Who may call what, over real mTLS: the admin and cluster-writer checks, and join
tokens that work exactly once (each test kills a mutation that once survived the suite)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import pytest

import trust
from federation._errors import PermissionDenied, RemoteError, Unauthenticated
from federation.server._etcd import Etcd
from federation._join import join
from federation.server._store import Store, token_hash
from federation.models import ExportedService, ServicePort

from .fixtures import FederationProcess, JoinedCluster, Pki, join_cluster

SVC = ExportedService(cluster="east", namespace="shop", name="cart", ports=(ServicePort(port=80),))
POLICY = {"kind": "AuthorizationPolicy", "name": "p", "action": "DENY", "rules": [{}]}


@pytest.fixture
def east(fed: FederationProcess, pki: Pki, tmp_path: Path) -> JoinedCluster:
    return join_cluster(fed, pki, "east", tmp_path)


def _svid(cluster: JoinedCluster, spiffe_id: str, out: Path) -> Path:
    """A leaf that ``cluster``'s own CA may legally sign (its name constraint allows it)."""
    trust.ClusterCA(cluster.out_dir / "ca").issue(spiffe_id, out)
    return out


def _refused(call, code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(RemoteError) as e:
        call()
    assert e.value.code == code, e.value
    return e.value.details


def test_an_admin_path_in_a_cluster_trust_domain_is_not_an_admin(
        fed: FederationProcess, pki: Pki, east: JoinedCluster, tmp_path: Path) -> None:
    """east's CA can mint spiffe://east.isthmus.local/admin/x; only the federation's own
    trust domain holds admins, so that identity may do nothing at all."""
    west = join_cluster(fed, pki, "west", tmp_path)  # a name on either side of "isthmus" in sort order
    for cluster in (east, west):
        sid = f"spiffe://{cluster.name}.isthmus.local/admin/x"
        fake = _svid(cluster, sid, tmp_path / f"fake-admin-{cluster.name}")
        with fed.client(fake) as c:
            for call in (lambda: c.create_token(600, "north"), lambda: c.apply_policy(POLICY),
                         lambda: c.delete_policy("p"), lambda: c.list_clusters(), lambda: c.revoke_cluster("east")):
                details = _refused(call)
                assert sid in details
    with fed.client(pki.admin_dir) as admin:  # the control: the real admin may
        assert admin.create_token(600, "north").token
        assert not any(c.revoked for c in admin.list_clusters())
        assert admin.list_policies() == []


def test_a_workload_of_east_cannot_write_easts_records(
        fed: FederationProcess, pki: Pki, east: JoinedCluster, tmp_path: Path) -> None:
    """Only east's gateway and agent accounts write for east: a workload certificate of
    east may not publish, withdraw, heartbeat or report status."""
    wl = _svid(east, trust.workload_id("east.isthmus.local", "shop", "cart"), tmp_path / "workload")
    with fed.client(wl) as c:
        _refused(lambda: c.publish("east", [SVC]))
        _refused(lambda: c.withdraw("east"))
        _refused(lambda: c.withdraw("east", "shop", "cart"))
        _refused(lambda: c.heartbeat("east"))
        _refused(lambda: c.report_applied("spiffe://east.isthmus.local/ns/shop/sa/cart", 1))
    with fed.client(pki.admin_dir) as admin:
        assert admin.list_services() == []  # nothing of it reached the store
        assert all(g.cluster != "east" for g in admin.status().gateways)
    # the control: east's agent and gateway may
    with fed.client(east.agent_dir) as agent:
        assert agent.publish("east", [SVC]).revision > 0
        assert agent.heartbeat("east") > 0
    with fed.client(east.gateway_dir) as gw:
        gw.report_applied("", 1)
    with fed.client(wl) as c:  # and still not the workload, now that there is something to withdraw
        _refused(lambda: c.withdraw("east", "shop", "cart"))
    with fed.client(pki.admin_dir) as admin:
        assert [s.name for s in admin.list_services()] == ["cart"]


def test_a_join_token_consumed_twice_at_once_works_exactly_once(etcd) -> None:  # type: ignore[no-untyped-def]
    """Two consumers read the token before either deletes it: the delete is a
    compare-and-swap, and only the one whose delete happened may go on."""
    async def main() -> list[BaseException | None]:
        async with Etcd(etcd.endpoint) as e:
            store = Store(e)
            token, _ = await store.create_token(600)
            results = await asyncio.gather(store.consume_token(token, "east"), store.consume_token(token, "west"),
                                           return_exceptions=True)
            assert await e.get(store.keys.token(token_hash(token))) is None  # used up
            return results  # type: ignore[return-value]

    results = asyncio.run(main())
    assert sum(r is None for r in results) == 1, results
    (err,) = [r for r in results if r is not None]
    assert isinstance(err, Unauthenticated) and "already used" in str(err)


def test_two_concurrent_joins_with_one_token_join_one_cluster(
        fed: FederationProcess, pki: Pki, tmp_path: Path) -> None:
    """Over the API: one unbound token, joins of east, west and central at once; exactly
    one gets a CA, the others are refused, and only that one cluster exists."""
    with fed.client(pki.admin_dir) as admin:
        tok = admin.create_token(600)
    names = ("east", "west", "central")
    outcome: dict[str, BaseException | None] = {}
    start = threading.Barrier(len(names))

    def one(name: str) -> None:
        start.wait()
        try:
            join(name, fed.address, tok.token, tok.ca_pin, tmp_path / name, join_address=fed.join_address)
            outcome[name] = None
        except BaseException as exc:  # noqa: BLE001 - the outcome is what we test
            outcome[name] = exc

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    joined = [n for n, r in outcome.items() if r is None]
    assert len(joined) == 1, outcome
    for n, r in outcome.items():
        if r is not None:
            assert "invalid join token" in str(r), (n, r)
    with fed.client(pki.admin_dir) as admin:
        assert [c.name for c in admin.list_clusters()] == joined


def test_a_caller_without_a_client_certificate_gets_nothing(fed: FederationProcess, pki: Pki) -> None:
    """The mTLS port refuses such a caller in the handshake; the join port serves Join
    alone (with a token), so every other call there is UNIMPLEMENTED."""
    from federation.proto import federation_pb2 as pb
    from federation.proto import federation_pb2_grpc as pb_grpc

    creds = grpc.ssl_channel_credentials((pki.admin_dir / "bundle.pem").read_bytes())
    with grpc.secure_channel(fed.join_address, creds) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.FederationStub(ch).ListClusters(pb.ListClustersRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED, e.value  # type: ignore[attr-defined]
    with grpc.secure_channel(fed.address, creds) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.FederationStub(ch).ListClusters(pb.ListClustersRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value  # type: ignore[attr-defined]


def test_a_workload_agent_and_admin_each_write_only_what_they_may(
        fed: FederationProcess, pki: Pki, east: JoinedCluster, tmp_path: Path) -> None:
    """east's agent writes east's records, never west's; an admin writes anyone's; the
    cluster name must be given; only admins create tokens."""
    west = join_cluster(fed, pki, "west", tmp_path)
    west_svc = SVC.model_copy(update={"cluster": "west"})
    with fed.client(east.agent_dir) as agent:
        details = _refused(lambda: agent.publish("west", [west_svc]))
        assert "may not write cluster 'west'" in details
        _refused(lambda: agent.heartbeat("west"))
        _refused(lambda: agent.heartbeat("central"))  # names before and after "east" alike
        _refused(lambda: agent.publish("", [SVC]), grpc.StatusCode.INVALID_ARGUMENT)
        assert "admins only" in _refused(lambda: agent.create_token(600, "north"))
        assert agent.publish("east", [SVC]).revision > 0
    with fed.client(west.agent_dir) as w:
        assert w.publish("west", [west_svc]).revision > 0
    with fed.client(pki.admin_dir) as admin:
        assert admin.withdraw("west", "shop", "cart") == 1  # an admin may write for any cluster
        assert [(s.cluster, s.name) for s in admin.list_services()] == [("east", "cart")]


def test_an_agent_writes_its_cluster_under_a_federation_domain_of_any_length(etcd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The cluster is read off the caller's trust domain by cutting the federation's
    domain off its end; with an even-length domain (16 characters here; the other tests'
    isthmus.local has 13) an off-by-one there would misname it."""
    from .fixtures import start_federation

    root = trust.TrustDir(tmp_path / "trust")
    root.init("fed.example.test")
    root.issue_admin("ops", tmp_path / "admin-ops")
    pki = Pki(root.path, tmp_path / "admin-ops")
    fed = start_federation(pki, etcd.endpoint, tmp_path)
    try:
        east = join_cluster(fed, pki, "east", tmp_path)
        with fed.client(east.agent_dir) as agent:
            assert agent.publish("east", [SVC]).revision > 0
            _refused(lambda: agent.publish("west", [SVC.model_copy(update={"cluster": "west"})]))
    finally:
        fed.stop()


def test_a_join_token_past_its_recorded_deadline_is_refused_before_etcd_drops_it(etcd) -> None:  # type: ignore[no-untyped-def]
    """etcd's lease removes a used-up token's key, but a lease may lapse a second late: the
    deadline recorded in the token is what counts. Also a token bound to a cluster works
    for that cluster only."""
    import json
    import time

    async def main() -> None:
        async with Etcd(etcd.endpoint) as e:
            store = Store(e)
            for name, body in (("late", {"cluster": "", "expires_at": time.time() - 5}),
                               ("bound", {"cluster": "east", "expires_at": time.time() + 600})):
                await e.put(store.keys.token(token_hash(name)), json.dumps(body).encode())  # no lease: still there
            with pytest.raises(Unauthenticated, match="^invalid join token: expired"):
                await store.consume_token("late", "east")
            with pytest.raises(PermissionDenied, match="join token is for cluster 'east', not 'west'"):
                await store.consume_token("bound", "west")
            await store.consume_token("bound", "east")  # the right cluster: works, once
            with pytest.raises(Unauthenticated, match="already used"):
                await store.consume_token("bound", "east")

    asyncio.run(main())

"""TrafficRoutes in the federation (issue 13): stored under traffic/, applied with every
other document kind in one etcd transaction, checked across records, streamed to
watchers, weights changed by compare-and-swap.  Real etcd, the real federation process,
real gRPC over mTLS.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from federation import models
from federation._errors import RemoteError
from federation.client import SnapshotTracker, decode_event, read_snapshot
from federation.proto import federation_pb2 as pb
from federation.server._embedded import etcdctl_binary

from .fixtures import Pki, join_cluster, restart_federation, start_federation
from .test_exports import svc
from .test_records_hardening import fed_metrics, invalid_records  # noqa: F401 - fed_metrics is a fixture
from .test_watch import Watcher


def route(name: str = "cart", *rules: dict[str, Any], host: str = "cart", **extra: Any) -> dict[str, Any]:
    rules = rules or ({"destinations": [{"cluster": "east", "weight": 90}, {"cluster": "west", "weight": 10}],
                       "failover": ["*"]},)
    return {"kind": "TrafficRoute", "name": name, "host": {"namespace": "shop", "service": host},
            "rules": list(rules), **extra}


def allow(name: str) -> dict[str, Any]:
    return {"kind": "AuthorizationPolicy", "name": name, "selector": {"namespace": "shop", "service": name},
            "rules": [{"from": [{"clusters": ["east"]}]}]}


def etcd_get(etcd, prefix: str) -> list[str]:  # type: ignore[no-untyped-def]
    out = subprocess.run([etcdctl_binary(), "--endpoints", etcd.endpoint, "get", "--prefix", "--keys-only", prefix],
                         check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line]


def etcdctl(etcd, *args: str) -> None:  # type: ignore[no-untyped-def]
    subprocess.run([etcdctl_binary(), "--endpoints", etcd.endpoint, *args], check=True, capture_output=True)


def refused(call) -> RemoteError:  # type: ignore[no-untyped-def]
    with pytest.raises(RemoteError) as err:
        call()
    return err.value


@pytest.fixture
def clusters(fed, pki: Pki, tmp_path: Path):  # type: ignore[no-untyped-def]
    """east, west and central joined; east and west export shop/cart, west shop/cart-v2."""
    joined = {n: join_cluster(fed, pki, n, tmp_path) for n in ("east", "west", "central")}
    with fed.client(joined["east"].agent_dir) as east, fed.client(joined["west"].agent_dir) as west:
        east.publish("east", [svc("east", "cart", ns="shop")], ttl=600)
        west.publish("west", [svc("west", "cart", ns="shop"), svc("west", "cart-v2", ns="shop")], ttl=600)
    return joined


# ---------------------------------------------------------------- store and API


def test_a_route_is_stored_under_traffic_and_applied_with_policies_in_one_transaction(
    admin, clusters, etcd
) -> None:  # type: ignore[no-untyped-def]
    rev, outcomes, warnings = admin.apply_documents([allow("cart"), route()])
    assert outcomes == ["created", "created"] and warnings == []
    assert etcd_get(etcd, "/isthmus/traffic/") == ["/isthmus/traffic/TrafficRoute/cart"]
    assert etcd_get(etcd, "/isthmus/policies/") == ["/isthmus/policies/AuthorizationPolicy/cart"]
    assert admin.apply_documents([allow("cart"), route()]) == (rev, ["unchanged", "unchanged"], [])
    changed = route("cart", {"destinations": [{"cluster": "east", "weight": 50}, {"cluster": "west", "weight": 50}]})
    rev2, outcomes, _ = admin.apply_documents([allow("cart"), changed, route("other", host="other")])
    assert outcomes == ["unchanged", "configured", "created"] and rev2 == rev + 1  # one revision
    [cart, other] = admin.list_routes()
    assert (cart.name, other.name) == ("cart", "other")
    assert [d.weight for d in cart.rules[0].destinations] == [50, 50]
    # Routes are no policies: ListPolicies (which older clients read as policies) leaves them out.
    assert [p.name for p in admin.list_policies()] == ["cart"]
    assert [d.kind for d in admin.list_documents()] == ["AuthorizationPolicy", "TrafficRoute", "TrafficRoute"]


def test_one_refused_document_leaves_every_other_unwritten(admin, clusters) -> None:  # type: ignore[no-untyped-def]
    admin.apply_documents([route()])
    bad = route("x", {"destinations": [{"cluster": "nope"}]}, host="x")
    err = refused(lambda: admin.apply_documents([allow("a"), route(locality="prefer-same-region"),
                                                 bad]))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details.startswith("document 2: rules[0].destinations[0].cluster: cluster 'nope' is not joined"), \
        err.details
    assert admin.list_policies() == []
    [cart] = admin.list_routes()
    assert cart.locality == ""  # the route's change did not go in either


RULE_OK = {"destinations": [{"cluster": "east"}]}


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        pytest.param(route("r", {"destinations": [{"cluster": "east", "weight": -1}]}),
                     "invalid TrafficRoute: rules[0].destinations[0].weight: ", id="negative-weight"),
        pytest.param(route("r", {"destinations": [{"cluster": "east", "weight": "ten"}]}),
                     "invalid TrafficRoute: rules[0].destinations[0].weight: ", id="non-numeric-weight"),
        pytest.param(route("r", {"destinations": [{"cluster": "east", "weight": 0}, {"cluster": "west", "weight": 0}]}),
                     "invalid TrafficRoute: rules[0]: every destination weight is 0", id="all-weights-zero"),
        pytest.param(route("r", {"destinations": [{"cluster": "mars"}]}),
                     "rules[0].destinations[0].cluster: cluster 'mars' is not joined (joined: central, east, west)",
                     id="destination-cluster-not-joined"),
        pytest.param(route("r", RULE_OK, {"destinations": [{"cluster": "west"}], "failover": ["central", "venus"]}),
                     "rules[1].failover[1].cluster: cluster 'venus' is not joined", id="failover-cluster-not-joined"),
        pytest.param(route("r", {"match": [{"path": {"regex": "^/api/(("}}], **RULE_OK}),
                     "invalid TrafficRoute: rules[0].match[0].path.regex: invalid regex '^/api/((' (RE2 syntax)",
                     id="invalid-regex"),
        pytest.param(route("r", {"match": [{"headers": {"x-canary": {"exact": "1"}}, "query": {"a": "b"}}], **RULE_OK}),
                     "invalid TrafficRoute: rules[0].match[0].query: Extra inputs are not permitted",
                     id="unknown-match-field"),
        pytest.param(route("r", {"match": [{"headers": {"x-canary": {"regex": "a{1001}"}}}], **RULE_OK}),
                     "invalid TrafficRoute: rules[0].match[0].headers.x-canary.regex: invalid regex",
                     id="regex-re2-refuses"),
    ],
)
def test_bad_input_is_refused_with_the_field_path(admin, clusters, doc, says) -> None:  # type: ignore[no-untyped-def]
    err = refused(lambda: admin.apply_documents([allow("first"), doc]))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details.startswith("document 1: "), err.details
    assert says in err.details, err.details
    assert admin.list_documents() == []  # refused as a whole


def test_two_routes_for_one_host_are_refused_naming_both(admin, clusters) -> None:  # type: ignore[no-untyped-def]
    err = refused(lambda: admin.apply_documents([route("a"), route("b")]))
    assert err.details.startswith("document 1: host: TrafficRoute 'b' and TrafficRoute 'a' (document 0) both route "
                                  "shop/cart"), err.details
    admin.apply_documents([route("a")])
    err = refused(lambda: admin.apply_documents([allow("p"), route("b")]))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details.startswith("document 1: host: TrafficRoute 'b' and the stored TrafficRoute 'a' both route "
                                  "shop/cart"), err.details
    assert [r.name for r in admin.list_routes()] == ["a"] and admin.list_policies() == []
    # Re-applying the same route (same name) is an update, not a second route.
    assert admin.apply_documents([route("a", locality="prefer-same-region")])[1] == ["configured"]


def test_concurrent_applies_cannot_both_route_one_host(fed, admin, clusters, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    """Each apply checks the stored routes and commits only if no route changed since."""
    for round_ in range(8):
        results: dict[str, object] = {}

        def apply(name: str) -> None:
            with fed.client(pki.admin_dir) as c:
                try:
                    results[name] = c.apply_documents([route(name)])
                except RemoteError as exc:
                    results[name] = exc

        threads = [threading.Thread(target=apply, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        names = [r.name for r in admin.list_routes()]
        assert len(names) == 1, (round_, names, results)
        loser = "b" if names == ["a"] else "a"
        assert isinstance(results[loser], RemoteError) and "both route shop/cart" in results[loser].details
        admin.delete_document("TrafficRoute", names[0])


def test_a_destination_no_cluster_exports_is_a_warning(admin, clusters) -> None:  # type: ignore[no-untyped-def]
    doc = route("cart", {"destinations": [{"cluster": "west", "service": "cart-v3"}, {"cluster": "central"}],
                         "failover": ["east"]})
    rev, outcomes, warnings = admin.apply_documents([doc])
    assert outcomes == ["created"]
    assert warnings == [
        "document 0: rules[0].destinations[0]: no cluster exports shop/cart-v3 yet; this destination is "
        "unavailable until one does",
        "document 0: rules[0].destinations[1]: cluster 'central' does not export shop/cart (exported by east, west); "
        "this destination is unavailable until it does",
    ]
    assert [r.name for r in admin.list_routes()] == ["cart"]


def test_delete_by_kind_and_name(admin, clusters) -> None:  # type: ignore[no-untyped-def]
    admin.apply_documents([allow("cart"), route("cart")])
    # A policy delete without a kind deletes policies only, never the route of that name.
    assert admin.delete_policy("cart") == 1
    assert [r.name for r in admin.list_routes()] == ["cart"]
    assert admin.delete_document("TrafficRoute", "cart") == 1
    assert admin.list_routes() == []
    err = refused(lambda: admin.delete_document("TrafficRoute", "cart"))
    assert err.code == grpc.StatusCode.NOT_FOUND and "no TrafficRoute named 'cart'" in err.details
    err = refused(lambda: admin.delete_document("Gateway", "cart"))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT


def test_only_admins_write_routes(fed, admin, clusters) -> None:  # type: ignore[no-untyped-def]
    admin.apply_documents([route()])
    with fed.client(clusters["east"].gateway_dir) as gw:
        assert [r.name for r in gw.list_routes()] == ["cart"]  # reading is fine
        for attempt in (lambda: gw.apply_documents([route("mine", host="mine")]),
                        lambda: gw.delete_document("TrafficRoute", "cart"),
                        lambda: gw.set_route_weights("cart", [("east", "", 1)])):
            assert refused(attempt).code == grpc.StatusCode.PERMISSION_DENIED
    [cart] = admin.list_routes()
    assert [d.weight for d in cart.rules[0].destinations] == [90, 10]


# ---------------------------------------------------------------- set-weights


def canary() -> dict[str, Any]:
    return route("cart",
                 {"match": [{"headers": {"x-canary": {"exact": "1"}}}],
                  "destinations": [{"cluster": "west", "service": "cart-v2"}]},
                 {"destinations": [{"cluster": "east", "weight": 90}, {"cluster": "west", "weight": 10}],
                  "failover": ["central"]})


def test_set_weights_changes_one_rule_in_one_step(admin, clusters) -> None:  # type: ignore[no-untyped-def]
    rev0, _, _ = admin.apply_documents([canary()])
    # No --rule: the one rule that sends to both east and west.
    rev, new, rule = admin.set_route_weights("cart", [("east", "", 80), ("west", "", 20)])
    assert rule == 1 and rev > rev0
    assert [(d.cluster, d.weight) for d in new.rules[1].destinations] == [("east", 80), ("west", 20)]
    assert new.rules[0] == models.parse_input(models.TrafficRoute, canary()).rules[0]  # the other rule is as it was
    [stored] = admin.list_routes()
    assert stored == new
    # A destination not named keeps its weight; the same weights again change nothing.
    rev2, new, _ = admin.set_route_weights("cart", [("west", "cart", 0)], rule=1)
    assert [d.weight for d in new.rules[1].destinations] == [80, 0] and rev2 > rev
    assert admin.set_route_weights("cart", [("west", "", 0)], rule=1)[0] == rev2


@pytest.mark.parametrize(
    ("weights", "rule", "code", "says"),
    [
        ([("mars", "", 10)], 1, "INVALID_ARGUMENT", "rules[1].destinations: no destination 'mars' in this rule "
                                                    "(it sends to east/cart, west/cart)"),
        ([("west", "cart-v9", 10)], 1, "INVALID_ARGUMENT", "no destination 'west/cart-v9'"),
        ([("east", "", -5)], 1, "INVALID_ARGUMENT", "rules[1].destinations[0].weight: -5 for 'east': a weight is a "
                                                    "non-negative integer"),
        ([("east", "", 0), ("west", "", 0)], 1, "INVALID_ARGUMENT", "rules[1]: every destination weight is 0"),
        ([("east", "", 2_000_000)], 1, "INVALID_ARGUMENT", "rules[1].destinations[0].weight: "),
        ([("east", "", 1)], 5, "INVALID_ARGUMENT", "TrafficRoute 'cart' has 2 rule(s), numbered 0 to 1; there is no rule 5"),
        ([("west", "", 1)], None, "INVALID_ARGUMENT", "has 2 rules and rules 0, 1 all send to west: choose one with --rule"),
        ([("east", "", 1), ("east", "cart", 2)], 1, "INVALID_ARGUMENT", "is given twice"),
    ],
)
def test_set_weights_refuses_naming_the_problem(admin, clusters, weights, rule, code, says) -> None:  # type: ignore[no-untyped-def]
    admin.apply_documents([canary()])
    err = refused(lambda: admin.set_route_weights("cart", weights, rule))
    assert err.code.name == code and says in err.details, err.details
    [stored] = admin.list_routes()
    assert [d.weight for d in stored.rules[1].destinations] == [90, 10]


def test_set_weights_of_a_route_that_does_not_exist(admin, clusters) -> None:  # type: ignore[no-untyped-def]
    err = refused(lambda: admin.set_route_weights("nope", [("east", "", 1)]))
    assert err.code == grpc.StatusCode.NOT_FOUND and "no TrafficRoute named 'nope'" in err.details


def test_concurrent_set_weights_lose_no_update(fed, admin, clusters, pki: Pki, etcd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Eight writers on two federation replicas, each owning one destination of the same
    rule, change its weight five times at once: every writer's last weight is in the
    stored route (compare-and-swap on the record, across replicas)."""
    n = 8
    admin.apply_documents([route("cart", {"destinations": [{"cluster": "east", "service": f"s{i}", "weight": 1}
                                                           for i in range(n)]})])
    other = start_federation(pki, etcd.endpoint, tmp_path, name="fed2")
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        with (fed if i % 2 else other).client(pki.admin_dir) as c:
            try:
                for k in range(5):
                    c.set_route_weights("cart", [("east", f"s{i}", 100 * (i + 1) + k)])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join(60)
    finally:
        other.stop()
    assert errors == []
    [stored] = admin.list_routes()
    assert [d.weight for d in stored.rules[0].destinations] == [100 * (i + 1) + 4 for i in range(n)]


# ---------------------------------------------------------------- watch and status


def test_the_watch_carries_route_changes_and_snapshots_with_routes(fed, admin, clusters) -> None:  # type: ignore[no-untyped-def]
    w = Watcher(fed.client(clusters["west"].gateway_dir))
    try:
        assert w.next().snapshot is not None
        rev, _, _ = admin.apply_documents([route()])
        delta = w.next()
        while not delta.changes:  # progress messages
            delta = w.next()
        assert delta.revision == rev
        [change] = delta.changes
        assert (change.kind, change.key, change.deleted) == ("traffic", "TrafficRoute/cart", False)
        assert change.value == models.parse_input(models.TrafficRoute, route())
        assert [r.name for r in w.tracker.snapshot().routes] == ["cart"]
        rev2, _, _ = admin.set_route_weights("cart", [("east", "", 1), ("west", "", 1)])
        snap = w.wait_for(lambda s: s.revision >= rev2)
        assert [d.weight for d in snap.routes[0].rules[0].destinations] == [1, 1]
    finally:
        w.close()
    fresh = Watcher(fed.client(clusters["west"].gateway_dir))
    try:
        first = fresh.next()
        assert first.snapshot is not None and [r.name for r in first.snapshot.routes] == ["cart"]
        assert first.snapshot.policies == ()  # a route is never a policy (let alone a DENY)
        admin.delete_document("TrafficRoute", "cart")
        fresh.wait_for(lambda s: s.routes == ())
        assert [(c.kind, c.key, c.deleted) for m in fresh.all for c in m.changes] == [
            ("traffic", "TrafficRoute/cart", True)]
    finally:
        fresh.close()


def test_a_traffic_policy_is_stored_beside_routes_and_streamed_in_deltas_and_snapshots(
    fed, admin, clusters, etcd
) -> None:  # type: ignore[no-untyped-def]
    tp = {"kind": "TrafficPolicy", "name": "cart", "host": {"namespace": "shop", "service": "cart"},
          "connection_pool": {"max_requests": 10}, "outlier_detection": {"consecutive_5xx": 3}}
    w = Watcher(fed.client(clusters["west"].gateway_dir))
    try:
        assert w.next().snapshot is not None
        rev, outcomes, _ = admin.apply_documents([route(), tp])
        assert outcomes == ["created", "created"]
        assert etcd_get(etcd, "/isthmus/traffic/") == ["/isthmus/traffic/TrafficPolicy/cart",
                                                      "/isthmus/traffic/TrafficRoute/cart"]
        snap = w.wait_for(lambda s: s.revision >= rev)
        assert [p.connection_pool.max_requests for p in snap.traffic_policies] == [10]
        assert [r.name for r in snap.routes] == ["cart"]
    finally:
        w.close()
    fresh = Watcher(fed.client(clusters["west"].gateway_dir))
    try:
        first = fresh.next()
        assert first.snapshot is not None
        assert [p.name for p in first.snapshot.traffic_policies] == ["cart"]
        assert first.snapshot.traffic_policies[0] == models.parse_input(models.TrafficPolicy, tp)
        admin.delete_document("TrafficPolicy", "cart")
        fresh.wait_for(lambda s: s.traffic_policies == ())
    finally:
        fresh.close()


def test_status_reports_the_route_revision_each_gateway_applied(fed, admin, clusters) -> None:  # type: ignore[no-untyped-def]
    rev, _, _ = admin.apply_documents([route()])
    gw_east = "east/gateway-1"
    gw_west = "west/gateway-1"
    with fed.client(clusters["east"].gateway_dir) as e, fed.client(clusters["west"].gateway_dir) as w:
        e.report_applied(gw_east, rev)
        w.report_applied(gw_west, rev - 1)
        st = admin.status()
        assert st.route_revision == rev
        by = {g.gateway_id: g for g in st.gateways}
        assert by[gw_east].routes_applied and not by[gw_west].routes_applied
        # A policy is no route change: east still has the newest routes.
        admin.apply_documents([allow("p")])
        st = admin.status()
        assert st.route_revision == rev and st.policy_revision > rev
        assert {g.gateway_id: g.routes_applied for g in st.gateways} == {gw_east: True, gw_west: False}
        # Deleting one is a route change.
        admin.delete_document("TrafficRoute", "cart")
        assert admin.status().route_revision > st.policy_revision


def test_a_traffic_policy_change_moves_the_route_revision(fed, admin, clusters) -> None:  # type: ignore[no-untyped-def]
    """A TrafficPolicy steers traffic too (locality, breakers, ejections): a gateway has not
    applied the routes until it holds the policy's revision, as for a TrafficRoute."""
    rev, _, _ = admin.apply_documents([route()])
    gw = "east/gateway-1"
    tp = {"kind": "TrafficPolicy", "name": "cart", "host": {"namespace": "shop", "service": "cart"},
          "locality": "prefer-same-region"}
    with fed.client(clusters["east"].gateway_dir) as e:
        e.report_applied(gw, rev)
        assert next(g for g in admin.status().gateways if g.gateway_id == gw).routes_applied
        rev2, _, _ = admin.apply_documents([tp])
        st = admin.status()
        assert st.route_revision == rev2 > rev
        assert not next(g for g in st.gateways if g.gateway_id == gw).routes_applied
        e.report_applied(gw, rev2)
        assert next(g for g in admin.status().gateways if g.gateway_id == gw).routes_applied
        admin.delete_document("TrafficPolicy", "cart")
        assert admin.status().route_revision > rev2


def test_a_restarted_federation_knows_the_route_revision(fed, admin, clusters, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    admin.apply_documents([route()])
    rev, _, _ = admin.apply_documents([{"kind": "TrafficPolicy", "name": "cart",
                                         "host": {"namespace": "shop", "service": "cart"}}])
    admin.apply_documents([allow("p")])
    fed2 = restart_federation(fed)
    try:
        with fed2.client(pki.admin_dir) as c:
            st = c.status()
            assert st.route_revision == rev and st.policy_revision == rev + 1
    finally:
        fed2.stop()


def test_a_bad_route_record_in_etcd_is_skipped_and_counted_while_others_stream(
    fed_metrics, pki: Pki, etcd, tmp_path: Path  # noqa: F811 - the fixture
) -> None:  # type: ignore[no-untyped-def]
    fed, metrics_port = fed_metrics
    join_cluster(fed, pki, "east", tmp_path)
    west = join_cluster(fed, pki, "west", tmp_path)
    with fed.client(pki.admin_dir) as admin:
        admin.apply_documents([route("good", host="good")])
        before = invalid_records(metrics_port).get("traffic", 0.0)
        w = Watcher(fed.client(west.gateway_dir))
        try:
            w.wait_for(lambda s: [r.name for r in s.routes] == ["good"])
            etcdctl(etcd, "put", "/isthmus/traffic/TrafficRoute/junk", "{not json")
            wrong_name = route("other", host="x")
            etcdctl(etcd, "put", "/isthmus/traffic/TrafficRoute/mismatch", json.dumps(wrong_name))
            bad_regex = route("regex", {"match": [{"path": {"regex": "(("}}], "destinations": [{"cluster": "east"}]})
            etcdctl(etcd, "put", "/isthmus/traffic/TrafficRoute/regex", json.dumps(bad_regex))
            etcdctl(etcd, "put", "/isthmus/traffic/TrafficPolicy/future", json.dumps({"kind": "TrafficPolicy",
                                                                                       "name": "future"}))
            # The good route before them, and a later change, still stream.
            rev, _, _ = admin.apply_documents([route("later", host="later")])
            snap = w.wait_for(lambda s: s.revision >= rev)
            assert [r.name for r in snap.routes] == ["good", "later"]
            assert snap.policies == ()  # nothing was turned into a DENY
            assert [r.name for r in admin.list_routes()] == ["good", "later"]
            assert invalid_records(metrics_port).get("traffic", 0.0) - before == 4
            assert w.error is None
        finally:
            w.close()
        fresh = Watcher(fed.client(west.gateway_dir))
        try:
            first = fresh.next()
            assert first.snapshot is not None and [r.name for r in first.snapshot.routes] == ["good", "later"]
        finally:
            fresh.close()
        # The bad ones do not block applying a route for their host.
        assert admin.apply_documents([route("x", host="x")])[1] == ["created"]
        err = refused(lambda: admin.set_route_weights("junk", [("east", "", 1)]))
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION and "isthmus delete TrafficRoute junk" in err.details


# ---------------------------------------------------------------- the client's lenient reading (no etcd)


def test_an_unreadable_route_on_the_wire_is_skipped_and_reported_never_a_deny() -> None:
    good = json.dumps(route("good", host="good"))
    bad = route("bad", {"destinations": [{"cluster": "east", "weight": -3}]})
    reported: list[tuple[str, str, str]] = []
    hook = lambda kind, key, error: reported.append((kind, key, error))  # noqa: E731
    snap_json = json.dumps({"revision": 7, "routes": [json.loads(good), bad, "nonsense"], "policies": []})
    snap, keys = read_snapshot(snap_json, hook)
    assert [r.name for r in snap.routes] == ["good"] and snap.policies == () and keys == ()
    assert [(k, key) for k, key, _ in reported] == [("traffic", "TrafficRoute/bad"), ("traffic", "TrafficRoute/?")]
    assert "rules[0].destinations[0].weight" in reported[0][2]

    tracker = SnapshotTracker()
    tracker.apply(decode_event(pb.WatchEvent(revision=7, is_snapshot=True, snapshot_json=snap_json), hook))
    assert [r.name for r in tracker.snapshot().routes] == ["good"]
    reported.clear()
    event = pb.WatchEvent(revision=8, changes=[
        pb.Change(kind=pb.TRAFFIC, key="TrafficRoute/good", json=json.dumps(bad | {"name": "good"})),
        pb.Change(kind=pb.TRAFFIC, key="TrafficRoute/new", json=json.dumps(route("new", host="new"))),
        pb.Change(kind=pb.TRAFFIC, key="TrafficShaper/future", json='{"kind": "TrafficShaper"}'),  # newer server
        pb.Change(kind=pb.TRAFFIC, key="TrafficPolicy/broken", json='{"kind": "TrafficPolicy"}'),  # known, invalid
    ])
    message = decode_event(event, hook)
    assert [(c.kind, c.key, c.deleted) for c in message.changes] == [
        ("traffic", "TrafficRoute/good", True), ("traffic", "TrafficRoute/new", False),
        ("traffic", "TrafficPolicy/broken", True)]
    assert [(k, key) for k, key, _ in reported] == [("traffic", "TrafficRoute/good"), ("traffic", "TrafficPolicy/broken")]
    snap = tracker.apply(message)
    assert [r.name for r in snap.routes] == ["new"] and snap.policies == () and snap.revision == 8

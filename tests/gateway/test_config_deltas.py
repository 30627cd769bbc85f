"""A delta costs what it changed: the gateway derives the new state from the one in force
(gateway/_state.py, federation/snapshot_index.py), shares what did not change, and ends
with the very state a build from scratch makes; a delta that cannot be built is rejected
and the next one derives from the last good state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.client import Change, SnapshotTracker, WatchMessage
from federation.models import (
    ClusterRecord,
    ExportedService,
    FailoverTarget,
    RouteDestination,
    RouteHost,
    RouteRule,
    ServicePort,
    Snapshot,
    TrafficRoute,
)
from federation.snapshot_index import SHARDS, CowMap, Records, ServiceIndex, changed_span, changes_since
from gateway import Gateway
from gateway._errors import SnapshotRejected
from gateway._routes import build_routes
from gateway._state import ConfigState, build_state, empty_state

from .conftest import Pki, gateway_config

CLUSTERS = ("west", "east", "north")  # west: the gateway's own
NAMESPACES = ("default", "shop")
NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def west(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    return Gateway(gateway_config(pki, "west", tmp_path_factory.mktemp("deltas")))


def _build(gw: Gateway, snap: Snapshot, previous: ConfigState) -> ConfigState:
    return build_state(snap, "federation", cluster=gw.cluster, dns_suffix=gw.cfg.dns_suffix,
                       crl_file=gw.cfg.tls.crl_file, authz=gw.authz, previous=previous,
                       bundle_file=gw.cfg.tls.bundle_file)


def _scratch(gw: Gateway, snap: Snapshot) -> ConfigState:
    return _build(gw, snap, empty_state(gw.cluster, gw.cfg.dns_suffix, gw.authz))


def _split(g: Any) -> tuple[Any, ...]:
    return (g.targets, g.weights, g.label)


def _plan(p: Any) -> tuple[Any, ...]:
    rules = tuple((r.index, r.excluded, r.dests, tuple(map(_split, r.groups)),
                   tuple((s.spec, s.candidates, tuple(map(_split, s.groups))) for s in r.failover), r.exhausted)
                  for r in p.rules)
    return (p.namespace, p.service, p.port, p.route, rules, p.no_rule)


def _view(s: ConfigState) -> dict[str, Any]:
    """Everything requests and /config read of a state, as comparable values."""
    r, t = s.routes, s.traffic
    return {
        "revision": (s.revision, r.revision, t.revision, s.policy.revision),
        "outbound": dict(r.outbound.items()), "inbound": dict(r.inbound.items()),
        "peers": (r.peers_by_td, r.peers_by_name),
        "plans": {k: _plan(p) for k, p in t.plans.items()},
        "routes": (t.by_host, t.digest, t.stale, t.names),
        "policy": (s.policy.digest, s.policy.jwks_uris, s.policy.failed),
        "guards": (sorted(s.guards.rules), {k: (v.name, v.pool, v.outlier) for k, v in s.guards.services.items()}),
        "tracing": s.tracing,
        "revoked": s.revocations,
    }


def _service(cluster: str, ns: str, name: str, port: int, target_port: int, ready: int,
             export_to: tuple[str, ...]) -> ExportedService:
    target = f"10.0.0.1:{target_port}" if cluster == "west" else ""
    return ExportedService(cluster=cluster, namespace=ns, name=name, ready_endpoints=ready, export_to=export_to,
                           ports=(ServicePort(name="http", port=port, target=target),
                                  ServicePort(name="grpc", port=9090, protocol="GRPC")))


def _base() -> Snapshot:
    clusters = tuple(ClusterRecord(name=c, trust_domain=f"{c}.isthmus.local",
                                   gateway_addresses=(f"10.9.0.{i + 1}:15443",))
                     for i, c in enumerate(CLUSTERS))
    # a's route names b: a change of b's exports changes a's plan too.
    route = TrafficRoute(name="a-to-b", host=RouteHost(namespace="default", service="a"), rules=(
        RouteRule(destinations=(RouteDestination(cluster="east", service="b", weight=3),
                                RouteDestination(cluster="north")),
                  failover=(FailoverTarget(cluster="*", service="b"),)),))
    services = tuple(_service(c, ns, n, 8080, 8000, 3, ()) for c in CLUSTERS for ns in NAMESPACES for n in NAMES)
    return Snapshot(revision=1, clusters=clusters, services=services, routes=(route,))


_ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from(CLUSTERS), st.sampled_from(NAMESPACES), st.sampled_from(NAMES),
              st.sampled_from((80, 8080)), st.sampled_from((8000, 8001)), st.sampled_from((0, 3)),
              st.sampled_from(((), ("west",), ("east",)))),
    st.tuples(st.just("delete"), st.sampled_from(CLUSTERS), st.sampled_from(NAMESPACES), st.sampled_from(NAMES)),
    st.tuples(st.just("broken"), st.sampled_from(NAMESPACES), st.sampled_from(NAMES)),
), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops, burst=st.integers(1, 3), plain=st.booleans())
def test_a_delta_builds_the_state_a_full_build_makes(west: Gateway, ops: list[tuple[Any, ...]], burst: int,
                                                    plain: bool) -> None:
    """Random watch deltas (puts, deletes, a local export that cannot be built), folded by
    the tracker as the watch thread does, ``burst`` at a time (the control loop coalesces
    bursts): each derived state equals a state built from scratch, a rejected one leaves
    the last good state in force and the next delta derives from that.  ``plain``: the
    services as a plain tuple (no derivation steps: the identity scan finds the change)."""
    tracker = SnapshotTracker()
    base = _base()
    state = _build(west, tracker.apply(WatchMessage(1, snapshot=base)), empty_state("west", "isthmus.local", west.authz))
    rev = 1
    for i in range(0, len(ops), burst):
        for op in ops[i:i + burst]:
            rev += 1
            if op[0] == "put":
                _, c, ns, n, port, tport, ready, export_to = op
                svc = _service(c, ns, n, port, tport, ready, export_to)
                change = Change("service", f"{c}/{ns}/{n}", False, svc)
            elif op[0] == "delete":
                change = Change("service", f"{op[1]}/{op[2]}/{op[3]}", True)
            else:  # lenient readers may hand out a target without a port: the build refuses it
                bad = ServicePort.model_construct(name="http", port=80, target="localhost", protocol="HTTP",
                                                  target_tls="")
                svc = ExportedService(cluster="west", namespace=op[1], name=op[2], ports=(bad,))
                change = Change("service", f"west/{op[1]}/{op[2]}", False, svc)
            snap = tracker.apply(WatchMessage(rev, changes=(change,)))
        if plain:
            snap = snap.model_copy(update={"services": tuple(snap.services)})
        try:
            derived = _build(west, snap, state)
        except SnapshotRejected:
            with pytest.raises(SnapshotRejected):
                _scratch(west, snap)  # rejected from scratch too
            continue
        assert _view(derived) == _view(_scratch(west, snap))
        state = derived


def test_an_unchanged_service_keeps_its_built_objects(west: Gateway) -> None:
    """One changed export: its routes and plans are new, everyone else's are the objects
    of the state before, and so are the revocations, guards and the tables' shards."""
    tracker = SnapshotTracker()
    first = tracker.apply(WatchMessage(1, snapshot=_base()))
    before = _build(west, first, empty_state("west", "isthmus.local", west.authz))
    moved = _service("east", "shop", "c", 8080, 8001, 0, ())
    second = tracker.apply(WatchMessage(2, changes=(Change("service", "east/shop/c", False, moved),)))
    assert second.clusters is first.clusters and second.routes is first.routes  # the tracker shares kinds
    after = _build(west, second, before)

    assert after.routes.index is not None and after.routes.index.changed == {("shop", "c")}
    old_out, new_out = before.routes.outbound, after.routes.outbound
    assert new_out[("c.shop.east.isthmus.local", 8080)] is not old_out[("c.shop.east.isthmus.local", 8080)]
    assert new_out[("b.shop.east.isthmus.local", 8080)] is old_out[("b.shop.east.isthmus.local", 8080)]
    assert new_out[("c.shop.isthmus.local", 8080)] is not old_out[("c.shop.isthmus.local", 8080)]
    assert after.traffic.plans[("shop", "b", 8080)] is before.traffic.plans[("shop", "b", 8080)]
    assert after.traffic.plans[("shop", "c", 8080)] is not before.traffic.plans[("shop", "c", 8080)]
    assert after.revocations is before.revocations and after.guards is before.guards
    own_a = (_service("west", "default", "a", 8080, 8000, 3, ()).hostname, 8080)  # west's own, untouched
    assert after.routes.inbound[own_a] is before.routes.inbound[own_a]
    assert isinstance(new_out, CowMap)
    # Only the leaves holding shop/c's entries were copied; the others are shared.
    own = {(hash(k) & (SHARDS - 1)) * SHARDS + ((hash(k) >> 8) & (SHARDS - 1))
           for k, v in old_out.items() if (v.namespace, v.service) == ("shop", "c")}
    copied = {i for i, (a, b) in enumerate(zip(new_out.leaves(), old_out.leaves())) if a is not b}
    assert copied and copied <= own
    # b's exports feed a's route (a-to-b): a changed b rebuilds a's plan too.
    b_moved = _service("east", "default", "b", 8080, 8000, 0, ())
    third = tracker.apply(WatchMessage(3, changes=(Change("service", "east/default/b", False, b_moved),)))
    again = _build(west, third, after)
    assert again.traffic.plans[("default", "a", 8080)] is not after.traffic.plans[("default", "a", 8080)]
    assert again.traffic.plans[("default", "c", 8080)] is after.traffic.plans[("default", "c", 8080)]
    assert _view(again) == _view(_scratch(west, third))
    # The state before is untouched: a request still holding it sees its revision.
    assert before.routes.outbound[("c.shop.east.isthmus.local", 8080)].clusters[0].name == "east"
    assert _view(before) == _view(_scratch(west, first))


def test_the_changed_span_and_the_index_follow_identity() -> None:
    """changed_span skips the shared prefix and suffix; an index of records that are not
    the same objects (another snapshot's, equal or not) treats them as changed."""
    svcs = tuple(_service(c, "default", n, 8080, 8000, 3, ()) for c in CLUSTERS for n in NAMES)
    extra = _service("east", "default", "z", 8080, 8000, 3, ())
    # Records (the tracker's tuples) say what they changed since an earlier generation.
    r0 = Records.derive(svcs, None, None, None)
    r1 = Records.derive((*svcs, extra), r0, (), (extra,))
    r2 = Records.derive(svcs, r1, (extra,), ())
    assert changes_since(r0, r2) == [((), (extra,)), ((extra,), ())] and changes_since(r1, r2) == [((extra,), ())]
    assert changes_since(svcs, r2) is None and changes_since(r2, r0) is None and r2 == svcs
    assert changed_span(svcs, svcs) == ((), ())
    assert changed_span(svcs, (*svcs[:4], extra, *svcs[4:])) == ((), (extra,))
    assert changed_span(svcs, svcs[:4] + svcs[5:]) == ((svcs[4],), ())
    first = ServiceIndex.of(svcs)
    assert first.changed is None and not first.derived_from(None)
    copies = tuple(s.model_copy() for s in svcs)
    second = ServiceIndex.of(copies, first)
    assert second.derived_from(first) and second.changed == {("default", n) for n in NAMES}
    assert dict(second.groups.items()) == dict(ServiceIndex.of(copies).groups.items())
    # Two records for one (cluster, namespace, name): the later wins, as in a dict.
    dup = ServiceIndex.of((*svcs, extra.model_copy(update={"ready_endpoints": 0}), extra))
    assert dup.duplicates == 1 and dup.groups[("default", "z")]["east"] is extra


def test_the_last_known_good_file_holds_the_snapshot_as_loaded_back(west: Gateway, tmp_path: Path) -> None:
    """save_lkg splices pydantic's JSON into the file (one serialisation): load_lkg reads
    back the same snapshot."""
    from gateway._control import load_lkg, save_lkg

    snap = _base()
    path = tmp_path / "lkg.json"
    save_lkg(path, snap, "west", ["sha256:x"])
    assert load_lkg(path, "west") == snap


# ---------------------------------------------------------------- the route table's own edges

def _cluster(name: str) -> ClusterRecord:
    return ClusterRecord(name=name, trust_domain=f"{name}.isthmus.local", gateway_addresses=("10.9.0.1:15443",))


def _cart(cluster: str, name: str = "cart", export_to: tuple[str, ...] = ()) -> ExportedService:
    return ExportedService(cluster=cluster, namespace="shop", name=name, export_to=export_to,
                           ports=(ServicePort(port=8080, target="10.0.0.1:80" if cluster == "west" else ""),))


def _delta(local: str, clusters: tuple[str, ...], before: tuple[ExportedService, ...],
           after: tuple[ExportedService, ...], previous_local: str | None = None,
           suffix: str = "isthmus.local", previous_suffix: str | None = None) -> tuple[Any, Any]:
    """(the table a delta from ``before`` to ``after`` builds, the table a full build makes)."""
    return _delta3(local, clusters, before, after, previous_local, suffix, previous_suffix)[:2]


def _delta3(local: str, clusters: tuple[str, ...], before: tuple[ExportedService, ...],
            after: tuple[ExportedService, ...], previous_local: str | None = None,
            suffix: str = "isthmus.local", previous_suffix: str | None = None) -> tuple[Any, Any, Any]:
    """:func:`_delta`'s two tables and the previous one."""
    cs = tuple(map(_cluster, clusters))
    first = build_routes(Snapshot(revision=1, clusters=cs, services=before), previous_local or local,
                         previous_suffix or suffix)
    snap = Snapshot(revision=2, clusters=cs, services=after)
    index = ServiceIndex.of(snap.services, first.index)
    assert index.derived_from(first.index)
    return build_routes(snap, local, suffix, index=index, previous=first), build_routes(snap, local, suffix), first


def _fresh(s: str) -> str:
    """An equal string that is another object (config and snapshot strings never are one)."""
    out = "".join(list(s))
    assert out == s and out is not s
    return out


# Two (namespace, name)s can answer to one name: cart exported by cluster "east--c" and
# cart--east exported by cluster "c" share the mirror name cart--east--c (names.mirror_name).
MEETING = "cart--east--c.shop.svc"


@pytest.mark.parametrize("first, second", [(_cart("east--c"), _cart("c", "cart--east")),
                                           (_cart("c", "cart--east"), _cart("east--c"))],
                         ids=["cart first", "cart--east first"])
def test_two_services_answering_to_one_name_mark_the_table_and_a_delta_defers_to_a_full_build(
        first: ExportedService, second: ExportedService) -> None:
    clusters = ("west", "east--c", "c")
    alone, _ = _delta("west", clusters, (), (first,))
    assert not alone.shadowed
    delta, full = _delta("west", clusters, (first,), (first, second))
    assert full.shadowed and delta.shadowed  # the delta saw the clash and built from scratch
    assert dict(delta.outbound.items()) == dict(full.outbound.items())
    assert full.outbound[(MEETING, 8080)].service == "cart--east"  # the later (namespace, name) in order
    both, full = _delta("west", clusters, (), (first, second))  # both arrive in one delta
    assert both.shadowed and dict(both.outbound.items()) == dict(full.outbound.items())


def test_a_record_hidden_from_this_cluster_leaves_the_next_clusters_record_routed() -> None:
    """east exports cart to north only: south's gateway skips east's record and still
    routes west's, the next one in cluster order."""
    delta, full = _delta("south", ("south", "east", "west"), (),
                         (_cart("east", export_to=("north",)), _cart("west")))
    for t in (delta, full):
        assert ("cart.shop.east.isthmus.local", 8080) not in t.outbound
        assert t.outbound[("cart.shop.west.isthmus.local", 8080)].clusters[0].name == "west"
        fed = t.outbound[("cart.shop.isthmus.local", 8080)]
        assert [c.name for c in fed.clusters] == ["west"] and fed.federated  # a TrafficRoute may govern it
        assert not t.outbound[("cart.shop.west.isthmus.local", 8080)].federated  # a pin: never re-routed


def test_records_before_the_one_this_cluster_routes_never_stop_the_group() -> None:
    """In cluster order: a record with no ports and the gateway's own cluster's record come
    before west's, which is still routed (and the own one served inbound)."""
    portless = ExportedService(cluster="central", namespace="shop", name="cart", ports=())
    delta, full = _delta("east", ("central", "east", "west"), (), (portless, _cart("east"), _cart("west")))
    for t in (delta, full):
        assert ("cart.shop.west.isthmus.local", 8080) in t.outbound
        assert [c.name for c in t.outbound[("cart.shop.isthmus.local", 8080)].clusters] == ["west"]
        assert ("cart.shop.svc.cluster.local", 8080) in t.inbound


def test_names_from_config_and_snapshot_compare_by_value() -> None:
    """The gateway's cluster name and DNS suffix come from its config, records from the
    wire: equal strings, never the same objects. The own cluster's export is served, the own
    cluster is no peer, and a delta still derives from the previous table."""
    services = (_cart("west"), _cart("east"), _cart("east", "other"))
    delta, full, first = _delta3(_fresh("west"), ("west", "east"), services,
                                 (*services[:2], _cart("east", "other", export_to=("north",))),
                                 previous_local=_fresh("west"), suffix=_fresh("isthmus.local"),
                                 previous_suffix=_fresh("isthmus.local"))
    for t in (delta, full):
        assert ("cart.shop.svc.cluster.local", 8080) in t.inbound
        assert "west" not in t.peers_by_name and set(t.peers_by_name) == {"east"}
    key = ("cart.shop.east.isthmus.local", 8080)  # cart is unchanged: its entry is shared
    assert delta.outbound[key] is first.outbound[key] and full.outbound[key] is not first.outbound[key]
    assert dict(delta.outbound.items()) == dict(full.outbound.items())


@pytest.mark.parametrize("previous_local, local, previous_suffix", [
    ("zz", "aa", "isthmus.local"), ("aa", "zz", "isthmus.local"),
    ("zz", "zz", "a.local"), ("zz", "zz", "z.local")])
def test_a_table_of_another_cluster_or_suffix_is_never_a_delta_base(
        previous_local: str, local: str, previous_suffix: str) -> None:
    before = (_cart("east"), _cart(previous_local))
    after = (*before, _cart(local, "other"))
    delta, full = _delta(local, ("east",), before, after, previous_local=previous_local,
                         previous_suffix=previous_suffix)
    assert dict(delta.inbound.items()) == dict(full.inbound.items())
    assert dict(delta.outbound.items()) == dict(full.outbound.items())

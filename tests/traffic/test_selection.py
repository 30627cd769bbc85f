"""federation/traffic.py: each case of selection, one test apiece (property tests are in
test_properties.py)."""

from __future__ import annotations

import pytest

from federation.models import ExportedService, ServicePort
from federation.traffic import (
    CALLER,
    NO_ENDPOINTS,
    NO_GATEWAY,
    NO_PORT,
    NOT_EXPORTED,
    NOT_EXPORTED_TO_CALLER,
    NOT_JOINED,
    REVOKED,
    Request,
    RouteConflict,
    compile_routes,
)

from .helpers import NS, cluster, down, export, route, snapshot, spread

CLUSTERS = [cluster(c) for c in ("east", "west", "central", "north", "south")]
CART = [export(c) for c in ("east", "west", "central", "north")]
CANARY = {"match": [{"headers": {"x-canary": {"exact": "1"}}}], "destinations": [{"cluster": "west", "service": "cart-v2"}]}
SPLIT = {"destinations": [{"cluster": "east", "weight": 90}, {"cluster": "west", "weight": 10}],
         "failover": ["central", "*"]}


def rs_of(rules: list[dict], services=None, clusters=None, caller: str = "south", **kw):  # type: ignore[no-untyped-def]
    services = CART + [export("west", "cart-v2")] if services is None else services
    return compile_routes(snapshot(clusters or CLUSTERS, services, [route(rules, **kw)]), caller)


def test_weights_split_the_traffic_in_proportion() -> None:
    got = spread(rs_of([SPLIT]), n=10000)
    assert set(got) == {("east", "cart"), ("west", "cart")}
    assert 0.08 < got[("west", "cart")] / 10000 < 0.12


def test_weights_are_normalised_not_percentages() -> None:
    got = spread(rs_of([{"destinations": [{"cluster": "east", "weight": 3}, {"cluster": "west", "weight": 1}]}]), n=8000)
    assert 0.70 < got[("east", "cart")] / 8000 < 0.80


def test_a_zero_weight_destination_takes_nothing() -> None:
    got = spread(rs_of([{"destinations": [{"cluster": "east", "weight": 5}, {"cluster": "west", "weight": 0}]}]))
    assert set(got) == {("east", "cart")}


def test_an_unhealthy_destinations_weight_goes_to_the_healthy_ones() -> None:
    rules = [{"destinations": [{"cluster": "east", "weight": 50}, {"cluster": "west", "weight": 30},
                               {"cluster": "central", "weight": 20}]}]
    got = spread(rs_of(rules), health=down("east"), n=10000)
    assert set(got) == {("west", "cart"), ("central", "cart")}
    assert 0.56 < got[("west", "cart")] / 10000 < 0.64  # 30 / (30 + 20)


def test_all_weighted_down_tries_failover_in_order() -> None:
    rs = rs_of([SPLIT])
    assert set(spread(rs, health=down("east", "west"))) == {("central", "cart")}
    # "*" is every other exporting cluster not listed yet: north
    assert set(spread(rs, health=down("east", "west", "central"))) == {("north", "cart")}


def test_failover_exhausted_means_no_destination() -> None:
    rs = rs_of([SPLIT])
    sel = rs.select(NS, "cart", 8080, Request(), down("east", "west", "central", "north"))
    assert sel is not None and sel.target is None and sel.tier == "none"
    assert sel.route == "cart" and sel.rule == 0


def test_star_spreads_evenly_over_its_healthy_clusters() -> None:
    rs = rs_of([{"destinations": [{"cluster": "east"}], "failover": ["*"]}])
    got = spread(rs, health=down("east"), n=6000)
    assert set(got) == {("west", "cart"), ("central", "cart"), ("north", "cart")}
    assert all(1700 < n < 2300 for n in got.values()), got


def test_first_matching_rule_wins_and_header_match_picks_another_service() -> None:
    rs = rs_of([CANARY, SPLIT])
    sel = rs.select(NS, "cart", 8080, Request(headers={"x-canary": "1"}))
    assert sel is not None and sel.target is not None and sel.rule == 0
    assert (sel.target.cluster, sel.target.service) == ("west", "cart-v2")
    assert sel.target.authority == "cart-v2.shop.svc.cluster.local:8080"
    other = rs.select(NS, "cart", 8080, Request(headers={"x-canary": "2"}))
    assert other is not None and other.rule == 1


@pytest.mark.parametrize("match, req, hit", [
    ({"path": {"exact": "/api"}}, Request("GET", "/api?x=1"), True),  # the query is not part of the path
    ({"path": {"exact": "/api"}}, Request("GET", "/api/"), False),
    ({"path": {"prefix": "/api/"}}, Request("GET", "/api/v1"), True),
    ({"path": {"prefix": "/api/"}}, Request("GET", "/apix"), False),
    ({"path": {"regex": "^/v[0-9]+/items$"}}, Request("GET", "/v12/items"), True),
    ({"path": {"regex": "^/v[0-9]+/items$"}}, Request("GET", "/v12/items/3"), False),
    ({"method": "POST"}, Request("POST", "/"), True),
    ({"method": "POST"}, Request("GET", "/"), False),
    ({"headers": {"x-user": {"prefix": "adm"}}}, Request(headers={"X-User": "admin"}), True),
    ({"headers": {"x-user": {"regex": "^a.*n$"}}}, Request(headers={"x-user": "admin"}), True),
    ({"headers": {"x-user": {"present": True}}}, Request(headers={"x-user": ""}), True),
    ({"headers": {"x-user": {"present": True}}}, Request(), False),
    ({"headers": {"x-user": {"present": False}}}, Request(), True),
    ({"headers": {"x-user": {"exact": "a"}}}, Request(), False),
    ({"source_clusters": ["south"]}, Request(), True),
    ({"source_clusters": ["east"]}, Request(), False),
    ({"path": {"prefix": "/"}, "method": "GET"}, Request("GET", "/", tcp=True), False),  # TCP: no HTTP match holds
    ({"source_clusters": ["south"]}, Request(tcp=True), True),
])
def test_each_match_condition(match: dict, req: Request, hit: bool) -> None:
    rs = rs_of([{"match": [match], "destinations": [{"cluster": "west"}]}, {"destinations": [{"cluster": "east"}]}])
    sel = rs.select(NS, "cart", 8080, req)
    assert sel is not None and sel.target is not None
    assert (sel.target.cluster == "west") is hit


def test_a_rules_matches_are_alternatives_and_a_matchs_conditions_all_hold() -> None:
    rule = {"match": [{"method": "POST", "path": {"prefix": "/a"}}, {"headers": {"x-b": {"present": True}}}],
            "destinations": [{"cluster": "west"}]}
    rs = rs_of([rule, {"destinations": [{"cluster": "east"}]}])
    cluster_of = lambda r: rs.select(NS, "cart", 8080, r).target.cluster  # type: ignore[union-attr]  # noqa: E731
    assert cluster_of(Request("POST", "/a1")) == "west"
    assert cluster_of(Request("GET", "/a1")) == "east"  # only one condition of the first
    assert cluster_of(Request("GET", "/", {"x-b": "1"})) == "west"


def test_repeated_header_fields_match_as_one_comma_joined_value() -> None:
    rs = rs_of([{"match": [{"headers": {"x-tag": {"exact": "a,b"}}}], "destinations": [{"cluster": "west"}]},
                {"destinations": [{"cluster": "east"}]}])
    sel = rs.select(NS, "cart", 8080, Request(raw=[(b"x-tag", b"a"), (b"x-tag", b"b")]))
    assert sel is not None and sel.target is not None and sel.target.cluster == "west"


def test_no_matching_rule_means_no_destination() -> None:
    rs = rs_of([CANARY])
    sel = rs.select(NS, "cart", 8080, Request())
    assert sel is not None and sel.target is None and sel.tier == "no-rule" and sel.rule is None


def test_without_a_route_the_name_spreads_evenly_over_healthy_clusters() -> None:
    rs = compile_routes(snapshot(CLUSTERS, CART), "south")
    got = spread(rs, n=8000)
    assert set(got) == {(c, "cart") for c in ("east", "west", "central", "north")}
    assert all(1700 < n < 2300 for n in got.values()), got
    assert set(spread(rs, health=down("east", "west"))) == {("central", "cart"), ("north", "cart")}
    sel = rs.select(NS, "cart", 8080, Request(), down("east", "west", "central", "north"))
    assert sel is not None and sel.target is None and sel.route == "" and sel.tier == "none"


@pytest.mark.parametrize("services, clusters, code", [
    ([export("east", export_to=("north",))], CLUSTERS, NOT_EXPORTED_TO_CALLER),
    ([export("central")], CLUSTERS, NOT_EXPORTED),
    ([export("east", ready_endpoints=0, endpoints_known=True)], CLUSTERS, NO_ENDPOINTS),
    ([export("east", ports=(9090, 9091))], CLUSTERS, NO_PORT),
    ([export("east")], [cluster("east", revoked=True), *CLUSTERS[1:]], REVOKED),
    ([export("east")], [cluster("east", addresses=()), *CLUSTERS[1:]], NO_GATEWAY),
    ([export("east")], CLUSTERS[1:], NOT_JOINED),
])
def test_a_destination_that_cannot_serve_the_caller_drops_out_and_explain_says_why(
        services: list[ExportedService], clusters: list, code: str) -> None:
    # west exports cart (so the name exists); east is the destination under test
    rs = rs_of([{"destinations": [{"cluster": "east", "weight": 9}, {"cluster": "west", "weight": 1}]}],
               services=[export("west"), *services], clusters=clusters)
    assert set(spread(rs, n=200)) == {("west", "cart")}
    doc = rs.explain("cart.shop.isthmus.local:8080", Request())
    east = next(d for d in doc["destinations"] if d["cluster"] == "east")
    assert east["state"] == "out" and east["reason"] == code, east
    assert next(d for d in doc["destinations"] if d["cluster"] == "west")["effective_weight"] == 100.0


def test_ready_endpoints_zero_counts_only_when_the_count_is_known() -> None:
    rs = rs_of([{"destinations": [{"cluster": "east"}]}], services=[export("east", ready_endpoints=0)])
    assert set(spread(rs, n=50)) == {("east", "cart")}


def test_the_calling_cluster_is_never_a_destination() -> None:
    rs = rs_of([{"destinations": [{"cluster": "south"}, {"cluster": "east"}]}],
               services=[*CART, export("south")])
    assert set(spread(rs, n=200)) == {("east", "cart")}
    doc = rs.explain("cart.shop.isthmus.local", Request())
    assert next(d for d in doc["destinations"] if d["cluster"] == "south")["reason"] == CALLER


def test_another_services_only_port_stands_in_for_the_requested_one() -> None:
    services = [*CART, ExportedService(cluster="west", namespace=NS, name="cart-v2", ports=(ServicePort(port=9000),))]
    rs = rs_of([CANARY], services=services)
    sel = rs.select(NS, "cart", 8080, Request(headers={"x-canary": "1"}))
    assert sel is not None and sel.target is not None and sel.target.authority == "cart-v2.shop.svc.cluster.local:9000"


def test_prefer_same_region_sends_to_the_callers_region_first() -> None:
    clusters = [cluster("east", "eu"), cluster("west", "us"), cluster("central", "us"), cluster("south", "us")]
    services = [export(c) for c in ("east", "west", "central")]
    rules = [{"destinations": [{"cluster": "east", "weight": 80}, {"cluster": "west", "weight": 20}],
              "failover": ["*"]}]
    rs = rs_of(rules, services=services, clusters=clusters, locality="prefer-same-region")
    assert set(spread(rs)) == {("west", "cart")}
    assert set(spread(rs, health=down("west"))) == {("east", "cart")}  # the split before failover
    # failover "*": same region first
    assert set(spread(rs, health=down("west", "east"))) == {("central", "cart")}
    plain = rs_of(rules, services=services, clusters=clusters)
    assert set(spread(plain)) == {("east", "cart"), ("west", "cart")}


def test_a_caller_without_a_region_ignores_locality() -> None:
    clusters = [cluster("east", "eu"), cluster("west", "us"), cluster("south")]
    rs = rs_of([{"destinations": [{"cluster": "east"}, {"cluster": "west"}]}], services=[export("east"), export("west")],
               clusters=clusters, locality="prefer-same-region")
    assert set(spread(rs)) == {("east", "cart"), ("west", "cart")}


def test_source_clusters_are_decided_when_compiling() -> None:
    rule = {"match": [{"source_clusters": ["north"]}], "destinations": [{"cluster": "west"}]}
    rules = [rule, {"destinations": [{"cluster": "east"}]}]
    assert set(spread(rs_of(rules, caller="south"), n=50)) == {("east", "cart")}
    assert set(spread(rs_of(rules, services=[*CART, export("south")], caller="north"), n=50)) == {("west", "cart")}


def test_two_routes_for_one_host_do_not_compile() -> None:
    snap = snapshot(CLUSTERS, CART, [route([SPLIT], name="b"), route([SPLIT], name="a")])
    with pytest.raises(RouteConflict) as e:
        compile_routes(snap, "south")
    assert "'a' and 'b'" in str(e.value)


def test_a_route_for_a_name_nobody_exports_compiles_to_nothing_selectable() -> None:
    rs = compile_routes(snapshot(CLUSTERS, CART, [route([SPLIT], name="pay", service="pay")]), "south")
    assert rs.names == ["pay"] and rs.select(NS, "pay", 8080, Request()) is None
    doc = rs.explain("pay.shop.isthmus.local", Request())
    assert doc["result"]["outcome"] == "no-such-name"


def test_the_digest_changes_with_the_routes_only() -> None:
    a = compile_routes(snapshot(CLUSTERS, CART, [route([SPLIT])], revision=1), "south")
    b = compile_routes(snapshot(CLUSTERS, CART[:2], [route([SPLIT])], revision=2), "south")
    c = compile_routes(snapshot(CLUSTERS, CART, [route([CANARY, SPLIT])], revision=3), "south")
    assert a.digest == b.digest != c.digest


# ---------------------------------------------------------------- TrafficPolicy.locality

REGIONS = [cluster("east", "eu"), cluster("west", "us"), cluster("central", "us"), cluster("south", "us")]
THREE = [export(c) for c in ("east", "west", "central")]


def _with_policy(routes: list, locality: str = "prefer-same-region", service: str = "cart"):  # type: ignore[no-untyped-def]
    from federation.models import Snapshot, TrafficPolicy
    tp = TrafficPolicy.model_validate({"name": service, "host": {"namespace": NS, "service": service},
                                       "locality": locality})
    return compile_routes(Snapshot(revision=1, clusters=tuple(REGIONS), services=tuple(THREE), routes=tuple(routes),
                                   traffic_policies=(tp,)), "south")


def test_a_policys_locality_keeps_a_name_without_a_route_in_the_callers_region() -> None:
    plain = compile_routes(snapshot(REGIONS, THREE), "south")
    assert set(spread(plain)) == {("east", "cart"), ("west", "cart"), ("central", "cart")}
    rs = _with_policy([])
    got = spread(rs, n=4000)
    assert set(got) == {("west", "cart"), ("central", "cart")}  # us, evenly
    assert 1700 < got[("west", "cart")] < 2300
    # unhealthy same-region destinations fall back to the other region
    assert set(spread(rs, health=down("west"))) == {("central", "cart")}
    assert set(spread(rs, health=down("west", "central"))) == {("east", "cart")}


def test_a_policys_locality_applies_to_a_route_that_leaves_its_own_out() -> None:
    rules = [{"destinations": [{"cluster": "east", "weight": 80}, {"cluster": "west", "weight": 20}],
              "failover": ["*"]}]
    rs = _with_policy([route(rules)])
    assert set(spread(rs)) == {("west", "cart")}
    assert set(spread(rs, health=down("west"))) == {("east", "cart")}
    assert set(spread(rs, health=down("west", "east"))) == {("central", "cart")}  # "*": same region first
    # The route's own setting wins when set (the policy's is the default): the same here.
    assert set(spread(_with_policy([route(rules, locality="prefer-same-region")], locality=""))) == {("west", "cart")}


def test_a_policy_for_another_service_leaves_the_route_alone() -> None:
    rules = [{"destinations": [{"cluster": "east"}, {"cluster": "west"}]}]
    rs = _with_policy([route(rules)], service="pay")
    assert set(spread(rs)) == {("east", "cart"), ("west", "cart")}

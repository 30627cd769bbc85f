"""RouteSet.explain: the matched rule, effective weights after health, failover order, and
why every exporting cluster is in or out — from the same selection the gateway runs."""

from __future__ import annotations

from federation.traffic import STALE, Out, Request, compile_routes

from .helpers import cluster, down, export, route, snapshot, spread

CLUSTERS = [cluster(c) for c in ("east", "west", "central", "north", "south")]
SERVICES = [export("east"), export("west"), export("central"), export("north", export_to=("east",)),
            export("west", "cart-v2")]
RULES = [
    {"match": [{"headers": {"x-canary": {"exact": "1"}}}], "destinations": [{"cluster": "west", "service": "cart-v2"}]},
    {"destinations": [{"cluster": "east", "weight": 90}, {"cluster": "west", "weight": 10}], "failover": ["central", "*"]},
]
HOST = "cart.shop.isthmus.local:8080"


def rs():  # type: ignore[no-untyped-def]
    return compile_routes(snapshot(CLUSTERS, SERVICES, [route(RULES)], revision=42), "south")


def by_cluster(entries: list[dict]) -> dict[str, dict]:
    return {e["cluster"]: e for e in entries}


def test_explain_names_the_rule_weights_failover_and_every_exporter() -> None:
    doc = rs().explain(HOST, Request("GET", "/"))
    assert doc["route"] == "cart" and doc["rule"] == 1 and doc["revision"] == 42
    assert doc["rules"][0]["matched"] is False and "x-canary" in doc["rules"][0]["why"]
    assert [(d["cluster"], d["weight"], d["effective_weight"]) for d in doc["destinations"]] == [
        ("east", 90, 90.0), ("west", 10, 10.0)]
    # failover order: central, then "*" = every other exporter not listed yet (north is
    # not exported to south, so it is out with its reason)
    assert [(f["step"], f["spec"], f["cluster"], f["state"]) for f in doc["failover"]] == [
        (0, "central", "central", "standby"), (1, "*", "north", "out")]
    assert by_cluster(doc["failover"])["north"]["reason"] == "not-exported-to-caller"
    c = by_cluster(doc["clusters"])
    assert c["east"]["state"] == c["west"]["state"] == "serving"
    assert c["central"]["state"] == "standby" and c["north"]["state"] == "out"
    assert doc["result"] == {"outcome": "split", "status": 200, "flags": None, "detail": ""}


def test_explain_with_health_agrees_with_selection() -> None:
    routes = rs()
    health = down("east")
    doc = routes.explain(HOST, Request(), health)
    assert [(d["cluster"], d["state"], d["effective_weight"]) for d in doc["destinations"]] == [
        ("east", "out", 0.0), ("west", "serving", 100.0)]
    assert set(spread(routes, health=health, n=500)) == {("west", "cart")}
    doc = routes.explain(HOST, Request(), down("east", "west"))
    assert doc["result"]["outcome"] == "failover"
    assert doc["serving"] == [{"cluster": "central", "service": "cart", "effective_weight": 100.0}]
    doc = routes.explain(HOST, Request(), down("east", "west", "central"))
    assert doc["result"] == {"outcome": "no-healthy-destination", "status": 503, "flags": "UH",
                             "detail": "every destination and failover target is out"}


def test_explain_reports_the_federations_liveness_as_given() -> None:
    stale = lambda t: Out(STALE, "last heartbeat 40s ago") if t.cluster == "east" else None  # noqa: E731
    doc = rs().explain(HOST, Request(), stale)
    east = by_cluster(doc["destinations"])["east"]
    assert east["reason"] == "stale" and "40s" in east["detail"]


def test_the_header_match_explains_the_other_service() -> None:
    doc = rs().explain(HOST, Request("GET", "/", {"X-Canary": "1"}))
    assert doc["rule"] == 0 and doc["request"]["headers"] == {"x-canary": "1"}
    assert doc["serving"] == [{"cluster": "west", "service": "cart-v2", "effective_weight": 100.0}]
    # the host service's exporters are listed too, as not named by this rule
    c = {(e["cluster"], e["service"]): e for e in doc["clusters"]}
    assert c[("east", "cart")]["state"] == "unused" and c[("west", "cart-v2")]["state"] == "serving"


def test_a_per_cluster_name_is_a_pin() -> None:
    doc = rs().explain("cart.shop.central.isthmus.local:8080", Request(), down("central"))
    assert doc["pinned"] == "central" and doc["result"]["outcome"] == "pinned" and doc["route"] is None
    assert doc["serving"] == [{"cluster": "central", "service": "cart", "effective_weight": 100.0}]
    assert rs().explain("cart--central.shop:8080", Request())["pinned"] == "central"


def test_a_pin_the_caller_cannot_use_is_no_such_name_with_the_reason() -> None:
    doc = rs().explain("cart.shop.north.isthmus.local", Request())
    assert doc["result"]["outcome"] == "no-such-name" and doc["clusters"][0]["reason"] == "not-exported-to-caller"


def test_unknown_names_and_unmatched_requests() -> None:
    assert rs().explain("nope.shop.isthmus.local", Request())["result"]["status"] == 404
    only_canary = compile_routes(snapshot(CLUSTERS, SERVICES, [route(RULES[:1])]), "south")
    doc = only_canary.explain(HOST, Request())
    assert doc["result"]["outcome"] == "no-rule" and doc["result"]["flags"] == "NR"


def test_the_default_port_and_the_federated_mirror_name() -> None:
    doc = rs().explain("cart--isthmus.shop.svc.cluster.local", Request())
    assert doc["service"] == {"namespace": "shop", "name": "cart", "port": 8080} and doc["rule"] == 1


def test_a_tcp_connection_skips_rules_with_http_matches() -> None:
    doc = rs().explain(HOST, Request(tcp=True))
    assert doc["rule"] == 1 and "TCP" in doc["rules"][0]["why"] and doc["request"]["tcp"] is True


def test_no_route_explains_the_even_spread() -> None:
    plain = compile_routes(snapshot(CLUSTERS, SERVICES), "south")
    doc = plain.explain(HOST, Request(), down("west"))
    assert doc["route"] is None and doc["rule"] is None
    assert {d["cluster"]: d["effective_weight"] for d in doc["destinations"]} == {
        "east": 50.0, "west": 0.0, "central": 50.0, "north": 0.0}
    assert by_cluster(doc["destinations"])["north"]["reason"] == "not-exported-to-caller"


def test_a_name_exported_to_others_only_says_why_for_each_exporter() -> None:
    only_east = [export("west", export_to=("east",)), export("central", export_to=("east",))]
    doc = compile_routes(snapshot(CLUSTERS, only_east), "south").explain("cart.shop.isthmus.local", Request())
    assert doc["result"]["outcome"] == "no-such-name"
    assert {c["cluster"]: c["reason"] for c in doc["clusters"]} == {
        "west": "not-exported-to-caller", "central": "not-exported-to-caller"}


def test_explain_says_where_the_locality_comes_from() -> None:
    from federation.models import TrafficPolicy

    clusters = [cluster("east", "eu"), cluster("west", "us"), cluster("south", "eu")]
    services = [export("east"), export("west")]
    pol = TrafficPolicy.model_validate({"name": "cart", "host": {"namespace": "shop", "service": "cart"},
                                        "locality": "prefer-same-region"})

    def doc(routes: list, policies: list) -> dict:  # type: ignore[type-arg]
        snap = snapshot(clusters, services, routes).model_copy(update={"traffic_policies": tuple(policies)})
        return compile_routes(snap, "south").explain(HOST, Request())["locality"]

    assert doc([], []) == {"mode": None, "from": None, "region": "eu"}
    assert doc([], [pol]) == {"mode": "prefer-same-region", "from": "traffic-policy", "region": "eu"}
    assert doc([route([{"destinations": [{"cluster": "east"}, {"cluster": "west"}]}])], [pol]) == {
        "mode": "prefer-same-region", "from": "traffic-policy", "region": "eu"}
    own = route([{"destinations": [{"cluster": "east"}, {"cluster": "west"}]}], locality="prefer-same-region")
    assert doc([own], []) == {"mode": "prefer-same-region", "from": "route", "region": "eu"}
    assert doc([own], [pol])["from"] == "route"  # the route's own setting wins


def test_route_explain_prints_the_locality_and_its_source() -> None:
    from federation.cli._route import render

    clusters = [cluster("east", "eu"), cluster("west", "us"), cluster("south", "eu")]
    own = route([{"destinations": [{"cluster": "east"}, {"cluster": "west"}]}], locality="prefer-same-region")
    lines = render(compile_routes(snapshot(clusters, [export("east"), export("west")], [own]), "south")
                   .explain(HOST, Request()))
    assert "  locality:     prefer-same-region, from the route (the caller's region: eu)" in lines
    plain = render(rs().explain(HOST, Request()))
    assert not any(line.startswith("  locality:") for line in plain)

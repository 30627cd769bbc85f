"""STALE clusters, as the federation streams them (models.ClusterLiveness): out of every
split while anything else serves; used anyway (soft, Envoy's panic) when nothing else is
left, because the federation's own trouble can make every cluster STALE at once."""

from __future__ import annotations

from federation.models import ClusterLiveness
from federation.traffic import STALE, Out, Request, RouteSet, Target, compile_routes

from .helpers import NS, cluster, down, export, route, snapshot, spread


def _routes(stale: tuple[str, ...], rules: list[dict] | None = None) -> RouteSet:
    snap = snapshot([cluster("east"), cluster("west"), cluster("central")],
                    [export("west"), export("central")],
                    [route(rules)] if rules else [])
    snap = snap.model_copy(update={"liveness": tuple(
        ClusterLiveness(cluster=c, state="STALE", since=1.0, last_heartbeat_age=40.0) for c in stale)})
    return compile_routes(snap, "east")


def gateway_health(rs: RouteSet, unreachable: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    """As the gateway's dialer answers: a failing peer first, else the streamed STALE state."""
    def health(t: Target) -> Out | None:
        return down(*unreachable)(t) or rs.stale.get(t.cluster)
    return health


def test_the_compiled_routes_carry_the_streamed_stale_clusters() -> None:
    rs = _routes(("west",))
    assert rs.stale == {"west": Out(STALE, "last heartbeat 40s ago")}
    assert _routes(()).stale == {}


def test_a_stale_cluster_leaves_the_even_spread() -> None:
    rs = _routes(("west",))
    assert spread(rs, health=gateway_health(rs), n=500) == {("central", "cart"): 500}


def test_a_stale_cluster_leaves_a_weighted_split_and_failover_skips_it() -> None:
    rs = _routes(("west",), [{"destinations": [{"cluster": "west", "weight": 90}, {"cluster": "central", "weight": 10}]}])
    assert spread(rs, health=gateway_health(rs), n=500) == {("central", "cart"): 500}
    rs = _routes(("central",), [{"destinations": [{"cluster": "west"}], "failover": ["central"]}])
    # west unreachable, central STALE: the failover target serves, flagged (nothing else left)
    assert spread(rs, health=gateway_health(rs, ("west",)), n=200) == {("central", "cart"): 200}


def test_when_every_cluster_is_stale_they_all_serve_rather_than_nothing() -> None:
    rs = _routes(("west", "central"))
    got = spread(rs, health=gateway_health(rs), n=2000)
    assert set(got) == {("west", "cart"), ("central", "cart")} and min(got.values()) > 800, got
    # ... but a hard reason still counts: unreachable west is out even then.
    assert spread(rs, health=gateway_health(rs, ("west",)), n=300) == {("central", "cart"): 300}
    # and with both hard-down there is no destination (503 UH), as before
    assert spread(rs, health=gateway_health(rs, ("west", "central")), n=10) == {None: 10}


def test_explain_says_stale_and_serving_anyway() -> None:
    rs = _routes(("west",))
    doc = rs.explain(f"cart.{NS}.isthmus.local:8080", Request(), gateway_health(rs))
    by = {c["cluster"]: c for c in doc["clusters"]}
    assert by["west"]["state"] == "out" and by["west"]["reason"] == STALE
    assert "last heartbeat 40s ago" in by["west"]["detail"]
    rs = _routes(("west", "central"), [{"destinations": [{"cluster": "west"}, {"cluster": "central"}]}])
    doc = rs.explain(f"cart.{NS}.isthmus.local:8080", Request(), gateway_health(rs))
    assert doc["result"]["outcome"] == "split"
    dests = {d["cluster"]: d for d in doc["destinations"]}
    assert dests["west"]["state"] == "serving" and "serving anyway" in dests["west"]["detail"]
    assert dests["west"]["effective_weight"] == 50.0

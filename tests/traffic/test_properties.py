"""Property tests of selection: weight normalisation, match precedence, health redistribution.

Selection is a pure function of (routes, health, request, random draw), so each property
is checked against an oracle written from the issue's words, not from the code."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from federation.traffic import Request, compile_routes

from .helpers import NS, cluster, down, export, route, snapshot

NAMES = ("c0", "c1", "c2", "c3", "c4", "c5")
CALLER = "me"
HOST = "cart.shop.isthmus.local:8080"


def _routes(rules: list[dict]):  # type: ignore[no-untyped-def]
    clusters = [cluster(n) for n in (*NAMES, CALLER)]
    return compile_routes(snapshot(clusters, [export(n) for n in NAMES], [route(rules)]), CALLER)


weights = st.lists(st.integers(0, 1000), min_size=1, max_size=len(NAMES)).filter(any)


@settings(max_examples=150, deadline=None)
@given(weights, st.integers(1, 50))
def test_weights_are_normalised_shares_and_scaling_them_changes_nothing(ws: list[int], k: int) -> None:
    rules = [{"destinations": [{"cluster": NAMES[i], "weight": w} for i, w in enumerate(ws)]}]
    scaled = [{"destinations": [{"cluster": NAMES[i], "weight": w * k} for i, w in enumerate(ws)]}]
    doc, doc_k = (_routes(r).explain(HOST, Request()) for r in (rules, scaled))
    total = sum(ws)
    for i, w in enumerate(ws):
        assert abs(doc["destinations"][i]["effective_weight"] - 100.0 * w / total) < 0.0011  # rounded to 3 places
        assert doc_k["destinations"][i]["effective_weight"] == doc["destinations"][i]["effective_weight"]
    assert abs(sum(s["effective_weight"] for s in doc["serving"]) - 100.0) < 0.01


@settings(max_examples=100, deadline=None)
@given(weights, st.integers(1, 4))
def test_draws_spread_over_the_unit_interval_land_exactly_in_proportion(ws: list[int], m: int) -> None:
    """Feed the draws (i + 0.5) / N for N = total * m: destination j gets exactly w_j * m."""
    rs = _routes([{"destinations": [{"cluster": NAMES[i], "weight": w} for i, w in enumerate(ws)]}])
    n = sum(ws) * m
    draws = iter([(i + 0.5) / n for i in range(n)])
    counts: dict[str, int] = {}
    for _ in range(n):
        sel = rs.select(NS, "cart", 8080, Request(), rand=lambda: next(draws))
        assert sel is not None and sel.target is not None
        counts[sel.target.cluster] = counts.get(sel.target.cluster, 0) + 1
    assert counts == {NAMES[i]: w * m for i, w in enumerate(ws) if w}


@settings(max_examples=200, deadline=None)
@given(weights, st.sets(st.sampled_from(NAMES)), st.lists(st.sampled_from((*NAMES, "*")), max_size=4))
def test_unhealthy_weight_is_shared_in_proportion_then_failover_in_order(
        ws: list[int], unhealthy: set[str], failover: list[str]) -> None:
    rules = [{"destinations": [{"cluster": NAMES[i], "weight": w} for i, w in enumerate(ws)], "failover": failover}]
    rs = _routes(rules)
    health = down(*unhealthy)
    doc = rs.explain(HOST, Request(), health)
    listed = [NAMES[i] for i in range(len(ws))]
    healthy_w = {NAMES[i]: w for i, w in enumerate(ws) if w and NAMES[i] not in unhealthy}
    # oracle, from the issue: healthy weighted share in proportion; else the first failover
    # step with a healthy cluster ("*": every exporting cluster not listed before, evenly)
    want: dict[str, Fraction] = {}
    if healthy_w:
        total = sum(healthy_w.values())
        want = {c: Fraction(w, total) for c, w in healthy_w.items()}
    else:
        seen = set(listed)
        for step in failover:
            cands = [c for c in NAMES if c not in seen] if step == "*" else ([step] if step not in seen else [])
            seen.update(cands)
            ok = [c for c in cands if c not in unhealthy]
            if ok:
                want = {c: Fraction(1, len(ok)) for c in ok}
                break
    got = {s["cluster"]: s["effective_weight"] for s in doc["serving"]}
    assert set(got) == set(want), (got, want)
    for c, share in want.items():
        assert abs(got[c] - float(share) * 100) < 0.001
    assert doc["result"]["outcome"] == ("split" if healthy_w else "failover" if want else "no-healthy-destination")
    # and selection agrees: it never picks an unhealthy cluster, only the serving ones
    for i in range(20):
        sel = rs.select(NS, "cart", 8080, Request(), health, rand=lambda: (i + 0.5) / 20)
        assert sel is not None
        assert (sel.target.cluster if sel.target else None) in (set(want) or {None})


METHODS = ("GET", "POST")
PATHS = ("/", "/a", "/a/b", "/b")
match_spec = st.fixed_dictionaries({}, optional={
    "method": st.sampled_from(METHODS),
    "path": st.sampled_from([{"prefix": "/a"}, {"exact": "/b"}, {"regex": "^/a/.+"}]),
    "headers": st.dictionaries(st.sampled_from(["x-a", "x-b"]),
                               st.sampled_from([{"exact": "1"}, {"present": True}, {"present": False}]), max_size=2),
    "source_clusters": st.sampled_from([[CALLER], ["c0"], [CALLER, "c1"]]),
})
rule_spec = st.lists(match_spec, max_size=3)


def _holds(m: dict, method: str, path: str, headers: dict[str, str]) -> bool:
    """The oracle: every condition of one match, as the issue states them."""
    if "method" in m and m["method"] != method:
        return False
    p = m.get("path")
    if p is not None:
        if "prefix" in p and not path.startswith(p["prefix"]):
            return False
        if "exact" in p and path != p["exact"]:
            return False
        if "regex" in p and not (path.startswith("/a/") and len(path) > 3):
            return False
    for name, hm in m.get("headers", {}).items():
        v = headers.get(name)
        if "exact" in hm and v != hm["exact"]:
            return False
        if "present" in hm and (v is not None) != hm["present"]:
            return False
    return not ("source_clusters" in m and CALLER not in m["source_clusters"])


@settings(max_examples=300, deadline=None)
@given(st.lists(rule_spec, min_size=1, max_size=5), st.sampled_from(METHODS), st.sampled_from(PATHS),
       st.dictionaries(st.sampled_from(["x-a", "x-b"]), st.sampled_from(["1", "2"]), max_size=2))
def test_the_first_rule_with_a_holding_match_wins(rules: list[list[dict]], method: str, path: str,
                                                  headers: dict[str, str]) -> None:
    rs = _routes([{"match": ms, "destinations": [{"cluster": NAMES[i]}]} if ms else
                  {"destinations": [{"cluster": NAMES[i]}]} for i, ms in enumerate(rules)])
    want = next((i for i, ms in enumerate(rules) if not ms or any(_holds(m, method, path, headers) for m in ms)), None)
    sel = rs.select(NS, "cart", 8080, Request(method, path + "?q=1", headers))
    assert sel is not None and sel.rule == want
    assert (sel.target.cluster if sel.target else None) == (NAMES[want] if want is not None else None)
    doc = rs.explain(HOST, Request(method, path, headers))
    assert doc["rule"] == want
    assert [r["matched"] for r in doc["rules"]] == [False] * (len(doc["rules"]) - 1) + [want is not None]

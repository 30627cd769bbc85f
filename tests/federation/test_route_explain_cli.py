"""``isthmus route explain`` from the federation's view: a real federation (etcd, the
service, joined clusters publishing their exports, liveness from their leases).

The route is applied through the real API (``apply_documents``) and read back by the
command (``list_routes``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from federation import models
from federation.cli import cli
from federation.cli._route import liveness_health, render
from federation.client import ClusterLiveness
from federation.traffic import Target

from .fixtures import Pki, join_cluster

ROUTE = models.TrafficRoute.model_validate({
    "name": "cart", "host": {"namespace": "shop", "service": "cart"},
    "rules": [
        {"match": [{"headers": {"x-canary": {"exact": "1"}}}], "destinations": [{"cluster": "west", "service": "cart-v2"}]},
        {"destinations": [{"cluster": "east", "weight": 90}, {"cluster": "west", "weight": 10}],
         "failover": ["central", "*"]},
    ]})


def export(cluster: str, name: str = "cart", **kw) -> models.ExportedService:  # type: ignore[no-untyped-def]
    return models.ExportedService(cluster=cluster, namespace="shop", name=name,
                                  ports=(models.ServicePort(port=8080),), **kw)


@pytest.fixture
def federation_with_cart(fed, pki: Pki, tmp_path: Path):  # type: ignore[no-untyped-def]
    exports = {"east": [export("east")], "west": [export("west"), export("west", "cart-v2")],
               "central": [export("central", ready_endpoints=0, endpoints_known=True)],
               "north": [export("north", export_to=("east",))], "south": []}
    for name, svcs in exports.items():
        c = join_cluster(fed, pki, name, tmp_path)
        if svcs:
            with fed.client(c.agent_dir) as agent:
                agent.publish(name, svcs, ttl=60)
    with fed.client(pki.admin_dir) as admin:
        admin.apply_documents([ROUTE])
    return {"ISTHMUS_FEDERATION": fed.address, "ISTHMUS_CERT_DIR": str(pki.admin_dir)}


def run(env: dict[str, str], *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, ["route", "explain", *args], env=env, catch_exceptions=False)


def test_explain_from_the_federation(federation_with_cart: dict[str, str]) -> None:
    r = run(federation_with_cart, "cart.shop.isthmus.local:8080", "--from", "south", "-o", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["source"] == "federation" and doc["route"] == "cart" and doc["rule"] == 1 and doc["revision"] > 0
    assert [(d["cluster"], d["effective_weight"]) for d in doc["destinations"]] == [("east", 90.0), ("west", 10.0)]
    fo = {f["cluster"]: f for f in doc["failover"]}
    # central exports with a known 0 ready endpoints; north only to east
    assert fo["central"]["reason"] == "no-endpoints" and fo["north"]["reason"] == "not-exported-to-caller"
    text = run(federation_with_cart, "cart.shop.isthmus.local:8080", "--from", "south")
    assert text.exit_code == 0, text.output
    assert "route:        cart, rule 1" in text.output and "east/cart" in text.output
    assert "0 ready endpoints" in text.output


def test_explain_the_canary_header(federation_with_cart: dict[str, str]) -> None:
    r = run(federation_with_cart, "cart.shop.isthmus.local:8080", "--from", "south", "--header", "x-canary=1",
            "--path", "/api?q=1", "-o", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["rule"] == 0 and doc["request"]["path"] == "/api"
    assert doc["serving"] == [{"cluster": "west", "service": "cart-v2", "effective_weight": 100.0}]


def test_explain_refuses_bad_input(federation_with_cart: dict[str, str]) -> None:
    r = run(federation_with_cart, "cart.shop.isthmus.local", "--from", "nowhere")
    assert r.exit_code == 2 and "'nowhere' is not a joined cluster" in r.output
    r = run(federation_with_cart, "cart.shop.isthmus.local", "--from", "south", "--header", "x-canary")
    assert r.exit_code == 2 and "NAME=VALUE" in r.output
    r = run(federation_with_cart, "cart.shop.isthmus.local", "--from", "south", "--path", "api")
    assert r.exit_code == 2 and "must start with '/'" in r.output


def test_live_without_a_gateway_says_how_to_reach_one() -> None:
    r = CliRunner().invoke(cli, ["route", "explain", "cart.shop.isthmus.local", "--from", "south", "--live",
                                 "--admin", "http://127.0.0.1:9"], catch_exceptions=False)
    assert r.exit_code == 1 and "cannot reach the gateway admin endpoint" in r.output and "--admin" in r.output


def test_liveness_becomes_health() -> None:
    live = {"east": ClusterLiveness("east", 1, 30, 5, 25.0, 0.0, "STALE"),
            "west": ClusterLiveness("west", 1, 30, 25, 1.0, 0.0, "LIVE"),
            "central": ClusterLiveness("central", 0, 0, -1, -1.0, 0.0, "EXPIRED")}
    health = liveness_health(live)
    t = lambda c: Target(c, "shop", "cart", 8080, "HTTP", f"{c}.isthmus.local", ("10.0.0.1:15443",))  # noqa: E731
    stale, expired = health(t("east")), health(t("central"))
    assert stale is not None and stale.code == "stale" and "25s" in stale.detail
    assert expired is not None and expired.code == "expired"
    assert health(t("west")) is None and health(t("north")) is None


def test_render_names_every_part() -> None:
    from federation.traffic import Request, compile_routes

    clusters = tuple(models.ClusterRecord(name=c, trust_domain=f"{c}.isthmus.local", gateway_addresses=("10.0.0.1:1",))
                     for c in ("east", "west", "central", "south"))
    snap = models.Snapshot(revision=3, clusters=clusters, services=(export("east"), export("west"), export("central")),
                           routes=(ROUTE,))
    doc = {"source": "federation", "cluster": "south",
           **compile_routes(snap, "south").explain("cart.shop.isthmus.local", Request("GET", "/x"))}
    text = "\n".join(render(doc))
    assert "GET /x to cart.shop.isthmus.local from south (federation, revision 3)" in text
    assert "rule 0 skipped: match[0]: header x-canary" in text
    assert "east/cart" in text and "serving 90%" in text and "weight 90" in text
    assert "1.  central -> central/cart" in text and "standby" in text

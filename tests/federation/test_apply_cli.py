"""``isthmus apply -f``, ``get``, ``delete`` and ``route set-weights`` as a user runs them:
the real ``isthmus`` process against a real federation (etcd, mTLS)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.clirun import expect, isthmus

from .fixtures import Pki
from .test_routes_store import clusters  # noqa: F401 - a fixture

FILE = """\
kind: AuthorizationPolicy
name: cart
selector: {namespace: shop, service: cart}
rules:
- from: [{clusters: [west]}]
---
kind: TrafficRoute
name: cart
host: {namespace: shop, service: cart}
rules:
- match:
  - path: {prefix: /api/}
    method: GET
    headers: {x-canary: {exact: "1"}}
    source_clusters: [east]
  destinations:
  - {cluster: west, service: cart-v2}
- destinations:
  - {cluster: east, weight: 90}
  - {cluster: west, weight: 10}
  failover: [central, "*"]
"""


@pytest.fixture
def conn(fed, pki: Pki) -> tuple[str, ...]:  # type: ignore[no-untyped-def]
    return ("--federation", fed.address, "--cert-dir", str(pki.admin_dir))


def revisions(out: str) -> set[str]:
    return {line.rsplit("revision ", 1)[1].rstrip(")") for line in out.splitlines() if "(revision " in line}


def test_apply_a_file_of_every_kind_then_get_it_back(clusters, conn, tmp_path: Path) -> None:  # noqa: F811
    f = tmp_path / "cart.yaml"
    f.write_text(FILE)
    out = expect(isthmus("apply", "-f", str(f), *conn), 0, "AuthorizationPolicy/cart created",
                 "TrafficRoute/cart created")
    assert len(revisions(out)) == 1  # one transaction
    expect(isthmus("apply", "-f", "-", *conn, input=FILE), 0, "AuthorizationPolicy/cart unchanged",
           "TrafficRoute/cart unchanged")
    out = expect(isthmus("apply", "-f", "-", *conn, input=FILE.replace("weight: 90", "weight: 70")), 0,
                 "AuthorizationPolicy/cart unchanged", "TrafficRoute/cart configured")

    # get -o yaml is what apply takes: applying it back changes nothing.
    got = expect(isthmus("get", "routes", "-o", "yaml", *conn), 0)
    [doc] = list(yaml.safe_load_all(got))
    assert doc["kind"] == "TrafficRoute" and doc["rules"][1]["destinations"][0] == {"cluster": "east", "service": "",
                                                                                   "weight": 70}
    expect(isthmus("apply", "-f", "-", *conn, input=got), 0, "TrafficRoute/cart unchanged")
    body = json.loads(expect(isthmus("get", "TrafficRoute", "cart", "-o", "json", *conn), 0))
    assert body["host"] == {"namespace": "shop", "service": "cart"}
    assert body["rules"][0]["match"][0]["headers"] == {"x-canary": {"exact": "1"}}
    policies = json.loads(expect(isthmus("get", "authorizationpolicies", "-o", "json", *conn), 0))
    assert [p["name"] for p in policies] == ["cart"]
    table = expect(isthmus("get", "trafficroute", *conn), 0)
    assert "shop/cart" in table and "east/cart=70 west/cart=10 failover central,*" in table
    expect(isthmus("get", "TrafficRoute", "nope", *conn), 1, "no TrafficRoute named 'nope'")
    expect(isthmus("get", "Gateways", *conn), 2, "unknown kind 'Gateways': use one of AuthorizationPolicy, "
                                                  "RequestAuthentication, TrafficRoute")


def test_apply_prints_warnings_and_refuses_a_bad_batch_whole(clusters, conn, tmp_path: Path) -> None:  # noqa: F811
    f = tmp_path / "r.yaml"
    f.write_text(FILE.replace("cart-v2", "cart-v3"))
    r = isthmus("apply", "-f", str(f), *conn)
    expect(r, 0, "TrafficRoute/cart created")
    assert "warning: document 1: rules[0].destinations[0]: no cluster exports shop/cart-v3 yet" in r.stderr
    f.write_text(FILE.replace("name: cart\nselector", "name: other\nselector").replace("[central", "[nope"))
    expect(isthmus("apply", "-f", str(f), *conn), 2,
           "document 1: rules[1].failover[0].cluster: cluster 'nope' is not joined")
    policies = json.loads(expect(isthmus("get", "AuthorizationPolicy", "-o", "json", *conn), 0))
    assert [p["name"] for p in policies] == ["cart"]  # "other" did not go in either
    f.write_text(FILE.replace("name: cart\nhost", "name: cart2\nhost"))
    expect(isthmus("apply", "-f", str(f), *conn), 2,
           "host: TrafficRoute 'cart2' and the stored TrafficRoute 'cart' both route shop/cart")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (FILE.replace("weight: 10", "weight: -10"), "document 1: rules[1].destinations[1].weight: "),
        (FILE.replace("weight: 10", "weight: ten"), "document 1: rules[1].destinations[1].weight: "),
        (FILE.replace("weight: 90", "weight: 0").replace("weight: 10", "weight: 0"),
         "document 1: rules[1]: every destination weight is 0"),
        (FILE.replace("prefix: /api/", "regex: '(('"), "document 1: rules[0].match[0].path.regex: invalid regex"),
        (FILE.replace("    method: GET", "    methods: [GET]"), "document 1: rules[0].match[0].methods: Extra inputs"),
        (FILE.replace("kind: TrafficRoute", "kind: VirtualService"), "document 1: kind: 'VirtualService' is not a kind"),
        (FILE + "---\n" + FILE.split("---\n")[1], "document 2: TrafficRoute 'cart' is already defined in document 1"),
        ("kind: TrafficRoute\nname: [", "not valid YAML: line 2"),
    ],
)
def test_bad_files_are_refused_offline_with_document_and_field(tmp_path: Path, text: str, says: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    # No federation: the file is checked before any call.
    expect(isthmus("apply", "-f", str(f), "--federation", "127.0.0.1:1", "--cert-dir", str(tmp_path)), 2,
           f"invalid file: {f}", says)
    expect(isthmus("apply", "-f", str(f), "--dry-run"), 2, says)


def test_apply_file_problems_are_one_line(tmp_path: Path) -> None:
    expect(isthmus("apply", "-f", str(tmp_path / "missing.yaml"), "--dry-run"), 2, "missing.yaml: no such file")
    expect(isthmus("apply", "-f", str(tmp_path), "--dry-run"), 2, "is a directory")
    expect(isthmus("apply", "-f", "-", "--dry-run", input="\n---\n"), 2, "no documents found")
    expect(isthmus("apply", "-f", "-", "--dry-run", input=FILE), 0, "AuthorizationPolicy/cart valid (dry run)",
           "TrafficRoute/cart valid (dry run)")


def test_delete_by_kind_and_name(clusters, conn, tmp_path: Path) -> None:  # noqa: F811
    expect(isthmus("apply", "-f", "-", *conn, input=FILE), 0)
    expect(isthmus("delete", "route", "cart", *conn), 0, "TrafficRoute/cart deleted")
    expect(isthmus("delete", "TrafficRoute", "cart", *conn), 1, "NOT_FOUND", "no TrafficRoute named 'cart'")
    assert json.loads(expect(isthmus("get", "routes", "-o", "json", *conn), 0)) == []
    # The policy of the same name is still there; `policy apply` keeps working beside apply.
    assert [p["name"] for p in json.loads(expect(isthmus("get", "AuthorizationPolicy", "-o", "json", *conn), 0))] \
        == ["cart"]
    expect(isthmus("delete", "AuthorizationPolicy", "cart", *conn), 0, "AuthorizationPolicy/cart deleted")
    expect(isthmus("policy", "apply", "-f", "-", *conn, input=FILE.split("---\n")[0]), 0,
           "AuthorizationPolicy/cart configured")


def test_set_weights(clusters, conn) -> None:  # noqa: F811
    expect(isthmus("apply", "-f", "-", *conn, input=FILE), 0)
    out = expect(isthmus("route", "set-weights", "cart", "east=80", "west=20", *conn), 0,
                 "TrafficRoute/cart rules[1]: east/cart=80 west/cart=20 (revision ")
    [rev] = revisions(out)
    body = json.loads(expect(isthmus("get", "route", "cart", "-o", "json", *conn), 0))
    assert [d["weight"] for d in body["rules"][1]["destinations"]] == [80, 20]
    out = expect(isthmus("route", "set-weights", "cart", "--rule", "1", "west/cart=50", *conn), 0,
                 "east/cart=80 west/cart=50")
    assert int(revisions(out).pop()) > int(rev)
    for args, code, says in [
        (("east=abc",), 2, "weight 'abc' is not a whole number"),
        (("east=-1",), 2, "weight -1 is negative"),
        (("east",), 2, "expected CLUSTER=WEIGHT"),
        (("east=0", "west=0"), 2, "rules[1]: every destination weight is 0"),
        (("mars=5",), 2, "no rule sends to all of mars"),
        (("--rule", "1", "mars=5"), 2, "rules[1].destinations: no destination 'mars' in this rule"),
        (("--rule", "7", "east=5"), 2, "has 2 rule(s), numbered 0 to 1; there is no rule 7"),
        (("west=5",), 2, "choose one with --rule N"),
    ]:
        expect(isthmus("route", "set-weights", "cart", *args, *conn), code, says)
    expect(isthmus("route", "set-weights", "nope", "east=1", *conn), 1, "NOT_FOUND", "no TrafficRoute named 'nope'")
    body = json.loads(expect(isthmus("get", "route", "cart", "-o", "json", *conn), 0))
    assert [d["weight"] for d in body["rules"][1]["destinations"]] == [80, 50]  # no refused call changed it


POLICY = """\
kind: TrafficPolicy
name: cart
host: {namespace: shop, service: cart}
connection_pool: {max_requests: 1000}
outlier_detection: {consecutive_5xx: 5}
"""


def test_a_traffic_policy_is_applied_and_shown_with_its_defaults(clusters, conn) -> None:  # noqa: F811
    expect(isthmus("apply", "-f", "-", *conn, input=POLICY), 0, "TrafficPolicy/cart created")
    [doc] = list(yaml.safe_load_all(expect(isthmus("get", "trafficpolicy", "cart", "-o", "yaml", *conn), 0)))
    assert doc["connection_pool"] == {"max_requests": 1000}
    full = yaml.safe_load(expect(isthmus("get", "trafficpolicy", "cart", "-o", "yaml", "--show-defaults", *conn), 0))
    assert full["connection_pool"] == {"max_requests": 1000, "max_pending": None, "max_retries": None,
                                       "max_connections_per_peer": None}
    assert full["outlier_detection"] == {"consecutive_5xx": 5, "consecutive_gateway_errors": 0, "interval": "10s",
                                         "base_ejection_time": "30s", "max_ejection_time": "5m",
                                         "max_ejection_percent": 10.0}
    expect(isthmus("apply", "-f", "-", *conn, input=yaml.safe_dump(full)), 0, "TrafficPolicy/cart")
    assert "max_requests=1000" in expect(isthmus("get", "trafficpolicies", *conn), 0)

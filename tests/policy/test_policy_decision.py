"""Table-driven authorization decisions across three clusters (east, west, central)."""

from __future__ import annotations

import re

import pytest

from federation.models import AuthorizationPolicy, Snapshot
from federation.policy import (
    Decision,
    PolicyError,
    PolicySet,
    RequestAttributes,
    StringMatcher,
    load_policies,
)

from ._helpers import ISSUER, spiffe

EAST_WEB = spiffe("east", "web", "frontend")
WEST_WEB = spiffe("west", "web", "frontend")
CENTRAL_WEB = spiffe("central", "web", "frontend")
CENTRAL_OPS = spiffe("central", "ops", "runner")
EAST_BATCH = spiffe("east", "batch", "cron")

POLICIES = f"""
# shop/cart: east's frontend, or anything in central's web namespace, may GET/POST /api/*
kind: AuthorizationPolicy
name: cart-from-frontends
selector: {{namespace: shop, service: cart}}
rules:
- from:
  - principals: ["{EAST_WEB}"]
  - clusters: [central]
    namespaces: [web]
  to:
  - methods: [GET, POST]
    paths: ["/api/*"]
---
# West may not touch admin paths anywhere in shop; DENY beats every ALLOW.
kind: AuthorizationPolicy
name: no-west-admin
action: DENY
selector: {{namespace: shop}}
rules:
- from: [{{clusters: [west]}}]
  to: [{{paths: ["/admin*", "*/debug"]}}]
---
# Every DELETE anywhere is audited.
kind: AuthorizationPolicy
name: audit-deletes
action: AUDIT
rules:
- to: [{{methods: [DELETE]}}]
---
# shop/payments: an ALLOW policy without rules - nobody gets in.
kind: AuthorizationPolicy
name: payments-locked
selector: {{namespace: shop, service: payments}}
---
# shop/catalog: open to everyone (rules: [{{}}]).
kind: AuthorizationPolicy
name: catalog-open
selector: {{namespace: shop, service: catalog}}
rules: [{{}}]
---
# billing/*: any cluster but west, except the ops namespace; never DELETE; not port 9090.
kind: AuthorizationPolicy
name: billing-not-west
selector: {{namespace: billing}}
rules:
- from:
  - principals: ["*"]
    not_clusters: [west]
    not_namespaces: [ops]
  to:
  - not_methods: [DELETE]
    not_ports: [9090]
---
# api/gateway: only requests with a JWT from our IdP whose groups include admins
# (or whose nested realm.roles include operator), and only GET paths not under /internal.
kind: AuthorizationPolicy
name: api-admins
selector: {{namespace: api, service: gateway}}
rules:
- from: [{{request_principals: ["{ISSUER}/*"]}}]
  to: [{{methods: [GET], not_paths: ["/internal*"]}}]
  when: [{{claim: groups, values: [admins]}}]
- from: [{{request_principals: ["*"]}}]
  when: [{{claim: realm.roles, values: [operator]}}, {{claim: email, values: ["*@example.com"]}}]
---
# db/postgres: TCP 5432 from east and central only.
kind: AuthorizationPolicy
name: postgres-east-central
selector: {{namespace: db, service: postgres}}
rules:
- from: [{{clusters: [east, central]}}]
  to: [{{ports: [5432]}}]
---
# db/*: deny GETs to /dump from anyone - an HTTP-only DENY, which on TCP denies more.
kind: AuthorizationPolicy
name: db-no-dump
action: DENY
selector: {{namespace: db, service: redis}}
rules:
- to: [{{methods: [GET], paths: [/dump]}}]
---
# Istio-style principals without the scheme, suffix match on the service account.
kind: AuthorizationPolicy
name: metrics-scrapers
selector: {{namespace: monitoring, service: metrics}}
rules:
- from: [{{principals: ["central.isthmus.local/ns/ops/*", "*/sa/prometheus"]}}]
"""


@pytest.fixture(scope="module")
def policy_set() -> PolicySet:
    return PolicySet(load_policies(POLICIES), revision=42)


def req(src: str | None, dest: str, method: str | None = "GET", path: str | None = "/",
        port: int | None = 8080, **kw: object) -> RequestAttributes:
    ns, svc = dest.split("/")
    return RequestAttributes.for_request(
        source_principal=src, destination_namespace=ns, destination_service=svc,
        method=method, path=path, port=port, **kw,
    )


GROUPS = {"iss": ISSUER, "sub": "alice", "groups": ["dev", "admins"]}
OPERATOR = {"iss": ISSUER, "sub": "bob", "realm": {"roles": ["operator"]}, "email": "bob@example.com"}

# (id, request, allowed, deciding policy, audit)
CASES = [
    # selectors: an ALLOW on shop/cart makes it default-deny; other services stay open
    ("east-frontend-gets-cart", req(EAST_WEB, "shop/cart", path="/api/items"), True, "cart-from-frontends", False),
    ("east-frontend-post-cart", req(EAST_WEB, "shop/cart", "POST", "/api/items"), True, "cart-from-frontends", False),
    ("query-string-ignored", req(EAST_WEB, "shop/cart", path="/api/items?id=7"), True, "cart-from-frontends", False),
    ("central-web-any-sa", req(spiffe("central", "web", "other"), "shop/cart", path="/api/x"), True, "cart-from-frontends", False),
    ("central-ops-not-web", req(CENTRAL_OPS, "shop/cart", path="/api/x"), False, None, False),
    ("west-frontend-default-deny", req(WEST_WEB, "shop/cart", path="/api/x"), False, None, False),
    ("east-wrong-path", req(EAST_WEB, "shop/cart", path="/other"), False, None, False),
    ("east-wrong-method", req(EAST_WEB, "shop/cart", "PUT", "/api/x"), False, None, False),
    ("unauthenticated-cart", req(None, "shop/cart", path="/api/x"), False, None, False),
    ("unselected-service-open", req(WEST_WEB, "shop/reviews"), True, None, False),
    ("unselected-namespace-open", req(None, "other/thing"), True, None, False),
    # DENY beats ALLOW; prefix and suffix paths
    ("west-admin-denied-even-open", req(WEST_WEB, "shop/catalog", path="/admin/users"), False, "no-west-admin", False),
    ("west-debug-suffix-denied", req(WEST_WEB, "shop/catalog", path="/v1/debug"), False, "no-west-admin", False),
    ("east-admin-catalog-allowed", req(EAST_WEB, "shop/catalog", path="/admin"), True, "catalog-open", False),
    ("west-catalog-allowed", req(WEST_WEB, "shop/catalog", path="/items"), True, "catalog-open", False),
    ("catalog-unauthenticated", req(None, "shop/catalog"), True, "catalog-open", False),
    # ALLOW with no rules: deny all for the selected service
    ("payments-locked-east", req(EAST_WEB, "shop/payments"), False, None, False),
    ("payments-locked-central", req(CENTRAL_WEB, "shop/payments", "POST", "/pay"), False, None, False),
    # AUDIT marks only
    ("audit-delete-open", req(WEST_WEB, "shop/reviews", "DELETE", "/r/1"), True, None, True),
    ("audit-delete-denied", req(WEST_WEB, "shop/cart", "DELETE", "/api/1"), False, None, True),
    ("audit-delete-deny-policy", req(WEST_WEB, "shop/catalog", "DELETE", "/admin/x"), False, "no-west-admin", True),
    # not_* fields
    ("billing-east", req(EAST_WEB, "billing/invoices"), True, "billing-not-west", False),
    ("billing-central-web", req(CENTRAL_WEB, "billing/invoices"), True, "billing-not-west", False),
    ("billing-west", req(WEST_WEB, "billing/invoices"), False, None, False),
    ("billing-central-ops", req(CENTRAL_OPS, "billing/invoices"), False, None, False),
    ("billing-delete", req(EAST_WEB, "billing/invoices", "DELETE", "/i/1"), False, None, True),
    ("billing-port-9090", req(EAST_WEB, "billing/invoices", port=9090), False, None, False),
    ("billing-unauthenticated", req(None, "billing/invoices"), False, None, False),
    # JWT: request principals and claims (string list, nested, wildcard values)
    ("api-admin-jwt", req(None, "api/gateway", path="/users", request_principal=f"{ISSUER}/alice", jwt_claims=GROUPS), True, "api-admins", False),
    ("api-admin-internal-path", req(None, "api/gateway", path="/internal/x", request_principal=f"{ISSUER}/alice", jwt_claims=GROUPS), False, None, False),
    ("api-no-jwt", req(EAST_WEB, "api/gateway", path="/users"), False, None, False),
    ("api-jwt-not-admin", req(None, "api/gateway", request_principal=f"{ISSUER}/carol", jwt_claims={"iss": ISSUER, "sub": "carol", "groups": "dev"}), False, None, False),
    ("api-jwt-string-claim", req(None, "api/gateway", request_principal=f"{ISSUER}/dan", jwt_claims={"iss": ISSUER, "sub": "dan", "groups": "admins"}), True, "api-admins", False),
    ("api-other-issuer", req(None, "api/gateway", request_principal="https://evil/alice", jwt_claims=GROUPS), False, None, False),
    ("api-nested-operator", req(None, "api/gateway", "POST", "/internal/op", request_principal=f"{ISSUER}/bob", jwt_claims=OPERATOR), True, "api-admins", False),
    ("api-operator-bad-email", req(None, "api/gateway", "POST", "/op", request_principal=f"{ISSUER}/bob", jwt_claims={**OPERATOR, "email": "bob@evil.com"}), False, None, False),
    # ports and TCP
    ("postgres-east-tcp", req(EAST_BATCH, "db/postgres", None, None, 5432), True, "postgres-east-central", False),
    ("postgres-central-tcp", req(CENTRAL_OPS, "db/postgres", None, None, 5432), True, "postgres-east-central", False),
    ("postgres-west-tcp", req(WEST_WEB, "db/postgres", None, None, 5432), False, None, False),
    ("postgres-wrong-port", req(EAST_BATCH, "db/postgres", None, None, 5433), False, None, False),
    ("redis-http-dump-denied", req(EAST_WEB, "db/redis", "GET", "/dump"), False, "db-no-dump", False),
    ("redis-http-other-ok", req(EAST_WEB, "db/redis", "GET", "/keys"), True, None, False),
    ("redis-tcp-deny-is-restrictive", req(EAST_WEB, "db/redis", None, None, 6379), False, "db-no-dump", False),
    # Istio-form principals and suffix matches
    ("metrics-central-ops", req(CENTRAL_OPS, "monitoring/metrics"), True, "metrics-scrapers", False),
    ("metrics-prometheus-any-cluster", req(spiffe("west", "mon", "prometheus"), "monitoring/metrics"), True, "metrics-scrapers", False),
    ("metrics-east-web", req(EAST_WEB, "monitoring/metrics"), False, None, False),
]


@pytest.mark.parametrize(
    "attrs,allowed,policy,audit", [pytest.param(*c[1:], id=c[0]) for c in CASES]
)
def test_decision_matrix(policy_set: PolicySet, attrs: RequestAttributes, allowed: bool,
                         policy: str | None, audit: bool) -> None:
    d = policy_set.evaluate(attrs)
    assert (d.allowed, d.policy, d.audit) == (allowed, policy, audit), d.reason
    if policy is not None:
        assert policy in d.reason
    if audit:
        assert d.audit_policy == "audit-deletes"


def test_reasons_name_what_decided(policy_set: PolicySet) -> None:
    d = policy_set.evaluate(req(WEST_WEB, "shop/cart", path="/api/x"))
    assert d == Decision(False, None, "DENY",
                         "no ALLOW policy matched (ALLOW policies selecting shop/cart: cart-from-frontends)")
    d = policy_set.evaluate(req(WEST_WEB, "shop/catalog", path="/admin"))
    assert (d.action, d.reason) == ("DENY", "DENY policy 'no-west-admin' matched (rule 0)")
    d = policy_set.evaluate(req(WEST_WEB, "nowhere/svc"))
    assert (d.allowed, d.action, d.reason) == (True, "ALLOW", "no ALLOW policy selects nowhere/svc")


def test_policy_set_carries_revision() -> None:
    snap = Snapshot(revision=9, policies=(AuthorizationPolicy(name="a", rules=({},)),))
    ps = PolicySet.from_snapshot(snap)
    assert ps.revision == 9 and len(ps) == 1


def test_for_request_derives_cluster_and_namespace() -> None:
    a = req(CENTRAL_OPS, "x/y")
    assert (a.source_cluster, a.source_namespace) == ("central", "ops")
    admin = req("spiffe://isthmus.local/admin/root", "x/y")
    assert (admin.source_cluster, admin.source_namespace) == (None, None)
    given = req(EAST_WEB, "x/y", source_cluster="override")
    assert given.source_cluster == "override"


def test_first_matching_deny_in_policy_order_is_named() -> None:
    ps = PolicySet(load_policies("""
kind: AuthorizationPolicy
name: deny-b
action: DENY
rules: [{}]
---
kind: AuthorizationPolicy
name: deny-a
action: DENY
selector: {namespace: ns, service: svc}
rules: [{}]
"""))
    assert ps.evaluate(req(EAST_WEB, "ns/svc")).policy == "deny-b"


def test_tcp_request_never_matches_allow_with_http_fields() -> None:
    ps = PolicySet(load_policies("""
kind: AuthorizationPolicy
name: get-only
rules: [{to: [{methods: [GET]}]}]
"""))
    assert ps.evaluate(req(EAST_WEB, "a/b", "GET", "/")).allowed
    assert not ps.evaluate(req(EAST_WEB, "a/b", None, None)).allowed
    assert not ps.evaluate(req(EAST_WEB, "a/b", "POST", "/")).allowed


@pytest.mark.parametrize("bad,field", [
    ({"rules": [{"from": [{"principals": ["a*b"]}]}]}, "rules[0].from[0].principals[0]"),
    ({"rules": [{"to": [{"paths": ["*mid*"]}]}]}, "rules[0].to[0].paths[0]"),
    ({"rules": [{"to": [{"ports": [0]}]}]}, "rules[0].to[0].ports[0]"),
    ({"rules": [{"to": [{"not_ports": [70000]}]}]}, "rules[0].to[0].not_ports[0]"),
    ({"rules": [{"when": [{"claim": "g", "values": []}]}]}, "rules[0].when[0].values"),
    ({"rules": [{"from": [{"namespaces": [""]}]}]}, "rules[0].from[0].namespaces[0]"),
    ({"selector": {"namespace": "prod-*"}}, "selector.namespace"),
])
def test_uncompilable_policy_is_refused_with_field_path(bad: dict, field: str) -> None:
    with pytest.raises(PolicyError, match=rf"policy 'p': {re.escape(field)}: "):
        PolicySet([AuthorizationPolicy.model_validate({"name": "p", **bad})])


@pytest.mark.parametrize("pattern,value,expected", [
    ("*", "", True), ("*", "x", True), ("abc", "abc", True), ("abc", "abcd", False),
    ("abc*", "abc", True), ("abc*", "abcdef", True), ("abc*", "xabc", False),
    ("*abc", "abc", True), ("*abc", "xxabc", True), ("*abc", "abcx", False),
])
def test_string_match_forms(pattern: str, value: str, expected: bool) -> None:
    m = StringMatcher([pattern])
    assert m(value) is expected
    assert m(None) is False


@pytest.mark.parametrize("n, listed", [
    (5, "a0, a1, a2, a3, a4"), (6, "a0, a1, a2, a3, a4, ..."), (1, "a0")])
def test_a_default_deny_names_at_most_five_allow_policies(n: int, listed: str) -> None:
    ps = PolicySet([AuthorizationPolicy.model_validate(
        {"name": f"a{i}", "selector": {"namespace": "shop"},
         "rules": [{"from": [{"principals": [f"spiffe://east.isthmus.local/ns/x{i}/*"]}]}]}) for i in range(n)])
    d = ps.evaluate(req(EAST_WEB, "shop/cart"))
    assert (d.allowed, d.action, d.policy) == (False, "DENY", None)
    assert d.reason == f"no ALLOW policy matched (ALLOW policies selecting shop/cart: {listed})"


def test_a_deny_on_tcp_skips_http_fields_but_still_checks_the_rest() -> None:
    """On a TCP (CONNECT) request a DENY ignores its HTTP-only fields and goes on to the
    others: here the port decides."""
    deny = AuthorizationPolicy.model_validate({"name": "no-db", "action": "DENY", "selector": {"namespace": "shop"},
                                               "rules": [{"to": [{"paths": ["/x"], "ports": [5432]}]}]})
    ps = PolicySet([deny])
    tcp = {"method": None, "path": None}
    assert ps.evaluate(req(EAST_WEB, "shop/db", port=80, **tcp)).allowed  # another port: not this DENY
    d = ps.evaluate(req(EAST_WEB, "shop/db", port=5432, **tcp))
    assert (d.allowed, d.policy) == (False, "no-db")


def test_the_first_matching_audit_policy_is_named() -> None:
    audits = [AuthorizationPolicy.model_validate({"name": f"audit-{i}", "action": "AUDIT", "rules": [{}]})
              for i in range(3)]
    d = PolicySet(audits).evaluate(req(EAST_WEB, "shop/cart"))
    assert (d.allowed, d.audit, d.audit_policy) == (True, True, "audit-0")


def test_request_authentications_come_in_policy_order() -> None:
    from federation.models import JwtRule, RequestAuthentication

    def authn(name: str, service: str) -> RequestAuthentication:
        return RequestAuthentication(name=name, selector={"namespace": "shop", "service": service},  # type: ignore[arg-type]
                                     jwt_rules=(JwtRule(issuer=f"https://{name}.example", jwks='{"keys": []}'),))

    ps = PolicySet([authn("b-any", "*"), authn("a-cart", "cart"), authn("c-any", "*")])
    assert [p.name for p in ps.request_authentications("shop", "cart")] == ["b-any", "a-cart", "c-any"]


def test_many_policies_decide_by_the_selecting_ones() -> None:
    """200 policies, 20 selecting shop/*: each request gets the decision of the policy
    that names it, whatever the other 199 say. (How long a decision takes is
    tests/bench/policy.py's figure, not an assert here.)"""
    from tests.bench.policy import many_policies, request

    ps = PolicySet(many_policies())

    def x(i: int) -> str:
        return f"spiffe://east.isthmus.local/ns/x{i}/sa/a"

    def outcome(attrs: RequestAttributes) -> tuple[bool, str | None]:
        d = ps.evaluate(attrs)
        return d.allowed, d.policy

    assert outcome(request()) == (False, None)  # ALLOWs select shop, none matches: default deny
    assert outcome(request("/v10/y", x(10))) == (True, "p10")  # an ALLOW among the twenty
    assert outcome(request("/v190/y", x(190))) == (True, "p190")  # ...the last of them
    assert outcome(request("/v20/y", x(20))) == (False, "p20")  # a DENY among them
    assert outcome(request("/v10/y", x(20))) == (False, None)  # p10's path, not its caller
    assert outcome(request("/v11/y", x(11))) == (False, None)  # p11 selects ns11, not shop
    assert outcome(request("/v11/y", x(11), namespace="ns11")) == (True, "p11")
    assert outcome(request("/v12/y", x(11), namespace="ns11")) == (False, None)
    assert outcome(request(namespace="elsewhere")) == (True, None)  # selected by none: open


def test_policy_benchmark_smoke_runs_and_reports_a_ratio() -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "policy.py"
    r = subprocess.run([sys.executable, str(bench), "--smoke", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["decisions"] == 5000 and doc["one_policy_us"] > 0 and doc["ratio_200_vs_1"] > 0

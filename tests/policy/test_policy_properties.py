"""Property tests: decision invariants, wildcard semantics, and a loader that never crashes."""

from __future__ import annotations

import fnmatch
import random

import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from federation.models import AuthorizationPolicy, JwtClaimMatch, RequestAuthentication, Rule, RuleFrom, RuleTo, Selector
from federation.policy import PolicyFileError, PolicySet, RequestAttributes, StringMatcher, load_policies

from ._helpers import CLUSTERS, spiffe

NAMESPACES = ("web", "shop", "ops")
SERVICES = ("cart", "pay")
PRINCIPALS = tuple(spiffe(c, ns, sa) for c in CLUSTERS for ns in NAMESPACES for sa in ("a", "b"))
METHODS = ("GET", "POST", "DELETE")
PATHS = ("/", "/api/x", "/admin", "/api/admin")

settings.register_profile("policy", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("policy")


def patterns(values: tuple[str, ...]) -> st.SearchStrategy[tuple[str, ...]]:
    """Exact values plus prefix/suffix/any forms derived from them."""
    one = st.sampled_from(values) | st.just("*") | st.sampled_from(values).flatmap(
        lambda v: st.integers(1, max(1, len(v) - 1)).flatmap(
            lambda i: st.sampled_from((v[:i] + "*", "*" + v[i:]))))
    return st.lists(one, max_size=2).map(tuple)


sources = st.builds(
    RuleFrom,
    principals=patterns(PRINCIPALS), not_principals=patterns(PRINCIPALS),
    clusters=patterns(CLUSTERS), not_clusters=patterns(CLUSTERS),
    namespaces=patterns(NAMESPACES), not_namespaces=patterns(NAMESPACES),
    request_principals=st.lists(st.sampled_from(("*", "https://idp/*", "https://idp/alice")),
                                max_size=1).map(tuple),
)
operations = st.builds(
    RuleTo,
    methods=patterns(METHODS), not_methods=patterns(METHODS),
    paths=patterns(PATHS), not_paths=patterns(PATHS),
    ports=st.lists(st.sampled_from((80, 8080, 5432)), max_size=2).map(tuple),
    not_ports=st.lists(st.sampled_from((80, 8080, 5432)), max_size=1).map(tuple),
)
conditions = st.builds(JwtClaimMatch, claim=st.sampled_from(("groups", "realm.roles")),
                       values=st.lists(st.sampled_from(("admins", "dev", "adm*")), min_size=1,
                                       max_size=2).map(tuple))
rules = st.builds(
    lambda f, t, w: Rule.model_validate({"from": f, "to": t, "when": w}),
    st.lists(sources, max_size=2), st.lists(operations, max_size=2), st.lists(conditions, max_size=1),
)
selectors = st.builds(Selector, namespace=st.sampled_from(("*",) + NAMESPACES),
                      service=st.sampled_from(("*",) + SERVICES))


def policies(action: st.SearchStrategy[str] = st.sampled_from(("ALLOW", "DENY", "AUDIT"))):
    return st.builds(
        lambda i, a, s, r: AuthorizationPolicy(name=f"p{i}", action=a, selector=s, rules=tuple(r)),
        st.integers(0, 10**6), action, selectors, st.lists(rules, max_size=3),
    )


policy_lists = st.lists(policies(), max_size=4)

requests = st.builds(
    lambda src, dest_ns, dest_svc, http, method, path, port, jwt: RequestAttributes.for_request(
        source_principal=src, destination_namespace=dest_ns, destination_service=dest_svc,
        method=method if http else None, path=path if http else None, port=port,
        request_principal=None if jwt is None else f"https://idp/{jwt['sub']}", jwt_claims=jwt,
    ),
    st.none() | st.sampled_from(PRINCIPALS), st.sampled_from(NAMESPACES), st.sampled_from(SERVICES),
    st.booleans(), st.sampled_from(METHODS), st.sampled_from(PATHS + ("/api/x?q=1",)),
    st.none() | st.sampled_from((80, 8080, 5432)),
    st.none() | st.fixed_dictionaries({
        "sub": st.sampled_from(("alice", "bob")),
        "groups": st.sampled_from(("admins", ["dev", "admins"], [], "dev", 3, True)),
        "realm": st.fixed_dictionaries({"roles": st.lists(st.sampled_from(("admins", "dev")))}),
    }),
)


@given(requests)
def test_no_policies_allow_everything(attrs: RequestAttributes) -> None:
    d = PolicySet([]).evaluate(attrs)
    assert d.allowed and d.policy is None and not d.audit


@given(policy_lists, requests, policies(st.just("DENY")))
def test_adding_a_deny_never_turns_a_deny_into_an_allow(pols, attrs, deny) -> None:
    before = PolicySet(pols).evaluate(attrs)
    after = PolicySet([*pols, deny]).evaluate(attrs)
    if not before.allowed:
        assert not after.allowed
    if after.allowed:
        assert before.allowed and after.policy == before.policy


@given(policy_lists, requests)
def test_deny_of_everything_denies_everything(pols, attrs) -> None:
    deny_all = AuthorizationPolicy(name="deny-all", action="DENY", rules=(Rule(),))
    d = PolicySet([*pols, deny_all]).evaluate(attrs)
    assert not d.allowed and d.action == "DENY" and d.policy is not None
    if attrs.source_principal is not None:  # '*' needs a principal to be present
        any_principal = AuthorizationPolicy(
            name="deny-any", action="DENY", rules=(Rule.model_validate({"from": [{"principals": ["*"]}]}),)
        )
        assert not PolicySet([any_principal, *pols]).evaluate(attrs).allowed


@given(policy_lists, requests, st.randoms(use_true_random=False))
def test_outcome_does_not_depend_on_policy_order(pols, attrs, rnd: random.Random) -> None:
    shuffled = list(pols)
    rnd.shuffle(shuffled)
    a, b = PolicySet(pols).evaluate(attrs), PolicySet(shuffled).evaluate(attrs)
    assert (a.allowed, a.audit) == (b.allowed, b.audit)


@given(policy_lists, requests)
def test_audit_policies_never_change_the_outcome(pols, attrs) -> None:
    without = [p for p in pols if p.action != "AUDIT"]
    a, b = PolicySet(pols).evaluate(attrs), PolicySet(without).evaluate(attrs)
    assert (a.allowed, a.policy, a.action) == (b.allowed, b.policy, b.action)


@given(policy_lists, requests)
def test_allow_with_empty_rule_list_denies_selected(pols, attrs) -> None:
    lock = AuthorizationPolicy(
        name="lock", selector=Selector(namespace=attrs.destination_namespace,
                                       service=attrs.destination_service))
    others = [p for p in pols if p.action != "ALLOW"]
    assert not PolicySet([*others, lock]).evaluate(attrs).allowed


@given(policy_lists, requests)
def test_selector_mismatch_is_invisible(pols, attrs) -> None:
    """Policies selecting some other service never affect this one."""
    moved = [p.model_copy(update={"selector": Selector(namespace="elsewhere")}) for p in pols]
    assert PolicySet(moved).evaluate(attrs).allowed


@given(requests)
def test_not_fields_are_the_complement(attrs) -> None:
    assume(attrs.source_cluster is not None)
    only = AuthorizationPolicy(name="only", rules=(Rule.model_validate({"from": [{"clusters": ["east"]}]}),))
    but = AuthorizationPolicy(name="but", rules=(Rule.model_validate({"from": [{"not_clusters": ["east"]}]}),))
    assert PolicySet([only]).evaluate(attrs).allowed != PolicySet([but]).evaluate(attrs).allowed


safe_text = st.text(alphabet="abcxyz/.-_:", min_size=0, max_size=8)


@given(safe_text, safe_text, st.sampled_from(("exact", "prefix", "suffix", "any")))
def test_wildcards_agree_with_fnmatch(core: str, value: str, form: str) -> None:
    assume(core or form == "any")
    pattern = {"exact": core, "prefix": core + "*", "suffix": "*" + core, "any": "*"}[form]
    assert StringMatcher([pattern])(value) == fnmatch.fnmatchcase(value, pattern)
    # and a value built to match does match
    built = {"exact": core, "prefix": core + value, "suffix": value + core, "any": value}[form]
    assert StringMatcher([pattern])(built)


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=10)
    | st.sampled_from(("AuthorizationPolicy", "RequestAuthentication", "ALLOW", "DENY", "*", "p1")),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(("kind", "name", "selector", "action", "rules", "from", "to", "when",
                         "principals", "paths", "ports", "jwt_rules", "issuer", "jwks",
                         "namespace", "service", "claim", "values", "x")) | st.text(max_size=5),
        inner, max_size=4),
    max_leaves=20,
)


@given(st.lists(yaml_values, max_size=3))
def test_loader_never_crashes_on_structured_yaml(docs: list[object]) -> None:
    text = yaml.safe_dump_all(docs)
    try:
        load_policies(text)
    except PolicyFileError as exc:
        assert str(exc).startswith("invalid policy file: <text>")


@given(st.text(max_size=200))
@example("kind: [")
@example("just words")
@example("kind: AuthorizationPolicy\nname: p1")
@example("")
def test_loader_on_random_text_returns_policies_or_a_located_error(text: str) -> None:
    """Any text: either a list of policies (that round-trips through the writer) or a
    PolicyFileError naming the source and what is wrong; never another exception."""
    try:
        got = load_policies(text + "\n")
    except PolicyFileError as exc:
        msg = str(exc)
        assert msg.startswith("invalid policy file: <text>"), msg
        assert msg.rstrip(":") != "invalid policy file: <text>"  # it says what is wrong
    else:
        assert all(isinstance(p, (AuthorizationPolicy, RequestAuthentication)) for p in got), got
        assert load_policies(yaml.safe_dump_all([p.model_dump(mode="json", by_alias=True) for p in got])
                             + "\n") == got


@given(st.lists(policies(), max_size=4, unique_by=lambda p: p.name))
def test_loader_round_trips_valid_policies(pols: list[AuthorizationPolicy]) -> None:
    text = yaml.safe_dump_all([p.model_dump(mode="json", by_alias=True) for p in pols])
    assert load_policies(text) == pols


"""federation.documents without a federation: kinds, files, the checks across records and
set-weights are pure functions (the API tests in test_routes_store.py run them for real)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation import models
from federation._errors import InvalidRequest
from federation.documents import BatchRefused, DocumentFileError, check_batch, load_documents, resolve_kind, with_weights


def tr(name: str, host: str, *dests: tuple[str, str, int], failover: tuple[str, ...] = ()) -> models.TrafficRoute:
    return models.parse_input(models.TrafficRoute, {
        "name": name, "host": {"namespace": "shop", "service": host},
        "rules": [{"destinations": [{"cluster": c, "service": s, "weight": w} for c, s, w in dests],
                   "failover": list(failover)}]})


CLUSTERS = [models.ClusterRecord(name=n, trust_domain=f"{n}.isthmus.local") for n in ("east", "west")] + [
    models.ClusterRecord(name="gone", trust_domain="gone.isthmus.local", revoked=True)]
SERVICES = [models.ExportedService(cluster="east", namespace="shop", name="cart")]


@pytest.mark.parametrize(("text", "kind"), [("TrafficRoute", "TrafficRoute"), ("routes", "TrafficRoute"),
                                            ("route", "TrafficRoute"), ("trafficroutes", "TrafficRoute"),
                                            ("authorizationpolicies", "AuthorizationPolicy"),
                                            ("RequestAuthentications", "RequestAuthentication")])
def test_kinds_are_named_as_kubectl_names_resources(text: str, kind: str) -> None:
    assert resolve_kind(text) == kind


def test_an_unknown_kind_names_the_kinds() -> None:
    with pytest.raises(InvalidRequest, match="unknown kind 'pods': use one of AuthorizationPolicy"):
        resolve_kind("pods")


def test_a_file_of_every_kind_keeps_its_order_and_skips_empty_documents() -> None:
    docs = load_documents("kind: TrafficRoute\nname: r\nhost: {namespace: a, service: b}\n"
                          "rules: [{destinations: [{cluster: east}]}]\n---\n---\n"
                          "kind: AuthorizationPolicy\nname: p\n", source="f.yaml")
    assert [(d.kind, d.name) for d in docs] == [("TrafficRoute", "r"), ("AuthorizationPolicy", "p")]
    with pytest.raises(DocumentFileError) as err:
        load_documents("kind: AuthorizationPolicy\nname: p\nrules: [{from: [{principals: ['a*b*']}]}]\n", source="f")
    assert err.value.document == 0 and err.value.field == "rules[0].from[0].principals[0]"  # validate_policy's


def test_document_numbers_count_non_empty_documents_as_the_batch_checks_do() -> None:
    route = "kind: TrafficRoute\nname: {}\nhost: {{namespace: a, service: {}}}\nrules: [{{destinations: [{{cluster: {}}}]}}]\n"
    text = "---\n---\n" + route.format("r1", "b", "east") + "---\n---\n" + route.format("r2", "c", "gone")
    with pytest.raises(DocumentFileError) as err:
        load_documents(text + "---\nkind: AuthorizationPolicy\nname: p\nbogus: 1\n", source="f")
    assert err.value.document == 2  # the third non-empty document
    docs = load_documents(text, source="f")
    with pytest.raises(BatchRefused) as refused:
        check_batch(docs, clusters=CLUSTERS, services=SERVICES, stored_routes=[])
    assert refused.value.document == 1 and docs[1].name == "r2"  # the same numbering


def test_a_destination_twice_in_one_rule_is_refused() -> None:
    with pytest.raises(InvalidRequest, match=r"rules\[0\]\.destinations\[1\]: east/cart is destinations\[0\] again"):
        tr("r", "cart", ("east", "", 1), ("east", "cart", 2))


def test_check_batch_refuses_revoked_and_unknown_clusters_and_warns_for_exports() -> None:
    with pytest.raises(BatchRefused) as err:
        check_batch([tr("r", "cart", ("east", "", 1), failover=("gone",))], clusters=CLUSTERS, services=SERVICES,
                    stored_routes=[])
    assert (err.value.document, err.value.field) == (0, "rules[0].failover[0].cluster")
    assert "revoked" in str(err.value)
    warnings = check_batch([tr("r", "cart", ("east", "", 1), ("west", "", 1), failover=("*",))],
                           clusters=CLUSTERS, services=SERVICES, stored_routes=[tr("r", "other", ("east", "", 1))])
    assert warnings == ["document 0: rules[0].destinations[1]: cluster 'west' does not export shop/cart (exported by "
                        "east); this destination is unavailable until it does"]  # "*": east exports it


DESTS = [("east", "a"), ("east", "b"), ("west", "a")]


@given(st.dictionaries(st.sampled_from(range(3)), st.integers(0, 1000), min_size=1))
def test_set_weights_changes_exactly_the_named_destinations(new: dict[int, int]) -> None:
    route = tr("r", "a", *((c, s, 5) for c, s in DESTS))
    weights = [(DESTS[i][0], DESTS[i][1], w) for i, w in new.items()]
    expected = [new.get(i, 5) for i in range(3)]
    if not any(expected):
        with pytest.raises(InvalidRequest, match=r"rules\[0\]: every destination weight is 0"):
            with_weights(route, weights)
        return
    out, rule = with_weights(route, weights)
    assert rule == 0 and [d.weight for d in out.rules[0].destinations] == expected
    assert out.model_copy(update={"rules": route.rules}) == route  # nothing else changed


def test_set_weights_needs_the_service_where_a_cluster_has_two() -> None:
    route = tr("r", "a", *((c, s, 5) for c, s in DESTS))
    with pytest.raises(InvalidRequest, match=r"cluster 'east' has 2 destinations in this rule \(a, b\): name one as "
                                             r"east/SERVICE=W"):
        with_weights(route, [("east", "", 1)])
    with pytest.raises(InvalidRequest, match="name at least one destination"):
        with_weights(route, [])


def _rule_with(setting: str, value: object) -> models.TrafficRoute:
    return models.parse_input(models.TrafficRoute, {
        "name": "r", "host": {"namespace": "shop", "service": "cart"},
        "rules": [{"destinations": [{"cluster": "east"}], setting: value}]})


@pytest.mark.parametrize(("setting", "value"), [("timeout", "2s"), ("retries", {"attempts": 3}),
                                                ("fault", {"abort": {"percent": 5, "http_status": 503}}),
                                                ("mirror", {"cluster": "west", "percent": 5})])
def test_resilience_settings_the_gateways_enforce_are_accepted(setting: str, value: object) -> None:
    check_batch([_rule_with(setting, value)], clusters=CLUSTERS, services=SERVICES, stored_routes=[])


def test_a_policys_max_connections_per_peer_is_accepted() -> None:
    policy = models.parse_input(models.TrafficPolicy, {"name": "cart", "host": {"namespace": "shop", "service": "cart"},
                                                       "connection_pool": {"max_connections_per_peer": 2}})
    assert check_batch([policy], clusters=CLUSTERS, services=SERVICES, stored_routes=[]) == []


def test_a_policys_locality_is_accepted() -> None:
    policy = models.parse_input(models.TrafficPolicy, {"name": "cart", "host": {"namespace": "shop", "service": "cart"},
                                                       "locality": "prefer-same-region"})
    assert check_batch([policy], clusters=CLUSTERS, services=SERVICES, stored_routes=[]) == []


def test_traffic_policies_are_accepted_once_per_service() -> None:
    def tp(name: str) -> models.TrafficPolicy:
        return models.parse_input(models.TrafficPolicy, {
            "name": name, "host": {"namespace": "shop", "service": "cart"},
            "connection_pool": {"max_requests": 10}, "outlier_detection": {"consecutive_5xx": 3}})
    assert check_batch([tp("a")], clusters=CLUSTERS, services=SERVICES, stored_routes=[]) == []
    with pytest.raises(BatchRefused, match="one policy per service") as err:
        check_batch([tp("a"), tp("b")], clusters=CLUSTERS, services=SERVICES, stored_routes=[])
    assert err.value.document == 1 and err.value.field == "host"

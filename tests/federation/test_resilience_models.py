"""The resilience settings of the contract (issue 14): a rule's timeout, retries, fault and
mirror, and TrafficPolicy.  Every bad input the issue lists is refused with its field path;
every default changes nothing; what is stored reads back as written."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation._errors import InvalidInput
from federation.models import (
    DEFAULT_RETRY_ON,
    DOCUMENT_KINDS,
    ConnectionPool,
    Snapshot,
    TrafficPolicy,
    TrafficRoute,
    format_duration,
    parse_duration,
    parse_input,
    read_record,
    with_defaults,
)

HOST = {"namespace": "shop", "service": "cart"}
FULL_RULE = {
    "destinations": [{"cluster": "east", "weight": 90}, {"cluster": "west", "weight": 10}],
    "timeout": "2s",
    "retries": {"attempts": 3, "per_try_timeout": "500ms",
                "retry_on": ["connect-failure", "refused-stream", "reset", "503", "gateway-error", "unavailable"],
                "budget": {"percent": 20, "min_per_second": 10}},
    "fault": {"delay": {"percent": 10, "fixed": "200ms"}, "abort": {"percent": 5, "http_status": 503}},
    "mirror": {"cluster": "central", "service": "cart", "percent": 5},
}
FULL_POLICY = {
    "kind": "TrafficPolicy", "name": "cart", "host": HOST,
    "connection_pool": {"max_requests": 1000, "max_pending": 100, "max_retries": 3, "max_connections_per_peer": 4},
    "outlier_detection": {"consecutive_5xx": 5, "consecutive_gateway_errors": 3, "interval": "10s",
                          "base_ejection_time": "30s", "max_ejection_percent": 100},
    "locality": "prefer-same-region",
}


def route(**rule: Any) -> dict[str, Any]:
    return {"kind": "TrafficRoute", "name": "cart", "host": HOST,
            "rules": [{"destinations": [{"cluster": "east"}], **rule}]}


def refused(model: Any, doc: dict[str, Any]) -> tuple[str, str]:
    """The one (field path, message) ``doc`` is refused with."""
    with pytest.raises(InvalidInput) as err:
        parse_input(model, doc)
    assert len(err.value.problems) == 1, err.value.problems
    return err.value.problems[0]


# ---------------------------------------------------------------- the issue's examples


def test_the_issues_rule_and_policy_are_accepted_as_written() -> None:
    r = parse_input(TrafficRoute, route(**FULL_RULE))
    rule = r.rules[0]
    assert rule.timeout == 2.0 and rule.retries is not None and rule.retries.per_try_timeout == 0.5
    assert rule.retries.attempts == 3 and rule.retries.budget.percent == 20.0
    assert rule.retries.retry_on == ("connect-failure", "refused-stream", "reset", "503", "gateway-error",
                                     "unavailable")
    assert rule.fault is not None and rule.fault.delay is not None and rule.fault.delay.fixed == 0.2
    assert rule.fault.abort is not None and rule.fault.abort.http_status == 503
    assert rule.mirror is not None and (rule.mirror.cluster, rule.mirror.percent) == ("central", 5.0)
    p = parse_input(TrafficPolicy, FULL_POLICY)
    assert p.connection_pool.max_requests == 1000 and p.outlier_detection is not None
    assert (p.outlier_detection.consecutive_gateway_errors, p.outlier_detection.base_ejection_time) == (3, 30.0)


def test_traffic_policy_is_a_document_kind_and_rides_the_snapshot() -> None:
    assert DOCUMENT_KINDS["TrafficPolicy"] is TrafficPolicy
    snap = Snapshot(revision=3, traffic_policies=(parse_input(TrafficPolicy, FULL_POLICY),))
    assert read_record(Snapshot, snap.model_dump_json()) == snap


def test_stored_form_keeps_durations_as_written_and_reads_back_equal() -> None:
    r = parse_input(TrafficRoute, route(**FULL_RULE))
    stored = json.loads(r.model_dump_json())
    assert stored["rules"][0]["timeout"] == "2s"
    assert stored["rules"][0]["retries"]["per_try_timeout"] == "500ms"
    assert stored["rules"][0]["retries"]["budget"]["ttl"] == "10s"
    assert read_record(TrafficRoute, json.dumps(stored)) == r
    p = parse_input(TrafficPolicy, FULL_POLICY)
    assert json.loads(p.model_dump_json())["outlier_detection"]["interval"] == "10s"
    assert read_record(TrafficPolicy, p.model_dump_json()) == p


def test_a_route_stored_before_resilience_existed_still_reads() -> None:
    old = {"kind": "TrafficRoute", "name": "cart", "host": HOST,
           "rules": [{"match": [], "destinations": [{"cluster": "east", "service": "", "weight": 1}], "failover": []}],
           "locality": ""}
    rule = read_record(TrafficRoute, json.dumps(old)).rules[0]
    assert (rule.timeout, rule.retries, rule.fault, rule.mirror) == (None, None, None, None)


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(("text", "seconds"), [
    ("2s", 2.0), ("500ms", 0.5), ("1m", 60.0), ("1h", 3600.0), ("1m30s", 90.0), ("1.5s", 1.5),
    ("250us", None), ("1ms", 0.001), ("0.5h", 1800.0), ("100ms", 0.1),
])
def test_durations_are_written_like_istio(text: str, seconds: float | None) -> None:
    if seconds is None:
        with pytest.raises(ValueError, match="shorter than 1ms"):
            parse_duration(text)
    else:
        assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("value", "why"), [
    ("0s", "is zero"), ("0ms", "is zero"), ("-1s", "is negative"), ("-500ms", "is negative"),
    (2, "write it with a unit"), (2.5, "write it with a unit"), ("2", "write it with a unit"),
    ("2 s", "write it with a unit"), ("2d", "write it with a unit"), ("s", "write it with a unit"),
    ("", "write it with a unit"), ("200h", "longer than 7 days"),
])
def test_bad_durations_are_refused_with_the_field_path(value: object, why: str) -> None:
    path, message = refused(TrafficRoute, route(timeout=value))
    assert path == "rules[0].timeout" and why in message


@pytest.mark.parametrize("field", ["interval", "base_ejection_time", "max_ejection_time"])
def test_zero_durations_in_a_policy_are_refused_with_the_field_path(field: str) -> None:
    doc = {**FULL_POLICY, "outlier_detection": {**FULL_POLICY["outlier_detection"], field: "0s"}}
    path, message = refused(TrafficPolicy, doc)
    assert path == f"outlier_detection.{field}" and "is zero" in message


@pytest.mark.parametrize(("where", "rule"), [
    ("rules[0].retries.per_try_timeout", {"retries": {"per_try_timeout": "-1s"}}),
    ("rules[0].fault.delay.fixed", {"fault": {"delay": {"fixed": "0s"}}}),
    ("rules[0].retries.budget.ttl", {"retries": {"budget": {"ttl": "0ms"}}}),
])
def test_zero_or_negative_durations_anywhere_in_a_rule_are_refused(where: str, rule: dict[str, Any]) -> None:
    path, message = refused(TrafficRoute, route(**rule))
    assert path == where and ("zero" in message or "negative" in message)


@given(st.integers(min_value=1, max_value=7 * 86400 * 1000))
def test_a_formatted_duration_parses_back_to_the_same_value(ms: int) -> None:
    seconds = ms / 1000
    text = format_duration(seconds)
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-9)
    assert len(text) <= 12


def test_durations_format_in_the_shortest_whole_unit() -> None:
    assert [format_duration(s) for s in (2.0, 0.5, 60.0, 90.0, 3600.0, 0.0015)] == \
        ["2s", "500ms", "1m", "90s", "1h", "1500us"]


# ---------------------------------------------------------------- timeouts and retries


def test_a_per_try_timeout_longer_than_the_timeout_is_refused() -> None:
    path, message = refused(TrafficRoute, route(timeout="1s", retries={"per_try_timeout": "2s"}))
    assert path == "rules[0].retries.per_try_timeout"
    assert "per_try_timeout 2s is longer than the rule's timeout 1s" in message
    # equal is fine, and so is a per-try timeout with no overall timeout
    parse_input(TrafficRoute, route(timeout="1s", retries={"per_try_timeout": "1s"}))
    parse_input(TrafficRoute, route(retries={"per_try_timeout": "5s"}))


@pytest.mark.parametrize(("name", "index", "why"), [
    ("bogus", 1, "unknown retry_on 'bogus'"),
    ("5xxx", 1, "unknown retry_on"),
    ("retriable-status-codes", 1, "write the status codes themselves"),
    ("retriable-headers", 1, "not supported"),
    ("999", 1, "from 400 to 599"),
    ("200", 1, "from 400 to 599"),
    ("OK", 1, "unknown retry_on"),  # OK is not a failure to retry on
])
def test_unknown_retry_on_names_are_refused_at_their_index(name: str, index: int, why: str) -> None:
    path, message = refused(TrafficRoute, route(retries={"retry_on": ["reset", name]}))
    assert path == f"rules[0].retries.retry_on[{index}]" and why in message


def test_retry_on_takes_envoys_names_grpc_statuses_and_status_codes_in_either_spelling() -> None:
    r = parse_input(TrafficRoute, route(retries={
        "retry_on": "5xx, gateway-error,reset,reset-before-request,connect-failure,refused-stream,retriable-4xx,"
                    "UNAVAILABLE,deadline_exceeded,resource-exhausted,cancelled,internal,503,503"}))
    assert r.rules[0].retries is not None
    assert r.rules[0].retries.retry_on == (
        "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "refused-stream",
        "retriable-4xx", "unavailable", "deadline-exceeded", "resource-exhausted", "cancelled", "internal", "503")


def test_an_empty_retry_on_is_refused() -> None:
    path, message = refused(TrafficRoute, route(retries={"retry_on": []}))
    assert path == "rules[0].retries.retry_on" and "empty" in message


@pytest.mark.parametrize(("retries", "where"), [
    ({"attempts": -1}, "rules[0].retries.attempts"),
    ({"attempts": 11}, "rules[0].retries.attempts"),
    ({"attempts": "3"}, "rules[0].retries.attempts"),
    ({"budget": {"percent": 120}}, "rules[0].retries.budget.percent"),
    ({"budget": {"percent": -5}}, "rules[0].retries.budget.percent"),
    ({"budget": {"min_per_second": -1}}, "rules[0].retries.budget.min_per_second"),
    ({"budget": {"ttl": "2m"}}, "rules[0].retries.budget.ttl"),
    ({"tries": 3}, "rules[0].retries.tries"),
])
def test_bad_retry_settings_are_refused_with_the_field_path(retries: dict[str, Any], where: str) -> None:
    assert refused(TrafficRoute, route(retries=retries))[0] == where


# ---------------------------------------------------------------- faults and mirrors


@pytest.mark.parametrize(("fault", "where"), [
    ({"delay": {"percent": 101, "fixed": "1s"}}, "rules[0].fault.delay.percent"),
    ({"delay": {"percent": -0.1, "fixed": "1s"}}, "rules[0].fault.delay.percent"),
    ({"abort": {"percent": 100.5, "http_status": 503}}, "rules[0].fault.abort.percent"),
    ({"abort": {"percent": float("nan"), "http_status": 503}}, "rules[0].fault.abort.percent"),
    ({"abort": {"percent": 5}}, "rules[0].fault.abort"),
    ({"abort": {"http_status": 503, "grpc_status": "UNAVAILABLE"}}, "rules[0].fault.abort"),
    ({"abort": {"http_status": 99}}, "rules[0].fault.abort.http_status"),
    ({"abort": {"http_status": 600}}, "rules[0].fault.abort.http_status"),
    ({"abort": {"grpc_status": "NOPE"}}, "rules[0].fault.abort.grpc_status"),
    ({"abort": {"grpc_status": "OK"}}, "rules[0].fault.abort.grpc_status"),
    ({"delay": {"percent": 10}}, "rules[0].fault.delay.fixed"),
    ({}, "rules[0].fault"),
])
def test_bad_faults_are_refused_with_the_field_path(fault: dict[str, Any], where: str) -> None:
    assert refused(TrafficRoute, route(fault=fault))[0] == where


def test_percentages_are_floats_and_grpc_statuses_take_either_spelling() -> None:
    r = parse_input(TrafficRoute, route(fault={"delay": {"percent": 0.5, "fixed": "10ms"},
                                               "abort": {"grpc_status": "deadline-exceeded"}}))
    fault = r.rules[0].fault
    assert fault is not None and fault.delay is not None and fault.abort is not None
    assert fault.delay.percent == 0.5 and fault.abort.percent == 100.0  # written without percent: every request
    assert fault.abort.grpc_status == "DEADLINE_EXCEEDED"


@pytest.mark.parametrize("mirror", [
    {"cluster": "east"},  # the destination, services both defaulted
    {"cluster": "east", "service": "cart"},  # the same once the host's service is filled in
])
def test_a_mirror_equal_to_the_primary_destination_is_refused(mirror: dict[str, Any]) -> None:
    path, message = refused(TrafficRoute, route(mirror=mirror))
    assert path == "rules[0].mirror" and "is one of the rule's destinations" in message


def test_a_mirror_equal_to_any_weighted_destination_is_refused_in_the_right_rule() -> None:
    doc = route()
    doc["rules"].append({"destinations": [{"cluster": "east", "service": "cart-v2"}, {"cluster": "west"}],
                         "mirror": {"cluster": "west", "service": "cart"}})
    assert refused(TrafficRoute, doc)[0] == "rules[1].mirror"


@pytest.mark.parametrize("mirror", [
    {"cluster": "east", "service": "cart-shadow"}, {"cluster": "central"},
])
def test_a_mirror_elsewhere_is_accepted(mirror: dict[str, Any]) -> None:
    m = parse_input(TrafficRoute, route(mirror=mirror)).rules[0].mirror
    assert m is not None and m.percent == 100.0


@pytest.mark.parametrize(("mirror", "where"), [
    ({"cluster": "central", "percent": 150}, "rules[0].mirror.percent"),
    ({"cluster": "Central"}, "rules[0].mirror.cluster"),
    ({"service": "cart"}, "rules[0].mirror.cluster"),
])
def test_bad_mirrors_are_refused_with_the_field_path(mirror: dict[str, Any], where: str) -> None:
    assert refused(TrafficRoute, route(mirror=mirror))[0] == where


# ---------------------------------------------------------------- traffic policies


@pytest.mark.parametrize("limit", ["max_requests", "max_pending", "max_retries", "max_connections_per_peer"])
def test_connection_pool_limits_of_zero_are_refused(limit: str) -> None:
    path, message = refused(TrafficPolicy, {**FULL_POLICY, "connection_pool": {limit: 0}})
    assert path == f"connection_pool.{limit}" and "at least 1" in message and "leave it out" in message


@pytest.mark.parametrize(("od", "where"), [
    ({"max_ejection_percent": 101}, "outlier_detection.max_ejection_percent"),
    ({"max_ejection_percent": -1}, "outlier_detection.max_ejection_percent"),
    ({"consecutive_5xx": -1}, "outlier_detection.consecutive_5xx"),
    ({"consecutive_5xx": 0, "consecutive_gateway_errors": 0}, "outlier_detection.consecutive_5xx"),
    ({"base_ejection_time": "10m"}, "outlier_detection.max_ejection_time"),
    ({"consecutive_errors": 5}, "outlier_detection.consecutive_errors"),
])
def test_bad_outlier_detection_is_refused_with_the_field_path(od: dict[str, Any], where: str) -> None:
    assert refused(TrafficPolicy, {**FULL_POLICY, "outlier_detection": od})[0] == where


def test_bad_policy_names_hosts_and_localities_are_refused() -> None:
    assert refused(TrafficPolicy, {**FULL_POLICY, "name": "Cart"})[0] == "name"
    assert refused(TrafficPolicy, {**FULL_POLICY, "host": {"namespace": "shop"}})[0] == "host.service"
    assert refused(TrafficPolicy, {**FULL_POLICY, "locality": "nearest"})[0] == "locality"


# ---------------------------------------------------------------- defaults


def test_an_empty_traffic_policy_sets_nothing() -> None:
    p = parse_input(TrafficPolicy, {"kind": "TrafficPolicy", "name": "cart", "host": HOST})
    assert p.connection_pool == ConnectionPool()
    assert all(getattr(p.connection_pool, f) is None for f in ConnectionPool.model_fields)  # no limit
    assert p.outlier_detection is None and p.locality == ""


def test_a_rule_without_resilience_settings_has_none() -> None:
    rule = parse_input(TrafficRoute, route()).rules[0]
    assert (rule.timeout, rule.retries, rule.fault, rule.mirror) == (None, None, None, None)


def test_written_blocks_get_istio_envoy_and_linkerd_defaults() -> None:
    r = parse_input(TrafficRoute, route(retries={}, mirror={"cluster": "central"})).rules[0]
    assert r.retries is not None
    assert (r.retries.attempts, r.retries.per_try_timeout, r.retries.retry_on) == (2, None, DEFAULT_RETRY_ON)
    assert (r.retries.budget.percent, r.retries.budget.min_per_second, r.retries.budget.ttl) == (20.0, 10, 10.0)
    assert r.mirror is not None and r.mirror.percent == 100.0
    od = parse_input(TrafficPolicy, {**FULL_POLICY, "outlier_detection": {}}).outlier_detection
    assert od is not None
    assert (od.consecutive_5xx, od.consecutive_gateway_errors, od.interval, od.base_ejection_time,
            od.max_ejection_time, od.max_ejection_percent) == (5, 0, 10.0, 30.0, 300.0, 10.0)


def test_with_defaults_shows_every_effective_setting_and_changes_none() -> None:
    written = parse_input(TrafficPolicy, {"kind": "TrafficPolicy", "name": "cart", "host": HOST,
                                          "outlier_detection": {"consecutive_5xx": 3}})
    assert written.model_dump(mode="json", exclude_unset=True) == {
        "kind": "TrafficPolicy", "name": "cart", "host": HOST, "outlier_detection": {"consecutive_5xx": 3}}
    full = with_defaults(written)
    assert full == written
    shown = full.model_dump(mode="json", exclude_unset=True)
    assert shown["connection_pool"] == {"max_requests": None, "max_pending": None, "max_retries": None,
                                        "max_connections_per_peer": None}
    assert shown["outlier_detection"] == {"consecutive_5xx": 3, "consecutive_gateway_errors": 0,
                                          "interval": "10s", "base_ejection_time": "30s",
                                          "max_ejection_time": "5m", "max_ejection_percent": 10.0}
    assert shown["locality"] == ""
    r = parse_input(TrafficRoute, route(retries={"attempts": 1}))
    shown_rule = with_defaults(r).model_dump(mode="json", exclude_unset=True)["rules"][0]
    assert shown_rule["timeout"] is None and shown_rule["fault"] is None
    assert shown_rule["retries"]["budget"] == {"percent": 20.0, "min_per_second": 10, "ttl": "10s"}

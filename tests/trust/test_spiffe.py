from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trust import InvalidName, InvalidSpiffeId, SpiffeId, validate_cluster_name, validate_trust_domain

td_chars = st.text(alphabet=string.ascii_lowercase + string.digits + ".-_", min_size=1, max_size=60)
seg_chars = st.text(alphabet=string.ascii_letters + string.digits + ".-_", min_size=1, max_size=20).filter(
    lambda s: s not in (".", "..")
)


@given(td=td_chars, segs=st.lists(seg_chars, max_size=6))
def test_valid_ids_round_trip(td: str, segs: list[str]) -> None:
    text = f"spiffe://{td}" + "".join("/" + s for s in segs)
    sid = SpiffeId.parse(text)
    assert str(sid) == text
    assert sid.trust_domain == td
    assert sid.segments == segs


@given(st.text(max_size=80))
def test_parse_never_crashes_on_garbage(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except InvalidSpiffeId as exc:
        assert str(exc)
    else:
        assert str(sid) == text


@given(td=td_chars, bad=st.sampled_from(list(string.ascii_uppercase + "!$%&'()*+,;=:@ ")))
def test_trust_domain_rejects_other_characters(td: str, bad: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        validate_trust_domain(td + bad)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "empty"),
        ("http://east.isthmus.local/x", "must start with 'spiffe://'"),
        ("SPIFFE://east.isthmus.local/x", "must start with 'spiffe://'"),
        ("spiffe://", "missing trust domain"),
        ("spiffe:///path", "missing trust domain"),
        ("spiffe://East.isthmus.local/ns/a", "lowercase"),
        ("spiffe://east.isthmus.local:443/ns/a", "port"),
        ("spiffe://user@east/ns/a", "user info"),
        ("spiffe://east/", "must not end with '/'"),
        ("spiffe://east/ns//sa", "empty path segment"),
        ("spiffe://east/ns/../sa", "'..'"),
        ("spiffe://east/ns/a?x=1", "query"),
        ("spiffe://east/ns/a#frag", "fragment"),
        ("spiffe://east/ns/a b", "not allowed in the path"),
        ("spiffe://east/" + "a" * 2100, "longer than 2048"),
    ],
)
def test_invalid_ids_name_the_problem(text: str, problem: str) -> None:
    with pytest.raises(InvalidSpiffeId, match="invalid"):
        SpiffeId.parse(text)
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse(text)
    assert problem in str(info.value)


def test_trust_domain_too_long() -> None:
    with pytest.raises(InvalidSpiffeId, match="longer than 255"):
        validate_trust_domain("a" * 256)


def test_workload_accessors() -> None:
    sid = SpiffeId.parse("spiffe://east.isthmus.local/ns/shop/sa/cart")
    assert (sid.namespace, sid.service_account) == ("shop", "cart")
    assert SpiffeId.parse("spiffe://isthmus.local/admin/alice").namespace is None


@given(st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z"))
def test_rfc1123_labels_accepted(name: str) -> None:
    assert validate_cluster_name(name) == name


@pytest.mark.parametrize("name", ["", "East", "-east", "east-", "ea_st", "east.west", "a" * 64, "ést"])
def test_bad_cluster_names_refused_with_what_is_allowed(name: str) -> None:
    with pytest.raises(InvalidName, match="lowercase RFC 1123 label"):
        validate_cluster_name(name)

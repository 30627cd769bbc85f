"""The sanitizer (``gateway._sanitize``), driven directly."""

from __future__ import annotations

import pytest

from gateway._sanitize import (
    BodyFraming,
    Refused,
    check_request,
    check_size,
    header_list_size,
    outbound_request,
    request_trailers,
    source_identity,
)

BASE = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x"), (b":authority", b"a")]


@pytest.mark.parametrize("extra, status", [
    ([(b"X-Up", b"1")], 400),
    ([(b"connection", b"close")], 400),
    ([(b"transfer-encoding", b"chunked")], 400),
    ([(b"upgrade", b"h2c")], 400),
    ([(b"te", b"gzip")], 400),
    ([(b"x", b"a\r\nb")], 400),
    ([(b"x", b"a\x00b")], 400),
    ([(b"content-length", b"1x")], 400),
    ([(b"content-length", b"1"), (b"content-length", b"2")], 400),
    ([(b":path", b"/y")], 400),
    ([(b"bad name", b"1")], 400),
])
def test_refused(extra, status) -> None:
    with pytest.raises(Refused) as exc:
        check_request(BASE + extra)
    assert exc.value.status == status


@pytest.mark.parametrize("headers", [
    [(b":method", b"get"), (b":path", b"/")],
    [(b":method", b"GET"), (b":path", b"/a b")],
    [(b":method", b"GET"), (b":path", b"/a\x7f")],
    [(b":method", b"GET")],
    [(b"x", b"1"), (b":method", b"GET"), (b":path", b"/")],
    [(b":method", b"GET"), (b":path", b"/"), (b":status", b"200")],
])
def test_bad_pseudo_headers(headers) -> None:
    with pytest.raises(Refused):
        check_request(headers)


def test_allowed() -> None:
    check_request(BASE + [(b"te", b"trailers"), (b"content-length", b"3"), (b"x-ok", b"v")])
    check_request([(b":method", b"CONNECT"), (b":authority", b"a:1")])


def test_outbound_strips_identity_in_any_case_and_hop_by_hop() -> None:
    out = outbound_request(BASE + [
        (b"Isthmus-Source-Identity", b"x"), (b"isthmus-source-identity", b"y"),
        (b"ISTHMUS-OTHER", b"z"), (b"X-Forwarded-Client-Cert", b"By=evil"),
        (b"connection", b"x-secret, keep-alive"), (b"x-secret", b"1"), (b"keep-alive", b"5"),
        (b"te", b"gzip"), (b"host", b"h"), (b"x-kept", b"1")])
    assert out == BASE + [(b"x-kept", b"1")]


def test_identity_count_and_trailers() -> None:
    assert source_identity(BASE) is None
    assert source_identity(BASE + [(b"isthmus-source-identity", b"a")]) == b"a"
    with pytest.raises(Refused) as exc:
        source_identity(BASE + [(b"isthmus-source-identity", b"a"),
                                (b"ISTHMUS-SOURCE-IDENTITY", b"b")])
    assert exc.value.status == 403
    assert request_trailers([(b"isthmus-source-identity", b"a"), (b"x-forwarded-client-cert", b"b"),
                             (b":path", b"/"), (b"grpc-status", b"0")]) == [(b"grpc-status", b"0")]


def test_header_list_budget_counts_rfc9113_overhead() -> None:
    assert header_list_size([(b"ab", b"cd")]) == 4 + 32
    check_size([(b"a", b"b" * 100)], 133)
    with pytest.raises(Refused) as exc:
        check_size([(b"a", b"b" * 100)], 132)
    assert exc.value.status == 431


def test_body_framing() -> None:
    head = BodyFraming([(b":status", b"403"), (b"content-length", b"5")], "HEAD")
    assert head.data(5) is None and head.end_ok()
    for status in (b"204", b"304"):
        assert BodyFraming([(b":status", status)], "GET").data(1) is None
    cl = BodyFraming([(b":status", b"200"), (b"content-length", b"5")], "GET")
    assert cl.data(3) is True and not cl.end_ok()
    assert cl.data(3) is False
    assert cl.data(2) is True and cl.end_ok()
    req = BodyFraming(BASE + [(b"content-length", b"2")])
    assert req.data(2) is True and req.end_ok()
    free = BodyFraming([(b":status", b"200")], "GET")
    assert free.data(10**6) is True and free.end_ok()

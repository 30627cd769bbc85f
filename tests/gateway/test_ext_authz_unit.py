"""CUSTOM authorization below the gateways: the pure parts (gateway/_extauthz.py: CheckRequest building,
reading answers, header changes that may never touch Isthmus' identity headers) and the
per-provider concurrency bound of the clients (gateway/_extauthz_io.py) against a real authorizer."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.rpc import status_pb2
from hypothesis import given
from hypothesis import strategies as st

from federation.models import ExtAuthzHttp, ExtensionProvider
from gateway._decision import RequestAttrs
from gateway._extauthz import (HeaderMutation, MalformedAnswer, Verdict, decision_for, grpc_check_request,
                               grpc_verdict, http_check_request, http_verdict, protected)

ATTRS = RequestAttrs("east", "spiffe://east.isthmus.local/ns/isthmus-system/sa/isthmus-gateway",
                     "spiffe://east.isthmus.local/ns/default/sa/client", "shop", "cart", 8080, "POST",
                     "/admin/x?y=1",
                     ((b":method", b"POST"), (b":path", b"/admin/x?y=1"), (b":authority", b"cart.shop:8080"),
                      (b":scheme", b"https"), (b"x-a", b"1"), (b"x-a", b"2"), (b"authorization", b"Bearer t")))


def opt(key: str, value: str, append: bool | None = None) -> base_pb2.HeaderValueOption:
    o = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value))
    if append is not None:
        o.append.value = append
    return o


def test_check_request_is_filled_as_envoy_does() -> None:
    req = grpc_check_request(ATTRS, cluster="west", identity="spiffe://west.isthmus.local/gw")
    a = req.attributes
    assert a.source.principal == "spiffe://east.isthmus.local/ns/default/sa/client"
    assert a.destination.principal == "spiffe://west.isthmus.local/gw"
    h = a.request.http
    assert (h.method, h.path, h.query, h.host, h.scheme) == ("POST", "/admin/x?y=1", "y=1", "cart.shop:8080", "https")
    assert h.headers["x-a"] == "1,2" and ":scheme" not in h.headers and h.headers[":path"] == "/admin/x?y=1"
    assert dict(a.context_extensions) == {"source_cluster": "east", "destination_cluster": "west",
                                          "destination_namespace": "shop", "destination_service": "cart"}


def test_ok_response_changes_only_what_isthmus_does_not_own() -> None:
    resp = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0), ok_response=external_auth_pb2.OkHttpResponse(
        headers=[opt("x-user", "alice"), opt("x-a", "3", append=True), opt("isthmus-source-identity", "spiffe://x"),
                 opt(":path", "/other"), opt("x-forwarded-client-cert", "forged"), opt("host", "evil")],
        headers_to_remove=["x-gone", "isthmus-source-identity"]))
    v = grpc_verdict(resp)
    assert v.result == "allowed"
    assert set(v.ignored) == {b"isthmus-source-identity", b":path", b"x-forwarded-client-cert", b"host"}
    out = v.mutation([(b":path", b"/p"), (b"isthmus-source-identity", b"spiffe://real"), (b"x-a", b"1"),
                      (b"x-gone", b"1"), (b"x-user", b"mallory")])
    assert out == [(b":path", b"/p"), (b"isthmus-source-identity", b"spiffe://real"), (b"x-a", b"1"),
                   (b"x-user", b"alice"), (b"x-a", b"3")]


def test_denied_response_carries_status_headers_and_body() -> None:
    resp = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=7), denied_response=external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=401), headers=[opt("www-authenticate", "Bearer")], body="who?"))
    v = grpc_verdict(resp)
    assert (v.result, v.status, v.headers, v.body) == ("denied", 401, ((b"www-authenticate", b"Bearer"),), b"who?")
    d = decision_for("p", "opa", None, v)
    assert not d.allow and d.status == 401 and d.body == b"who?" and d.flags == "UAEX"
    # No status in the denied_response: 403, as Envoy does.
    assert grpc_verdict(external_auth_pb2.CheckResponse(status=status_pb2.Status(code=7))).status == 403


def test_a_malformed_answer_is_an_error() -> None:
    bad = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0), ok_response=external_auth_pb2.OkHttpResponse(
        headers=[opt("x-bad", "a\r\nb")]))
    with pytest.raises(MalformedAnswer):
        grpc_verdict(bad)
    too_many = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0), ok_response=external_auth_pb2.OkHttpResponse(
        headers=[opt(f"x-{i}", "v") for i in range(65)]))
    with pytest.raises(MalformedAnswer):
        grpc_verdict(too_many)


def test_fail_open_and_status_on_error() -> None:
    closed = ExtensionProvider.model_validate({"name": "o", "ext_authz_grpc": {"address": "a:1", "status_on_error": 503}})
    opened = ExtensionProvider.model_validate({"name": "o", "ext_authz_grpc": {"address": "a:1", "fail_open": True}})
    for result in ("error", "timeout"):
        d = decision_for("p", "o", closed, Verdict(result))
        assert not d.allow and d.status == 503 and d.flags == "UAEX" and d.details == "ext_authz_error"
        d = decision_for("p", "o", opened, Verdict(result))
        assert d.allow and d.log_flags == "UAEX"
    assert not decision_for("p", "gone", None, Verdict("error")).allow  # unknown provider: closed


def test_http_request_and_answers() -> None:
    cfg = ExtAuthzHttp(address="authz:80", path_prefix="/check", include_request_headers=("X-A",),
                       headers_to_upstream_on_allow=("x-user", "isthmus-source-identity"),
                       headers_to_downstream_on_deny=("x-why",))
    method, url, headers = http_check_request(cfg, "authz:80", ATTRS, identity="spiffe://west/gw")
    assert (method, url) == ("POST", "http://authz:80/check/admin/x?y=1")
    assert dict(headers) == {"host": "cart.shop:8080", "x-a": "1,2", "authorization": "Bearer t",
                             "x-forwarded-client-cert": "By=spiffe://west/gw;URI=" + ATTRS.source_principal}
    ok = http_verdict(cfg, 200, [(b"X-User", b"al"), (b"isthmus-source-identity", b"x"), (b"x-other", b"1")], b"")
    assert ok.mutation.set == ((b"x-user", b"al"),) and ok.ignored == (b"isthmus-source-identity",)
    no = http_verdict(cfg, 401, [(b"x-why", b"expired"), (b"x-other", b"1")], b"log in")
    assert (no.result, no.status, no.headers, no.body) == ("denied", 401, ((b"x-why", b"expired"),), b"log in")
    with pytest.raises(MalformedAnswer):
        http_verdict(cfg, 503, [], b"")


NAMES = st.sampled_from([b"isthmus-source-identity", b"isthmus-x", b":path", b":authority", b"host",
                         b"x-forwarded-client-cert", b"connection", b"x-user", b"x-a"])


@given(st.lists(st.tuples(NAMES, st.binary(max_size=8).filter(lambda b: b"\r" not in b and b"\n" not in b)), max_size=8),
       st.lists(NAMES, max_size=4))
def test_no_answer_changes_a_protected_header(changes, removes) -> None:
    resp = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0), ok_response=external_auth_pb2.OkHttpResponse(
        headers=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k.decode(), raw_value=v))
                 for k, v in changes],
        headers_to_remove=[n.decode() for n in removes],
        response_headers_to_add=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k.decode(), raw_value=v))
                                 for k, v in changes]))
    try:
        v = grpc_verdict(resp)
    except MalformedAnswer:
        return
    before = [(b":path", b"/"), (b"isthmus-source-identity", b"spiffe://a"), (b"x-forwarded-client-cert", b"c"),
              (b"host", b"h"), (b"x-user", b"u")]
    after = v.mutation(before)
    assert [h for h in after if protected(h[0])] == [h for h in before if protected(h[0])]
    response = [(b":status", b"200"), (b"isthmus-x", b"1"), (b"connection", b"close")]
    assert [h for h in v.response(response) if protected(h[0])] == response


def test_empty_mutation_is_falsy() -> None:
    assert not HeaderMutation() and HeaderMutation(remove=(b"x",))


@pytest.mark.parametrize(("limit", "timeout", "allowed"), [(1, "1500ms", 1), (3, "3s", 3)])
async def test_concurrency_to_a_provider_is_bounded(limit: int, timeout: str, allowed: int) -> None:
    """Three slow checks at once: with one slot the others wait for it, within their
    deadline, and time out; with three all are answered."""
    import trio

    from gateway._extauthz_io import ExtAuthzClients

    from .extauthz_servers import start_authorizer

    server, port, authz = start_authorizer()
    clients = ExtAuthzClients("west")
    try:
        provider = ExtensionProvider.model_validate({"name": "opa", "ext_authz_grpc": {
            "address": f"127.0.0.1:{port}", "timeout": timeout, "max_concurrency": limit}})
        slow = RequestAttrs("east", "", "", "shop", "cart", 80, "GET", "/", ((b":path", b"/"), (b"x-slow", b"1")))
        results: list[str] = []

        async def one() -> None:
            results.append((await clients.check("opa", provider, slow)).result)

        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(one)
        assert sorted(results) == sorted(["allowed"] * allowed + ["timeout"] * (3 - allowed))
        assert authz.max_in_flight == limit
    finally:
        await clients.aclose()
        server.stop(0)


@pytest.mark.parametrize(("path", "set_", "remove", "want"), [
    (b"/p", [("a", "1")], [], b"/p?a=1"),
    (b"/p?a=0&b=1&a=2", [("a", "x y")], [], b"/p?a=x%20y&b=1"),  # overwritten in place, duplicates gone
    (b"/p?a=1&b=2", [], ["a", "missing"], b"/p?b=2"),
    (b"/p?a=1", [], ["a"], b"/p"),
    (b"/p?x", [("k&=#", "v&w=1")], [], b"/p?x&k%26%3D%23=v%26w%3D1"),  # cannot add structure
])
def test_query_rewrite_as_envoy_does(path: bytes, set_, remove, want: bytes) -> None:
    from gateway._extauthz import rewrite_query

    assert rewrite_query(path, set_, remove) == want


def test_ok_response_query_and_response_headers() -> None:
    resp = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0), ok_response=external_auth_pb2.OkHttpResponse(
        response_headers_to_add=[opt("x-said", "ok"), opt("x-more", "1", append=True), opt("isthmus-x", "no")],
        query_parameters_to_set=[base_pb2.QueryParameter(key="a", value="1")], query_parameters_to_remove=["b"]))
    v = grpc_verdict(resp)
    assert v.response.set == ((b"x-said", b"ok"),) and v.response.append == ((b"x-more", b"1"),)
    assert v.ignored == (b"isthmus-x",)
    assert v.mutation([(b":path", b"/x?b=2&c=3"), (b"x-a", b"1")]) == [(b":path", b"/x?c=3&a=1"), (b"x-a", b"1")]
    assert v.response([(b":status", b"200"), (b"x-said", b"old")]) == [(b":status", b"200"), (b"x-said", b"ok"),
                                                                        (b"x-more", b"1")]
    empty_key = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0), ok_response=external_auth_pb2.OkHttpResponse(
        query_parameters_to_set=[base_pb2.QueryParameter(key="", value="1")]))
    with pytest.raises(MalformedAnswer):
        grpc_verdict(empty_key)


def test_http_allow_may_send_headers_to_the_caller() -> None:
    cfg = ExtAuthzHttp(address="authz:80", headers_to_downstream_on_allow=("x-session", "isthmus-x"))
    ok = http_verdict(cfg, 200, [(b"x-session", b"s1"), (b"isthmus-x", b"no"), (b"x-other", b"1")], b"")
    assert ok.response.set == ((b"x-session", b"s1"),) and ok.ignored == (b"isthmus-x",)


def test_check_request_carries_socket_addresses() -> None:
    import dataclasses

    a = dataclasses.replace(ATTRS, source_address=("10.0.0.7", 40123), destination_address=("10.0.0.1", 15443))
    at = grpc_check_request(a, cluster="west").attributes
    assert (at.source.address.socket_address.address, at.source.address.socket_address.port_value) == (
        "10.0.0.7", 40123)
    assert (at.destination.address.socket_address.address,
            at.destination.address.socket_address.port_value) == ("10.0.0.1", 15443)
    assert not grpc_check_request(ATTRS, cluster="west").attributes.source.HasField("address")  # unknown: unset


@pytest.mark.parametrize(("data", "complete", "length", "partial_ok", "want"), [
    (b"abc", True, 3, False, ("abc", False, 3)),
    (b"abc", True, None, False, ("abc", False, 3)),
    (b"x" * 11, False, None, False, "too_large"),
    (b"", False, 11, False, "too_large"),  # refused by its content-length alone
    (b"x" * 11, False, None, True, ("x" * 10, True, -1)),
    (b"abc", False, None, False, "incomplete"),  # the rest did not arrive in time
    (b"abc", False, 50, True, ("abc", True, 50)),
])
def test_the_body_a_provider_gets(data: bytes, complete: bool, length, partial_ok: bool, want) -> None:
    from federation.models import IncludeRequestBody
    from gateway._extauthz import body_for

    got = body_for(IncludeRequestBody(max_request_bytes=10, allow_partial_message=partial_ok), data, complete, length)
    assert (got if isinstance(got, str) else (got.data.decode(), got.partial, got.size)) == want


def test_parked_collects_up_to_the_bound_and_acks_only_that() -> None:
    """Bytes are acknowledged (the caller's window reopens) until more than the bound
    arrived; the rest waits under flow control; replayed with the credit still owed."""
    from gateway._authz import Parked
    from gateway._half import Half, link

    class Down(Half):
        def __init__(self) -> None:
            super().__init__()
            self.acked = 0

        def ack(self, credit: int) -> None:
            self.acked += credit

    class Up(Down):
        def __init__(self) -> None:
            super().__init__()
            self.got: list = []

        def write_data(self, data: bytes, credit: int) -> None:
            self.got.append((data, credit))

        def write_end(self) -> None:
            self.got.append("end")

    down, parked = Down(), Parked()
    link(down, parked)
    parked.write_data(b"a" * 4, 4)  # before collecting: held, not acked
    woken: list[int] = []
    parked.collect(10, lambda: woken.append(1))
    assert down.acked == 4 and not woken
    parked.write_data(b"b" * 8, 8)  # 12 > 10: acked (it started under the bound), wakes
    assert down.acked == 12 and woken == [1]
    parked.write_data(b"c" * 5, 5)  # past the bound: flow control holds the rest
    parked.write_end()
    assert down.acked == 12 and woken == [1]
    assert parked.body() == (b"a" * 4 + b"b" * 8 + b"c" * 5, True)
    up = Up()
    parked.replay(up)
    assert up.got == [(b"aaaa", 0), (b"b" * 8, 0), (b"c" * 5, 5), "end"]


def test_a_provider_change_changes_the_policy_digest() -> None:
    """/config's policies digest covers the providers: a gateway shows a provider change."""
    from federation.models import Snapshot
    from gateway._authz import Authz

    def digest(timeout: str) -> str:
        p = ExtensionProvider.model_validate({"name": "o", "ext_authz_grpc": {"address": "a:1", "timeout": timeout}})
        return Authz().compile(Snapshot(revision=1, extension_providers=(p,))).digest

    assert digest("1s") == digest("1s") != digest("2s")
    assert Authz().compile(Snapshot(revision=1)).digest != digest("1s")

"""The outbound and inbound decisions (``gateway/_proxy.py``), driven directly on the
route tables real gateways build from a snapshot (the gateways are configured, not run:
these are the pure functions the relay calls per request, with no socket).

Each test pins one promise the mutation run (tests/mutation) found unpinned: HTTP/2's
ban on connection-specific headers against HTTP/1.1's dropping them, the ``:authority``
a request without one gets, CONNECT only to TCP ports on both sides, identity refusals
told apart from malformed requests, exactly one verified ``x-forwarded-client-cert``
and one trace context, and a denial being final."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation.models import ExportedService, ServicePort
from gateway import Gateway
from gateway._context import RequestContext
from gateway._decision import Decision
from gateway._proxy import Forward, inbound, outbound
from gateway._telemetry import Exchange

from .conftest import Pki, gateway_config, make_snapshot

WEB_OUT = b"web.default.west.isthmus.local:8080"
TCP_OUT = b"tcpecho.default.west.isthmus.local:7"
WEB_IN = b"web.default.svc.cluster.local:8080"
TCP_IN = b"tcpecho.default.svc.cluster.local:7"
EAST_WL = "spiffe://east.isthmus.local/ns/default/sa/client"
IDENTITY = b"isthmus-source-identity"
# Built at run time: a header name from the wire is never the gateway's own constant
# object, so an identity comparison (``is``) in place of equality would show.
XFCC = "x-forwarded-client-cert".encode()
TRACEPARENT = "traceparent".encode()
INCOMING_TRACE = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def gws(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Gateway]:
    tmp: Path = tmp_path_factory.mktemp("proxy-decisions")
    shadowy = ExportedService(cluster="west", namespace="default", name="web-shadow", ports=(
        ServicePort(port=8080, protocol="HTTP2", target="127.0.0.1:3"),))
    snap = make_snapshot(pki, {"east": 1, "west": 2}, 3, 4, 5, 6, extra_services=(shadowy,))
    out = {}
    for c in ("east", "west"):
        g = Gateway(gateway_config(pki, c, tmp, access_log=False))
        assert g.apply_snapshot(snap), g.last_rejected
        out[c] = g
    return out


def _ctx(g: Gateway, headers: list, protocol: str = "HTTP/2", reporter: str = "source") -> RequestContext:
    return RequestContext.parse(headers, Exchange(reporter, protocol, g.recorder))


def _out(g: Gateway, headers: list, protocol: str = "HTTP/2") -> Forward | Decision:
    return outbound(headers, g.state.routes, EAST_WL, _ctx(g, headers, protocol))


def _allow(attrs: object) -> Decision:
    return Decision(allow=True)


def _in(g: Gateway, headers: list, authorize=_allow, **kw) -> Forward | Decision:  # type: ignore[no-untyped-def]
    routes = g.state.routes
    peer = routes.peer("east.isthmus.local")
    assert peer is not None
    return inbound(headers, routes, peer, "spiffe://east.isthmus.local/ns/isthmus-system/sa/isthmus-gateway",
                   authorize, _ctx(g, headers, reporter="destination"), local_id=g.identity, **kw)


def _get(authority: bytes, *extra: tuple[bytes, bytes], path: bytes = b"/") -> list:
    return [(b":method", b"GET"), (b":scheme", b"http"), (b":path", path), (b":authority", authority), *extra]


def _values(headers: list, name: bytes) -> list[bytes]:
    return [v for k, v in headers if k == name]


# ---------------------------------------------------------------- outbound


def test_http2_refuses_a_connection_specific_header_that_http1_drops(gws: dict[str, Gateway]) -> None:
    headers = _get(WEB_OUT, (b"connection", b"keep-alive"), (b"x-app", b"1"))
    d = _out(gws["east"], headers, "HTTP/2")
    assert isinstance(d, Decision) and (d.status, d.flags) == (400, "DPE"), d
    assert "connection-specific" in d.reason
    f = _out(gws["east"], headers, "HTTP/1.1")
    assert isinstance(f, Forward), f
    assert _values(f.headers, b"connection") == [] and _values(f.headers, b"x-app") == [b"1"]


def test_a_request_named_by_host_alone_gets_exactly_one_authority_with_the_pseudo_headers(
        gws: dict[str, Gateway]) -> None:
    # "0-early" sorts before ":authority": whether one is present is asked by name, not order.
    headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"0-early", b"1"),
               (b"host", WEB_OUT)]
    f = _out(gws["east"], headers, "HTTP/1.1")
    assert isinstance(f, Forward), f
    assert _values(f.headers, b":authority") == [f.dest.authority.encode()]
    names = [k for k, _ in f.headers]
    assert all(k.startswith(b":") for k in names[:names.index(b"0-early")])  # pseudo-headers first
    assert _values(f.headers, b"0-early") == [b"1"]  # only :authority itself is rewritten
    assert _values(f.headers, IDENTITY) == [EAST_WL.encode()]


def test_a_request_with_no_authority_and_no_host_is_a_400(gws: dict[str, Gateway]) -> None:
    d = _out(gws["east"], [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")])
    assert isinstance(d, Decision) and (d.status, d.flags) == (400, "NR"), d


def test_outbound_connect_tunnels_to_tcp_ports_only(gws: dict[str, Gateway]) -> None:
    d = _out(gws["east"], [(b":method", b"CONNECT"), (b":authority", WEB_OUT)])
    assert isinstance(d, Decision) and d.status == 405 and "TCP ports only" in d.reason, d
    f = _out(gws["east"], [(b":method", b"CONNECT"), (b":authority", TCP_OUT)])
    assert isinstance(f, Forward) and f.connect, f


def test_an_outbound_head_grown_past_the_limit_is_refused_not_raised(gws: dict[str, Gateway]) -> None:
    headers = _get(WEB_OUT, (b"x-big", b"a" * 70_000))
    ctx = _ctx(gws["east"], headers)
    d = outbound(headers, gws["east"].state.routes, EAST_WL, ctx, header_limit=65_536)
    assert isinstance(d, Decision) and d.flags == "DPE" and d.status in (400, 431), d


# ---------------------------------------------------------------- inbound


def test_identity_refusals_are_rbac_403_and_malformed_requests_are_dpe_400(gws: dict[str, Gateway]) -> None:
    two = _get(WEB_IN, (IDENTITY, EAST_WL.encode()), (IDENTITY, EAST_WL.encode()))
    d = _in(gws["west"], two)
    assert isinstance(d, Decision) and (d.status, d.flags) == (403, "RBAC"), d
    bad = _get(WEB_IN, (b"te", b"gzip"))  # HTTP/2 allows only "te: trailers"
    d = _in(gws["west"], bad)
    assert isinstance(d, Decision) and (d.status, d.flags) == (400, "DPE"), d


def test_inbound_connect_tunnels_to_tcp_ports_only(gws: dict[str, Gateway]) -> None:
    d = _in(gws["west"], [(b":method", b"CONNECT"), (b":authority", WEB_IN)])
    assert isinstance(d, Decision) and d.status == 405, d
    f = _in(gws["west"], [(b":method", b"CONNECT"), (b":authority", TCP_IN), (IDENTITY, EAST_WL.encode())])
    assert isinstance(f, Forward) and f.connect, f
    assert _values(f.headers, XFCC) == []  # a tunnel carries no HTTP header to the service


def test_the_service_gets_one_xfcc_naming_the_verified_caller_and_one_trace_context(
        gws: dict[str, Gateway]) -> None:
    g = gws["west"]
    headers = _get(WEB_IN, (IDENTITY, EAST_WL.encode()), (XFCC, b"By=evil;URI=spiffe://evil/x"),
                   (TRACEPARENT, INCOMING_TRACE))
    f = _in(g, headers)
    assert isinstance(f, Forward), f
    assert _values(f.headers, XFCC) == [f"By={g.identity};URI={EAST_WL}".encode()]
    [trace] = _values(f.headers, TRACEPARENT)
    assert trace.split(b"-")[1] == INCOMING_TRACE.split(b"-")[1]  # the caller's trace, continued


def test_a_caller_with_no_identity_gets_no_xfcc(gws: dict[str, Gateway]) -> None:
    f = _in(gws["west"], _get(WEB_IN, (XFCC, b"By=evil")))
    assert isinstance(f, Forward), f
    assert _values(f.headers, XFCC) == []


def test_a_denial_is_final_and_a_pending_decision_is_left_to_the_gateway(gws: dict[str, Gateway]) -> None:
    denied = Decision(allow=False, status=403, reason="denied by the test's policy")
    d = _in(gws["west"], _get(WEB_IN, (IDENTITY, EAST_WL.encode())), authorize=lambda attrs: denied)
    assert d is denied
    pending = Decision(allow=False, pending=lambda: denied)
    f = _in(gws["west"], _get(WEB_IN, (IDENTITY, EAST_WL.encode())), authorize=lambda attrs: pending)
    assert isinstance(f, Forward) and f.decision is pending, f  # parked, decided later


def test_the_service_gets_the_path_as_normalized_for_authorization(gws: dict[str, Gateway]) -> None:
    seen = []

    def authorize(attrs):  # type: ignore[no-untyped-def]
        seen.append(attrs.path)
        return Decision(allow=True)

    headers = [(":method".encode(), b"GET"), (":scheme".encode(), b"http"), (":path".encode(), b"/admin/../public/./x"),
               (":authority".encode(), WEB_IN)]
    f = _in(gws["west"], headers, authorize=authorize)
    assert isinstance(f, Forward), f
    assert seen == ["/public/x"] and _values(f.headers, b":path") == [b"/public/x"]
    assert _values(f.headers, b":authority") == [WEB_IN] and _values(f.headers, b":method") == [b"GET"]


def test_an_inbound_request_with_no_authority_is_a_400(gws: dict[str, Gateway]) -> None:
    d = _in(gws["west"], [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")])
    assert isinstance(d, Decision) and (d.status, d.flags) == (400, "NR"), d


def test_a_mirrors_shadow_copy_reaches_the_service_it_names(gws: dict[str, Gateway]) -> None:
    f = _in(gws["west"], _get(b"web.default.svc.cluster.local-shadow:8080", (IDENTITY, EAST_WL.encode())))
    assert isinstance(f, Forward) and f.route.service == "web", f
    # A service whose own name has "-shadow" in it is itself, not a copy of another.
    f = _in(gws["west"], _get(b"web-shadow.default.svc.cluster.local:8080", (IDENTITY, EAST_WL.encode())))
    assert isinstance(f, Forward) and f.route.service == "web-shadow", f
    d = _in(gws["west"], _get(b"nothing.default.svc.cluster.local-shadow:8080"))
    assert isinstance(d, Decision) and d.flags == "NR", d  # 404, as for any name not exported


def test_an_inbound_head_grown_past_the_limit_is_refused_not_raised(gws: dict[str, Gateway]) -> None:
    d = _in(gws["west"], _get(WEB_IN, (IDENTITY, EAST_WL.encode()), (b"x-big", b"a" * 5000)), header_limit=4096)
    assert isinstance(d, Decision) and (d.status, d.flags) == (431, "DPE"), d

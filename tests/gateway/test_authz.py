"""Federation AuthorizationPolicy enforced at the inbound gateway, across three clusters.

east, west and central gateways run in-process with real TLS; west exports the services
and enforces the policies carried in the snapshot.  Callers are real peer gateways (raw
HTTP/2 with a gateway certificate, asserting a workload identity as an outbound gateway
does) or real workloads calling through their own cluster's outbound listener.
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trio

import trust
from federation.models import (
    AuthorizationPolicy,
    ExportedService,
    Rule,
    RuleFrom,
    RuleTo,
    Selector,
    ServicePort,
    Snapshot,
)
from gateway import Decision, Gateway

from .backends import SERVICE, H2Backend, start_grpc_server, tcp_echo
from .conftest import Pki, gateway_config, make_snapshot
from .h2client import h2_request

CLUSTERS = ("east", "west", "central")
WEB = "web.default.svc.cluster.local:8080"
OPEN = "open.default.svc.cluster.local:8080"
ECHO_OUT = "echo.default.west.isthmus.local:50051"


def _ensure_central(pki: Pki) -> None:
    # The session PKI has east/west/rogue; a third cluster for these tests only.
    if "central" not in pki.cas:
        pki.cas["central"] = pki.root.issue_cluster("central", validity=86400)
        pki.gw["central"] = pki.cas["central"].issue(
            trust.gateway_id(pki.td("central")), pki.dir / "gw-central", validity=3600)


@dataclass
class Mesh3:
    pki: Pki
    gws: dict[str, Gateway]
    web: H2Backend
    grpc_port: int
    echo_port: int
    tmp: Path

    @property
    def west(self) -> Gateway:
        return self.gws["west"]

    def snapshot(self, revision: int, policies: tuple[Any, ...] = ()) -> Snapshot:
        snap = make_snapshot(
            self.pki, {c: g.ports["inbound"] for c, g in self.gws.items()},
            self.web.port, self.web.port, self.grpc_port, self.echo_port, revision,
            (ExportedService(cluster="west", namespace="default", name="open", ports=(
                ServicePort(name="http", port=8080, protocol="HTTP2",
                            target=f"127.0.0.1:{self.web.port}"),)),))
        return snap.model_copy(update={"policies": tuple(policies)})

    def apply(self, revision: int, policies: tuple[Any, ...] = ()) -> Snapshot:
        snap = self.snapshot(revision, policies)
        for g in self.gws.values():
            g.apply_snapshot(snap)
        return snap

    def gw_ctx(self, cluster: str):
        f = self.pki.gw[cluster]
        return trust.client_context(f.bundle, f.cert, f.key)

    async def call(self, peer: str, identity: str | None, path: str = "/echo",
                   method: str = "GET", authority: str = WEB, body: bytes = b"",
                   extra: tuple[tuple[bytes, bytes], ...] = ()) -> tuple[dict, bytes]:
        """As peer cluster ``peer``'s gateway would: straight to west's inbound listener."""
        h = [(b":method", method.encode()), (b":scheme", b"https"), (b":path", path.encode()),
             (b":authority", authority.encode())]
        if identity:
            h.append((b"isthmus-source-identity", identity.encode()))
        h.extend(extra)
        return await h2_request(self.west.ports["inbound"], h, body=body,
                                ssl_context=self.gw_ctx(peer))


def wl(cluster: str, ns: str, sa: str) -> str:
    return f"spiffe://{cluster}.isthmus.local/ns/{ns}/sa/{sa}"


async def _mesh3(pki: Pki, nursery: trio.Nursery, tmp_path: Path, **gw_kwargs: Any):
    _ensure_central(pki)
    web = await nursery.start(H2Backend().serve)
    echo_port = await nursery.start(tcp_echo)
    grpc_server, grpc_port = start_grpc_server()
    gws = {}
    for c in CLUSTERS:
        gws[c] = Gateway(gateway_config(pki, c, tmp_path), **(gw_kwargs if c == "west" else {}))
        await nursery.start(gws[c].run)
    m = Mesh3(pki, gws, web, grpc_port, echo_port, tmp_path)
    m.apply(1)
    return m, grpc_server


@pytest.fixture
async def mesh3(pki: Pki, nursery: trio.Nursery, tmp_path: Path):
    m, server = await _mesh3(pki, nursery, tmp_path)
    yield m
    for g in m.gws.values():
        g.stop()
    server.stop(0)


def requests_total(gw: Gateway, **labels: str) -> float:
    total = 0.0
    for metric in gw.metrics.registry.collect():
        for s in metric.samples:
            if s.name == "istio_requests_total" and all(s.labels.get(k) == v
                                                        for k, v in labels.items()):
                total += s.value
    return total


# ---------------------------------------------------------------- the policy matrix

SEL_WEB = Selector(namespace="default", service="web")
MATRIX_POLICIES = (
    AuthorizationPolicy(name="deny-admin", selector=SEL_WEB, action="DENY",
                        rules=(Rule(to=(RuleTo(paths=("/admin*",)),)),)),
    AuthorizationPolicy(name="allow-east-shop", selector=SEL_WEB, rules=(Rule(
        from_=(RuleFrom(clusters=("east",), namespaces=("shop",)),),
        to=(RuleTo(methods=("GET",)),)),)),
    AuthorizationPolicy(name="allow-billing", selector=SEL_WEB, rules=(Rule(
        from_=(RuleFrom(principals=("spiffe://central.isthmus.local/ns/billing/sa/*",)),)),)),
    AuthorizationPolicy(name="audit-posts", selector=SEL_WEB, action="AUDIT",
                        rules=(Rule(to=(RuleTo(methods=("POST",)),)),)),
    AuthorizationPolicy(name="deny-west-ports", selector=Selector(service="tcpecho"),
                        action="DENY", rules=(Rule(to=(RuleTo(paths=("/x",)),)),)),
)


@pytest.mark.parametrize("peer, identity, method, path, status, policy", [
    ("east", wl("east", "shop", "cart"), "GET", "/echo", 200, None),
    # DENY beats ALLOW: the same caller, on a denied path
    ("east", wl("east", "shop", "cart"), "GET", "/admin/users", 403, "deny-admin"),
    ("east", wl("east", "shop", "cart"), "GET", "/admin?x=1", 403, "deny-admin"),
    # an ALLOW selects web: anything no ALLOW matches is denied
    ("east", wl("east", "shop", "cart"), "DELETE", "/echo", 403, ""),
    ("east", wl("east", "other", "cart"), "GET", "/echo", 403, ""),
    ("east", None, "GET", "/echo", 403, ""),  # no principal, no namespace
    # wildcard principal; the cluster comes from the peer's certificate, not the ID
    ("central", wl("central", "billing", "invoicer"), "POST", "/echo", 200, None),
    ("central", wl("central", "shop", "cart"), "GET", "/echo", 403, ""),
    ("central", wl("central", "billing", "invoicer"), "GET", "/admin", 403, "deny-admin"),
])
async def test_policy_matrix(mesh3: Mesh3, peer, identity, method, path, status, policy) -> None:
    mesh3.apply(2, MATRIX_POLICIES)
    before = mesh3.web.requests
    resp, body = await mesh3.call(peer, identity, path, method)
    assert resp[b":status"] == str(status).encode(), body
    if status == 200:
        assert json.loads(body)["path"] == path
        return
    assert mesh3.web.requests == before  # never reached the service
    if policy:
        assert body == f"RBAC: access denied by policy '{policy}'\n".encode()
    else:
        assert body == b"RBAC: access denied (no ALLOW policy matched)\n"
    flags = requests_total(mesh3.west, response_flags="RBAC", response_code="403",
                           reporter="destination", source_cluster=peer)
    assert flags == 1


async def test_service_no_allow_selects_stays_open(mesh3: Mesh3) -> None:
    mesh3.apply(2, MATRIX_POLICIES)
    resp, _ = await mesh3.call("central", None, authority=OPEN)
    assert resp[b":status"] == b"200"


async def test_denial_body_names_policy_and_nothing_else(mesh3: Mesh3, logs) -> None:
    mesh3.apply(2, MATRIX_POLICIES)
    resp, body = await mesh3.call("east", wl("east", "other", "x"), "/echo")
    assert resp[b":status"] == b"403"
    for secret in (b"allow-east-shop", b"allow-billing", b"shop", b"east", b"rule"):
        assert secret not in body
    denied = [e for e in logs if e["event"] == "inbound.denied"]
    assert "allow-east-shop" in denied[0]["reason"]  # the details go to the log
    access = [e for e in logs if e["event"] == "access" and e["response_code"] == 403]
    assert access[0]["response_flags"] == "RBAC"
    assert access[0]["response_code_details"] == "rbac_access_denied_matched_policy[none]"


async def test_audit_marks_the_access_log(mesh3: Mesh3, logs) -> None:
    mesh3.apply(2, MATRIX_POLICIES)
    ok, _ = await mesh3.call("central", wl("central", "billing", "a"), "/echo", "POST", body=b"hi")
    denied, _ = await mesh3.call("east", wl("east", "shop", "cart"), "/echo", "POST", body=b"x")
    plain, _ = await mesh3.call("central", wl("central", "billing", "a"), "/echo", "GET")
    assert (ok[b":status"], denied[b":status"], plain[b":status"]) == (b"200", b"403", b"200")
    lines = [e for e in logs if e["event"] == "access" and e["reporter"] == "destination"]
    assert [(e["method"], e["response_code"], e["audit_policy"]) for e in lines] == [
        ("POST", 200, "audit-posts"), ("POST", 403, "audit-posts"), ("GET", 200, None)]


async def test_connect_tunnels_are_checked_without_http_fields(mesh3: Mesh3) -> None:
    """DENY rules with HTTP-only fields match TCP (the restrictive reading); ALLOW ones don't."""
    tcp = "tcpecho.default.svc.cluster.local:7".encode()
    h = [(b":method", b"CONNECT"), (b":authority", tcp),
         (b"isthmus-source-identity", wl("east", "shop", "cart").encode())]
    mesh3.apply(2, MATRIX_POLICIES)
    resp, body = await h2_request(mesh3.west.ports["inbound"], h, ssl_context=mesh3.gw_ctx("east"))
    assert resp[b":status"] == b"403" and b"deny-west-ports" in body
    allow_get = AuthorizationPolicy(name="allow-get", selector=Selector(service="tcpecho"),
                                    rules=(Rule(to=(RuleTo(methods=("GET",)),)),))
    allow_east = AuthorizationPolicy(name="allow-east", selector=Selector(service="tcpecho"),
                                     rules=(Rule(from_=(RuleFrom(clusters=("east",)),),
                                                 to=(RuleTo(ports=(7,)),)),))
    mesh3.apply(3, (allow_get,))
    resp, _ = await h2_request(mesh3.west.ports["inbound"], h, ssl_context=mesh3.gw_ctx("east"))
    assert resp[b":status"] == b"403"
    mesh3.apply(4, (allow_get, allow_east))
    # allowed by port and cluster: a real tunnel to the echo server
    assert await _tunnel(mesh3.west.ports["inbound"], h, mesh3.gw_ctx("east")) == b"ping"
    resp, _ = await h2_request(mesh3.west.ports["inbound"], h, ssl_context=mesh3.gw_ctx("central"))
    assert resp[b":status"] == b"403"


async def _tunnel(port: int, headers, ctx) -> bytes:
    """CONNECT, wait for 200, send "ping", read the echo."""
    import h2.config
    import h2.connection
    import h2.events

    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx,
                            server_hostname="gateway")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                 header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(1, headers)
    await stream.send_all(conn.data_to_send())
    got = b""
    with trio.fail_after(5):
        while got != b"ping":
            for e in conn.receive_data(await stream.receive_some(65536)):
                if isinstance(e, h2.events.ResponseReceived):
                    assert dict(e.headers)[b":status"] == b"200"
                    conn.send_data(1, b"ping")
                elif isinstance(e, h2.events.DataReceived):
                    got += e.data
            await stream.send_all(conn.data_to_send())
    await trio.aclose_forcefully(stream)
    return got


async def test_workload_identity_through_the_outbound_gateway(mesh3: Mesh3) -> None:
    """A workload with an mTLS certificate calls east's outbound listener; east asserts its
    identity; west's policy allows east/shop and refuses east/other."""
    mesh3.apply(2, MATRIX_POLICIES)
    port = mesh3.gws["east"].ports["outbound"]
    out = []
    for ns in ("shop", "other"):
        f = mesh3.pki.issue("east", ns, "cart", f"wl-authz-{ns}")
        ctx = trust.client_context(f.bundle, f.cert, f.key)
        h = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/echo"),
             (b":authority", b"web.default.west.isthmus.local:8080")]
        resp, body = await h2_request(port, h, ssl_context=ctx)
        out.append((resp[b":status"], body))
    assert out[0][0] == b"200"
    assert json.loads(out[0][1])["headers"]["isthmus-source-identity"] == wl("east", "shop", "cart")
    assert out[1] == (b"403", b"RBAC: access denied (no ALLOW policy matched)\n")


# ---------------------------------------------------------------- gRPC


def _channel(m: Mesh3, cluster: str = "east") -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{m.gws[cluster].ports['outbound']}",
                                 options=[("grpc.default_authority", ECHO_OUT)])


def _m(name: str) -> str:
    return f"/{SERVICE}/{name}"


DENY_UNARY = AuthorizationPolicy(
    name="deny-unary", selector=Selector(namespace="default", service="echo"), action="DENY",
    rules=(Rule(to=(RuleTo(paths=(f"/{SERVICE}/Unary",)),)),))


async def test_grpc_denial_is_permission_denied_trailers_only(mesh3: Mesh3) -> None:
    mesh3.apply(2, (DENY_UNARY,))

    def call():
        with _channel(mesh3) as ch:
            try:
                ch.unary_unary(_m("Unary"))(b"hello", timeout=10)
            except grpc.RpcError as e:
                denied = (e.code(), e.details())
            streamed = list(ch.unary_stream(_m("ServerStream"))(b"3", timeout=10))
        return denied, streamed

    denied, streamed = await trio.to_thread.run_sync(call)
    assert denied == (grpc.StatusCode.PERMISSION_DENIED, "RBAC: access denied by policy 'deny-unary'")
    assert streamed == [b"0", b"1", b"2"]
    assert requests_total(mesh3.west, response_flags="RBAC", grpc_response_status="7",
                          request_protocol="grpc") == 1
    # the raw answer: HTTP 200, grpc-status 7 in the headers frame, no body
    h = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", _m("Unary").encode()),
         (b":authority", b"echo.default.svc.cluster.local:50051"),
         (b"content-type", b"application/grpc"), (b"te", b"trailers")]
    resp, body = await h2_request(mesh3.west.ports["inbound"], h, body=b"\0\0\0\0\0",
                                  ssl_context=mesh3.gw_ctx("east"))
    assert (resp[b":status"], resp[b"grpc-status"], body) == (b"200", b"7", b"")


async def test_policy_change_mid_stream_keeps_the_stream_on_its_old_set(mesh3: Mesh3) -> None:
    started, applied = threading.Event(), threading.Event()

    def bidi():
        q: queue.Queue = queue.Queue()

        def gen():
            while (item := q.get()) is not None:
                yield item

        with _channel(mesh3) as ch:
            responses = ch.stream_stream(_m("Bidi"))(gen(), timeout=20)
            out = []
            q.put(b"before")
            out.append(next(responses))
            started.set()
            assert applied.wait(10)
            for i in range(5):
                q.put(b"after%d" % i)
                out.append(next(responses))
            q.put(None)
            out.extend(responses)
            return out

    deny_all = AuthorizationPolicy(name="deny-echo", action="DENY",
                                   selector=Selector(namespace="default", service="echo"),
                                   rules=(Rule(),))
    async with trio.open_nursery() as n:
        result: list = []

        async def run() -> None:
            result.append(await trio.to_thread.run_sync(bidi))

        n.start_soon(run)
        assert await trio.to_thread.run_sync(started.wait, 10)
        mesh3.apply(7, (deny_all,))
        assert mesh3.west.state.policy.revision == 7
        applied.set()
    assert result[0] == [b"BEFORE"] + [b"AFTER%d" % i for i in range(5)]

    def fresh():
        with _channel(mesh3) as ch:
            try:
                ch.unary_unary(_m("Unary"))(b"x", timeout=10)
            except grpc.RpcError as e:
                return e.code()
    assert await trio.to_thread.run_sync(fresh) == grpc.StatusCode.PERMISSION_DENIED


# ---------------------------------------------------------------- revision, fail closed, hook


async def test_policy_revision_in_config_and_metrics(mesh3: Mesh3) -> None:
    mesh3.apply(42, MATRIX_POLICIES)
    async with httpx.AsyncClient() as c:
        doc = (await c.get(f"http://127.0.0.1:{mesh3.west.ports['admin']}/config")).json()
        metrics = (await c.get(f"http://127.0.0.1:{mesh3.west.ports['admin']}/metrics")).text
    assert doc["policy_revision"] == 42
    assert doc["policies"]["count"] == len(MATRIX_POLICIES)
    assert doc["policies"]["digest"].startswith("sha256:")
    assert "isthmus_policy_revision 42.0" in metrics
    east_doc = mesh3.gws["east"].state.policy
    assert east_doc.digest == mesh3.west.state.policy.digest  # same policies, same digest everywhere


async def test_unenforceable_policy_fails_closed(mesh3: Mesh3, logs) -> None:
    bad = AuthorizationPolicy(name="bad-pattern", selector=SEL_WEB, rules=(Rule(
        from_=(RuleFrom(principals=("spiffe://*/ns/*",)),)),))
    bad_sel = AuthorizationPolicy(name="bad-selector", selector=Selector(service="op*n"),
                                  action="AUDIT", rules=(Rule(),))
    mesh3.apply(3, (bad, bad_sel))
    resp, body = await mesh3.call("east", wl("east", "shop", "cart"))
    assert resp[b":status"] == b"403" and b"bad-pattern" in body
    resp, _ = await mesh3.call("east", wl("east", "shop", "cart"), authority=OPEN)
    assert resp[b":status"] == b"200"  # a broken AUDIT policy is dropped, not enforced
    assert mesh3.west.state.policy.failed == ["bad-pattern", "bad-selector"]
    assert mesh3.west.metrics.policy_errors._value.get() == 2
    assert {e["policy"] for e in logs if e["event"] == "authz.policy_failed_closed"} == \
        {"bad-pattern", "bad-selector"}


async def test_extra_hook_runs_after_policies(pki: Pki, nursery: trio.Nursery, tmp_path: Path) -> None:
    seen = []

    def hook(a) -> Decision:
        seen.append(a.path)
        return Decision(a.path != "/hooked", "hook says no")

    m, server = await _mesh3(pki, nursery, tmp_path, authorize=hook)
    try:
        m.apply(2, MATRIX_POLICIES)
        ok, _ = await m.call("east", wl("east", "shop", "cart"), "/echo")
        hooked, body = await m.call("east", wl("east", "shop", "cart"), "/hooked")
        policy, _ = await m.call("east", wl("east", "shop", "cart"), "/admin")
        assert (ok[b":status"], hooked[b":status"], policy[b":status"]) == (b"200", b"403", b"403")
        assert body == b"hook says no\n"
        assert seen == ["/echo", "/hooked"]  # a policy denial never reaches the hook
    finally:
        for g in m.gws.values():
            g.stop()
        server.stop(0)


# ---------------------------------------------------------------- source.cluster


async def test_source_cluster_comes_from_the_peer_certificate_even_without_an_identity(mesh3: Mesh3) -> None:
    """A plain-text workload's call carries no identity; its cluster is still known,
    from the peer gateway's verified certificate."""
    only_east = AuthorizationPolicy(name="only-east", selector=SEL_WEB,
                                    rules=(Rule(from_=(RuleFrom(clusters=("east",)),)),))
    mesh3.apply(2, (only_east,))
    resp, body = await mesh3.call("east", None)
    assert resp[b":status"] == b"200", body
    resp, body = await mesh3.call("central", None)
    assert resp[b":status"] == b"403", body


def test_source_cluster_is_the_peers_not_the_asserted_identitys() -> None:
    """The policy engine is handed the peer's cluster even when the asserted identity
    names another one (the inbound check refuses that pairing before; this pins that
    the decision itself never derives the cluster from the identity)."""
    from federation.jwt import JwksStore
    from gateway._authz import PolicyState
    from gateway._proxy import RequestAttrs

    only_east = AuthorizationPolicy(name="only-east", selector=SEL_WEB,
                                    rules=(Rule(from_=(RuleFrom(clusters=("east",)),)),))
    ps = PolicyState(Snapshot(revision=1, policies=(only_east,)), JwksStore())

    def decide(peer: str, identity: str) -> bool:
        return ps(RequestAttrs(peer, f"spiffe://{peer}.isthmus.local/ns/isthmus-system/sa/isthmus-gateway",
                               identity, "default", "web", 8080, "GET", "/")).allow

    assert decide("east", wl("central", "shop", "cart"))
    assert not decide("central", wl("east", "shop", "cart"))
    assert decide("east", "")


@pytest.mark.parametrize("method", ["ACL", "BIND", "CHECKOUT", "COPY", "GET", "PROPFIND", "UNLOCK"])
def test_only_connect_is_checked_as_a_tunnel(method: str) -> None:
    """Only CONNECT drops the HTTP fields from the check: a request with any other method
    (WebDAV's ACL and BIND sort before "CONNECT") is matched on its path, so a DENY on
    paths holds for it."""
    from federation.jwt import JwksStore
    from gateway._authz import PolicyState
    from gateway._proxy import RequestAttrs

    deny = AuthorizationPolicy(name="deny-admin", selector=SEL_WEB, action="DENY",
                               rules=(Rule(to=(RuleTo(paths=("/admin*",)),)),))
    ps = PolicyState(Snapshot(revision=1, policies=(deny,)), JwksStore())
    gw = "spiffe://east.isthmus.local/ns/isthmus-system/sa/isthmus-gateway"
    d = ps(RequestAttrs("east", gw, wl("east", "shop", "cart"), "default", "web", 8080, method, "/admin/x"))
    assert not d.allow and d.policy == "deny-admin", d
    assert ps(RequestAttrs("east", gw, wl("east", "shop", "cart"), "default", "web", 8080, method, "/x")).allow

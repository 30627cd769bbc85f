"""CUSTOM authorization through two gateways: east's workload calls west's service, west's
inbound gateway asks a real external authorizer (Envoy ext_authz v3 gRPC on xds-protos'
stubs, or HTTP) before its DENY/ALLOW policies."""

from __future__ import annotations

import hashlib
import threading

import grpc
import httpx
import pytest
import trio

import trust
from federation.models import AuthorizationPolicy, ExtensionProvider, Rule, RuleTo, Selector

from .conftest import Mesh
from .extauthz_servers import SLOW, start_authorizer, start_http_authorizer

WEB_FED = "web.default.isthmus.local:8080"
CALLER = "spiffe://east.isthmus.local/ns/default/sa/client"
SEL_WEB = Selector(namespace="default", service="web")


def custom(provider: str = "opa", paths: tuple[str, ...] = ("/echo*",)) -> AuthorizationPolicy:
    return AuthorizationPolicy(name="web-custom", selector=SEL_WEB, action="CUSTOM", provider=provider,
                               rules=(Rule(to=(RuleTo(paths=paths),)),))


def grpc_provider(port: int, **extra: object) -> ExtensionProvider:
    return ExtensionProvider.model_validate(
        {"name": "opa", "ext_authz_grpc": {"address": f"127.0.0.1:{port}", "timeout": "2s", **extra}})


def apply(mesh: Mesh, revision: int, policies: tuple, providers: tuple) -> None:
    snap = mesh.snapshot(revision).model_copy(update={"policies": policies, "extension_providers": providers})
    mesh.west.apply_snapshot(snap)
    mesh.east.apply_snapshot(snap)


def client(mesh: Mesh) -> httpx.AsyncClient:
    f = mesh.pki.issue("east", "default", "client", "wl-east-client")
    ctx = trust.client_context(f.bundle, f.cert, f.key, alpn=("h2",))
    return httpx.AsyncClient(http2=True, verify=ctx, base_url=f"https://127.0.0.1:{mesh.east_out}",
                             headers={"host": WEB_FED}, timeout=10)


def ext_total(mesh: Mesh, result: str, provider: str = "opa") -> float:
    for metric in mesh.west.metrics.registry.collect():
        for s in metric.samples:
            if s.name == "isthmus_ext_authz_total" and s.labels == {"provider": provider, "result": result}:
                return s.value
    return 0.0


def access(logs: list, path: str) -> dict:
    return next(e for e in logs if e.get("event") == "access" and e.get("reporter") == "destination"
                and e.get("path", "").startswith(path))


@pytest.fixture
def authorizer():
    server, port, servicer = start_authorizer()
    yield port, servicer
    server.stop(0)


async def test_custom_grpc_allow_deny_and_request_changes(mesh: Mesh, authorizer, logs) -> None:
    port, authz = authorizer
    apply(mesh, 2, (custom(),), (grpc_provider(port),))
    async with client(mesh) as c:
        ok = await c.get("/echo/a/../b/./c?q=1", headers={"x-remove-me": "1"})
        denied = await c.get("/echo/deny")
        injected = await c.get("/echo/inject", headers={"x-remove-me": "1"})
        huge = await c.get("/echo/huge")
        unmatched = await c.get("/big?n=1")  # outside the CUSTOM rules: not asked
    assert ok.status_code == 200, ok.text
    assert ok.json()["headers"]["x-remove-me"] == "1"  # only /echo/inject removes it
    # The CheckRequest: the caller's SPIFFE ID, the normalized path, clusters, the host.
    first = authz.requests[0].attributes
    assert first.source.principal == CALLER
    assert first.request.http.path == "/echo/b/c?q=1"
    assert first.request.http.method == "GET"
    assert first.request.http.host.startswith("web.default.")
    assert first.context_extensions["source_cluster"] == "east"
    assert first.context_extensions["destination_cluster"] == "west"
    assert first.destination.principal == "spiffe://west.isthmus.local/ns/isthmus-system/sa/isthmus-gateway"
    # A deny: the authorizer's status, header and body reach the caller.
    assert denied.status_code == 418
    assert denied.headers["x-authz-reason"] == "teapot"
    assert denied.text == "denied by the test authorizer\n"
    assert access(logs, "/echo/deny")["response_flags"] == "UAEX"
    # An allow's header changes: the added header arrives, identity headers stay Isthmus'.
    assert injected.status_code == 200, injected.text
    h = injected.json()["headers"]
    assert h["x-authz-added"] == "yes"
    assert "x-remove-me" not in h
    assert h["isthmus-source-identity"] == CALLER
    assert "spiffe://evil" not in h.get("x-forwarded-client-cert", "")
    assert any(e["event"] == "ext_authz.protected_headers_ignored" for e in logs)
    assert huge.status_code == 431  # the header changes would exceed the request's header budget
    assert unmatched.status_code == 200
    assert len(authz.requests) == 4
    assert ext_total(mesh, "allowed") == 3 and ext_total(mesh, "denied") == 1


async def test_custom_deny_comes_before_local_deny(mesh: Mesh, authorizer) -> None:
    """Istio order: CUSTOM first; an allow there still meets the DENY policy."""
    port, authz = authorizer
    deny = AuthorizationPolicy(name="deny-secret", selector=SEL_WEB, action="DENY",
                               rules=(Rule(to=(RuleTo(paths=("/echo/deny*", "/echo/secret")),)),))
    apply(mesh, 2, (custom(), deny), (grpc_provider(port),))
    async with client(mesh) as c:
        both = await c.get("/echo/deny")
        local = await c.get("/echo/secret")
    assert both.status_code == 418  # the authorizer's answer, not RBAC's
    assert local.status_code == 403 and "deny-secret" in local.text
    assert len(authz.requests) == 2


@pytest.mark.parametrize("fail_open", [False, True])
async def test_custom_timeout(mesh: Mesh, authorizer, logs, fail_open: bool) -> None:
    port, authz = authorizer
    apply(mesh, 2, (custom(),), (grpc_provider(port, timeout="150ms", fail_open=fail_open),))
    async with client(mesh) as c:
        start = trio.current_time()
        slow = await c.get("/echo/slow", headers={"x-slow": "1"})
        took = trio.current_time() - start
        fast = await c.get("/echo/fast")  # the next request is not held up
    assert took < SLOW  # answered at the deadline, not when the authorizer answered
    assert slow.status_code == (200 if fail_open else 403), slow.text
    assert fast.status_code == 200
    assert access(logs, "/echo/slow")["response_flags"] == "UAEX"
    assert ext_total(mesh, "timeout") == 1


async def test_custom_authorizer_down_fails_closed(mesh: Mesh, logs) -> None:
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    apply(mesh, 2, (custom(), AuthorizationPolicy(name="other", selector=Selector(namespace="default",
                                                  service="open"), action="CUSTOM", provider="missing",
                                                  rules=(Rule(),))),
          (grpc_provider(dead, status_on_error=503),))
    async with client(mesh) as c:
        r = await c.get("/echo")
    assert r.status_code == 503
    assert access(logs, "/echo")["response_flags"] == "UAEX"
    assert ext_total(mesh, "error") == 1
    assert any(e["event"] == "ext_authz.failed" for e in logs)


async def test_custom_http_authorizer(mesh: Mesh, logs) -> None:
    server, port, seen = start_http_authorizer()
    try:
        provider = ExtensionProvider.model_validate({"name": "oauth", "ext_authz_http": {
            "address": f"127.0.0.1:{port}", "path_prefix": "/check", "timeout": "2s",
            "include_request_headers": ["x-user", "x-boom"],
            "headers_to_upstream_on_allow": ["x-authz-user", "isthmus-source-identity"],
            "headers_to_downstream_on_deny": ["x-authz-reason"],
            "headers_to_downstream_on_allow": ["x-authz-user"],
            "include_request_body": {"max_request_bytes": 1024}}})
        apply(mesh, 2, (custom("oauth"),), (provider,))
        async with client(mesh) as c:
            ok = await c.get("/echo/x/../y", headers={"x-user": "bob", "x-other": "1"})
            denied = await c.get("/echo/deny")
            boom = await c.get("/echo/boom", headers={"x-boom": "1"})
            with_body = await c.post("/echo/body", content=b"a body for the authorizer")
            bad_body = await c.post("/echo/body", content=b"a forbidden body")
    finally:
        server.shutdown()
    assert ok.status_code == 200, ok.text
    h = ok.json()["headers"]
    assert h["x-authz-user"] == "alice" and "x-not-copied" not in h
    assert h["isthmus-source-identity"] == CALLER
    assert ok.headers["x-authz-user"] == "alice"  # headers_to_downstream_on_allow: to the caller too
    method, path, sent, _ = seen[0]
    assert (method, path) == ("GET", "/check/echo/y")
    assert sent["x-user"] == "bob" and "x-other" not in sent
    assert CALLER in sent["x-forwarded-client-cert"]
    assert denied.status_code == 403 and denied.text == "nope from http authz\n"
    assert denied.headers["x-authz-reason"] == "http-says-no"
    assert boom.status_code == 403  # a 5xx from the authorizer is an error: fail closed
    # include_request_body: the authorization request carries the body; the service gets it too.
    assert with_body.status_code == 200 and with_body.json()["body_len"] == 25, with_body.text
    method, path, sent, body = seen[3]
    assert (method, path, body) == ("POST", "/check/echo/body", b"a body for the authorizer")
    assert sent["x-envoy-auth-partial-body"] == "false"
    assert bad_body.status_code == 403 and seen[4][3] == b"a forbidden body"
    assert ext_total(mesh, "allowed", "oauth") == 2
    assert ext_total(mesh, "denied", "oauth") == 2
    assert ext_total(mesh, "error", "oauth") == 1


async def test_custom_on_a_grpc_service(mesh: Mesh, authorizer) -> None:
    """A gRPC caller: an allow reaches the service (the request body waited while parked),
    a deny is a trailers-only PERMISSION_DENIED carrying the authorizer's body."""
    port, authz = authorizer
    pol = AuthorizationPolicy(name="echo-custom", selector=Selector(namespace="default", service="echo"),
                              action="CUSTOM", provider="opa", rules=(Rule(),))
    apply(mesh, 2, (pol,), (grpc_provider(port),))

    def call(metadata: tuple = ()) -> tuple:
        with grpc.insecure_channel(f"127.0.0.1:{mesh.east_out}",
                                   options=[("grpc.default_authority", "echo.default.west.isthmus.local:50051")]) as ch:
            try:
                return ch.unary_unary("/isthmus.test.Echo/Unary")(b"hello", timeout=10, metadata=metadata), None
            except grpc.RpcError as exc:
                return None, exc

    ok, err = await trio.to_thread.run_sync(call)
    assert ok == b"hello", err
    _, err = await trio.to_thread.run_sync(call, (("x-deny", "1"),))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "denied by the test authorizer" in err.details()
    assert authz.requests[0].attributes.request.http.path == "/isthmus.test.Echo/Unary"


async def test_custom_allow_rewrites_the_query_adds_response_headers_and_sees_addresses(mesh: Mesh, authorizer,
                                                                                         logs) -> None:
    """ok_response's query_parameters_to_set/_remove reach the service, its
    response_headers_to_add the caller (never a protected one); the CheckRequest carries
    the socket addresses of the peer gateway's connection as the inbound sees it."""
    port, authz = authorizer
    apply(mesh, 2, (custom(),), (grpc_provider(port),))
    async with client(mesh) as c:
        r = await c.get("/echo/rewrite?a=old&keep=1&drop=x&a=dup")
    assert r.status_code == 200, r.text
    assert r.json()["path"] == "/echo/rewrite?a=new%20value%26x%3D1&keep=1&b=2"
    assert r.headers["x-authz-said"] == "ok"
    assert "isthmus-forged" not in r.headers
    ignored = [e for e in logs if e["event"] == "ext_authz.protected_headers_ignored"]
    assert ignored and set(ignored[0]["headers"]) == {"isthmus-forged", ":status"}
    at = authz.requests[0].attributes
    src, dst = at.source.address.socket_address, at.destination.address.socket_address
    assert (dst.address, dst.port_value) == ("127.0.0.1", mesh.west.ports["inbound"])
    assert src.address == "127.0.0.1" and src.port_value not in (0, dst.port_value)


def body_provider(port: int, timeout: str = "2s", **body: object) -> ExtensionProvider:
    return grpc_provider(port, timeout=timeout, include_request_body={"max_request_bytes": 64, **body})


async def test_custom_grpc_gets_the_body_and_the_service_gets_it_all(mesh: Mesh, authorizer, logs) -> None:
    """include_request_body: the authorizer sees the body (http.body, or raw_body with
    pack_as_bytes), a body past max_request_bytes is 413 without asking unless partial
    messages are allowed, and after an allow the service receives every byte."""
    port, authz = authorizer
    apply(mesh, 2, (custom(),), (body_provider(port),))
    async with client(mesh) as c:
        ok = await c.post("/echo/body", content=b"hello authz")
        denied = await c.post("/echo/body", content=b"this is forbidden")
        big = await c.post("/echo/body", content=b"x" * 65)
        assert len(authz.requests) == 2  # the 413 asked nobody
        # A body much larger than a stream window: held up to the bound, the rest follows.
        body = bytes(range(256)) * 1200  # 300 kB
        apply(mesh, 3, (custom(),), (grpc_provider(port, include_request_body={
            "max_request_bytes": 200_000, "allow_partial_message": True, "pack_as_bytes": True}),))
        partial = await c.post("/echo/body", content=body)
    assert ok.status_code == 200 and ok.json()["body_len"] == 11, ok.text
    http = authz.requests[0].attributes.request.http
    assert (http.body, http.size, http.headers["x-envoy-auth-partial-body"]) == ("hello authz", 11, "false")
    assert denied.status_code == 418
    assert big.status_code == 413 and big.text == "Payload Too Large\n"
    [too] = [e for e in logs if e.get("event") == "access" and e.get("reporter") == "destination"
             and e.get("response_code") == 413]
    assert (too["response_flags"], too["response_code_details"]) == ("UAEX", "ext_authz_request_payload_too_large")
    assert partial.status_code == 200, partial.text
    assert partial.json()["body_len"] == len(body)
    assert partial.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    http = authz.requests[2].attributes.request.http
    assert http.raw_body == body[:200_000] and http.body == ""
    assert (http.size, http.headers["x-envoy-auth-partial-body"]) == (len(body), "true")


@pytest.mark.parametrize("partial", [False, True])
async def test_custom_body_that_never_ends_waits_at_most_the_timeout(mesh: Mesh, authorizer, partial: bool) -> None:
    """A gRPC client stream that sends one message and then waits: the inbound holds it for
    the provider's timeout, then asks with what arrived (allow_partial_message) or fails
    closed as a timeout; after an allow the rest of the stream reaches the service."""
    port, authz = authorizer
    pol = AuthorizationPolicy(name="echo-custom", selector=Selector(namespace="default", service="echo"),
                              action="CUSTOM", provider="opa", rules=(Rule(),))
    apply(mesh, 2, (pol,), (body_provider(port, "300ms", allow_partial_message=partial, pack_as_bytes=True),))
    go_on = trio.Event()
    token = trio.lowlevel.current_trio_token()
    more = threading.Event()

    def messages():
        yield b"first"
        more.wait(10)
        yield b"second"

    def call() -> tuple:
        with grpc.insecure_channel(f"127.0.0.1:{mesh.east_out}",
                                   options=[("grpc.default_authority", "echo.default.west.isthmus.local:50051")]) as ch:
            try:
                return ch.stream_unary("/isthmus.test.Echo/ClientStream")(messages(), timeout=10), None
            except grpc.RpcError as exc:
                return None, exc
            finally:
                token.run_sync_soon(go_on.set)

    async with trio.open_nursery() as n:
        result: list = []

        async def run() -> None:
            result.append(await trio.to_thread.run_sync(call))

        n.start_soon(run)
        with trio.fail_after(5):
            while not authz.requests and not go_on.is_set():
                await trio.sleep(0.02)
        more.set()  # the rest may flow now: the decision was made
    ok, err = result[0]
    if partial:
        assert ok == b"2:11", err  # both messages (5 + 6 bytes) reached the service
        raw = authz.requests[0].attributes.request.http.raw_body
        assert raw == b"\x00\x00\x00\x00\x05first" and authz.requests[0].attributes.request.http.headers[
            "x-envoy-auth-partial-body"] == "true"
    else:
        assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED, (ok, err)
        assert not authz.requests and ext_total(mesh, "timeout") == 1

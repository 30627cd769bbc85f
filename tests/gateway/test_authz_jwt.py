"""RequestAuthentication (JWT) through the inbound gateway: inline JWKS and a jwks_uri
served by a real local HTTP server; claims and request principals in AuthorizationPolicy."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import grpc
import pytest
import trio
from joserfc import jwt
from joserfc.jwk import ECKey

from federation.jwt import JwksStore
from federation.models import (
    AuthorizationPolicy,
    JwtClaimMatch,
    JwtRule,
    RequestAuthentication,
    Rule,
    RuleFrom,
    Selector,
)

from .conftest import Pki
from .test_authz import OPEN, SERVICE, Mesh3, _channel, _mesh3, mesh3, requests_total, wl  # noqa: F401

ISS = "https://issuer.test"
K1 = ECKey.generate_key("P-256", parameters={"kid": "k1"}, private=True)
K2 = ECKey.generate_key("P-256", parameters={"kid": "k2"}, private=True)
# A kid chosen to read like another failure: categories come from the failure, not its text.
K_WORDY = ECKey.generate_key("P-256", parameters={"kid": "expired audience"}, private=True)
CART = wl("east", "shop", "cart")
SEL_WEB = Selector(namespace="default", service="web")


def jwks(*keys: ECKey) -> str:
    return json.dumps({"keys": [k.as_dict(private=False) for k in keys]})


def token(key: ECKey = K1, **claims) -> str:
    now = int(time.time())
    body = {"iss": ISS, "sub": "alice", "aud": "web", "iat": now, "exp": now + 300, **claims}
    return jwt.encode({"alg": "ES256", "kid": key.kid}, body, key)


def bearer(t: str) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"authorization", b"Bearer " + t.encode()),)


def authn(selector: Selector = SEL_WEB, **rule) -> RequestAuthentication:
    rule.setdefault("jwks", jwks(K1))
    return RequestAuthentication(name="jwt", selector=selector, jwt_rules=(
        JwtRule(issuer=ISS, audiences=("web",), **rule),))


REQUIRE_JWT = AuthorizationPolicy(name="require-jwt", selector=SEL_WEB, rules=(
    Rule(from_=(RuleFrom(request_principals=(f"{ISS}/*",)),)),))
ADMINS_ONLY = AuthorizationPolicy(name="admins-only", selector=SEL_WEB, rules=(
    Rule(from_=(RuleFrom(request_principals=(f"{ISS}/*",)),),
         when=(JwtClaimMatch(claim="groups", values=("admins",)),)),))


# Tokens are minted when the test runs, not at collection: a slow suite must not
# turn the "valid" token into an expired one.
@pytest.mark.parametrize("case, make_tok, status, body", [
    ("valid", lambda: token(), 200, None),
    ("none", lambda: None, 403, "RBAC: access denied (no ALLOW policy matched)"),
    ("expired", lambda: token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200), 401,
     "Jwt is expired"),
    ("wrong-audience", lambda: token(aud="billing"), 401, "Audiences in Jwt are not allowed"),
    ("unknown-key", lambda: token(K2), 401, "Jwt verification fails"),
    ("wrong-issuer", lambda: token(iss="https://evil.test"), 401, "Jwt issuer is not configured"),
    ("garbage", lambda: "not.a.jwt", 401, "Jwt is not in the form of Header.Payload.Signature"),
    ("iss-says-expired", lambda: token(iss="expired"), 401, "Jwt issuer is not configured"),
    ("iss-says-jwks", lambda: token(iss="jwks not fetched, audience"), 401, "Jwt issuer is not configured"),
    ("kid-says-expired", lambda: token(K_WORDY), 401, "Jwt verification fails"),
    ("aud-says-expired", lambda: token(aud="expired"), 401, "Audiences in Jwt are not allowed"),
])
async def test_jwt_cases_with_inline_jwks(mesh3: Mesh3, logs, case, make_tok, status, body) -> None:
    tok = make_tok()
    mesh3.apply(2, (authn(), REQUIRE_JWT))
    resp, got = await mesh3.call("east", CART, extra=bearer(tok) if tok else ())
    assert resp[b":status"] == str(status).encode(), got
    if status == 200:
        echoed = json.loads(got)["headers"]
        assert "authorization" not in echoed  # a validated token goes no further (Istio's default)
        return
    assert got == (body + "\n").encode()
    assert mesh3.web.requests == 0
    if status == 401:
        assert resp[b"www-authenticate"] == b'Bearer realm="isthmus", error="invalid_token"'
        assert requests_total(mesh3.west, response_flags="UAEX", response_code="401") == 1
        access = [e for e in logs if e["event"] == "access" and e["response_code"] == 401]
        assert access[0]["response_code_details"].startswith("jwt_authn_access_denied{")
        assert tok not in json.dumps([dict(e) for e in logs], default=str)  # never logged


async def test_validated_token_is_forwarded_only_when_the_rule_says_so(mesh3: Mesh3) -> None:
    mesh3.apply(2, (authn(forward_original_token=True), REQUIRE_JWT))
    tok = token()
    resp, got = await mesh3.call("east", CART, extra=bearer(tok))
    assert resp[b":status"] == b"200"
    assert json.loads(got)["headers"]["authorization"] == f"Bearer {tok}"
    # a service without RequestAuthentication gets whatever the caller sent, untouched
    mesh3.apply(3, ())
    resp, got = await mesh3.call("east", CART, extra=((b"authorization", b"Basic abc"),))
    assert resp[b":status"] == b"200" and json.loads(got)["headers"]["authorization"] == "Basic abc"


async def test_claims_in_policy_rules(mesh3: Mesh3) -> None:
    mesh3.apply(2, (authn(), ADMINS_ONLY))
    ok, _ = await mesh3.call("east", CART, extra=bearer(token(groups=["dev", "admins"])))
    no, body = await mesh3.call("east", CART, extra=bearer(token(groups=["dev"])))
    assert (ok[b":status"], no[b":status"]) == (b"200", b"403")
    assert body == b"RBAC: access denied (no ALLOW policy matched)\n"


async def test_token_optional_unless_a_policy_requires_it(mesh3: Mesh3) -> None:
    open_sel = Selector(namespace="default", service="open")
    mesh3.apply(2, (authn(open_sel),))
    plain, _ = await mesh3.call("east", CART, authority=OPEN)
    valid, _ = await mesh3.call("east", CART, authority=OPEN, extra=bearer(token()))
    bad, _ = await mesh3.call("east", CART, authority=OPEN, extra=bearer(token(aud="x")))
    assert (plain[b":status"], valid[b":status"], bad[b":status"]) == (b"200", b"200", b"401")


async def test_grpc_invalid_token_is_unauthenticated(mesh3: Mesh3) -> None:
    echo = Selector(namespace="default", service="echo")
    mesh3.apply(2, (authn(echo),))

    def call(tok: str):
        with _channel(mesh3) as ch:
            try:
                return ch.unary_unary(f"/{SERVICE}/Unary")(
                    b"hi", timeout=10, metadata=(("authorization", f"Bearer {tok}"),))
            except grpc.RpcError as e:
                return e.code(), e.details()

    assert await trio.to_thread.run_sync(call, token()) == b"hi"
    expired = token(exp=int(time.time()) - 3600)
    assert await trio.to_thread.run_sync(call, expired) == (
        grpc.StatusCode.UNAUTHENTICATED, "Jwt is expired")


# ---------------------------------------------------------------- jwks_uri


class JwksServer:
    """A real HTTP server publishing a JWKS that the test can rotate."""

    def __init__(self, body: str) -> None:
        self.body = body.encode()
        self.fetches = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                outer.fetches += 1
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
async def uri_mesh(pki: Pki, nursery: trio.Nursery, tmp_path: Path):
    srv = JwksServer(jwks(K1))
    # Rotation-friendly limits: an unknown kid may refetch at once; failures back off briefly.
    store = JwksStore(min_refresh_interval=0.0, backoff=0.2, max_backoff=0.5, fetch_timeout=2.0)
    m, server = await _mesh3(pki, nursery, tmp_path, jwks_store=store)
    yield m, srv
    for g in m.gws.values():
        g.stop()
    server.stop(0)
    srv.close()


async def test_jwks_uri_fetched_and_issuer_key_rotation(uri_mesh) -> None:
    m, srv = uri_mesh
    m.apply(2, (authn(jwks="", jwks_uri=srv.uri), REQUIRE_JWT))
    resp, body = await m.call("east", CART, extra=bearer(token()))
    assert resp[b":status"] == b"200", body
    assert srv.fetches >= 1
    # The issuer rotates to k2: the first k2 token finds an unknown kid, is parked while
    # the JWKS is refetched in a worker thread, then forwarded with its body intact.
    srv.body = jwks(K2).encode()
    before = srv.fetches
    payload = b"p" * 16_000  # h2client sends one DATA frame
    resp, body = await m.call("east", CART, method="POST", body=payload,
                              extra=bearer(token(K2)))
    assert resp[b":status"] == b"200", body
    assert json.loads(body)["body_len"] == len(payload)
    assert "authorization" not in json.loads(body)["headers"]  # stripped after parking too
    assert srv.fetches == before + 1
    # k1 is gone from the JWKS now
    resp, body = await m.call("east", CART, extra=bearer(token(K1)))
    assert (resp[b":status"], body) == (b"401", b"Jwt verification fails\n")


async def test_jwks_uri_unreachable_fails_closed(uri_mesh) -> None:
    m, srv = uri_mesh
    srv.close()
    m.apply(2, (authn(jwks="", jwks_uri=srv.uri), REQUIRE_JWT))
    resp, body = await m.call("east", CART, extra=bearer(token()))
    assert (resp[b":status"], body) == (b"401", b"Jwks remote fetch is failed\n")
    resp, _ = await m.call("east", CART)
    assert resp[b":status"] == b"403"  # no token: the ALLOW policy still wants one

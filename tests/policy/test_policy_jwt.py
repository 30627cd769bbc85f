"""JWT validation on joserfc: claims, keys, algorithms and JWKS caching with an injected clock."""

from __future__ import annotations

import base64
import http.server
import json
import threading
from collections.abc import Iterator

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from federation.jwt import (
    JwksSource,
    JwksStore,
    JwksUnavailable,
    JwtError,
    JwtFailure,
    JwtValidator,
    default_fetch,
    parse_jwks,
)
from federation.models import JwtRule, RequestAuthentication, Selector
from federation.policy import PolicySet, RequestAttributes, load_policies

from ._helpers import ISSUER, NOW, Clock, FakeJwksServer, bearer, claims, jwks_of, sign

URI = "https://idp.example.com/.well-known/jwks.json"


def inline_validator(clock: Clock, *keys: object, audiences: tuple[str, ...] = ("shop-api",),
                     **kw: object) -> JwtValidator:
    rule = JwtRule(issuer=ISSUER, audiences=audiences, jwks=jwks_of(*keys))
    return JwtValidator([rule], clock=clock, **kw)


def uri_validator(clock: Clock, server: FakeJwksServer, **source_opts: float) -> JwtValidator:
    store = JwksStore(fetch=server, clock=clock, **source_opts)
    return JwtValidator([JwtRule(issuer=ISSUER, jwks_uri=URI)], store=store)


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


# ---------------------------------------------------------------- token checks


def test_valid_token_gives_principal_and_claims(clock: Clock, ec_key: ECKey) -> None:
    v = inline_validator(clock, ec_key)
    r = v.validate(bearer(sign(ec_key, claims(groups=["admins"]))))
    assert r.ok and r.request_principal == f"{ISSUER}/alice"
    assert r.claims is not None and r.claims["groups"] == ["admins"]


def test_rsa_token_and_header_pairs(clock: Clock, rsa_key: RSAKey) -> None:
    v = inline_validator(clock, rsa_key)
    token = sign(rsa_key, claims(), alg="RS256", kid="rsa-1")
    r = v.validate([(b"Authorization", f"bearer {token}".encode())])  # h2 gives bytes
    assert r.ok and r.request_principal == f"{ISSUER}/alice"


def test_no_token_passes_without_principal(clock: Clock, ec_key: ECKey) -> None:
    v = inline_validator(clock, ec_key)
    for headers in ({}, {"x-other": "1"}, {"authorization": "Basic dXNlcjpwdw=="}):
        r = v.validate(headers)
        assert r.ok and r.request_principal is None and r.claims is None


@pytest.mark.parametrize("over,needle,failure", [
    ({"exp": int(NOW) - 61}, "token expired at", JwtFailure.EXPIRED),
    ({"nbf": int(NOW) + 120}, "token not valid before", JwtFailure.NOT_YET_VALID),
    ({"aud": "other-api"}, "audience 'other-api' is not accepted (expected one of: shop-api)",
     JwtFailure.AUDIENCE),
    ({"iss": "https://evil.example.com"}, "issuer 'https://evil.example.com' is not accepted here",
     JwtFailure.ISSUER),
    # Attacker-chosen text that names another failure does not change the kind.
    ({"iss": "expired"}, "issuer 'expired' is not accepted here", JwtFailure.ISSUER),
    ({"aud": "expired jwks not fetched"}, "audience", JwtFailure.AUDIENCE),
    ({"sub": None}, "missing claim 'sub'", JwtFailure.VERIFICATION),
    ({"iat": int(NOW) + 3600}, "claim 'iat'", JwtFailure.VERIFICATION),
    ({"exp": "tomorrow"}, "claim 'exp'", JwtFailure.VERIFICATION),
])
def test_bad_claims_are_refused(clock: Clock, ec_key: ECKey, over: dict, needle: str,
                                failure: JwtFailure) -> None:
    r = inline_validator(clock, ec_key).validate(bearer(sign(ec_key, claims(**over))))
    assert not r.ok and r.request_principal is None
    assert r.reason.startswith("invalid JWT: ") and needle in r.reason, r.reason
    assert r.failure is failure


def test_small_clock_skew_is_tolerated(clock: Clock, ec_key: ECKey) -> None:
    v = inline_validator(clock, ec_key, leeway=60)
    assert v.validate(bearer(sign(ec_key, claims(exp=int(NOW) - 30)))).ok
    assert v.validate(bearer(sign(ec_key, claims(nbf=int(NOW) + 30)))).ok
    clock.advance(31)
    assert not v.validate(bearer(sign(ec_key, claims(exp=int(NOW) - 30)))).ok


def test_default_leeway_is_sixty_seconds(clock: Clock, ec_key: ECKey) -> None:
    """The README's 60 s, with no leeway passed (what the gateway's validators use)."""
    v = inline_validator(clock, ec_key)
    assert v.leeway == 60
    assert v.validate(bearer(sign(ec_key, claims(exp=int(NOW) - 59)))).ok
    assert not v.validate(bearer(sign(ec_key, claims(exp=int(NOW) - 61)))).ok
    assert v.validate(bearer(sign(ec_key, claims(nbf=int(NOW) + 59)))).ok
    assert not v.validate(bearer(sign(ec_key, claims(nbf=int(NOW) + 61)))).ok


def test_audience_list_and_unset_audiences(clock: Clock, ec_key: ECKey) -> None:
    v = inline_validator(clock, ec_key)
    assert v.validate(bearer(sign(ec_key, claims(aud=["x", "shop-api"])))).ok
    assert not v.validate(bearer(sign(ec_key, claims(aud=None)))).ok  # essential when configured
    any_aud = inline_validator(clock, ec_key, audiences=())
    assert any_aud.validate(bearer(sign(ec_key, claims(aud="whatever")))).ok


def test_unknown_kid_is_refused(clock: Clock, ec_key: ECKey, ec_key2: ECKey) -> None:
    r = inline_validator(clock, ec_key).validate(bearer(sign(ec_key2, claims(), kid="ec-2")))
    assert not r.ok and "no key with kid 'ec-2'" in r.reason
    assert not r.refresh_wanted  # inline key sets are never refetched


def test_bad_signature_is_refused(clock: Clock, ec_key: ECKey) -> None:
    impostor = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
    r = inline_validator(clock, ec_key).validate(bearer(sign(impostor, claims())))
    assert not r.ok and "signature does not verify" in r.reason
    token = sign(ec_key, claims())
    head, payload, sig = token.split(".")
    forged = ".".join([head, _b64(claims(sub="mallory")), sig])
    r = inline_validator(clock, ec_key).validate(bearer(forged))
    assert not r.ok and "signature does not verify" in r.reason


def test_alg_none_is_refused(clock: Clock, ec_key: ECKey) -> None:
    token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims())}."
    r = inline_validator(clock, ec_key).validate(bearer(token))
    assert not r.ok and "alg none" in r.reason


def test_hmac_with_the_public_key_is_refused(clock: Clock, rsa_key: RSAKey) -> None:
    """The classic algorithm confusion: HS256 keyed with the published RSA key."""
    # Forged by hand: joserfc (rightly) refuses to use a public key as an HMAC secret.
    import hashlib
    import hmac

    signing_input = f"{_b64({'alg': 'HS256', 'kid': 'rsa-1', 'typ': 'JWT'})}.{_b64(claims())}"
    mac = hmac.new(rsa_key.as_pem(private=False), signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    r = inline_validator(clock, rsa_key).validate(bearer(token))
    assert not r.ok and "algorithm 'HS256' is not allowed" in r.reason


def test_key_of_wrong_type_for_alg_is_refused(clock: Clock, ec_key: ECKey, rsa_key: RSAKey) -> None:
    token = sign(rsa_key, claims(), alg="RS256", kid="ec-1")  # claims the EC key's kid
    r = inline_validator(clock, ec_key).validate(bearer(token))
    assert not r.ok and "requires 'RSA' key" in r.reason


def test_symmetric_algorithms_cannot_be_configured(clock: Clock, ec_key: ECKey) -> None:
    for alg in ("HS256", "none"):
        with pytest.raises(JwtError, match="is not allowed"):
            inline_validator(clock, ec_key, algorithms=("ES256", alg))


@pytest.mark.parametrize("headers,needle", [
    ({"authorization": "Bearer not-a-jwt"}, "malformed token"),
    ({"authorization": "Bearer " + "a" * 9000}, "longer than 8192 bytes"),
    ([("authorization", "Bearer a.b.c"), ("x-jwt", "d.e.f")], "more than one token"),
])
def test_malformed_and_ambiguous_tokens(clock: Clock, ec_key: ECKey, headers: object,
                                        needle: str) -> None:
    rule = JwtRule(issuer=ISSUER, jwks=jwks_of(ec_key), from_headers=("authorization", "x-jwt"))
    r = JwtValidator([rule], clock=clock).validate(headers)  # type: ignore[arg-type]
    assert not r.ok and needle in r.reason


def test_token_from_custom_header_and_kidless_token(clock: Clock, ec_key: ECKey,
                                                    ec_key2: ECKey) -> None:
    rule = JwtRule(issuer=ISSUER, jwks=jwks_of(ec_key, ec_key2), from_headers=("x-jwt",))
    v = JwtValidator([rule], clock=clock)
    assert v.validate({"X-JWT": sign(ec_key2, claims(), kid=None)}).ok  # tries each key
    assert v.validate({"authorization": "Bearer x.y.z"}).request_principal is None  # not read


def test_for_service_uses_only_selecting_policies(clock: Clock, ec_key: ECKey) -> None:
    pols = [
        RequestAuthentication(name="shop", selector=Selector(namespace="shop"),
                              jwt_rules=(JwtRule(issuer=ISSUER, jwks=jwks_of(ec_key)),)),
        RequestAuthentication(name="other", selector=Selector(namespace="other"),
                              jwt_rules=(JwtRule(issuer="https://b", jwks=jwks_of(ec_key)),)),
    ]
    assert JwtValidator.for_service(pols, "shop", "cart", clock=clock).issuers == (ISSUER,)
    assert not JwtValidator.for_service(pols, "x", "y", clock=clock).enabled
    ps = PolicySet(pols)
    assert [p.name for p in ps.request_authentications("shop", "cart")] == ["shop"]


def test_parse_jwks_refuses_symmetric_and_junk() -> None:
    with pytest.raises(JwtError, match="symmetric"):
        parse_jwks({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})
    with pytest.raises(JwtError, match="not JSON"):
        parse_jwks("{")
    with pytest.raises(JwtError, match='expected a JSON object'):
        parse_jwks("[]")


# ---------------------------------------------------------------- fetched key sets


def test_jwks_is_fetched_on_first_use(clock: Clock, ec_key: ECKey) -> None:
    server = FakeJwksServer(keys=[ec_key])
    v = uri_validator(clock, server)
    token = bearer(sign(ec_key, claims(aud=None)))
    r = v.validate(token)
    assert not r.ok and "not fetched yet" in r.reason and r.refresh_wanted
    v.refresh()
    assert v.validate(token).ok
    assert server.calls == [URI]


def test_new_kid_triggers_one_rate_limited_refresh(clock: Clock, ec_key: ECKey,
                                                   ec_key2: ECKey) -> None:
    server = FakeJwksServer(keys=[ec_key])
    v = uri_validator(clock, server, min_refresh_interval=15)
    v.refresh()
    server.keys = [ec_key, ec_key2]  # the IdP rotates in a new key
    clock.advance(20)
    rotated = bearer(sign(ec_key2, claims(aud=None), kid="ec-2"))
    r = v.validate(rotated)
    assert not r.ok and r.refresh_wanted and "no key with kid 'ec-2'" in r.reason
    v.refresh()
    assert v.validate(rotated).ok
    assert len(server.calls) == 2

    # A flood of tokens with a bogus kid causes at most one fetch per interval.
    bogus = bearer(sign(ec_key2, claims(aud=None), kid="nope"))
    clock.advance(20)
    assert v.validate(bogus).refresh_wanted
    v.refresh()
    for _ in range(50):
        r = v.validate(bogus)
        assert not r.ok and not r.refresh_wanted
        v.refresh()
    assert len(server.calls) == 3
    clock.advance(15)
    assert v.validate(bogus).refresh_wanted


def test_periodic_refresh_is_due_after_interval(clock: Clock, ec_key: ECKey) -> None:
    server = FakeJwksServer(keys=[ec_key])
    v = uri_validator(clock, server, refresh_interval=300)
    v.refresh()
    assert not v.refresh_due()
    clock.advance(299)
    assert not v.refresh_due()
    clock.advance(2)
    assert v.refresh_due()
    v.refresh()
    assert len(server.calls) == 2


def test_fetch_failure_serves_stale_keys_then_fails_closed(clock: Clock, ec_key: ECKey) -> None:
    server = FakeJwksServer(keys=[ec_key])
    v = uri_validator(clock, server, refresh_interval=60, max_stale=600, backoff=1, max_backoff=30)
    v.refresh()
    server.failure = ConnectionRefusedError("connection refused")

    clock.advance(300)  # refresh due; the fetch fails; the cached keys are 300 s old
    v.refresh()
    token = lambda: bearer(sign(ec_key, claims(now=clock.now, aud=None)))  # noqa: E731
    assert v.validate(token()).ok

    # Backoff: no second attempt within a second, whatever the request rate.
    v.refresh()
    assert len(server.calls) == 2
    clock.advance(1)
    v.refresh()
    assert len(server.calls) == 3

    clock.advance(300)  # beyond max-stale: refuse, and say why
    v.refresh()
    r = v.validate(token())
    assert not r.ok
    assert "beyond max-stale 600s" in r.reason and "connection refused" in r.reason

    # Bounded attempts: a burst of requests does not fetch; backoff caps at 30 s.
    before = len(server.calls)
    for _ in range(100):
        v.validate(token())
        v.refresh()
    assert len(server.calls) == before

    server.failure = None  # the IdP recovers
    clock.advance(30)
    v.refresh()
    assert v.validate(token()).ok


def test_never_fetched_and_failing_source_says_why(clock: Clock) -> None:
    src = JwksSource(URI, fetch=FakeJwksServer(failure=TimeoutError("timed out")), clock=clock)
    src.refresh()
    with pytest.raises(JwksUnavailable, match="not fetched yet; last fetch failed: TimeoutError: timed out"):
        src.keyset()
    assert src.status()["failures"] == 1


def test_garbage_jwks_counts_as_failure(clock: Clock, ec_key: ECKey) -> None:
    server = FakeJwksServer(keys=[ec_key])
    v = uri_validator(clock, server)
    v.refresh()
    server.document = lambda: "<html>oops</html>"  # type: ignore[method-assign]
    v.refresh(force=True)
    assert v.validate(bearer(sign(ec_key, claims(aud=None)))).ok  # old keys kept
    assert "not JSON" in (v.sources()[0].status()["last_error"] or "")


def test_store_shares_sources_across_validators(clock: Clock, ec_key: ECKey) -> None:
    server = FakeJwksServer(keys=[ec_key])
    store = JwksStore(fetch=server, clock=clock)
    a = JwtValidator([JwtRule(issuer=ISSUER, jwks_uri=URI)], store=store)
    b = JwtValidator([JwtRule(issuer=ISSUER, jwks_uri=URI, audiences=("x",))], store=store)
    store.refresh()
    assert a.validate(bearer(sign(ec_key, claims(aud="x")))).ok
    assert b.validate(bearer(sign(ec_key, claims(aud="x")))).ok
    assert len(server.calls) == 1


# ---------------------------------------------------------------- the real fetcher


@pytest.fixture
def jwks_http(ec_key: ECKey) -> Iterator[str]:
    body = jwks_of(ec_key).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/jwks"
    srv.shutdown()
    srv.server_close()


def test_default_fetch_over_loopback_http(jwks_http: str, ec_key: ECKey) -> None:
    store = JwksStore(fetch=default_fetch)
    v = JwtValidator([JwtRule(issuer=ISSUER, jwks_uri=jwks_http)], store=store)
    v.refresh()
    token = jwt.encode({"alg": "ES256", "kid": "ec-1"}, {"iss": ISSUER, "sub": "s"}, ec_key)
    assert v.validate(bearer(token)).ok


def test_default_fetch_refuses_plain_http_to_remote_hosts() -> None:
    with pytest.raises(JwtError, match="use https://"):
        default_fetch("http://idp.example.com/jwks", 1.0)


# ---------------------------------------------------------------- with authorization


def test_jwt_result_feeds_the_decision(clock: Clock, ec_key: ECKey) -> None:
    pols = load_policies(f"""
kind: RequestAuthentication
name: shop-jwt
selector: {{namespace: shop}}
jwt_rules: [{{issuer: "{ISSUER}", jwks: '{jwks_of(ec_key)}'}}]
---
kind: AuthorizationPolicy
name: require-jwt
selector: {{namespace: shop}}
rules: [{{from: [{{request_principals: ["*"]}}]}}]
""")
    ps = PolicySet(pols)
    v = JwtValidator(
        [r for p in ps.request_authentications("shop", "cart") for r in p.jwt_rules], clock=clock
    )

    def decide(headers: dict[str, str]) -> tuple[bool, bool]:
        r = v.validate(headers)
        attrs = RequestAttributes(destination_namespace="shop", destination_service="cart",
                                  method="GET", path="/", request_principal=r.request_principal,
                                  jwt_claims=r.claims)
        return r.ok, ps.evaluate(attrs).allowed

    assert decide(bearer(sign(ec_key, claims(aud=None)))) == (True, True)
    assert decide({}) == (True, False)  # authenticated as nobody; authz refuses
    assert decide(bearer(sign(ec_key, claims(exp=int(NOW) - 999))))[0] is False  # 401


def test_fetch_failures_are_logged_without_tokens(clock: Clock, ec_key: ECKey) -> None:
    from structlog.testing import capture_logs

    server = FakeJwksServer(keys=[ec_key], failure=OSError("network unreachable"))
    v = uri_validator(clock, server)
    token = sign(ec_key, claims(aud=None))
    with capture_logs() as logs:
        v.validate(bearer(token))
        v.refresh()
    assert [e["event"] for e in logs] == ["jwt.jwks_fetch_failed"]
    assert logs[0]["uri"] == URI and "network unreachable" in logs[0]["error"]
    assert token not in repr(logs)


def test_public_surface() -> None:
    import federation.jwt as j
    import federation.policy as p

    assert sorted(p.__all__) == ["Decision", "PolicyError", "PolicyFileError", "PolicySet",
                                 "RequestAttributes", "StringMatcher", "load_policies",
                                 "validate_policy"]
    assert sorted(j.__all__) == ["DEFAULT_ALGORITHMS", "JwksSource", "JwksStore", "JwksUnavailable",
                                 "JwtError", "JwtFailure", "JwtResult", "JwtValidator",
                                 "default_fetch", "parse_jwks"]
    from federation._errors import FederationError, InvalidRequest

    assert issubclass(p.PolicyFileError, InvalidRequest) and issubclass(j.JwtError, FederationError)
    assert not any(a.startswith(("HS", "none")) for a in j.DEFAULT_ALGORITHMS)

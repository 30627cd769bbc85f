"""Helpers shared by the policy and JWT tests: identities in three clusters, tokens, a clock."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from joserfc import jwt
from joserfc.jwk import KeySet

FED = "isthmus.local"
CLUSTERS = ("east", "west", "central")
ISSUER = "https://idp.example.com"
NOW = 1_750_000_000.0


def spiffe(cluster: str, ns: str, sa: str) -> str:
    return f"spiffe://{cluster}.{FED}/ns/{ns}/sa/{sa}"


@dataclass
class Clock:
    """A settable clock so expiry and staleness tests need no sleeps."""

    now: float = NOW

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeJwksServer:
    """The injected fetcher: serves ``jwks`` (or raises ``failure``) and counts calls.

    A stand-in for the IdP's HTTPS endpoint; the real urllib fetcher is tested against a
    local HTTP server in test_policy_jwt.py.
    """

    keys: list[Any] = field(default_factory=list)
    failure: Exception | None = None
    calls: list[str] = field(default_factory=list)

    def document(self) -> str:
        return json.dumps(KeySet(list(self.keys)).as_dict(private=False))

    def __call__(self, uri: str, timeout: float) -> bytes:
        self.calls.append(uri)
        if self.failure is not None:
            raise self.failure
        return self.document().encode()


def jwks_of(*keys: Any) -> str:
    return json.dumps(KeySet(list(keys)).as_dict(private=False))


def sign(key: Any, claims: dict[str, Any], *, alg: str = "ES256", kid: str | None = "ec-1",
         **header: Any) -> str:
    hdr: dict[str, Any] = {"alg": alg, **header}
    if kid is not None:
        hdr["kid"] = kid
    return jwt.encode(hdr, claims, key)


def claims(now: float = NOW, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER, "sub": "alice", "aud": "shop-api",
        "iat": int(now) - 10, "exp": int(now) + 300,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


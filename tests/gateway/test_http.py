"""httpx over HTTP/1.1 and HTTP/2 through both gateways (east outbound -> west inbound)."""

from __future__ import annotations

import ssl

import httpx
import pytest

import trust

from .conftest import Mesh

WEB = "web.default.west.isthmus.local:8080"
WEB_FED = "web.default.isthmus.local:8080"


async def test_http2_prior_knowledge_reaches_service_through_both_gateways(mesh: Mesh) -> None:
    async with httpx.AsyncClient(http1=False, http2=True) as client:
        r = await client.get(f"http://127.0.0.1:{mesh.east_out}/echo?x=1", headers={"host": WEB})
    assert r.status_code == 200, r.text
    assert r.http_version == "HTTP/2"
    body = r.json()
    assert body["path"] == "/echo?x=1"
    assert body["authority"] == "web.default.svc.cluster.local:8080"
    # Plain caller: no identity is asserted, a trace is started.
    assert "isthmus-source-identity" not in body["headers"]
    assert body["headers"]["traceparent"].startswith("00-")

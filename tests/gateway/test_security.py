"""Inbound security: only joined, non-revoked peer gateways; no impersonation across
trust domains; nothing but exported services is reachable."""

from __future__ import annotations

import json

import pytest

import trust

from .conftest import Mesh
from .h2client import ConnectionRefusedByPeer, h2_request

pytestmark = pytest.mark.both_cores  # HTTP/2 data path: run on each core


def _gw_ctx(mesh: Mesh, cluster: str):
    f = mesh.pki.gw[cluster]
    return trust.client_context(f.bundle, f.cert, f.key)


def _req(authority: str, identity: str | None = None):
    h = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/echo"),
         (b":authority", authority.encode())]
    if identity:
        h.append((b"isthmus-source-identity", identity.encode()))
    return h


WEB = "web.default.svc.cluster.local:8080"


async def test_peer_gateway_may_assert_identities_of_its_own_trust_domain(mesh: Mesh) -> None:
    ident = "spiffe://east.isthmus.local/ns/default/sa/client"
    resp, body = await h2_request(mesh.west.ports["inbound"], _req(WEB, ident),
                                  ssl_context=_gw_ctx(mesh, "east"))
    assert resp[b":status"] == b"200"
    assert json.loads(body)["headers"]["isthmus-source-identity"] == ident


async def test_impersonation_of_another_trust_domain_is_refused_and_logged(mesh: Mesh, logs) -> None:
    resp, body = await h2_request(mesh.west.ports["inbound"],
                                  _req(WEB, "spiffe://west.isthmus.local/ns/default/sa/admin"),
                                  ssl_context=_gw_ctx(mesh, "east"))
    assert resp[b":status"] == b"403"
    assert b"may not assert" in body
    assert mesh.web.requests == 0  # never reached the service
    ev = [e for e in logs if e["event"] == "inbound.impersonation_refused"]
    assert ev and ev[0]["peer_cluster"] == "east"
    access = [e for e in logs if e["event"] == "access" and e["response_code"] == 403]
    assert access and access[0]["response_flags"] == "RBAC"


async def test_malformed_asserted_identity_is_refused(mesh: Mesh) -> None:
    resp, _ = await h2_request(mesh.west.ports["inbound"], _req(WEB, "not-a-spiffe-id"),
                               ssl_context=_gw_ctx(mesh, "east"))
    assert resp[b":status"] == b"403"


async def test_revoked_cluster_gateway_is_refused(mesh: Mesh, logs) -> None:
    with pytest.raises(ConnectionRefusedByPeer):
        await h2_request(mesh.west.ports["inbound"], _req(WEB), ssl_context=_gw_ctx(mesh, "rogue"))
    assert any(e["event"] == "inbound.peer_rejected" for e in logs)
    assert mesh.web.requests == 0


async def test_revocation_by_crl_alone_is_enforced(mesh: Mesh, logs) -> None:
    """Even if the registry still lists the cluster as joined, the CRL wins."""
    snap = mesh.snapshot(revision=5)
    clusters = tuple(c.model_copy(update={"revoked": False}) for c in snap.clusters)
    mesh.west.apply_snapshot(snap.model_copy(update={"clusters": clusters}))
    assert "rogue.isthmus.local" in mesh.west.state.routes.trust_domains()
    with pytest.raises(ConnectionRefusedByPeer):
        await h2_request(mesh.west.ports["inbound"], _req(WEB), ssl_context=_gw_ctx(mesh, "rogue"))
    rejected = [e for e in logs if e["event"] == "inbound.peer_rejected"]
    assert rejected and "revoked" in rejected[0]["error"]


async def test_workload_certificate_is_not_a_gateway(mesh: Mesh) -> None:
    f = mesh.pki.issue("east", "default", "client", "wl-east-sec")
    ctx = trust.client_context(f.bundle, f.cert, f.key)
    with pytest.raises(ConnectionRefusedByPeer):
        await h2_request(mesh.west.ports["inbound"], _req(WEB), ssl_context=ctx)


async def test_client_without_certificate_is_refused(mesh: Mesh) -> None:
    ctx = trust.client_context(mesh.pki.gw["east"].bundle)
    with pytest.raises(ConnectionRefusedByPeer):
        await h2_request(mesh.west.ports["inbound"], _req(WEB), ssl_context=ctx)


@pytest.mark.parametrize("authority", [
    "unexported.default.svc.cluster.local:80",  # not exported at all
    "private.default.svc.cluster.local:80",     # exported, but only to "south"
    "web.default.svc.cluster.local:9999",       # exported service, port not exported
    "127.0.0.1:%d",                             # the service's real address
])
async def test_unexported_service_is_unreachable(mesh: Mesh, authority: str) -> None:
    if "%d" in authority:
        authority = authority % mesh.web.port
    resp, _ = await h2_request(mesh.west.ports["inbound"], _req(authority),
                               ssl_context=_gw_ctx(mesh, "east"))
    assert resp[b":status"] == b"404"
    assert mesh.web.requests == 0
    assert mesh.web.connections == 0


async def test_connect_to_unexported_target_is_refused(mesh: Mesh) -> None:
    h = [(b":method", b"CONNECT"), (b":authority", f"127.0.0.1:{mesh.echo_port}".encode())]
    resp, _ = await h2_request(mesh.west.ports["inbound"], h, ssl_context=_gw_ctx(mesh, "east"))
    assert resp[b":status"] == b"404"


async def test_outbound_strips_forged_identity_from_workloads(mesh: Mesh) -> None:
    h = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/echo"),
         (b":authority", b"web.default.west.isthmus.local:8080"),
         (b"isthmus-source-identity", b"spiffe://west.isthmus.local/ns/default/sa/admin")]
    resp, body = await h2_request(mesh.east_out, h)
    assert resp[b":status"] == b"200"
    assert "isthmus-source-identity" not in json.loads(body)["headers"]


async def test_rejoined_clusters_previous_ca_is_refused(mesh: Mesh, logs, tmp_path) -> None:
    """east re-joined: its record carries the new CA, the old one is in previous_ca_certs_pem
    and on the CRL. A gateway certificate from the old CA is refused; one from the new works."""
    root = mesh.pki.root
    td = mesh.pki.td("east")
    old_ca = mesh.pki.cas["east"].cert
    new_key = trust.generate_key()
    new_ca = trust.build_intermediate(new_key.public_key(), td, "east", root.root_cert, root.root_key, 3600)
    leaf_key = trust.generate_key()
    leaf = trust.build_leaf(leaf_key.public_key(), trust.gateway_id(td), new_ca, new_key, 3600)
    (tmp_path / "cert.pem").write_bytes(trust.certs_to_pem([leaf, new_ca]))
    (tmp_path / "key.pem").write_bytes(trust.key_to_pem(leaf_key))
    crl = trust.build_crl(root.root_cert, root.root_key, [(old_ca.serial_number, old_ca.not_valid_before_utc)])
    from cryptography.hazmat.primitives import serialization

    snap = mesh.snapshot(revision=9)
    clusters = tuple(
        c.model_copy(update={"ca_cert_pem": trust.certs_to_pem([new_ca]).decode(),
                             "previous_ca_certs_pem": (mesh.pki.ca_pem("east"),)}) if c.name == "east" else c
        for c in snap.clusters)
    mesh.west.apply_snapshot(snap.model_copy(update={
        "clusters": clusters, "crl_pem": crl.public_bytes(serialization.Encoding.PEM).decode()}))

    with pytest.raises(ConnectionRefusedByPeer):
        await h2_request(mesh.west.ports["inbound"], _req(WEB), ssl_context=_gw_ctx(mesh, "east"))
    rejected = [e for e in logs if e["event"] == "inbound.peer_rejected"]
    assert rejected and "revoked" in rejected[-1]["error"]
    new_ctx = trust.client_context(mesh.pki.gw["east"].bundle, tmp_path / "cert.pem", tmp_path / "key.pem")
    resp, _ = await h2_request(mesh.west.ports["inbound"], _req(WEB), ssl_context=new_ctx)
    assert resp[b":status"] == b"200"

"""Join: tokens (good, reused, expired, forged, bound), pinning, name takeover, credentials written."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

import grpc
import pytest

import trust
from federation._errors import PinMismatch, RemoteError
from federation._join import join

from .fixtures import FederationProcess, Pki, join_cluster


def _join(fed: FederationProcess, name: str, token: str, pin: str, out: Path, **kw: object):  # type: ignore[no-untyped-def]
    return join(name, fed.address, token, pin, out, join_address=fed.join_address, **kw)  # type: ignore[arg-type]


def test_join_with_good_token_records_cluster_and_writes_credentials(fed, admin, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tok = admin.create_token(600)
    assert tok.ca_pin == pki.td.ca_pin()
    result = _join(fed, "east", tok.token, tok.ca_pin, tmp_path / "east",
                   gateway_addresses=["10.0.0.1:15443"], labels={"region": "eu-west-1", "cloud": "aws"})  # fmt: skip
    assert result.trust_domain == "east.isthmus.local"
    out = tmp_path / "east"
    assert stat.S_IMODE(os.stat(out / "ca" / "ca.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out / "gateway" / "key.pem").st_mode) == 0o600
    gw = trust.load_certs(out / "gateway" / "cert.pem")
    assert trust.spiffe_ids_of(gw[0]) == ["spiffe://east.isthmus.local/ns/isthmus-system/sa/isthmus-gateway"]
    gw[1].verify_directly_issued_by(pki.td.root_cert)  # the intermediate chains to the root
    gw[0].verify_directly_issued_by(gw[1])
    assert trust.spiffe_ids_of(trust.load_cert(out / "agent" / "cert.pem")) == [
        "spiffe://east.isthmus.local/ns/isthmus-system/sa/isthmus-agent"
    ]
    assert (out / "crl.pem").read_bytes().startswith(b"-----BEGIN X509 CRL")
    [record] = admin.list_clusters()
    assert record.name == "east" and record.trust_domain == "east.isthmus.local"
    assert record.gateway_addresses == ("10.0.0.1:15443",)
    assert record.labels == {"region": "eu-west-1", "cloud": "aws"}
    # The cluster's own identity now works on the mTLS port.
    with fed.client(out / "gateway") as gw_client:
        assert [c.name for c in gw_client.list_clusters()] == ["east"]


def test_token_works_once(fed, admin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tok = admin.create_token(600)
    _join(fed, "east", tok.token, tok.ca_pin, tmp_path / "east")
    with pytest.raises(RemoteError) as err:
        _join(fed, "west", tok.token, tok.ca_pin, tmp_path / "west")
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in err.value.details
    assert [c.name for c in admin.list_clusters()] == ["east"]


def test_expired_token_is_refused(fed, admin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tok = admin.create_token(2)
    time.sleep(2.2)
    with pytest.raises(RemoteError) as err:
        _join(fed, "east", tok.token, tok.ca_pin, tmp_path / "east")
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert admin.list_clusters() == []


def test_forged_token_is_refused(fed, admin, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    admin.create_token(600)
    with pytest.raises(RemoteError) as err:
        _join(fed, "east", "forged-" + "A" * 40, pki.td.ca_pin(), tmp_path / "east")
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert not (tmp_path / "east" / "ca" / "ca.key").exists()


def test_token_bound_to_another_name_is_refused(fed, admin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tok = admin.create_token(600, "west")
    with pytest.raises(RemoteError) as err:
        _join(fed, "east", tok.token, tok.ca_pin, tmp_path / "east")
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "'west'" in err.value.details


def test_wrong_pin_is_refused_before_anything_is_sent(fed, admin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A server whose chain does not match the pin never sees the token."""
    tok = admin.create_token(600)
    other = trust.TrustDir(tmp_path / "other")
    other.init("isthmus.local")
    with pytest.raises(PinMismatch, match="CA pin mismatch"):
        _join(fed, "east", tok.token, other.ca_pin(), tmp_path / "east")
    # The token was not consumed: it still works.
    _join(fed, "east", tok.token, tok.ca_pin, tmp_path / "east")


def test_tokens_are_stored_hashed_under_a_lease(fed, admin, etcd) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from federation.server import Etcd

    tok = admin.create_token(600)

    async def read() -> list:  # type: ignore[type-arg]
        async with Etcd(etcd.endpoint) as e:
            return list((await e.get_prefix(b"/isthmus/tokens/")).kvs)

    [kv] = asyncio.run(read())
    assert kv.key.decode().endswith(hashlib.sha256(tok.token.encode()).hexdigest())
    assert tok.token.encode() not in kv.key + kv.value
    assert kv.lease != 0


def test_name_takeover_is_refused(fed, admin, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    east = join_cluster(fed, pki, "east", tmp_path)
    west = join_cluster(fed, pki, "west", tmp_path)
    original = {c.name: c.ca_cert_pem for c in admin.list_clusters()}

    # Anonymous (token only): refused, even with a valid token.
    tok = admin.create_token(600)
    with pytest.raises(RemoteError) as err:
        _join(fed, "east", tok.token, tok.ca_pin, tmp_path / "thief")
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    # Another cluster's identity: refused.
    with pytest.raises(RemoteError) as err:
        _join(fed, "east", tok.token, tok.ca_pin, tmp_path / "thief", cert_dir=west.agent_dir)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert {c.name: c.ca_cert_pem for c in admin.list_clusters()} == original
    assert "rpc.refused" in fed.log_text()

    # The cluster itself may join again (new CA), and so may an admin.
    _join(fed, "east", tok.token, tok.ca_pin, tmp_path / "east2", cert_dir=east.agent_dir)
    tok2 = admin.create_token(600)
    _join(fed, "east", tok2.token, tok2.ca_pin, tmp_path / "east3", cert_dir=pki.admin_dir)
    assert {c.name: c.ca_cert_pem for c in admin.list_clusters()}["east"] != original["east"]


def test_only_admins_create_tokens(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    east = join_cluster(fed, pki, "east", tmp_path)
    with fed.client(east.gateway_dir) as gw, pytest.raises(RemoteError) as err:
        gw.create_token(600)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_join_port_serves_nothing_but_join(fed, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    from federation.proto import federation_pb2 as pb
    from federation.proto import federation_pb2_grpc as pb_grpc

    creds = grpc.ssl_channel_credentials(root_certificates=pki.td.bundle_pem())
    with grpc.secure_channel(fed.join_address, creds) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.FederationStub(ch).ListClusters(pb.ListClustersRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # a server of its own, with Join alone


def test_mtls_port_refuses_clients_without_certificate(fed, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    from federation.proto import federation_pb2 as pb
    from federation.proto import federation_pb2_grpc as pb_grpc

    creds = grpc.ssl_channel_credentials(root_certificates=pki.td.bundle_pem())
    with grpc.secure_channel(fed.address, creds) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.FederationStub(ch).ListClusters(pb.ListClustersRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails


def test_server_certificate_verifies_with_stock_grpc_by_name(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Stock tooling (hostname verification on) accepts 'localhost' and the listen IP."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = fed.address.rsplit(":", 1)[1]
    a = pki.admin_dir
    creds = grpc.ssl_channel_credentials(
        (a / "bundle.pem").read_bytes(), (a / "key.pem").read_bytes(), (a / "cert.pem").read_bytes()
    )
    for target in (f"localhost:{port}", f"127.0.0.1:{port}"):
        with grpc.secure_channel(target, creds) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
    key = next((tmp_path / "fed-data" / "server-tls").glob("key.pem"))
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert "BEGIN" not in fed.log_text()  # no key or certificate material in the logs

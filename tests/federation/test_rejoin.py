"""Re-joining revokes the previous cluster CA; revoking a cluster marks its record."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509

import trust
from federation._errors import RemoteError
from federation._join import join

from .fixtures import Pki, join_cluster
from .test_cli import admin_env, run
from .test_exports import svc


def _refused(fed, cert_dir: Path, timeout: float = 5.0) -> RemoteError:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    with fed.client(cert_dir) as c:
        while True:
            try:
                c.list_clusters()
            except RemoteError as exc:
                return exc
            assert time.monotonic() < deadline, f"{cert_dir} still accepted"
            time.sleep(0.1)


def test_rejoin_revokes_the_previous_cluster_ca(fed, admin, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    old = join_cluster(fed, pki, "east", tmp_path)
    old_ca = x509.load_pem_x509_certificate((old.out_dir / "ca" / "ca.crt").read_bytes())
    with fed.client(old.gateway_dir) as c:
        watch = c.watch()
        assert next(watch).snapshot is not None
        tok = admin.create_token(600, "east")
        # An admin re-joins the name (e.g. the old CA key leaked): a new key, a new CA.
        join("east", fed.address, tok.token, tok.ca_pin, tmp_path / "rejoined", cert_dir=pki.admin_dir,
             gateway_addresses=("127.0.0.1:15443",), join_address=fed.join_address)
        crl_change = next(ch for m in watch for ch in m.changes if ch.kind == "crl")
    new_ca = x509.load_pem_x509_certificate((tmp_path / "rejoined" / "ca" / "ca.crt").read_bytes())
    assert new_ca.serial_number != old_ca.serial_number
    revoked = pki.td.revoked_serials()
    assert old_ca.serial_number in revoked and new_ca.serial_number not in revoked
    # Watchers got the new CRL, and it maps onto the old CA through the record.
    crl_pem = crl_change.value.encode()
    [record] = [r for r in admin.list_clusters() if r.name == "east"]
    assert not record.revoked
    assert x509.load_pem_x509_certificate(record.ca_cert_pem.encode()) == new_ca
    assert [x509.load_pem_x509_certificate(p.encode()) for p in record.previous_ca_certs_pem] == [old_ca]
    cas = [new_ca, *(x509.load_pem_x509_certificate(p.encode()) for p in record.previous_ca_certs_pem)]
    revs = trust.Revocations.from_crl(crl_pem, cas)
    old_leaf = trust.load_cert(old.gateway_dir / "cert.pem")
    new_leaf = trust.load_cert(tmp_path / "rejoined" / "gateway" / "cert.pem")
    assert revs.is_revoked(old_leaf) and not revs.is_revoked(new_leaf)
    # The federation API refuses the old identity and serves the new one.
    err = _refused(fed, old.gateway_dir)
    assert err.code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in err.details
    with fed.client(tmp_path / "rejoined" / "agent") as c:
        c.publish("east", [svc("east", "web")])


def test_rejoin_with_the_previous_ca_key_is_refused(fed, admin, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Revoking the old CA revokes its key: re-using that key would leave a dead CA."""
    from federation.proto import federation_pb2 as pb

    old = join_cluster(fed, pki, "east", tmp_path)
    key = trust.load_key(old.out_dir / "ca" / "ca.key")
    csr = trust.make_csr(key, trust.SpiffeId("east.isthmus.local"))
    tok = admin.create_token(600, "east")
    with pytest.raises(RemoteError) as err:
        admin._call("Join", pb.JoinRequest(token=tok.token, name="east", csr_pem=csr))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "generate a new key" in err.value.details
    assert pki.td.revoked_serials() == {}


def test_revoke_cluster_marks_the_record_and_drops_its_exports(fed, admin, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    east = join_cluster(fed, pki, "east", tmp_path)
    west = join_cluster(fed, pki, "west", tmp_path)
    with fed.client(west.agent_dir) as w:
        w.publish("west", [svc("west", "db")])
        with pytest.raises(RemoteError) as err:  # only admins revoke
            w.revoke_cluster("east")
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    with fed.client(east.agent_dir) as e:
        e.publish("east", [svc("east", "web")])
    env = admin_env(fed, pki)
    r = run("revoke-cluster", "west", "--yes", env=env)
    assert r.exit_code == 0 and "1 export(s) dropped" in r.output, r.output
    records = {c.name: c for c in admin.list_clusters()}
    assert records["west"].revoked and not records["east"].revoked
    assert [s.cluster for s in admin.list_services()] == ["east"]
    west_ca = x509.load_pem_x509_certificate(records["west"].ca_cert_pem.encode())
    assert west_ca.serial_number in pki.td.revoked_serials()
    assert _refused(fed, west.agent_dir).code == grpc.StatusCode.UNAUTHENTICATED
    live = {lv.cluster: lv.state for lv in admin.status().liveness}
    assert live == {"east": "LIVE", "west": "REVOKED"}
    table = {c["name"]: c for c in json.loads(run("clusters", "-o", "json", env=env).output)}
    assert table["west"]["revoked"] is True and table["west"]["state"] == "REVOKED"
    r = run("revoke-cluster", "nosuch", "--yes", env=env)
    assert r.exit_code == 1 and "NOT_FOUND" in r.output


def test_sync_revoked_marks_clusters_revoked_on_the_trust_folder(fed, admin, pki: Pki, etcd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`isthmus trust revoke-cluster` (offline) + the trust sync: Store.sync_revoked marks the record."""
    import asyncio

    from federation.server import Etcd, Store

    join_cluster(fed, pki, "east", tmp_path)
    join_cluster(fed, pki, "west", tmp_path)
    pki.td.revoke_cluster("west")

    async def sync() -> tuple[list[str], list[str]]:
        async with Etcd(etcd.endpoint) as e:
            store = Store(e)
            return await store.sync_revoked(pki.td.crl_pem()), await store.sync_revoked(pki.td.crl_pem())

    first, again = asyncio.run(sync())
    assert first == ["west"] and again == []  # idempotent
    assert {c.name: c.revoked for c in admin.list_clusters()} == {"east": False, "west": True}

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from spiffe import X509Svid

import trust
from trust import _ca

from .conftest import TD, workload


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def openssl_verify(bundle: Path, untrusted: Path, leaf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(bundle), "-untrusted", str(untrusted), str(leaf)],
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("key_type", trust.KEY_TYPES)
def test_root_files_and_key_types(tmp_path: Path, key_type: str) -> None:
    td = trust.TrustDir(tmp_path / "r")
    cert = td.init(TD, key_type=key_type, validity=trust.parse_duration("2y"))
    assert _mode(td.root_key_path) == 0o600
    assert td.trust_domain == TD
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca
    left = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=729) < left <= dt.timedelta(days=731)
    # cluster CA and leaf issued from every key type
    ca = td.issue_cluster("east")
    files = ca.issue(workload("east"), tmp_path / "out")
    assert openssl_verify(td.bundle_path, ca.path / "ca.crt", files.cert).returncode == 0


def test_init_refuses_to_overwrite_unless_forced(root: trust.TrustDir) -> None:
    before = root.root_cert_path.read_bytes()
    with pytest.raises(trust.TrustError, match="already exists.*--force"):
        root.init(TD)
    assert root.root_cert_path.read_bytes() == before
    root.init(TD, force=True)
    assert root.root_cert_path.read_bytes() != before


def test_encrypted_root_key(tmp_path: Path) -> None:
    td = trust.TrustDir(tmp_path / "r", passphrase=b"s3cret")
    td.init(TD)
    assert b"ENCRYPTED" in td.root_key_path.read_bytes()
    td.issue_cluster("east")  # decrypts with the passphrase
    with pytest.raises(trust.BadFile, match="encrypted: pass --passphrase-file"):
        trust.TrustDir(tmp_path / "r").issue_cluster("west")
    with pytest.raises(trust.BadFile, match="wrong passphrase"):
        trust.TrustDir(tmp_path / "r", passphrase=b"nope").issue_cluster("west")


def test_import_existing_root(tmp_path: Path, root: trust.TrustDir) -> None:
    imported = trust.TrustDir(tmp_path / "imported")
    imported.import_root(root.root_cert_path, root.root_key_path)
    assert imported.trust_domain == TD
    assert imported.ca_pin() == root.ca_pin()


def test_import_refuses_mismatched_key(tmp_path: Path, root: trust.TrustDir) -> None:
    other = trust.TrustDir(tmp_path / "other")
    other.init(TD)
    target = trust.TrustDir(tmp_path / "t")
    with pytest.raises(trust.BadFile, match="does not match"):
        target.import_root(root.root_cert_path, other.root_key_path)
    assert not (tmp_path / "t" / "root.crt").exists()


def test_import_refuses_expired_root(tmp_path: Path) -> None:
    key = trust.generate_key()
    old = _ca.build_root(key, TD, 3600, now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2))
    (tmp_path / "old.crt").write_bytes(trust.certs_to_pem([old]))
    (tmp_path / "old.key").write_bytes(trust.key_to_pem(key))
    with pytest.raises(trust.BadFile, match="expired"):
        trust.TrustDir(tmp_path / "t").import_root(tmp_path / "old.crt", tmp_path / "old.key")


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "no PEM certificate"),
        (b"hello", "no PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "malformed PEM certificate"),
    ],
)
def test_malformed_pem_names_file_and_problem(tmp_path: Path, content: bytes, problem: str) -> None:
    f = tmp_path / "bad.crt"
    f.write_bytes(content)
    with pytest.raises(trust.BadFile) as info:
        trust.load_cert(f)
    assert str(f) in str(info.value) and problem in str(info.value)


def test_cluster_ca_profile(root: trust.TrustDir, east: trust.ClusterCA) -> None:
    cert = east.cert
    assert _mode(east.path / "ca.key") == 0o600
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    nc = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    assert [n.value for n in nc.value.permitted_subtrees] == [f"east.{TD}"]
    assert trust.spiffe_ids_of(cert) == [f"spiffe://east.{TD}"]
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    root_ski = root.root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert ski and aki == root_ski
    chain = trust.load_certs(east.path / "chain.pem")
    assert [c.serial_number for c in chain] == [cert.serial_number, root.root_cert.serial_number]


def test_leaf_is_an_x509_svid(root: trust.TrustDir, east: trust.ClusterCA, tmp_path: Path) -> None:
    before = dt.datetime.now(dt.timezone.utc)
    files = east.issue(workload("east"), tmp_path / "o", dns_names=["web.default.svc"], validity=3600)
    after = dt.datetime.now(dt.timezone.utc)
    assert _mode(files.key) == 0o600
    chain = trust.load_certs(files.cert)
    leaf = chain[0]
    assert len(chain) == 2 and chain[1].serial_number == east.cert.serial_number
    assert trust.spiffe_ids_of(leaf) == [workload("east")]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    # back-dated 5 minutes for clock skew, as the README promises (X.509 keeps whole seconds)
    skew = dt.timedelta(minutes=5)
    assert (before - skew).replace(microsecond=0) <= leaf.not_valid_before_utc <= after - skew
    assert (before + dt.timedelta(hours=1)).replace(microsecond=0) <= leaf.not_valid_after_utc <= after + dt.timedelta(hours=1)
    # Independent parser
    svid = X509Svid.parse(files.cert.read_bytes(), files.key.read_bytes())
    assert str(svid.spiffe_id) == workload("east")
    assert files.bundle.read_bytes() == root.bundle_pem()


def test_every_issued_leaf_parses_with_spiffe_library(root: trust.TrustDir, east: trust.ClusterCA, tmp_path: Path) -> None:
    outs = [
        east.issue(trust.gateway_id(f"east.{TD}"), tmp_path / "gw"),
        east.issue(trust.agent_id(f"east.{TD}"), tmp_path / "agent"),
        root.issue_admin("alice", tmp_path / "admin"),
        root.issue_server(trust.federation_server_id(TD), tmp_path / "srv", dns_names=["localhost"], ip_addresses=["127.0.0.1"]),
    ]
    for f in outs:
        svid = X509Svid.parse(f.cert.read_bytes(), f.key.read_bytes())
        assert str(svid.spiffe_id).startswith("spiffe://")
    assert str(X509Svid.parse(outs[2].cert.read_bytes(), outs[2].key.read_bytes()).spiffe_id) == f"spiffe://{TD}/admin/alice"


def test_leaf_not_after_capped_at_issuer(root: trust.TrustDir, tmp_path: Path) -> None:
    ca = root.issue_cluster("short", validity=3600)
    leaf, _ = ca.issue_leaf(workload("short"), validity=10 * 86400)
    assert leaf.not_valid_after_utc == ca.cert.not_valid_after_utc


def test_leaf_outside_trust_domain_refused(east: trust.ClusterCA, tmp_path: Path) -> None:
    with pytest.raises(trust.TrustError, match="outside this CA's trust domain"):
        east.issue(workload("west"), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_name_constraint_bites_in_openssl(root: trust.TrustDir, east: trust.ClusterCA, tmp_path: Path) -> None:
    """A compromised east CA key minting a west identity fails OpenSSL verification."""
    key = trust.generate_key()
    forged = _ca.build_leaf(key.public_key(), trust.SpiffeId.parse(workload("west")), east.cert, east.key, 3600)
    (tmp_path / "forged.pem").write_bytes(trust.certs_to_pem([forged]))
    res = openssl_verify(root.bundle_path, east.path / "ca.crt", tmp_path / "forged.pem")
    assert res.returncode != 0
    assert "permitted subtree violation" in res.stderr


def test_sign_cluster_csr(root: trust.TrustDir) -> None:
    key = trust.generate_key()
    csr = trust.make_csr(key, f"spiffe://east.{TD}")
    cert = root.sign_cluster_csr("east", csr)
    assert trust.key_matches(cert, key)
    assert trust.spiffe_ids_of(cert) == [f"spiffe://east.{TD}"]
    assert not (root.cluster_dir("east") / "ca.key").exists()


def test_csr_for_foreign_name_refused(root: trust.TrustDir) -> None:
    csr = trust.make_csr(trust.generate_key(), f"spiffe://west.{TD}")
    with pytest.raises(trust.InvalidCSR, match="outside the cluster's trust domain"):
        root.sign_cluster_csr("east", csr)


def test_csr_with_bad_signature_refused(root: trust.TrustDir) -> None:
    csr = bytearray(trust.make_csr(trust.generate_key(), f"spiffe://east.{TD}"))
    # flip a byte inside the base64 body, near the end (the signature)
    body_end = csr.rindex(b"-----END")
    pos = body_end - 10
    csr[pos] = ord("A") if csr[pos] != ord("A") else ord("B")
    with pytest.raises(trust.InvalidCSR, match="invalid CSR"):
        root.sign_cluster_csr("east", bytes(csr))


def test_csr_garbage_refused(root: trust.TrustDir) -> None:
    with pytest.raises(trust.InvalidCSR, match="malformed"):
        root.sign_cluster_csr("east", b"not a csr")


def test_revoke_cluster_writes_signed_crl(root: trust.TrustDir, east: trust.ClusterCA, west: trust.ClusterCA) -> None:
    serials = root.revoke_cluster("east")
    crl = trust.load_crl(root.crl_pem(), root.crl_path)
    assert crl.is_signature_valid(root.root_cert.public_key())
    assert {r.serial_number for r in crl} == set(serials) == {east.cert.serial_number}
    rev = root.revocations()
    east_leaf, _ = east.issue_leaf(workload("east"))
    west_leaf, _ = west.issue_leaf(workload("west"))
    assert rev.is_revoked(east_leaf) and not rev.is_revoked(west_leaf)


def test_revoke_unknown_cluster(root: trust.TrustDir) -> None:
    with pytest.raises(trust.TrustError, match="unknown cluster 'nope'"):
        root.revoke_cluster("nope")


def test_crl_signature_checked(root: trust.TrustDir, tmp_path: Path) -> None:
    other = trust.TrustDir(tmp_path / "other")
    other.init(TD)
    with pytest.raises(trust.TrustError, match="does not verify"):
        trust.Revocations.from_crl(other.crl_pem(), [], root.bundle())


def test_root_rotation_bundle_and_carried_revocations(root: trust.TrustDir, east: trust.ClusterCA, tmp_path: Path) -> None:
    root.revoke_cluster("east")
    old_root = root.root_cert
    new_root = root.rotate_root()
    fps = [trust.fingerprint(c) for c in root.bundle()]
    assert fps == [trust.fingerprint(new_root), trust.fingerprint(old_root)]
    assert east.cert.serial_number in root.revoked_serials()
    # a leaf chaining to the new root validates against the A+B bundle
    west = root.issue_cluster("west")
    f = west.issue(workload("west"), tmp_path / "w")
    assert openssl_verify(root.bundle_path, west.path / "ca.crt", f.cert).returncode == 0
    root.prune_bundle()
    assert [trust.fingerprint(c) for c in root.bundle()] == [trust.fingerprint(new_root)]


def test_spiffe_bundle_export(root: trust.TrustDir) -> None:
    root.rotate_root(key_type="ed25519")
    doc = json.loads(trust.spiffe_bundle_json(root.bundle()))
    assert [k["use"] for k in doc["keys"]] == ["x509-svid", "x509-svid"]
    assert {k["kty"] for k in doc["keys"]} == {"EC", "OKP"}
    for k, cert in zip(doc["keys"], root.bundle()):
        import base64

        assert x509.load_der_x509_certificate(base64.b64decode(k["x5c"][0])) == cert


def test_rotation_due_is_pure(east: trust.ClusterCA) -> None:
    leaf, _ = east.issue_leaf(workload("east"), validity=3600)
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    mid = start + (end - start) / 2
    assert not trust.rotation_due(leaf, mid - dt.timedelta(seconds=1))
    assert trust.rotation_due(leaf, mid)
    assert trust.rotation_due(leaf, end + dt.timedelta(days=1))


def test_ca_pin_format(root: trust.TrustDir) -> None:
    pin = root.ca_pin()
    assert pin.startswith("sha256:") and len(pin) == 7 + 64


def test_no_temp_files_left_behind(root: trust.TrustDir, east: trust.ClusterCA, tmp_path: Path) -> None:
    east.issue(workload("east"), tmp_path / "o")
    leftovers = [p for p in root.path.rglob("*.tmp")] + [p for p in (tmp_path / "o").glob("*.tmp")]
    assert leftovers == []

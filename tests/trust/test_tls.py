"""Real TLS handshakes over real sockets with contexts built by trust."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

import trust
from trust import _ca

from .conftest import TD, workload


class Server:
    """Accepts TLS connections on loopback; runs verify_peer right after each handshake."""

    def __init__(self, ctx_or_source, policy: trust.PeerPolicy) -> None:
        self.source = ctx_or_source
        self.policy = policy
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.results: list[object] = []
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _ctx(self) -> ssl.SSLContext:
        return self.source.current() if isinstance(self.source, trust.CertificateSource) else self.source

    def _run(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        if True:
            try:
                with self._ctx().wrap_socket(raw, server_side=True) as s:
                    try:
                        sid = trust.verify_peer(s, self.policy)
                    except trust.PeerRejected as exc:
                        self.results.append(exc)
                        return
                    self.results.append(sid)
                    s.sendall(b"hello " + str(sid).encode() + b"\n")
                    s.recv(1)
            except (ssl.SSLError, OSError) as exc:
                self.results.append(exc)

    def close(self) -> None:
        self.sock.close()


def connect(port: int, ctx: ssl.SSLContext) -> tuple[trust.SpiffeId, str, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as s:
            sid = trust.verify_peer(s)
            data = s.recv(200)
            return sid, s.version() or "", data


def files(ca: trust.ClusterCA, sid: str, d: Path) -> trust.IssuedFiles:
    return ca.issue(sid, d)


def server_ctx(f: trust.IssuedFiles, **kw) -> ssl.SSLContext:
    return trust.server_context(f.cert, f.key, f.bundle, alpn=("h2",), **kw)


def client_ctx(f: trust.IssuedFiles, **kw) -> ssl.SSLContext:
    return trust.client_context(f.bundle, f.cert, f.key, alpn=("h2",), **kw)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_same_cluster_handshake(east: trust.ClusterCA, tmp_path: Path, version: ssl.TLSVersion) -> None:
    s = files(east, workload("east", "a", "server"), tmp_path / "s")
    c = files(east, workload("east", "b", "client"), tmp_path / "c")
    srv = Server(server_ctx(s, max_version=version), trust.PeerPolicy(frozenset({f"east.{TD}"})))
    try:
        sid, ver, data = connect(srv.port, client_ctx(c))
        assert str(sid) == workload("east", "a", "server")
        assert ver == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        assert data == f"hello {workload('east', 'b', 'client')}\n".encode()
    finally:
        srv.close()


def test_cross_cluster_handshake(east: trust.ClusterCA, west: trust.ClusterCA, tmp_path: Path) -> None:
    s = files(west, trust.gateway_id(f"west.{TD}"), tmp_path / "s")
    c = files(east, trust.gateway_id(f"east.{TD}"), tmp_path / "c")
    srv = Server(server_ctx(s), trust.PeerPolicy(frozenset({f"east.{TD}", f"west.{TD}"})))
    try:
        sid, _, data = connect(srv.port, client_ctx(c))
        assert sid == trust.gateway_id(f"west.{TD}")
        assert str(trust.gateway_id(f"east.{TD}")).encode() in data
    finally:
        srv.close()


def test_trust_domain_not_allowed_is_rejected(east: trust.ClusterCA, west: trust.ClusterCA, tmp_path: Path) -> None:
    s = files(west, workload("west"), tmp_path / "s")
    c = files(east, workload("east"), tmp_path / "c")
    srv = Server(server_ctx(s), trust.PeerPolicy(frozenset({f"west.{TD}"})))
    try:
        result = refused(srv, client_ctx(c))
        assert isinstance(result, trust.PeerRejected)
        assert "not allowed" in str(result)
    finally:
        srv.close()


def _wait(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.01)


def refused(srv: Server, ctx: ssl.SSLContext) -> object:
    """Connect with ``ctx``, expect the connection to fail or be closed without a greeting,
    and return what the server recorded (its error or PeerRejected)."""
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        _, _, data = connect(srv.port, ctx)
        if not data:
            raise ConnectionError("closed")
    _wait(lambda: srv.results)
    return srv.results[0]


X509_V_ERR_PERMITTED_VIOLATION = 47  # OpenSSL's x509_vfy.h


def test_name_constraint_bites_in_handshake(root: trust.TrustDir, east: trust.ClusterCA, west: trust.ClusterCA, tmp_path: Path) -> None:
    """east's CA key signs a west identity: OpenSSL fails the handshake."""
    s = files(west, workload("west", "a", "server"), tmp_path / "s")
    key = trust.generate_key()
    forged = _ca.build_leaf(key.public_key(), trust.SpiffeId.parse(workload("west")), east.cert, east.key, 3600)
    d = tmp_path / "forged"
    d.mkdir()
    (d / "cert.pem").write_bytes(trust.certs_to_pem([forged, east.cert]))
    (d / "key.pem").write_bytes(trust.key_to_pem(key))
    ctx = trust.client_context(root.bundle_path, d / "cert.pem", d / "key.pem")
    srv = Server(server_ctx(s), trust.PeerPolicy())
    try:
        result = refused(srv, ctx)
        # the reason is the name constraint, not any other verification failure
        assert isinstance(result, ssl.SSLCertVerificationError), result
        assert result.verify_code == X509_V_ERR_PERMITTED_VIOLATION, (result.verify_code, result.verify_message)
        assert result.verify_message == "permitted subtree violation"
    finally:
        srv.close()


def test_revoked_cluster_leaf_rejected(root: trust.TrustDir, east: trust.ClusterCA, west: trust.ClusterCA, tmp_path: Path) -> None:
    s = files(west, workload("west"), tmp_path / "s")
    c = files(east, workload("east"), tmp_path / "c")
    root.revoke_cluster("east")
    srv = Server(server_ctx(s), trust.PeerPolicy(revocations=root.revocations()))
    try:
        result = refused(srv, client_ctx(c))
        assert isinstance(result, trust.PeerRejected)
        assert "revoked" in str(result)
    finally:
        srv.close()


def test_expired_leaf_rejected(tmp_path: Path) -> None:
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2)
    root = trust.TrustDir(tmp_path / "root")
    root.init(TD, now=past)
    east = root.issue_cluster("east", now=past)
    west = root.issue_cluster("west")
    s = files(west, workload("west"), tmp_path / "s")
    key = trust.generate_key()
    old = _ca.build_leaf(key.public_key(), trust.SpiffeId.parse(workload("east")), east.cert, east.key, 3600, now=past)
    d = tmp_path / "old"
    d.mkdir()
    (d / "cert.pem").write_bytes(trust.certs_to_pem([old, east.cert]))
    (d / "key.pem").write_bytes(trust.key_to_pem(key))
    srv = Server(server_ctx(s), trust.PeerPolicy())
    try:
        result = refused(srv, trust.client_context(s.bundle, d / "cert.pem", d / "key.pem"))
        assert "certificate has expired" in str(result)
    finally:
        srv.close()
    with pytest.raises(trust.PeerRejected, match="expired"):
        trust.verify_peer(old)


def test_a_ca_certificate_is_refused_as_a_leaf(east: trust.ClusterCA) -> None:
    """A certificate with CA:true is never a workload's SVID, even one that would pass
    every other check (valid, one SPIFFE URI SAN in an allowed trust domain)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = trust.generate_key()
    now = dt.datetime.now(dt.timezone.utc)
    uri = workload("east")
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([])).issuer_name(east.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .sign(east.key, hashes.SHA256()))
    policy = trust.PeerPolicy(trust_domains=frozenset({"east.isthmus.local"}))
    with pytest.raises(trust.PeerRejected, match="^invalid X509-SVID: leaf certificate is a CA$"):
        trust.verify_peer(cert, policy)
    # the same, but CA:false, is accepted: the CA bit alone is what was refused
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([])).issuer_name(east.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .sign(east.key, hashes.SHA256()))
    assert str(trust.verify_peer(leaf, policy)) == uri


def test_leaf_with_two_uri_sans_rejected(east: trust.ClusterCA) -> None:
    from cryptography import x509

    key = trust.generate_key()
    leaf = _ca.build_leaf(key.public_key(), trust.SpiffeId.parse(workload("east")), east.cert, east.key, 3600)
    # Re-sign a copy with a second URI SAN.
    san = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(workload("east")), x509.UniformResourceIdentifier(workload("east", "x", "y"))]
    )
    b = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(leaf.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(san, critical=False)
    )
    from cryptography.hazmat.primitives import hashes

    two = b.sign(east.key, hashes.SHA256())
    with pytest.raises(trust.PeerRejected, match="exactly one URI SAN, found 2"):
        trust.verify_peer(two)


def test_no_client_cert_refused(east: trust.ClusterCA, tmp_path: Path) -> None:
    s = files(east, workload("east"), tmp_path / "s")
    srv = Server(server_ctx(s), trust.PeerPolicy())
    try:
        assert isinstance(refused(srv, trust.client_context(s.bundle)), ssl.SSLError)
    finally:
        srv.close()


def test_root_rotation_with_overlap(root: trust.TrustDir, tmp_path: Path) -> None:
    """Bundle A → A+B → leaves from B → B only: every handshake succeeds throughout."""
    east = root.issue_cluster("east")
    a_files = east.issue(workload("east", "a", "server"), tmp_path / "a")
    root.rotate_root()
    east_b = root.issue_cluster("east")  # re-issued under root B, bundle A+B
    b_files = east_b.issue(workload("east", "b", "client"), tmp_path / "b")
    # server still on a leaf from A, client on B, both trusting A+B
    a_ctx = trust.server_context(a_files.cert, a_files.key, root.bundle_path)
    srv = Server(a_ctx, trust.PeerPolicy())
    try:
        sid, _, _ = connect(srv.port, trust.client_context(root.bundle_path, b_files.cert, b_files.key))
        assert sid.path == "/ns/a/sa/server"
    finally:
        srv.close()
    root.prune_bundle()
    b2 = root.issue_cluster("east").issue(workload("east", "a", "server"), tmp_path / "a2")
    srv = Server(trust.server_context(b2.cert, b2.key, root.bundle_path), trust.PeerPolicy())
    try:
        sid, _, _ = connect(srv.port, trust.client_context(root.bundle_path, b_files.cert, b_files.key))
        assert sid.path == "/ns/a/sa/server"
    finally:
        srv.close()


def test_certificate_source_swaps_without_dropping(east: trust.ClusterCA, tmp_path: Path) -> None:
    s_dir = tmp_path / "s"
    s = files(east, workload("east", "a", "server"), s_dir)
    c = files(east, workload("east", "b", "client"), tmp_path / "c")
    source = trust.CertificateSource(lambda: server_ctx(s), [s.cert, s.key], check_interval=0)
    srv = Server(source, trust.PeerPolicy())
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            with client_ctx(c).wrap_socket(raw) as first:
                first_serial = trust.load_cert(s.cert).serial_number
                assert first.recv(200).startswith(b"hello")
                # renew in place; the next connection gets the new certificate
                time.sleep(0.01)
                east.issue(workload("east", "a", "server"), s_dir)
                os.utime(s.cert)
                with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw2:
                    with client_ctx(c).wrap_socket(raw2) as second:
                        assert second.recv(200).startswith(b"hello")
                        from cryptography import x509

                        new_serial = x509.load_der_x509_certificate(second.getpeercert(True)).serial_number
                        assert new_serial != first_serial
                        second.sendall(b"x")
                # the first connection is still alive
                old_serial = trust.load_cert(s.cert).serial_number
                from cryptography import x509

                assert x509.load_der_x509_certificate(first.getpeercert(True)).serial_number == first_serial != old_serial
                first.sendall(b"x")
        assert source.generation == 2
    finally:
        srv.close()


def test_bad_bundle_and_mismatched_key(east: trust.ClusterCA, west: trust.ClusterCA, tmp_path: Path) -> None:
    e = files(east, workload("east"), tmp_path / "e")
    w = files(west, workload("west"), tmp_path / "w")
    with pytest.raises(trust.BadFile, match="does not match"):
        trust.server_context(e.cert, w.key, e.bundle)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("nonsense")
    with pytest.raises(trust.BadFile, match="garbage.pem"):
        trust.client_context(garbage)
    with pytest.raises(trust.BadFile, match="not found"):
        trust.client_context(tmp_path / "missing.pem")


# -- verify_peer and Revocations on their own (no handshake): every branch pinned ------------

def _cert(issuer: trust.ClusterCA, uris: list[str], *, ca: bool = False, ski: bool = True, aki: bool = True,
          not_after: dt.datetime | None = None):  # type: ignore[no-untyped-def]
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = trust.generate_key()
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(issuer.cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=1))
         .not_valid_after(not_after or now + dt.timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=True)
    if ski:
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    if aki:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.cert.public_key()),  # type: ignore[arg-type]
                            critical=False)
    return b.sign(issuer.key, hashes.SHA256())


def test_verify_peer_takes_der_a_certificate_or_nothing(east: trust.ClusterCA) -> None:
    from cryptography.hazmat.primitives import serialization

    leaf = _cert(east, [workload("east")])
    assert str(trust.verify_peer(leaf)) == workload("east")
    assert str(trust.verify_peer(leaf.public_bytes(serialization.Encoding.DER))) == workload("east")
    with pytest.raises(trust.PeerRejected, match="^invalid X509-SVID: the peer presented no certificate$"):
        trust.verify_peer(None)


def test_verify_peer_expiry_is_exclusive_at_not_after(east: trust.ClusterCA) -> None:
    leaf = _cert(east, [workload("east")])
    end = leaf.not_valid_after_utc
    assert trust.verify_peer(leaf, now=end - dt.timedelta(seconds=1))
    with pytest.raises(trust.PeerRejected, match="^invalid X509-SVID: expired at "):
        trust.verify_peer(leaf, now=end)


@pytest.mark.parametrize("uris, found", [([], 0), (["spiffe://east.isthmus.local/ns/a/sa/b", "spiffe://east.isthmus.local/ns/c/sa/d"], 2)])
def test_verify_peer_wants_exactly_one_uri_san(east: trust.ClusterCA, uris: list[str], found: int) -> None:
    with pytest.raises(trust.PeerRejected, match=f"^invalid X509-SVID: expected exactly one URI SAN, found {found}$"):
        trust.verify_peer(_cert(east, uris))


def test_verify_peer_refuses_a_uri_that_is_no_spiffe_id(east: trust.ClusterCA) -> None:
    with pytest.raises(trust.PeerRejected, match="^invalid X509-SVID: "):
        trust.verify_peer(_cert(east, ["https://east.isthmus.local/x"]))


def test_verify_peer_policy_trust_domains_revocations_and_ids(root: trust.TrustDir, east: trust.ClusterCA) -> None:
    leaf = _cert(east, [workload("east")])
    ok = trust.PeerPolicy(trust_domains=frozenset({"east.isthmus.local"}), ids=lambda sid: sid.path.startswith("/ns/"))
    assert str(trust.verify_peer(leaf, ok)) == workload("east")
    with pytest.raises(trust.PeerRejected, match="trust domain 'east.isthmus.local' is not allowed here"):
        trust.verify_peer(leaf, trust.PeerPolicy(trust_domains=frozenset({"west.isthmus.local"})))
    with pytest.raises(trust.PeerRejected, match="identity not allowed on this listener"):
        trust.verify_peer(leaf, trust.PeerPolicy(ids=lambda sid: False))
    root.revoke_cluster("east")
    revoked = trust.PeerPolicy(revocations=root.revocations())
    with pytest.raises(trust.PeerRejected, match="its issuing cluster CA has been revoked"):
        trust.verify_peer(leaf, revoked)


def test_revocations_map_the_crl_onto_the_known_intermediates(root: trust.TrustDir, east: trust.ClusterCA,
                                                              west: trust.ClusterCA) -> None:
    root.revoke_cluster("east")
    rev = trust.Revocations.from_crl(root.crl_pem(), [east.cert, west.cert], root.bundle())
    assert rev.is_revoked(_cert(east, [workload("east")]))
    assert not rev.is_revoked(_cert(west, [workload("west")]))
    assert not rev.is_revoked(_cert(east, [workload("east")], aki=False))  # no AKI: cannot be matched
    # an empty or absent CRL revokes nothing; a malformed one is a clear error
    for empty in (None, b""):
        assert trust.Revocations.from_crl(empty, [east.cert], root.bundle()).revoked_key_ids == frozenset()
    with pytest.raises(trust.BadFile, match="malformed CRL"):
        trust.Revocations.from_crl(b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", [east.cert])


def test_a_crl_must_be_signed_by_a_root_when_roots_are_given(root: trust.TrustDir, east: trust.ClusterCA,
                                                             tmp_path: Path) -> None:
    root.revoke_cluster("east")
    stranger = trust.TrustDir(tmp_path / "stranger")
    stranger.init(TD)
    assert stranger.root_cert.subject == root.root_cert.subject  # same name, another key
    from cryptography.hazmat.primitives import serialization

    forged = trust.build_crl(stranger.root_cert, stranger.root_key, [(east.cert.serial_number, east.cert.not_valid_before_utc)]
                             ).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(trust.TrustError, match="^invalid CRL: its signature does not verify against any root"):
        trust.Revocations.from_crl(forged, [east.cert], root.bundle())
    with pytest.raises(trust.TrustError, match="^invalid CRL"):
        trust.Revocations.from_crl(root.crl_pem(), [east.cert], [])  # no roots: nothing can vouch for it
    # signed by one of several roots (a rotation's A+B bundle): accepted
    rev = trust.Revocations.from_crl(root.crl_pem(), [east.cert], [stranger.root_cert, *root.bundle()])
    assert rev.is_revoked(_cert(east, [workload("east")]))
    # without roots the caller vouches for the CRL itself (the trust folder's own file)
    assert trust.Revocations.from_crl(forged, [east.cert]).is_revoked(_cert(east, [workload("east")]))


def test_an_intermediate_without_ski_is_matched_by_its_key(root: trust.TrustDir, tmp_path: Path) -> None:
    """A CA certificate without a SubjectKeyIdentifier (another issuer's) is matched by the
    SKI computed from its public key, as leaves' AKIs name it."""
    from cryptography import x509

    from cryptography.hazmat.primitives import hashes

    east = root.issue_cluster("east")
    # the same CA certificate without the extension (same key, same serial)

    b = (x509.CertificateBuilder().subject_name(east.cert.subject).issuer_name(east.cert.issuer)
         .public_key(east.cert.public_key()).serial_number(east.cert.serial_number)
         .not_valid_before(east.cert.not_valid_before_utc).not_valid_after(east.cert.not_valid_after_utc))
    for ext in east.cert.extensions:
        if not isinstance(ext.value, x509.SubjectKeyIdentifier):
            b = b.add_extension(ext.value, ext.critical)
    bare = b.sign(root.root_key, hashes.SHA256())
    root.revoke_cluster("east")
    rev = trust.Revocations.from_crl(root.crl_pem(), [bare], root.bundle())
    assert rev.is_revoked(_cert(east, [workload("east")]))


def test_a_crl_whose_issuer_is_not_the_roots_name_is_refused(root: trust.TrustDir, east: trust.ClusterCA) -> None:
    """Signed with the root's key but naming another issuer: RFC 5280 wants the CRL's
    issuer to be the certificate that signed it, so this is refused too."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    crl = (x509.CertificateRevocationListBuilder()
           .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the root")]))
           .last_update(now).next_update(now + dt.timedelta(days=1))
           .sign(root.root_key, hashes.SHA256()))
    with pytest.raises(trust.TrustError, match="^invalid CRL"):
        trust.Revocations.from_crl(crl.public_bytes(serialization.Encoding.PEM), [east.cert], root.bundle())

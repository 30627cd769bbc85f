"""Client TLS to etcd: a real etcd member serving https with --client-cert-auth, the
federation's etcd client and ``isthmus federation serve --etcd https://...`` against it,
and the refusals (no CA, a client without a certificate, a CA that did not sign it,
http endpoints with TLS options, mixed schemes) with errors that say what to do."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation import FederationError, StoreUnavailable
from federation.server import Etcd, EtcdTls
from federation.server._embedded import etcd_binary, free_port

from .fixtures import Pki, start_federation
from tests.scratch import scratch_dir


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], cn: str, server: bool,
          out: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca[1].subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = b.sign(ca[0], hashes.SHA256())
    cert_path, key_path = out / f"{cn}.pem", out / f"{cn}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


class TlsEtcd:
    def __init__(self, d: Path) -> None:
        self.dir = d
        self.ca = _ca("etcd-ca")
        self.ca_file = d / "ca.pem"
        self.ca_file.write_bytes(self.ca[1].public_bytes(serialization.Encoding.PEM))
        self.server = _leaf(self.ca, "etcd-server", True, d)
        self.client = _leaf(self.ca, "isthmus-federation", False, d)
        self.port = free_port()
        self.endpoint = f"https://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{free_port()}"
        self.log = open(d / "etcd.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([
            etcd_binary(), "--name", "m1", "--data-dir", str(d / "data"),
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"m1={peer}",
            "--cert-file", str(self.server[0]), "--key-file", str(self.server[1]),
            "--trusted-ca-file", str(self.ca_file), "--client-cert-auth", "--log-level", "error",
        ], stdout=self.log, stderr=subprocess.STDOUT)

    def tls(self, **kw: object) -> EtcdTls:
        args = {"ca_file": self.ca_file, "cert_file": self.client[0], "key_file": self.client[1], **kw}
        return EtcdTls(**args)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def tls_etcd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    e = TlsEtcd(scratch_dir(request, tmp_path_factory, "etcd-tls"))
    deadline = time.monotonic() + 30
    while True:  # ready when a TLS client can read
        try:
            asyncio.run(_roundtrip(e.endpoint, e.tls(), b"/probe"))
            break
        except FederationError:
            assert e.proc.poll() is None and time.monotonic() < deadline, (e.dir / "etcd.log").read_text()
            time.sleep(0.2)
    yield e
    e.stop()


async def _roundtrip(endpoint: str, tls: EtcdTls | None, key: bytes) -> bytes:
    etcd = Etcd(endpoint, timeout=3.0, tls=tls)
    await etcd.connect()
    try:
        await etcd.put(key, b"over tls")
        kv = await etcd.get(key)
        return kv.value if kv is not None else b""
    finally:
        await etcd.close()


def test_the_client_reads_and_writes_over_mutual_tls(tls_etcd: TlsEtcd) -> None:
    assert asyncio.run(_roundtrip(tls_etcd.endpoint, tls_etcd.tls(), b"/k1")) == b"over tls"
    # several endpoints (one address list): the name checked is the first host's, or the one given
    both = f"{tls_etcd.endpoint},https://localhost:{tls_etcd.port}"
    assert asyncio.run(_roundtrip(both, tls_etcd.tls(), b"/k2")) == b"over tls"
    assert asyncio.run(_roundtrip(both, tls_etcd.tls(server_name="localhost"), b"/k3")) == b"over tls"


def test_etcd_refuses_a_client_without_a_certificate_and_one_checking_another_ca(tls_etcd: TlsEtcd,
                                                                                 tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        asyncio.run(_roundtrip(tls_etcd.endpoint, EtcdTls(tls_etcd.ca_file), b"/nope"))
    other = tmp_path / "other-ca.pem"
    other.write_bytes(_ca("someone-else")[1].public_bytes(serialization.Encoding.PEM))
    with pytest.raises(StoreUnavailable):
        asyncio.run(_roundtrip(tls_etcd.endpoint, tls_etcd.tls(ca_file=other), b"/nope"))
    with pytest.raises(StoreUnavailable):  # the member's certificate does not name "etcd.example"
        asyncio.run(_roundtrip(tls_etcd.endpoint, tls_etcd.tls(server_name="etcd.example"), b"/nope"))


@pytest.mark.parametrize(("endpoints", "tls", "message"), [
    ("https://127.0.0.1:2379", False, "need the CA that signed etcd's certificates: --etcd-ca"),
    ("http://127.0.0.1:2379", True, "endpoints are http://: write them as https://"),
    ("https://127.0.0.1:2379,http://127.0.0.2:2379", True, "some are http://, some https://"),
    ("ftp://127.0.0.1:2379", True, "use http://HOST:PORT, or https://HOST:PORT with --etcd-ca"),
])
def test_endpoints_and_tls_options_must_agree(tls_etcd: TlsEtcd, endpoints: str, tls: bool, message: str) -> None:
    with pytest.raises(FederationError, match=message):
        Etcd(endpoints, tls=tls_etcd.tls() if tls else None)


def test_unreadable_or_non_pem_files_are_named(tls_etcd: TlsEtcd, tmp_path: Path) -> None:
    with pytest.raises(FederationError, match=r"cannot read --etcd-ca .*missing\.pem"):
        tls_etcd.tls(ca_file=tmp_path / "missing.pem").credentials()
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(FederationError, match=r"--etcd-key .*junk\.pem is not a PEM file"):
        tls_etcd.tls(key_file=junk).credentials()
    with pytest.raises(FederationError, match="--etcd-cert and --etcd-key together"):
        EtcdTls(tls_etcd.ca_file, cert_file=tls_etcd.client[0]).credentials()


def test_federation_serve_runs_on_an_etcd_that_wants_client_certificates(tls_etcd: TlsEtcd, pki: Pki,
                                                                         tmp_path: Path) -> None:
    fed = start_federation(pki, tls_etcd.endpoint, tmp_path, extra=(
        "--etcd-ca", str(tls_etcd.ca_file), "--etcd-cert", str(tls_etcd.client[0]),
        "--etcd-key", str(tls_etcd.client[1])))
    try:
        with fed.client(pki.admin_dir) as admin:
            tok = admin.create_token(60, "east")  # a write through the federation, over TLS to etcd
            assert tok.token and admin.status().config_revision > 0
    finally:
        fed.kill()
    # without the client certificate, serve says what is wrong and exits non-zero
    r = subprocess.run([*fed.args[:fed.args.index("--etcd-ca")], "--etcd-ca", str(tls_etcd.ca_file),
                        "--etcd-wait", "2"], capture_output=True, text=True, timeout=60)
    out = r.stderr + r.stdout
    assert r.returncode != 0 and "Traceback" not in out, out
    assert "etcd is unavailable" in out and "--etcd-cert and --etcd-key" in out, out

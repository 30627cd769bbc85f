"""--cert-dir is checked before any call, and a failed connection says why: against a real
federation, with certificates that are expired, not yet valid, mismatched, not PEM or
from another federation."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

import trust
from tests.clirun import expect, isthmus

from .fixtures import Pki

NOW = dt.datetime.now(dt.timezone.utc)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A federation whose root was made three days ago, so that certificates can be
    issued in the past (expired) as well as in the future (not yet valid)."""
    td = trust.TrustDir(tmp_path / "trust")
    td.init("isthmus.local", now=NOW - dt.timedelta(days=3))
    td.issue_admin("ops", tmp_path / "admin-ops")
    return Pki(td.path, tmp_path / "admin-ops")


def _clusters(fed, cert_dir: Path):  # type: ignore[no-untyped-def]
    return isthmus("clusters", "--federation", fed.address, "--cert-dir", str(cert_dir))


def test_good_credentials_work(fed, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    expect(_clusters(fed, pki.admin_dir), 0, "clusters")


def test_an_expired_certificate_is_named_with_its_dates(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    old = tmp_path / "old"
    pki.td.issue_admin("ops", old, validity=3600, now=NOW - dt.timedelta(days=2))
    out = expect(_clusters(fed, old), 2, f"{old / 'cert.pem'}", "spiffe://isthmus.local/admin/ops", "has expired",
                 "valid from ", " to ", "; now ")
    assert "UNAVAILABLE" not in out


def test_a_certificate_not_yet_valid_is_named_with_its_dates(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    future = tmp_path / "future"
    pki.td.issue_admin("ops", future, validity=3600, now=NOW + dt.timedelta(days=1))
    expect(_clusters(fed, future), 2, f"{future / 'cert.pem'}", "is not valid yet", "valid from ", "check the clock")


def test_an_expired_agent_certificate_stops_export_before_it_sends(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent = tmp_path / "agent"
    pki.td.issue_admin("ops", agent, validity=60, now=NOW - dt.timedelta(days=1))
    (tmp_path / "exports.yaml").write_text("services: []\n")
    r = isthmus("export", "--cluster", "east", "-f", str(tmp_path / "exports.yaml"), "--once",
                "--federation", fed.address, "--cert-dir", str(agent))
    expect(r, 2, "has expired")


def test_a_key_of_another_certificate_names_the_key_file(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mixed = tmp_path / "mixed"
    shutil.copytree(pki.admin_dir, mixed)
    pki.td.issue_admin("other", tmp_path / "other")
    shutil.copy(tmp_path / "other" / "key.pem", mixed / "key.pem")
    expect(_clusters(fed, mixed), 2, f"{mixed / 'key.pem'}: private key does not match the certificate in "
                                     f"{mixed / 'cert.pem'}")


@pytest.mark.parametrize("name, says", [
    ("cert.pem", "no PEM certificate found"),
    ("key.pem", "no PEM private key found"),
    ("bundle.pem", "no PEM trust bundle certificate found"),
])
def test_a_file_that_is_not_pem_is_named(fed, pki: Pki, tmp_path: Path, name: str, says: str) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad"
    shutil.copytree(pki.admin_dir, bad)
    (bad / name).write_bytes(b"\x30\x82\x01\x0a not a PEM file")
    expect(_clusters(fed, bad), 2, f"{bad / name}: {says}")


def test_a_missing_file_is_named(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad"
    shutil.copytree(pki.admin_dir, bad)
    (bad / "bundle.pem").unlink()
    expect(_clusters(fed, bad), 2, f"{bad / 'bundle.pem'}", "not found")


def _other_federation(tmp_path: Path) -> trust.TrustDir:
    other = trust.TrustDir(tmp_path / "other-fed")
    other.init("isthmus.local")
    return other


def test_a_bundle_without_the_certificates_root_says_so(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad"
    shutil.copytree(pki.admin_dir, bad)
    (bad / "bundle.pem").write_bytes(_other_federation(tmp_path).bundle_pem())
    expect(_clusters(fed, bad), 2, f"{bad / 'bundle.pem'}: the trust bundle does not contain the root that issued "
                                   f"{bad / 'cert.pem'}")


def test_a_server_certificate_the_bundle_does_not_trust_is_named(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Credentials of another federation: consistent on their own, so only the
    connection can tell; the reason is the server's certificate, not 'Socket closed'."""
    other = _other_federation(tmp_path)
    other.issue_admin("ops", tmp_path / "foreign")
    expect(_clusters(fed, tmp_path / "foreign"), 1, "UNAVAILABLE", f"{fed.address}: the server's certificate is not "
                                                    f"trusted by {tmp_path / 'foreign' / 'bundle.pem'}")


@pytest.fixture
def plain_http() -> Iterator[str]:
    class Hello(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hello)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_server_that_does_not_speak_tls_is_named(pki: Pki, plain_http: str) -> None:
    r = isthmus("clusters", "--federation", plain_http, "--cert-dir", str(pki.admin_dir), timeout=60)
    expect(r, 1, "UNAVAILABLE", f"{plain_http}: the other side does not speak TLS (WRONG_VERSION_NUMBER)")


def test_nothing_listening_is_named(pki: Pki) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    r = isthmus("status", "--federation", address, "--cert-dir", str(pki.admin_dir), timeout=60)
    expect(r, 1, "UNAVAILABLE", f"{address}: connection refused")


def test_federation_wait_gives_up_saying_why(pki: Pki) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    r = isthmus("federation", "wait", "--timeout", "2s", "--federation", address, "--cert-dir", str(pki.admin_dir))
    expect(r, 1, f"the federation at {address} did not answer within 2s", "connection refused")


def test_federation_wait_returns_once_serving(fed, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    r = isthmus("federation", "wait", "--federation", fed.address, "--cert-dir", str(pki.admin_dir))
    expect(r, 0, f"the federation at {fed.address} is serving")

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from federation.cli import cli


def run(*args: str) -> "CliRunner.invoke":
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def fed(tmp_path: Path) -> Path:
    d = tmp_path / "fed"
    r = run("trust", "init", "--dir", str(d), "--trust-domain", "isthmus.local")
    assert r.exit_code == 0, r.output
    return d


def test_init_issue_show_flow(fed: Path, tmp_path: Path) -> None:
    assert stat.S_IMODE(os.stat(fed / "root.key").st_mode) == 0o600
    r = run("trust", "issue-cluster", "east", "--dir", str(fed), "--validity", "30d")
    assert r.exit_code == 0 and "spiffe://east.isthmus.local" in r.output
    out = tmp_path / "web"
    r = run("trust", "issue", "--ca-dir", str(fed / "clusters/east"), "--spiffe-id",
            "spiffe://east.isthmus.local/ns/default/sa/web", "--out-dir", str(out), "--dns", "web.local", "--validity", "2h")
    assert r.exit_code == 0, r.output
    r = run("trust", "show", str(out / "cert.pem"))
    assert r.exit_code == 0
    assert "certificate: spiffe://east.isthmus.local/ns/default/sa/web" in r.output
    assert "issuer [1]: spiffe://east.isthmus.local" in r.output
    assert "time left:   1h" in r.output
    r = run("trust", "show", str(out / "cert.pem"), "-o", "json")
    doc = json.loads(r.output)
    assert doc[0]["spiffe_id"] == "spiffe://east.isthmus.local/ns/default/sa/web"
    assert doc[1]["name_constraints"] == ["east.isthmus.local"]
    assert 3500 < doc[0]["seconds_left"] <= 7200


def test_init_refuses_overwrite(fed: Path) -> None:
    r = run("trust", "init", "--dir", str(fed), "--trust-domain", "isthmus.local")
    assert r.exit_code == 1 and "--force" in r.output
    r = run("trust", "init", "--dir", str(fed), "--trust-domain", "isthmus.local", "--force", "--key-type", "ed25519")
    assert r.exit_code == 0


def test_init_rejects_uppercase_trust_domain(tmp_path: Path) -> None:
    r = run("trust", "init", "--dir", str(tmp_path / "x"), "--trust-domain", "Isthmus.Local")
    assert r.exit_code == 2 and "lowercase" in r.output  # bad input
    assert not (tmp_path / "x" / "root.key").exists()


def test_bad_validity(tmp_path: Path) -> None:
    r = run("trust", "init", "--dir", str(tmp_path / "x"), "--trust-domain", "a.b", "--validity", "ten years")
    assert r.exit_code == 2 and "e.g. 30m, 24h, 90d, 10y" in r.output


def test_issue_foreign_id_refused(fed: Path, tmp_path: Path) -> None:
    run("trust", "issue-cluster", "east", "--dir", str(fed))
    r = run("trust", "issue", "--ca-dir", str(fed / "clusters/east"), "--spiffe-id",
            "spiffe://west.isthmus.local/ns/a/sa/b", "--out-dir", str(tmp_path / "o"))
    assert r.exit_code == 1 and "outside this CA's trust domain" in r.output
    assert not (tmp_path / "o").exists()


def test_issue_non_spiffe_id_refused(fed: Path, tmp_path: Path) -> None:
    run("trust", "issue-cluster", "east", "--dir", str(fed))
    r = run("trust", "issue", "--ca-dir", str(fed / "clusters/east"), "--spiffe-id", "https://east/x",
            "--out-dir", str(tmp_path / "o"))
    assert r.exit_code == 2 and "must start with 'spiffe://'" in r.output


def test_admin_and_revoke(fed: Path, tmp_path: Path) -> None:
    r = run("trust", "issue-admin", "alice", "--dir", str(fed), "--out-dir", str(tmp_path / "alice"))
    assert r.exit_code == 0 and "spiffe://isthmus.local/admin/alice" in r.output
    run("trust", "issue-cluster", "east", "--dir", str(fed))
    r = run("trust", "revoke-cluster", "east", "--dir", str(fed))
    assert r.exit_code == 0 and "1 CA certificate" in r.output
    r = run("trust", "revoke-cluster", "ghost", "--dir", str(fed))
    assert r.exit_code == 1 and "unknown cluster 'ghost'" in r.output


def test_passphrase_and_import(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("hunter2\n")
    d = tmp_path / "enc"
    assert run("trust", "init", "--dir", str(d), "--trust-domain", "isthmus.local", "--passphrase-file", str(pw)).exit_code == 0
    assert b"ENCRYPTED" in (d / "root.key").read_bytes()
    r = run("trust", "issue-cluster", "east", "--dir", str(d))
    assert r.exit_code == 2 and "--passphrase-file" in r.output
    assert run("trust", "issue-cluster", "east", "--dir", str(d), "--passphrase-file", str(pw)).exit_code == 0
    r = run("trust", "init", "--dir", str(tmp_path / "imp"), "--from-cert", str(d / "root.crt"),
            "--from-key", str(d / "root.key"), "--from-key-passphrase-file", str(pw))
    assert r.exit_code == 0 and "imported" in r.output and "isthmus.local" in r.output


def test_rotation_verbs_and_spiffe_export(fed: Path) -> None:
    assert run("trust", "rotate-root", "--dir", str(fed)).exit_code == 0
    r = run("trust", "bundle", "show", "--dir", str(fed), "-o", "json")
    assert len(json.loads(r.output)) == 2
    r = run("trust", "bundle", "export", "--dir", str(fed), "--format", "spiffe")
    assert [k["use"] for k in json.loads(r.output)["keys"]] == ["x509-svid"] * 2
    assert run("trust", "bundle", "prune", "--dir", str(fed)).exit_code == 0
    assert len(json.loads(run("trust", "bundle", "show", "--dir", str(fed), "-o", "json").output)) == 1


def test_show_garbage_file(tmp_path: Path) -> None:
    f = tmp_path / "x.pem"
    f.write_text("garbage")
    r = run("trust", "show", str(f))
    assert r.exit_code == 2 and str(f) in r.output and "no PEM certificate" in r.output


def test_console_script_runs(tmp_path: Path) -> None:
    """The installed `isthmus` entry point (the console script pip wrote into this
    environment's scripts folder), as a real process."""
    import sysconfig

    exe = Path(sysconfig.get_path("scripts")) / "isthmus"
    assert exe.is_file(), f"{exe}: the isthmus console script is not installed (pip install -e .)"
    p = subprocess.run([str(exe), "trust", "init", "--dir", str(tmp_path / "r"),
                        "--trust-domain", "isthmus.local"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([str(exe), "trust", "issue-cluster", "Bad_Name", "--dir", str(tmp_path / "r")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "lowercase RFC 1123 label" in p.stderr

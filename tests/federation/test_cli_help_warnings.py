"""Help texts say what a newcomer needs, and the CLI warns when a command succeeds with a
result that will not work as hoped (real ``isthmus`` processes, a real federation)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

import trust
from tests.clirun import expect, isthmus, isthmus_env

from .fixtures import Pki

DATE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ"


def test_export_help_names_the_agent_credentials_not_an_admins() -> None:
    out = expect(isthmus("export", "--help"), 0, "DIR/agent", "--dry-run")
    assert "an admin's" not in out


@pytest.mark.parametrize("argv", [("federation", "join", "--help"), ("join-cluster", "--help"),
                                  ("agent", "run", "--help")])
def test_federation_option_help_mentions_its_environment_variable(argv: tuple[str, ...]) -> None:
    out = expect(isthmus(*argv), 0)
    federation_help = out[out.index("--federation"):]
    assert "ISTHMUS_FEDERATION" in federation_help.split("\n  -")[0]


def test_token_create_prints_a_join_command_with_the_gateway_address(fed, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    conn = ("--federation", fed.address, "--cert-dir", str(pki.admin_dir))
    out = expect(isthmus("federation", "token", "create", "--cluster", "east", *conn), 0)
    [command] = [line for line in out.splitlines() if "isthmus federation join east" in line]
    assert "--gateway-address HOST:PORT" in command


def test_token_create_env_output_feeds_join(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    script = (f"eval \"$({_argv()} federation token create --cluster east -o env)\" && "
              f"{_argv()} federation join east --out-dir {tmp_path / 'east'} --join-address {fed.join_address} "
              "--gateway-address 127.0.0.1:15443")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                       env=isthmus_env({"ISTHMUS_FEDERATION": fed.address, "ISTHMUS_CERT_DIR": str(pki.admin_dir)}))
    expect(r, 0, "joined east")


def _argv() -> str:
    import shlex
    import sys

    return f"{shlex.quote(sys.executable)} -m federation.cli"


def test_join_without_a_gateway_address_warns(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with fed.client(pki.admin_dir) as admin:
        tok = admin.create_token(600, "east")
    r = isthmus("federation", "join", "east", "--federation", fed.address, "--join-address", fed.join_address,
                "--token", tok.token, "--ca-pin", tok.ca_pin, "--out-dir", str(tmp_path / "east"))
    expect(r, 0, "joined east", "warning: east joined without --gateway-address",
           f"--cert-dir {tmp_path / 'east'}/agent --gateway-address HOST:PORT")


def test_join_warns_when_the_ca_validity_is_capped_by_the_root(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with fed.client(pki.admin_dir) as admin:
        tok = admin.create_token(600, "east")
    r = isthmus("federation", "join", "east", "--federation", fed.address, "--join-address", fed.join_address,
                "--token", tok.token, "--ca-pin", tok.ca_pin, "--out-dir", str(tmp_path / "east"),
                "--gateway-address", "127.0.0.1:15443", "--validity", "20y")
    out = expect(r, 0, "joined east", "warning: the requested CA validity 20y would end")
    assert len(re.findall(DATE, out)) == 2, out


def test_issuing_from_a_revoked_cluster_ca_warns(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    expect(isthmus("trust", "init", "--dir", str(fed), "--trust-domain", "isthmus.local"), 0)
    expect(isthmus("trust", "issue-cluster", "east", "--dir", str(fed)), 0)
    issue = ("trust", "issue", "--ca-dir", str(fed / "clusters" / "east"),
             "--spiffe-id", "spiffe://east.isthmus.local/ns/default/sa/web", "--out-dir", str(tmp_path / "web"))
    assert "warning" not in expect(isthmus(*issue), 0)
    expect(isthmus("trust", "revoke-cluster", "east", "--dir", str(fed)), 0)
    expect(isthmus(*issue), 0, f"warning: the CA in {fed / 'clusters' / 'east'}", f"is revoked by {fed / 'crl.pem'}")


def test_issuing_from_a_joined_clusters_revoked_ca_warns_too(tmp_path: Path) -> None:
    """A joined cluster's folder keeps its CA in DIR/ca and the CRL in DIR/crl.pem."""
    td = trust.TrustDir(tmp_path / "fed")
    td.init("isthmus.local")
    ca = td.issue_cluster("east")
    (tmp_path / "east").mkdir()
    (tmp_path / "east" / "ca").symlink_to(ca.path)
    td.revoke_cluster("east")
    (tmp_path / "east" / "crl.pem").write_bytes(td.crl_pem())
    (td.path / "crl.pem").unlink()
    expect(isthmus("trust", "issue", "--ca-dir", str(tmp_path / "east" / "ca"), "--spiffe-id",
                   "spiffe://east.isthmus.local/ns/default/sa/web", "--out-dir", str(tmp_path / "web")), 0,
           f"is revoked by {tmp_path / 'east' / 'crl.pem'}")


@pytest.mark.parametrize("argv", [
    ("trust", "issue-cluster", "east", "--dir", "fed", "--validity", "60d"),
    ("trust", "issue-admin", "ops", "--dir", "fed", "--out-dir", "ops", "--validity", "60d"),
])
def test_validity_capped_by_the_root_names_both_dates(tmp_path: Path, argv: tuple[str, ...]) -> None:
    expect(isthmus("trust", "init", "--dir", "fed", "--trust-domain", "isthmus.local", "--validity", "30d",
                   cwd=tmp_path), 0)
    out = expect(isthmus(*argv, cwd=tmp_path), 0, "warning: the requested validity would end", "when its issuer")
    assert len(re.findall(DATE, out.split("warning:")[1])) == 2, out


def test_leaf_validity_capped_by_the_cluster_ca_warns(tmp_path: Path) -> None:
    expect(isthmus("trust", "init", "--dir", "fed", "--trust-domain", "isthmus.local", cwd=tmp_path), 0)
    expect(isthmus("trust", "issue-cluster", "east", "--dir", "fed", "--validity", "2d", cwd=tmp_path), 0)
    out = expect(isthmus("trust", "issue", "--ca-dir", "fed/clusters/east", "--spiffe-id",
                         "spiffe://east.isthmus.local/ns/default/sa/web", "--out-dir", "web", "--validity", "7d",
                         cwd=tmp_path), 0, "warning: the requested validity would end")
    assert "east" in out.split("warning:")[1]  # names the issuer
    out = expect(isthmus("trust", "issue", "--ca-dir", "fed/clusters/east", "--spiffe-id",
                         "spiffe://east.isthmus.local/ns/default/sa/web", "--out-dir", "web", "--validity", "1d",
                         cwd=tmp_path), 0)
    assert "warning" not in out

"""``isthmus policy check``, invoked through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from federation.cli._policy_check import check, parse_service

from ._helpers import ISSUER, spiffe

POLICIES = f"""
kind: AuthorizationPolicy
name: cart-from-east
selector: {{namespace: shop, service: cart}}
rules:
- from: [{{clusters: [east]}}]
  to: [{{methods: [GET], paths: ["/api/*"]}}]
- from: [{{request_principals: ["{ISSUER}/*"]}}]
  when: [{{claim: groups, values: [admins]}}]
---
kind: AuthorizationPolicy
name: no-admin
action: DENY
selector: {{namespace: shop}}
rules: [{{to: [{{paths: ["/admin*"]}}]}}]
"""

EAST = spiffe("east", "web", "frontend")
WEST = spiffe("west", "web", "frontend")


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    f = tmp_path / "policies.yaml"
    f.write_text(POLICIES)
    return f


NO_FEDERATION_ENV: dict[str, str | None] = {"ISTHMUS_FEDERATION": None, "ISTHMUS_CERT_DIR": None}


def run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(check, list(args), env=NO_FEDERATION_ENV, catch_exceptions=False)


def test_allowed_exits_0_and_names_policy(policy_file: Path) -> None:
    r = run("--from", EAST, "--to", "shop/cart", "--method", "GET", "--path", "/api/items",
            "-f", str(policy_file))
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"ALLOWED: {EAST} -> shop/cart GET /api/items")
    assert "cart-from-east" in r.output and "2 policies from" in r.output


def test_denied_exits_1_naming_the_deny_policy(policy_file: Path) -> None:
    r = run("--from", EAST, "--to", "cart.shop", "--method", "GET", "--path", "/admin/x",
            "-f", str(policy_file))
    assert r.exit_code == 1
    assert r.output.startswith("DENIED") and "no-admin (DENY)" in r.output


def test_default_deny_explains(policy_file: Path) -> None:
    r = run("--from", WEST, "--to", "cart.shop.svc.cluster.local", "--method", "GET",
            "--path", "/api/x", "-f", str(policy_file), "--port", "8080")
    assert r.exit_code == 1
    assert "no ALLOW policy matched (ALLOW policies selecting shop/cart: cart-from-east)" in r.output


def test_jwt_claims_give_request_principal(policy_file: Path) -> None:
    claims = json.dumps({"iss": ISSUER, "sub": "alice", "groups": ["admins"]})
    r = run("--from", WEST, "--to", "shop/cart", "--method", "POST", "--path", "/x",
            "--jwt-claims", claims, "-f", str(policy_file), "-o", "json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["allowed"] is True and out["policy"] == "cart-from-east"
    assert out["request"]["request_principal"] == f"{ISSUER}/alice"
    assert out["request"]["source_cluster"] == "west"


def test_json_output_when_denied(policy_file: Path) -> None:
    r = run("--from", WEST, "--to", "shop/cart", "--method", "GET", "--path", "/admin",
            "-f", str(policy_file), "-o", "json")
    assert r.exit_code == 1
    out = json.loads(r.output)
    assert (out["decision"], out["policy"], out["action"]) == ("DENIED", "no-admin", "DENY")


def test_bad_yaml_exits_2_with_field_path(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(POLICIES + "---\nkind: AuthorizationPolicy\nname: x\n"
                 "rules: [{from: [{principals: [42]}]}]\n")
    r = run("--from", EAST, "--to", "shop/cart", "-f", str(f))
    assert r.exit_code == 2
    assert f"{f} document 2: rules[0].from[0].principals[0]: Input should be a valid string" in r.output


@pytest.mark.parametrize("args,needle", [
    (["--from", "east/web", "--to", "shop/cart"], "must start with 'spiffe://'"),
    (["--from", EAST, "--to", "shop"], "NAMESPACE/NAME or NAME.NAMESPACE"),
    (["--from", EAST, "--to", "Shop/cart"], "lowercase RFC 1123"),
    (["--from", EAST, "--to", "shop/cart", "--port", "0"], "0 is not in the range"),
    (["--from", EAST, "--to", "shop/cart", "--jwt-claims", "{nope"], "not JSON"),
    (["--from", EAST, "--to", "shop/cart", "--jwt-claims", "[1]"], "must be a JSON object"),
    (["--from", EAST, "--to", "shop/cart", "--path", "api"], "must start with '/'"),
])
def test_bad_arguments_exit_2(policy_file: Path, args: list[str], needle: str) -> None:
    r = run(*args, "-f", str(policy_file))
    assert r.exit_code == 2 and needle in r.output, r.output


def test_without_files_or_federation_exits_2() -> None:
    r = run("--from", EAST, "--to", "shop/cart")
    assert r.exit_code == 2
    assert "no federation address" in r.output and "-f POLICIES.yaml" in r.output


def test_tcp_check_without_method_and_path(tmp_path: Path) -> None:
    f = tmp_path / "db.yaml"
    f.write_text("kind: AuthorizationPolicy\nname: pg\nselector: {namespace: db}\n"
                 "rules: [{from: [{clusters: [east]}], to: [{ports: [5432]}]}]\n")
    assert run("--from", EAST, "--to", "db/pg", "--port", "5432", "-f", str(f)).exit_code == 0
    r = run("--from", WEST, "--to", "db/pg", "--port", "5432", "-f", str(f))
    assert r.exit_code == 1 and "TCP port 5432" in r.output


def test_reads_policies_from_stdin() -> None:
    r = CliRunner().invoke(check, ["--from", EAST, "--to", "shop/cart", "--method", "GET",
                                   "--path", "/api/x", "-f", "-"], input=POLICIES)
    assert r.exit_code == 0, r.output


def test_parse_service_forms() -> None:
    assert parse_service("shop/cart") == parse_service("cart.shop") == ("shop", "cart")
    assert parse_service("cart.shop.svc") == ("shop", "cart")


def test_attached_to_the_policy_group() -> None:
    from federation.cli._policy import policy

    assert policy.commands.get("check") is check


def test_checks_against_the_running_federation(tmp_path: Path) -> None:
    """Without -f: real etcd, the real federation process, policies applied by an admin."""
    from federation.policy import load_policies
    from tests.federation.fixtures import make_pki, start_etcd, start_federation

    etcd = start_etcd(tmp_path)
    try:
        pki = make_pki(tmp_path)
        fed = start_federation(pki, etcd.endpoint, tmp_path)
        try:
            with fed.client(pki.admin_dir) as admin:
                for p in load_policies(POLICIES):
                    admin.apply_policy(p)
            common = ["--to", "shop/cart", "--method", "GET", "--federation", fed.address,
                      "--cert-dir", str(pki.admin_dir)]
            r = run("--from", EAST, "--path", "/api/x", *common)
            assert r.exit_code == 0, r.output
            assert f"2 policies from the federation at {fed.address}" in r.output
            r = run("--from", EAST, "--path", "/admin", *common)
            assert r.exit_code == 1 and "no-admin (DENY)" in r.output
            r = run("--from", EAST, "--path", "/", *common[:-2], "--cert-dir", str(tmp_path / "none"))
            assert r.exit_code == 2 and "cannot list the federation's policies" in r.output
        finally:
            fed.stop()
    finally:
        etcd.stop()


CUSTOM = POLICIES + """---
kind: AuthorizationPolicy
name: cart-opa
action: CUSTOM
provider: opa
selector: {namespace: shop, service: cart}
rules: [{to: [{paths: ["/api/*", "/admin*"]}]}]
"""


def test_a_decision_that_depends_on_a_custom_provider_says_so(tmp_path: Path) -> None:
    f = tmp_path / "custom.yaml"
    f.write_text(CUSTOM)
    r = run("--from", EAST, "--to", "shop/cart", "--method", "GET", "--path", "/api/items", "-f", str(f))
    assert r.exit_code == 3, r.output
    assert r.output.startswith("DEPENDS: ")
    assert "'opa' (policy cart-opa)" in r.output and "cannot be known offline" in r.output
    r = run("--from", EAST, "--to", "shop/cart", "--method", "GET", "--path", "/admin/x", "-f", str(f), "-o", "json")
    out = json.loads(r.output)
    assert r.exit_code == 1 and out["decision"] == "DENIED"  # a local DENY stands whatever opa says
    assert out["custom"] == [{"policy": "cart-opa", "provider": "opa"}] and out["depends_on_custom"] is False
    r = run("--from", EAST, "--to", "shop/cart", "--method", "GET", "--path", "/other", "-f", str(f), "-o", "json")
    assert json.loads(r.output)["custom"] == []  # outside the CUSTOM rules: opa is not asked

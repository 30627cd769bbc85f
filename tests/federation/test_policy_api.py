"""Policies over the API: admin-only writes, validation errors that name the field path."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from federation import models
from federation._errors import RemoteError

from .fixtures import Pki, join_cluster

ALLOW_FRONTEND = {
    "kind": "AuthorizationPolicy",
    "name": "allow-frontend",
    "selector": {"namespace": "shop", "service": "cart"},
    "action": "ALLOW",
    "rules": [{"from": [{"principals": ["spiffe://east.isthmus.local/ns/shop/sa/frontend"]}], "to": [{"methods": ["GET"]}]}],
}


def test_apply_list_delete(admin) -> None:  # type: ignore[no-untyped-def]
    rev, changed = admin.apply_policy(ALLOW_FRONTEND)
    assert changed and rev > 0
    assert admin.apply_policy(ALLOW_FRONTEND) == (rev, False)  # idempotent
    jwt = models.RequestAuthentication(name="jwt", jwt_rules=(models.JwtRule(issuer="https://idp", jwks_uri="https://idp/jwks"),))
    admin.apply_policy(jwt)
    got = {p.name: p for p in admin.list_policies()}
    assert set(got) == {"allow-frontend", "jwt"}
    assert got["allow-frontend"].rules[0].from_[0].principals == ("spiffe://east.isthmus.local/ns/shop/sa/frontend",)
    assert admin.delete_policy("allow-frontend") == 1
    with pytest.raises(RemoteError) as err:
        admin.delete_policy("allow-frontend")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert [p.name for p in admin.list_policies()] == ["jwt"]


@pytest.mark.parametrize(
    ("patch", "path"),
    [
        ({"action": "MAYBE"}, "action"),
        ({"rules": [{"to": [{"ports": ["http"]}]}]}, "rules[0].to[0].ports[0]"),
        ({"rules": [{"from": [{"principalz": ["x"]}]}]}, "rules[0].from[0].principalz"),
        ({"name": "Not_A_Label"}, "name"),
    ],
)
def test_invalid_policy_is_rejected_with_the_field_path(admin, patch, path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RemoteError) as err:
        admin.apply_policy({**ALLOW_FRONTEND, **patch})
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details.startswith("invalid AuthorizationPolicy: ")
    assert f"{path}: " in err.value.details
    assert admin.list_policies() == []


def test_only_admins_write_policies(fed, admin, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    east = join_cluster(fed, pki, "east", tmp_path)
    admin.apply_policy(ALLOW_FRONTEND)
    with fed.client(east.gateway_dir) as gw:
        assert [p.name for p in gw.list_policies()] == ["allow-frontend"]  # reading is fine
        for attempt in (lambda: gw.apply_policy({**ALLOW_FRONTEND, "name": "mine"}), lambda: gw.delete_policy("allow-frontend")):
            with pytest.raises(RemoteError) as err:
                attempt()
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert [p.name for p in admin.list_policies()] == ["allow-frontend"]


@pytest.mark.parametrize(
    ("patch", "path"),
    [
        ({"rules": [{"from": [{"principals": ["spiffe://*/ns/*"]}]}]}, "rules[0].from[0].principals[0]"),
        ({"rules": [{"to": [{"ports": [70000]}]}]}, "rules[0].to[0].ports[0]"),
        ({"rules": [{"to": [{"paths": ["/a*b*"]}]}]}, "rules[0].to[0].paths[0]"),
        ({"selector": {"namespace": "sh*p"}}, "selector.namespace"),
    ],
)
def test_api_refuses_what_gateways_could_not_enforce(admin, patch, path) -> None:  # type: ignore[no-untyped-def]
    """ApplyPolicy runs federation.policy.validate_policy: a bad policy never reaches etcd."""
    with pytest.raises(RemoteError) as err:
        admin.apply_policy({**ALLOW_FRONTEND, **patch})
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details.startswith(f"invalid AuthorizationPolicy: {path}: "), err.value.details
    assert admin.list_policies() == []


def test_api_refuses_a_bad_inline_jwks(admin) -> None:  # type: ignore[no-untyped-def]
    bad = {"kind": "RequestAuthentication", "name": "jwt", "jwt_rules": [{"issuer": "https://idp", "jwks": '{"keys": 3}'}]}
    with pytest.raises(RemoteError) as err:
        admin.apply_policy(bad)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details.startswith("invalid RequestAuthentication: jwt_rules[0].jwks: "), err.value.details


def test_status_shows_which_gateways_enforce_the_latest_policy(fed, admin, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    east = join_cluster(fed, pki, "east", tmp_path)
    west = join_cluster(fed, pki, "west", tmp_path)
    rev, _ = admin.apply_policy(ALLOW_FRONTEND)
    gw_east, gw_west = "east/gw-east", "west/gw-west"
    with fed.client(east.gateway_dir) as e, fed.client(west.gateway_dir) as w:
        e.report_applied(gw_east, rev)
        w.report_applied(gw_west, rev - 1)
        st = admin.status()
        assert st.policy_revision == rev
        by = {g.gateway_id: g for g in st.gateways}
        assert by[gw_east].enforces_policy and not by[gw_west].enforces_policy
        # An export is a config change but not a policy change: east still enforces.
        e.publish("east", [models.ExportedService(cluster="east", namespace="shop", name="cart",
                                                  ports=(models.ServicePort(port=80),))])
        st = admin.status()
        assert st.policy_revision == rev and st.config_revision > rev
        by = {g.gateway_id: g for g in st.gateways}
        assert by[gw_east].enforces_policy and not by[gw_east].synced
        # Deleting a policy is a policy change too.
        admin.delete_policy("allow-frontend")
        st = admin.status()
        assert st.policy_revision > rev
        assert not any(g.enforces_policy for g in st.gateways)
        w.report_applied(gw_west, st.policy_revision)
    from click.testing import CliRunner

    from federation.cli import cli

    env = {"ISTHMUS_FEDERATION": fed.address, "ISTHMUS_CERT_DIR": str(pki.admin_dir)}
    out = CliRunner().invoke(cli, ["status", "-o", "json"], env=env).output
    import json

    body = json.loads(out)
    assert body["policy_revision"] == st.policy_revision
    assert {g["gateway_id"]: g["enforces_policy"] for g in body["gateways"]} == {gw_east: False, gw_west: True}
    table = CliRunner().invoke(cli, ["status"], env=env).output
    assert f"newest policy change: revision {st.policy_revision}" in " ".join(table.split())


def test_policy_file_errors_name_file_document_and_field(tmp_path: Path) -> None:
    """`isthmus policy apply -f` validates with federation.policy.load_policies (offline)."""
    from click.testing import CliRunner

    from federation.cli import cli

    f = tmp_path / "p.yaml"
    f.write_text(
        "kind: AuthorizationPolicy\nname: ok\n---\n"
        "kind: AuthorizationPolicy\nname: bad\nrules:\n  - from: [{principals: [42]}]\n"
    )
    r = CliRunner().invoke(cli, ["policy", "apply", "--dry-run", "-f", str(f)])
    assert r.exit_code == 2  # bad input
    assert f"invalid policy file: {f} document 1: rules[0].from[0].principals[0]: " in r.output
    f.write_text("kind: AuthorizationPolicy\nname: bad\nrules:\n  - from: [{principals: ['a*b*']}]\n")
    r = CliRunner().invoke(cli, ["policy", "apply", "--dry-run", "-f", str(f)])
    assert r.exit_code == 2 and f"{f} document 0: rules[0].from[0].principals[0]: 'a*b*' is not supported" in r.output
    f.write_text("kind: AuthorizationPolicy\nname: fine\nrules: [{}]\n")
    r = CliRunner().invoke(cli, ["policy", "apply", "--dry-run", "-f", "-"], input=f.read_text())
    assert r.exit_code == 0 and "AuthorizationPolicy/fine valid (dry run)" in r.output

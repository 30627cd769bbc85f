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
        ({"rules": [{"to": [{"ports": ["http"]}]}]}, "rules.0.to.0.ports.0"),
        ({"rules": [{"from": [{"principalz": ["x"]}]}]}, "rules.0.from.0.principalz"),
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

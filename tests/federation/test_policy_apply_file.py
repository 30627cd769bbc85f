"""``isthmus policy apply -f`` of a multi-document file is one etcd transaction: every
policy is written at the same revision, or (one refused) none is.  Real federation."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from federation._errors import RemoteError
from tests.clirun import expect, isthmus

from .fixtures import Pki


def _allow(name: str, **extra: object) -> dict[str, object]:
    return {"kind": "AuthorizationPolicy", "name": name, "selector": {"namespace": "shop", "service": name},
            "action": "ALLOW", "rules": [{"from": [{"clusters": ["east"]}]}], **extra}


def test_a_batch_is_written_at_one_revision(admin) -> None:  # type: ignore[no-untyped-def]
    rev, changed = admin.apply_policies([_allow("a"), _allow("b"), _allow("c")])
    assert changed == [True, True, True]
    assert admin.apply_policies([_allow("a"), _allow("b"), _allow("c")]) == (rev, [False, False, False])
    rev2, changed = admin.apply_policies([_allow("a"), _allow("b", action="DENY")])
    assert changed == [False, True] and rev2 == rev + 1  # one transaction, one revision


def test_one_refused_policy_leaves_every_other_unwritten(admin) -> None:  # type: ignore[no-untyped-def]
    admin.apply_policies([_allow("a")])
    with pytest.raises(RemoteError) as err:
        admin.apply_policies([_allow("a", action="DENY"), _allow("b"), _allow("c", action="MAYBE")])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details.startswith("document 2: invalid AuthorizationPolicy: action")
    [a] = admin.list_policies()
    assert a.name == "a" and a.action == "ALLOW"


def test_too_many_policies_for_one_transaction_are_refused_whole(admin) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RemoteError) as err:
        admin.apply_policies([_allow(f"p{i}") for i in range(101)])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "at most 100" in err.value.details
    assert admin.list_policies() == []


def _doc(name: str, action: str = "ALLOW") -> str:
    return (f"kind: AuthorizationPolicy\nname: {name}\nselector: {{namespace: shop, service: {name}}}\n"
            f"action: {action}\nrules:\n- from: [{{clusters: [east]}}]\n")


def test_cli_applies_a_file_whole_or_not_at_all(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    conn = ("--federation", fed.address, "--cert-dir", str(pki.admin_dir))
    f = tmp_path / "policies.yaml"
    f.write_text(_doc("a") + "---\n" + _doc("b"))
    out = expect(isthmus("policy", "apply", "-f", str(f), *conn), 0, "AuthorizationPolicy/a configured",
                 "AuthorizationPolicy/b configured")
    revisions = {line.rsplit("revision ", 1)[1] for line in out.splitlines() if "revision" in line}
    assert len(revisions) == 1  # both at the same revision
    f.write_text(_doc("a", "DENY") + "---\n" + _doc("c") + "---\n" + _doc("d", "MAYBE"))
    expect(isthmus("policy", "apply", "-f", str(f), *conn), 2, "document 2", "action")
    with fed.client(pki.admin_dir) as admin:
        got = {p.name: p.action for p in admin.list_policies()}
    assert got == {"a": "ALLOW", "b": "ALLOW"}  # neither a's change nor c went in

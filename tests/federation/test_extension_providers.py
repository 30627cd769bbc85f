"""ExtensionProvider documents and CUSTOM policies (issue 18): validated with field paths,
checked across the batch (a CUSTOM policy's provider must exist), stored under traffic/,
streamed in snapshots and deltas.  The federation test is real etcd, the real federation
process and real gRPC over mTLS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from federation import models
from federation.client import SnapshotTracker, WatchMessage, read_snapshot
from federation.documents import BatchRefused, DocumentFileError, check_batch, load_documents

from tests.clirun import expect, isthmus

from .fixtures import Pki, join_cluster, start_federation
from .test_routes_store import etcd_get, refused
from .test_watch import Watcher


def provider(name: str = "opa", **grpc_extra: Any) -> dict[str, Any]:
    return {"kind": "ExtensionProvider", "name": name,
            "ext_authz_grpc": {"address": "opa.authz.svc.cluster.local:9191", "timeout": "200ms", **grpc_extra}}


def custom(name: str = "cart-custom", provider: str = "opa", **extra: Any) -> dict[str, Any]:
    return {"kind": "AuthorizationPolicy", "name": name, "selector": {"namespace": "shop", "service": "cart"},
            "action": "CUSTOM", "provider": provider, "rules": [{"to": [{"paths": ["/admin/*"]}]}], **extra}


@pytest.mark.parametrize(("text", "field", "says"), [
    pytest.param("kind: ExtensionProvider\nname: opa\next_authz_grpc: {address: 'a:1'}\n"
                 "ext_authz_http: {address: 'a:1'}\n", "ext_authz_http", "not both", id="grpc-and-http"),
    pytest.param("kind: ExtensionProvider\nname: opa\n", "ext_authz_grpc", "set ext_authz_grpc or ext_authz_http",
                 id="neither"),
    pytest.param("kind: ExtensionProvider\nname: opa\next_authz_grpc: {address: 'a:1', timeout: 0s}\n",
                 "ext_authz_grpc.timeout", "is zero", id="timeout-0"),
    pytest.param("kind: ExtensionProvider\nname: opa\next_authz_http: {address: 'nohost'}\n",
                 "ext_authz_http.address", "must be HOST:PORT", id="bad-address"),
    pytest.param("kind: ExtensionProvider\nname: opa\next_authz_grpc: {addresses: {East: 'a:1'}}\n",
                 "ext_authz_grpc.addresses", "lowercase", id="bad-cluster"),
    pytest.param("kind: ExtensionProvider\nname: opa\next_authz_grpc: {address: 'a:1', include_request_body: "
                 "{max_request_bytes: 0}}\n", "ext_authz_grpc.include_request_body.max_request_bytes",
                 "greater than or equal to 1", id="body-bound-0"),
    pytest.param("kind: ExtensionProvider\nname: opa\next_authz_http: {address: 'a:1', include_request_body: "
                 "{max_request_bytes: 2000000}}\n", "ext_authz_http.include_request_body.max_request_bytes",
                 "less than or equal to 1048576", id="body-bound-too-large"),
    pytest.param("kind: ExtensionProvider\nname: opa\next_authz_grpc: {address: 'a:1', include_request_body: {}}\n",
                 "ext_authz_grpc.include_request_body.max_request_bytes", "required", id="body-bound-missing"),
    pytest.param("kind: AuthorizationPolicy\nname: p\naction: ALLOW\nprovider: opa\nrules: [{}]\n",
                 "provider", "for action CUSTOM only", id="provider-on-allow"),
    pytest.param("kind: AuthorizationPolicy\nname: p\naction: DENY\nprovider: opa\nrules: [{}]\n",
                 "provider", "for action CUSTOM only", id="provider-on-deny"),
    pytest.param("kind: AuthorizationPolicy\nname: p\naction: CUSTOM\nrules: [{}]\n",
                 "provider", "set provider", id="custom-without-provider"),
])
def test_bad_input_is_refused_with_the_field_path(text: str, field: str, says: str) -> None:
    with pytest.raises(DocumentFileError) as err:
        load_documents(text, source="authz.yaml")
    assert err.value.field == field, str(err.value)
    assert str(err.value).startswith(f"invalid file: authz.yaml document 0: {field}: "), str(err.value)
    assert says in str(err.value)


def test_a_custom_policy_needs_a_known_provider() -> None:
    [pol] = load_documents("---\n" + _yaml(custom()))
    with pytest.raises(BatchRefused) as err:
        check_batch([pol], clusters=(), services=(), stored_routes=(), stored_providers=("authorino",))
    assert (err.value.document, err.value.field) == (0, "provider")
    assert "no ExtensionProvider named 'opa' (known: authorino)" in str(err.value)
    [prov, pol] = load_documents(_yaml(provider()) + "---\n" + _yaml(custom()))
    assert check_batch([prov, pol], clusters=(), services=(), stored_routes=()) == []
    assert check_batch([pol], clusters=(), services=(), stored_routes=(), stored_providers=("opa",)) == []


def test_snapshot_and_deltas_carry_providers() -> None:
    prov = models.parse_input(models.ExtensionProvider, provider())
    snap, _ = read_snapshot('{"revision": 3, "extension_providers": [%s, {"name": "bad"}]}'
                            % prov.model_dump_json(by_alias=True), lambda *a: None)
    assert snap.extension_providers == (prov,)  # the bad one skipped
    tracker = SnapshotTracker()
    tracker.apply(WatchMessage(3, snapshot=snap))
    assert tracker.snapshot().extension_providers == (prov,)


def _yaml(doc: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(doc)


def test_providers_are_stored_applied_and_streamed(fed, admin, pki: Pki, tmp_path: Path, etcd) -> None:
    west = join_cluster(fed, pki, "west", tmp_path)
    err = refused(lambda: admin.apply_documents([custom()]))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details.startswith("document 0: provider: no ExtensionProvider named 'opa'"), err.details
    err = refused(lambda: admin.apply_documents([provider(timeout="0s")]))
    assert "ext_authz_grpc.timeout" in err.details, err.details
    w = Watcher(fed.client(west.gateway_dir))
    try:
        assert w.next().snapshot is not None
        rev, outcomes, _ = admin.apply_documents([provider(), custom()])
        assert outcomes == ["created", "created"]
        assert etcd_get(etcd, "/isthmus/traffic/") == ["/isthmus/traffic/ExtensionProvider/opa"]
        snap = w.wait_for(lambda s: s.revision >= rev)
        assert [p.name for p in snap.extension_providers] == ["opa"]
        assert snap.extension_providers[0].ext_authz.timeout == 0.2
        assert [(p.action, p.provider) for p in snap.policies] == [("CUSTOM", "opa")]
        # A later policy may name the stored provider.
        admin.apply_documents([custom("other")])
        assert [d.kind for d in admin.list_documents("ExtensionProvider")] == ["ExtensionProvider"]
    finally:
        w.close()
    fresh = Watcher(fed.client(west.gateway_dir))  # a new watcher's snapshot has them too
    try:
        first = fresh.next().snapshot
        assert first is not None and [p.name for p in first.extension_providers] == ["opa"]
    finally:
        fresh.close()


def test_a_provider_in_use_is_not_deleted_and_provider_changes_move_the_policy_revision(
        fed, admin, pki: Pki, tmp_path: Path, etcd) -> None:
    """`isthmus delete ExtensionProvider` refuses while a CUSTOM policy names it (naming
    the policies); applying, changing and deleting a provider moves policy_revision (what
    `isthmus status` checks each gateway's applied revision against), on this replica and
    on a fresh one."""
    conn = ("--federation", fed.address, "--cert-dir", str(pki.admin_dir))
    rev, _, _ = admin.apply_documents([provider(), custom(), custom("other"),
                                       custom("elsewhere", provider="authz2"), provider("authz2")])
    assert admin.status().policy_revision == rev
    expect(isthmus("delete", "ExtensionProvider", "opa", *conn), 1, "FAILED_PRECONDITION",
           "ExtensionProvider 'opa' is in use: the CUSTOM AuthorizationPolicy 'cart-custom', 'other' names it")
    assert [d.name for d in admin.list_documents("ExtensionProvider")] == ["authz2", "opa"]
    changed, _, _ = admin.apply_documents([provider(timeout="300ms")])  # only the provider changes
    assert changed > rev and admin.status().policy_revision == changed
    admin.delete_document("AuthorizationPolicy", "cart-custom")
    admin.delete_document("AuthorizationPolicy", "other")
    expect(isthmus("delete", "providers", "opa", *conn), 0, "ExtensionProvider/opa deleted")
    deleted = admin.status().policy_revision
    assert deleted > changed
    assert admin.apply_documents([provider("unused")])[0] == admin.status().policy_revision
    # A fresh replica reads the newest provider change from etcd as a policy change.
    admin.delete_document("ExtensionProvider", "unused")
    gone = admin.status().policy_revision
    other = start_federation(pki, etcd.endpoint, tmp_path, name="fed2")
    try:
        with other.client(pki.admin_dir) as second:
            seen = second.status().policy_revision
        # The fresh replica cannot tell when a key was deleted, only that one was after the
        # newest kept change: it then says its list revision (never a false SYNCED). That is
        # the delete's own revision unless something else was written before it listed (the
        # first replica re-winning an election on a loaded machine does).
        [listed] = [json.loads(line)["revision"] for line in (tmp_path / "fed2.log").read_text().splitlines()
                    if '"hub.listed"' in line]
        if listed == gone:
            assert seen == gone
        else:
            assert gone <= seen <= listed, (gone, seen, listed)
    finally:
        other.stop()

"""The contract's two parsers: what a user writes is strict, what etcd and the wire carry is
lenient (unknown fields ignored and logged once; a newer peer must not break an older one)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from structlog.testing import capture_logs

from federation import models
from federation._errors import InvalidInput, InvalidRecord
from federation.client import SnapshotTracker, decode_event
from federation.models import Policy, parse_input, read_record
from federation.proto import federation_pb2 as pb

POLICY = {"kind": "AuthorizationPolicy", "name": "p", "rules": [{"from": [{"principals": ["*"]}]}]}
SERVICE = {"cluster": "east", "namespace": "shop", "name": "web", "ports": [{"port": 80}]}


def _newer(doc: dict, **extra: object) -> dict:
    """``doc`` as a newer Isthmus might write it: unknown fields at several depths."""
    out = json.loads(json.dumps(doc))
    out.update(extra)
    return out


def test_input_refuses_unknown_fields_with_their_path() -> None:
    doc = _newer(POLICY)
    doc["rules"][0]["from"][0]["principalz"] = ["x"]
    with pytest.raises(InvalidInput) as err:
        parse_input(Policy, doc)
    assert err.value.field == "rules[0].from[0].principalz"
    assert str(err.value) == "invalid AuthorizationPolicy: rules[0].from[0].principalz: Extra inputs are not permitted"
    with pytest.raises(InvalidInput) as err:
        parse_input(models.ExportedService, json.dumps(_newer(SERVICE, weight=3)), what="exported service")
    assert str(err.value).startswith("invalid exported service: weight: Extra inputs")


@pytest.mark.parametrize(("data", "message"), [
    ({"name": "p"}, "invalid policy: kind: missing; set kind: AuthorizationPolicy or RequestAuthentication"),
    ({"kind": "Gateway", "name": "p"}, "invalid policy: kind: 'Gateway' is not a policy kind"),
    ({"kind": ["AuthorizationPolicy"]}, "invalid policy: kind: ['AuthorizationPolicy'] is not a policy kind"),
    ("[1, 2]", "invalid policy: expected an object with kind"),
    ("{nope", "invalid policy: not JSON: "),
])
def test_input_policies_are_dispatched_on_kind(data: object, message: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_input(Policy, data)
    assert str(err.value).startswith(message)


def test_input_names_three_problems_and_counts_the_rest() -> None:
    doc = {"kind": "AuthorizationPolicy", "name": "Bad_Name", "action": "MAYBE", "a": 1, "b": 2}
    with pytest.raises(InvalidInput) as err:
        parse_input(Policy, doc)
    assert len(err.value.problems) == 4 and str(err.value).endswith("(and 1 more)")


def test_records_ignore_unknown_fields_at_any_depth_and_log_them_once() -> None:
    doc = _newer(POLICY, priority=5)
    doc["rules"][0]["from"][0]["ip_blocks"] = ["10.0.0.0/8"]
    snapshot = {"revision": 7, "services": [_newer(SERVICE, weight=1), _newer(SERVICE, name="db", weight=2)],
                "policies": [doc], "topology": {}}
    with capture_logs() as logs:
        first = read_record(models.Snapshot, json.dumps(snapshot), what="test snapshot")
        again = read_record(models.Snapshot, json.dumps(snapshot), what="test snapshot")
    assert first == again and first.revision == 7 and [s.name for s in first.services] == ["web", "db"]
    assert first.policies == (parse_input(Policy, POLICY),)
    assert [(e["event"], e["fields"]) for e in logs] == [("record.unknown_fields_ignored", [
        "policies[].priority", "policies[].rules[].from[].ip_blocks", "services[].weight", "topology"])]


@pytest.mark.parametrize("data", [
    "{not json",
    json.dumps({**SERVICE, "ports": [{"port": 0}]}),
    json.dumps({**SERVICE, "namespace": "Not_A_Label", "extra": 1}),  # unknown field and a real error
])
def test_bad_records_raise_invalid_record(data: str) -> None:
    with pytest.raises(InvalidRecord) as err:
        read_record(models.ExportedService, data)
    assert str(err.value).startswith("invalid ExportedService: ")
    assert not isinstance(err.value, InvalidInput)  # a bad record is not the caller's bad input


def test_watch_events_from_a_newer_server_decode() -> None:
    svc = json.dumps(_newer(SERVICE, weight=1))
    snap = pb.WatchEvent(revision=3, is_snapshot=True,
                         snapshot_json=json.dumps({"revision": 3, "services": [json.loads(svc)], "new": True}))
    delta = pb.WatchEvent(revision=4, changes=[
        pb.Change(kind=pb.SERVICE, key="east/shop/db", json=svc.replace('"web"', '"db"')),
        pb.Change(kind=pb.POLICY, key="AuthorizationPolicy/p", json=json.dumps(_newer(POLICY, priority=1))),
    ])
    tracker = SnapshotTracker()
    tracker.apply(decode_event(snap))
    s = tracker.apply(decode_event(delta))
    assert s.revision == 4 and sorted(x.name for x in s.services) == ["db", "web"]
    assert [p.name for p in s.policies] == ["p"]


def test_the_federation_serves_records_a_newer_version_wrote(fed, admin, etcd, pki, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Records with unknown fields put straight into etcd are listed and watched; the API
    still refuses the same unknown fields as input."""
    from federation.server import Etcd

    from .fixtures import join_cluster

    join_cluster(fed, pki, "east", tmp_path)

    async def put() -> None:
        async with Etcd(etcd.endpoint) as e:
            await e.put(b"/isthmus/policies/AuthorizationPolicy/p", json.dumps(_newer(POLICY, priority=1)).encode())
            kv = await e.get(b"/isthmus/clusters/east")
            assert kv is not None
            await e.put(b"/isthmus/clusters/east", json.dumps({**json.loads(kv.value), "region": "eu"}).encode())

    asyncio.run(put())
    assert [p.name for p in admin.list_policies()] == ["p"]
    assert [c.name for c in admin.list_clusters()] == ["east"]
    assert "east" in {lv.cluster for lv in admin.status().liveness}
    deadline = time.monotonic() + 10
    for message in admin.watch():
        snapshot = SnapshotTracker().apply(message)
        if [p.name for p in snapshot.policies] == ["p"] or time.monotonic() > deadline:
            break
    assert [p.name for p in snapshot.policies] == ["p"] and [c.name for c in snapshot.clusters] == ["east"]
    from federation._errors import RemoteError

    with pytest.raises(RemoteError) as err:
        admin.apply_policy(_newer(POLICY, priority=1))
    assert err.value.details == "invalid AuthorizationPolicy: priority: Extra inputs are not permitted"

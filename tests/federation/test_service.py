"""Service-level behaviour: revocation reaches the API, reflection and health, advertised names."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

import trust
from federation._errors import RemoteError

from .fixtures import Pki, join_cluster, start_federation


def test_revoked_cluster_is_refused_and_watchers_get_the_new_crl(pki: Pki, etcd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fed = start_federation(pki, etcd.endpoint, tmp_path, extra=("--trust-sync-interval", "0.2"))
    try:
        east = join_cluster(fed, pki, "east", tmp_path)
        with fed.client(east.gateway_dir) as gw:
            assert gw.list_clusters()
            watch = gw.watch()
            first = next(watch)
            assert first.snapshot is not None
            pki.td.revoke_cluster("east")  # an operator runs `isthmus trust revoke-cluster east`
            crl = next(c for m in watch for c in m.changes if c.kind == "crl")
            assert crl.value == pki.td.crl_pem().decode()
        deadline = time.monotonic() + 5
        with fed.client(east.gateway_dir) as gw:
            while True:
                try:
                    gw.list_clusters()
                except RemoteError as exc:
                    assert exc.code == grpc.StatusCode.UNAUTHENTICATED
                    assert "revoked" in exc.details
                    break
                assert time.monotonic() < deadline, "revoked cluster still accepted"
                time.sleep(0.1)
        # the offline revocation marks the cluster's record too (trust sync)
        with fed.client(pki.admin_dir) as admin:
            while not next(c for c in admin.list_clusters() if c.name == "east").revoked:
                assert time.monotonic() < deadline + 5, "record not marked revoked"
                time.sleep(0.1)
    finally:
        fed.stop()


def test_reflection_and_health_are_on(fed, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    a = pki.admin_dir
    creds = grpc.ssl_channel_credentials(
        (a / "bundle.pem").read_bytes(), (a / "key.pem").read_bytes(), (a / "cert.pem").read_bytes()
    )
    with grpc.secure_channel(fed.address, creds) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        [resp] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert {"isthmus.federation.v1.Federation", "grpc.health.v1.Health"} <= names


def test_advertised_names_are_in_the_server_certificate(pki: Pki, etcd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fed = start_federation(pki, etcd.endpoint, tmp_path, extra=("--advertise", "fed.example.com", "--advertise", "192.0.2.7"))
    try:
        from cryptography import x509

        cert = trust.load_cert(tmp_path / "fed-data" / "server-tls" / "cert.pem")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {"localhost", "fed.example.com"} <= set(san.get_values_for_type(x509.DNSName))
        assert {"127.0.0.1", "192.0.2.7"} <= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        assert trust.spiffe_ids_of(cert) == ["spiffe://isthmus.local/federation"]
    finally:
        fed.stop()


@pytest.mark.timeout(60)
def test_bench_smoke_runs() -> None:
    """tests/bench/federation_scale.py --smoke must keep working (it is not run otherwise)."""
    import json
    import subprocess
    import sys

    from .fixtures import REPO

    r = subprocess.run(
        [sys.executable, str(REPO / "tests" / "bench" / "federation_scale.py"), "--smoke", "--json"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["publish_to_all_watchers_ms"]["samples"] == 10
    assert out["snapshot_bytes"] > 0 and out["server_peak_rss_mib"] > 0
    assert out["etcd_members"] == 3 and len(out["etcd_rss_mib_each"]) == 3
    assert out["etcd_members_answering"] == 3 and out["etcd_db_size_mib"] > 0, out
    assert "broke_at" not in out, out


@pytest.mark.timeout(120)
def test_bench_delta_cost_smoke_runs() -> None:
    """federation_scale.py --deltas: a real Gateway applies watch deltas at two sizes."""
    import json
    import subprocess
    import sys

    from .fixtures import REPO

    r = subprocess.run(
        [sys.executable, str(REPO / "tests" / "bench" / "federation_scale.py"), "--deltas", "--smoke", "--json"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["200"]["apply_ms_median"] > 0 and out["2000"]["apply_ms_median"] > 0
    assert out["ratio_largest/smallest"] > 0


@pytest.mark.timeout(180)
def test_bench_publish_to_enforced_smoke_runs() -> None:
    """federation_scale.py --gateways: real gateway processes enforce a policy change."""
    import json
    import subprocess
    import sys

    from .fixtures import REPO

    r = subprocess.run(
        [sys.executable, str(REPO / "tests" / "bench" / "federation_scale.py"), "--gateways", "2", "--smoke", "--json"],
        capture_output=True, text=True, timeout=170, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["publish_to_enforced_at_every_gateway_ms"]["samples"] == 5
    assert out["gateway_rss_mib_max"] > 0

"""join-cluster, leave-cluster and check against the kmock API emulator and a real federation.

kmock runs no controllers, so where a controller's work is needed the test does it and
says so: a "cloud controller" thread gives the gateway's LoadBalancer Service an address
(or a node port), and "the deployment controller" marks Deployments available.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509

import trust
from federation.agent import manifests as m
from federation.agent._rest import Rest
from federation.cli import cli
from federation.client import FederationClient
from tests.federation.fixtures import FederationProcess, Pki

from .kube_emulator import KubeEmulator

GOLDEN = Path(__file__).parent / "golden"
LB_IP = "203.0.113.10"


@pytest.fixture
def kubeconfig(kube: KubeEmulator, tmp_path: Path) -> Path:
    return kube.kubeconfig(tmp_path / "kubeconfig")


def token(fed_env: tuple[FederationProcess, Pki, Path], cluster: str) -> Any:
    fed, pki, _ = fed_env
    with fed.client(pki.admin_dir) as admin:
        return admin.create_token(600, cluster)


def cloud_controller(kube: KubeEmulator, *, node_port: int | None = None, delay: float = 0.3) -> threading.Thread:
    """Plays the cloud/service controller kmock lacks: gives the gateway Service its address."""
    rest = Rest(kube.api_client())

    def run() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            svc = rest.get("v1", "Service", "isthmus-gateway", m.NAMESPACE)
            if svc is not None:
                time.sleep(delay)  # so join-cluster really has to wait
                path = f"/api/v1/namespaces/{m.NAMESPACE}/services/isthmus-gateway"
                if node_port is None:
                    rest.request("PATCH", path, {"status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}}, "application/merge-patch+json")
                else:
                    ports = [{**svc["spec"]["ports"][0], "nodePort": node_port}]
                    rest.request("PATCH", path, {"spec": {"ports": ports}}, "application/merge-patch+json")
                    rest.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
                                                           "status": {"addresses": [{"type": "Hostname", "address": "node-1"},
                                                                                    {"type": "InternalIP", "address": "172.18.0.3"}]}})
                return
            time.sleep(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def join(kubeconfig: Path, fed_env: tuple[FederationProcess, Pki, Path], name: str, out_dir: Path, *extra: str, with_token: bool = True):  # type: ignore[no-untyped-def]
    fed = fed_env[0]
    args = ["join-cluster", name, "--federation", fed.address, "--join-address", fed.join_address,
            "--out-dir", str(out_dir), "--kubeconfig", str(kubeconfig), "--timeout", "20", *extra]
    if with_token:
        tok = token(fed_env, name)
        args += ["--token", tok.token, "--ca-pin", tok.ca_pin]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def inventory(rest: Rest) -> dict[str, list[str]]:
    """Every object join-cluster may have created, by kind (to spot duplicates)."""
    out = {}
    for api_version, kind, ns in [("v1", "Namespace", ""), ("v1", "Service", m.NAMESPACE), ("v1", "ConfigMap", m.NAMESPACE),
                                  ("v1", "Secret", m.NAMESPACE), ("v1", "ServiceAccount", m.NAMESPACE),
                                  ("apps/v1", "Deployment", m.NAMESPACE), ("policy/v1", "PodDisruptionBudget", m.NAMESPACE),
                                  ("rbac.authorization.k8s.io/v1", "ClusterRole", ""), ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", ""),
                                  ("rbac.authorization.k8s.io/v1", "Role", m.NAMESPACE), ("rbac.authorization.k8s.io/v1", "RoleBinding", m.NAMESPACE),
                                  ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy", ""),
                                  ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding", "")]:
        out[kind] = sorted(o["metadata"]["name"] for o in rest.list(api_version, kind, ns))
    return out


def secret_data(rest: Rest, name: str) -> dict[str, bytes]:
    s = rest.get("v1", "Secret", name, m.NAMESPACE)
    assert s is not None, name
    return {k: base64.b64decode(v) for k, v in s["data"].items()}


def test_join_installs_everything_registers_the_address_and_converges(kube, kubeconfig, fed_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fed, pki, _ = fed_env
    rest = Rest(kube.api_client())
    cloud_controller(kube)
    t0 = time.monotonic()
    r = join(kubeconfig, fed_env, "east", tmp_path / "east")
    elapsed = time.monotonic() - t0
    assert r.exit_code == 0, r.output
    assert f"cluster east joined; gateway registered at {LB_IP}:15443" in r.output
    assert "waiting for the gateway's LoadBalancer address" in r.output  # visible progress

    inv = inventory(rest)
    assert inv["Namespace"] == ["isthmus-system"]
    assert inv["Secret"] == sorted(m.SECRETS)
    assert inv["Deployment"] == ["isthmus-agent", "isthmus-gateway"]
    assert inv["Service"] == ["isthmus-gateway"]
    assert inv["ConfigMap"] == ["isthmus-config"]
    assert inv["ValidatingAdmissionPolicy"] == ["isthmus-agent-writes"]
    cm = rest.get("v1", "ConfigMap", "isthmus-config", m.NAMESPACE)["data"]  # type: ignore[index]
    assert cm["cluster"] == "east" and cm["federation"] == fed.address and cm["gateway-address"] == f"{LB_IP}:15443"

    gw = secret_data(rest, m.SECRET_GATEWAY)
    leaf = x509.load_pem_x509_certificate(gw["cert.pem"])
    assert trust.spiffe_ids_of(leaf) == ["spiffe://east.isthmus.local/ns/isthmus-system/sa/isthmus-gateway"]
    assert b"PRIVATE KEY" in gw["key.pem"]
    assert b"PRIVATE KEY" in secret_data(rest, m.SECRET_CA)["ca.key"]
    assert b"X509 CRL" in secret_data(rest, m.SECRET_TRUST)["crl.pem"]
    assert (tmp_path / "east" / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600

    with fed.client(pki.admin_dir) as admin:
        (record,) = [c for c in admin.list_clusters() if c.name == "east"]
    assert record.gateway_addresses == (f"{LB_IP}:15443",)

    # Again, without a token: converges, changes nothing, duplicates nothing.
    before = inventory(rest)
    again = join(kubeconfig, fed_env, "east", tmp_path / "east", with_token=False)
    assert again.exit_code == 0, again.output
    assert "cluster east already joined" in again.output
    assert inventory(rest) == before
    assert " created" not in again.output and " configured" not in again.output
    assert secret_data(rest, m.SECRET_GATEWAY) == gw

    # From another machine (no join folder): restored from the cluster's Secrets, no token spent.
    third = join(kubeconfig, fed_env, "east", tmp_path / "elsewhere", with_token=False)
    assert third.exit_code == 0, third.output
    assert "restored the join folder" in third.output and "already joined" in third.output
    assert inventory(rest) == before
    print(f"join-cluster took {elapsed:.2f}s (incl. a 0.3s simulated LoadBalancer delay)")


def test_join_with_nodeport_uses_a_node_address(kube, kubeconfig, fed_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cloud_controller(kube, node_port=31443)
    r = join(kubeconfig, fed_env, "north", tmp_path / "north", "--gateway-service-type", "NodePort")
    assert r.exit_code == 0, r.output
    assert "gateway registered at 172.18.0.3:31443" in r.output
    svc = Rest(kube.api_client()).get("v1", "Service", "isthmus-gateway", m.NAMESPACE)
    assert svc["spec"]["type"] == "NodePort" and svc["spec"]["ports"][0]["nodePort"] == 31443  # type: ignore[index]


def test_join_without_a_load_balancer_times_out_with_a_hint(kube, kubeconfig, fed_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fed = fed_env[0]
    r = CliRunner().invoke(cli, ["join-cluster", "south", "--federation", fed.address, "--kubeconfig", str(kubeconfig),
                                 "--out-dir", str(tmp_path / "s"), "--timeout", "0.3", "--token", "t", "--ca-pin", "sha256:" + "0" * 64])
    assert r.exit_code == 1
    assert "got no address in 0s" in r.output and "--gateway-service-type NodePort" in r.output


def test_join_refuses_a_cluster_that_joined_under_another_name(kube, kubeconfig, fed_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    Rest(kube.api_client()).apply(m.cluster_config("west", ["x:1"]) | {"metadata": {**m.cluster_config("west", ["x:1"])["metadata"]}})
    r = CliRunner().invoke(cli, ["join-cluster", "east", "--federation", fed_env[0].address, "--kubeconfig", str(kubeconfig),
                                 "--out-dir", str(tmp_path / "e"), "--gateway-address", "1.2.3.4:15443"])
    assert r.exit_code == 1
    assert "already joined as 'west'" in r.output and "leave-cluster west" in r.output


def test_dry_run_prints_the_golden_manifests_and_touches_nothing() -> None:
    r = CliRunner().invoke(cli, ["join-cluster", "east", "--federation", "fed.example.com:7443", "--dry-run",
                                 "--gateway-address", "203.0.113.10:15443", "--kubeconfig", "/nonexistent"])
    assert r.exit_code == 0, r.output
    golden = GOLDEN / "join-cluster-east.yaml"
    if os.environ.get("ISTHMUS_UPDATE_GOLDEN"):
        golden.write_text(r.output)
    assert r.output == golden.read_text(), "join-cluster --dry-run changed; ISTHMUS_UPDATE_GOLDEN=1 rewrites the golden file"
    assert "PRIVATE KEY" not in r.output and "LS0t" not in r.output  # no key material, not even base64


def mark_available(kube: KubeEmulator) -> None:
    """Plays the deployment controller: reports every Deployment in isthmus-system available."""
    rest = Rest(kube.api_client())
    for d in rest.list("apps/v1", "Deployment", m.NAMESPACE):
        name = d["metadata"]["name"]
        rest.request("PATCH", f"/apis/apps/v1/namespaces/{m.NAMESPACE}/deployments/{name}",
                     {"status": {"availableReplicas": d["spec"]["replicas"]}}, "application/merge-patch+json")


def test_check_post_install_then_leave_cluster(kube, kubeconfig, fed_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fed, pki, _ = fed_env
    runner = CliRunner()
    before = runner.invoke(cli, ["check", "--kubeconfig", str(kubeconfig)])
    assert before.exit_code == 1
    assert "× namespace isthmus-system exists" in before.output and "hint: run `isthmus join-cluster" in before.output

    cloud_controller(kube, delay=0)
    assert join(kubeconfig, fed_env, "central", tmp_path / "central").exit_code == 0
    pending = runner.invoke(cli, ["check", "--kubeconfig", str(kubeconfig), "-o", "json"])
    assert pending.exit_code == 1
    report = json.loads(pending.output)
    results = {c["description"]: c for cat in report["categories"] for c in cat["checks"]}
    assert results["gateway Deployment is available"]["result"] == "error"
    assert "kubectl -n isthmus-system describe deploy/isthmus-gateway" in results["gateway Deployment is available"]["hint"]

    mark_available(kube)
    ok = runner.invoke(cli, ["check", "--kubeconfig", str(kubeconfig)])
    assert ok.exit_code == 0, ok.output
    assert "√ cluster is registered in the federation (203.0.113.10:15443)" in ok.output
    assert ok.output.rstrip().endswith("Status check results are √")

    # An export to withdraw, and a mirror to clean up.
    with FederationClient([fed.address], tmp_path / "central" / "agent") as c:
        from federation.models import ExportedService, ServicePort

        c.publish("central", [ExportedService(cluster="central", namespace="shop", name="web", ports=(ServicePort(port=80),))], ttl=30)
    rest = Rest(kube.api_client())
    rest.request("POST", "/api/v1/namespaces/shop/services", {"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": "api--west", "namespace": "shop", "labels": {"isthmus.io/mirrored-from": "west", "app.kubernetes.io/managed-by": "isthmus-agent"}},
        "spec": {"ports": [{"port": 80}]}})
    rest.request("POST", "/api/v1/namespaces/shop/services", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "users", "namespace": "shop"},
                                                               "spec": {"ports": [{"port": 80}]}})

    no_trust = runner.invoke(cli, ["leave-cluster", "central", "--kubeconfig", str(kubeconfig)])
    assert no_trust.exit_code == 2 and "--trust-dir" in no_trust.output
    left = runner.invoke(cli, ["leave-cluster", "central", "--kubeconfig", str(kubeconfig), "--trust-dir", str(pki.trust_dir),
                               "--out-dir", str(tmp_path / "central")])
    assert left.exit_code == 0, left.output
    assert "withdrew 1 exported services" in left.output and "1 CA certificate(s) revoked" in left.output
    inv = inventory(rest)
    assert all(v == [] for v in inv.values()), inv
    assert rest.get("v1", "Service", "api--west", "shop") is None
    assert rest.get("v1", "Service", "users", "shop") is not None  # a user's Service is never touched
    with fed.client(pki.admin_dir) as admin:
        assert [s for s in admin.list_services("central")] == []
    crl = x509.load_pem_x509_crl(Path(pki.trust_dir, "crl.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "central" / "ca" / "ca.crt").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(ca.serial_number) is not None


def test_check_pre_install(kube, kubeconfig, fed_env) -> None:  # type: ignore[no-untyped-def]
    r = CliRunner().invoke(cli, ["check", "--pre", "--kubeconfig", str(kubeconfig), "--federation", fed_env[0].address, "-o", "json"])
    report = json.loads(r.output)
    results = {c["description"]: c["result"] for cat in report["categories"] for c in cat["checks"]}
    # kmock reports Kubernetes 1.26: the version check fails, and says why.
    assert results["is running Kubernetes 1.30 or newer"] == "error"
    assert results["can reach the Kubernetes API (v1.26.4+k3s1)"] == "success"
    assert results["can reach the federation service"] == "success"
    assert results["namespace isthmus-system is free or Isthmus' (not yet created)"] == "success"
    assert r.exit_code == 1

"""deploy/ renders offline, validates strictly, and matches what join-cluster applies (golden)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from federation.agent import manifests as m

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = ["cluster", "cluster-nodeport", "federation", "federation-external-etcd"]
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (for `kubectl kustomize`) is not installed")


def kustomize(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run([KUBECTL, "kustomize", str(path)], check=True, capture_output=True, text=True, timeout=60).stdout  # type: ignore[list-item]
    return [d for d in yaml.safe_load_all(out) if d]


def by_key(objs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    # Round-trip through JSON so Python ints/strs compare the way YAML renders them.
    return {m.object_key(o): json.loads(json.dumps(o)) for o in objs}


def validate(tmp_path: Path, objs: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    if shutil.which("kubernetes-validate") is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    f = tmp_path / "objs.yaml"
    f.write_text(m.to_yaml(objs))
    return subprocess.run(["kubernetes-validate", "--strict", "--quiet", str(f)], capture_output=True, text=True, timeout=120)


@needs_kubectl
@pytest.mark.parametrize(("overlay", "service_type"), [("cluster", "LoadBalancer"), ("cluster-nodeport", "NodePort")])
def test_join_cluster_rendering_matches_deploy(overlay: str, service_type: str) -> None:
    rendered = by_key(kustomize(DEPLOY / "overlays" / overlay))
    ours = by_key(m.workloads(service_type=service_type))
    assert sorted(rendered) == sorted(ours)
    for key in ours:
        assert rendered[key] == ours[key], f"{key} differs between deploy/overlays/{overlay} and manifests.py"


@needs_kubectl
@pytest.mark.parametrize("overlay", [*OVERLAYS, "../monitoring"])
def test_every_overlay_renders_and_validates_strictly(overlay: str, tmp_path: Path) -> None:
    objs = kustomize(DEPLOY / "overlays" / overlay)
    assert objs
    r = validate(tmp_path, objs)
    assert r.returncode == 0, r.stdout + r.stderr
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet"):
            for c in o["spec"]["template"]["spec"]["containers"]:
                assert c["resources"]["requests"] and c["resources"]["limits"], f"{o['metadata']['name']}: no requests/limits"
                assert "readinessProbe" in c and "livenessProbe" in c
            assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "isthmus"


def test_strict_validation_catches_a_typo(tmp_path: Path) -> None:
    """The validator is not a rubber stamp: an unknown field fails it."""
    bad = m.gateway_objects()[1]
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = bad["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")
    r = validate(tmp_path, [bad])
    assert r.returncode != 0


def test_full_install_validates_and_carries_no_secret_in_dry_run(tmp_path: Path) -> None:
    objs = m.install("east", ["fed.example:7443"], None)
    r = validate(tmp_path, objs)
    assert r.returncode == 0, r.stdout + r.stderr
    for s in (o for o in objs if o["kind"] == "Secret"):
        assert s["data"] == {}
        assert s["metadata"]["annotations"]["isthmus.io/filled-by"] == "join-cluster"


@needs_kubectl
def test_etcd_is_three_members_on_a_pinned_release() -> None:
    (sts,) = [o for o in kustomize(DEPLOY / "overlays" / "federation") if o["kind"] == "StatefulSet"]
    assert sts["spec"]["replicas"] == 3
    image = sts["spec"]["template"]["spec"]["containers"][0]["image"]
    tag = image.rsplit(":", 1)[1]
    major, minor, patch = (int(x) for x in tag.lstrip("v").split("."))
    assert (major, minor) >= (3, 5) and not ((major, minor) == (3, 5) and patch <= 2), image  # not an advisory release


def test_gateway_config_is_valid_for_the_gateway() -> None:
    from gateway._config import parse_config

    cfg = parse_config(yaml.safe_load(m.gateway_config("east", ["fed.example:7443"])))
    assert cfg.cluster == "east" and cfg.federation.address == "fed.example:7443"
    assert cfg.admin.port == 15000 and cfg.inbound.port == 15443 and cfg.outbound.port == 15001


def test_grafana_dashboard_uses_istio_metric_names() -> None:
    dash = json.loads((DEPLOY / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in ("istio_requests_total", "istio_request_duration_milliseconds_bucket", "istio_tcp_sent_bytes_total"):
        assert metric in exprs
    assert {v["name"] for v in dash["templating"]["list"]} >= {"source_cluster", "destination_cluster"}


@needs_kubectl
def test_every_metrics_port_has_a_scrape_job_that_finds_it() -> None:
    """Each scrape job keeps pods by name and port name: the overlays must have such a
    container port, and every port named http-metrics/http-admin must be scraped."""
    jobs = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-scrape.yaml").read_text())["scrape_configs"]
    wanted = set()
    for job in jobs:
        keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
        wanted.add((keep["__meta_kubernetes_pod_label_app_kubernetes_io_name"],
                    keep["__meta_kubernetes_pod_container_port_name"]))
    served = set()
    for overlay in OVERLAYS:
        for o in kustomize(DEPLOY / "overlays" / overlay):
            if o["kind"] in ("Deployment", "StatefulSet"):
                pod = o["spec"]["template"]
                for c in pod["spec"]["containers"]:
                    served |= {(pod["metadata"]["labels"]["app.kubernetes.io/name"], p["name"])
                               for p in c.get("ports", []) if p["name"] in ("http-metrics", "http-admin")}
    assert wanted == served
    assert ("isthmus-federation", "http-metrics") in served  # the federation's --metrics-listen


def test_unknown_service_type_is_refused() -> None:
    with pytest.raises(ValueError, match="use one of LoadBalancer, NodePort"):
        m.gateway_objects(service_type="ClusterIp")

"""kind-clusters/: the scripts pass shellcheck, the three clusters' subnets never overlap,
the demo manifests validate.  (Running them needs Docker and kind, which CI lacks.)"""

from __future__ import annotations

import ipaddress
import itertools
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

KIND = Path(__file__).resolve().parents[2] / "kind-clusters"
SCRIPTS = sorted(KIND.glob("*.sh"))


def test_every_script_passes_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    assert len(SCRIPTS) >= 8
    r = subprocess.run(["shellcheck", "--severity=style", *map(str, SCRIPTS)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.name != "lib.sh"], ids=lambda p: p.name)
def test_scripts_are_executable_strict_and_document_themselves(script: Path) -> None:
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n# ")  # a comment says what it does
    assert "source \"$(dirname \"${BASH_SOURCE[0]}\")/lib.sh\"" in text  # lib.sh: set -euo pipefail
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_lib_is_strict_and_checks_its_tools() -> None:
    lib = (KIND / "lib.sh").read_text()
    assert "set -euo pipefail" in lib and "need()" in lib
    readme = (KIND / "README.md").read_text()
    for tool in ("Docker", "kind", "kubectl", "python3"):
        assert tool in readme


def test_three_clusters_with_distinct_subnets() -> None:
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in KIND.glob("*.yaml")}
    assert set(configs) == {"east", "west", "central"}
    nets = []
    for name, cfg in configs.items():
        assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4"
        assert cfg["name"] == f"isthmus-{name}"
        nets += [ipaddress.ip_network(cfg["networking"]["podSubnet"]), ipaddress.ip_network(cfg["networking"]["serviceSubnet"])]
    for a, b in itertools.combinations(nets, 2):
        assert not a.overlaps(b), f"{a} overlaps {b}"


def test_demo_manifest_validates(tmp_path: Path) -> None:
    text = (KIND / "demo" / "hello.yaml").read_text().replace("CLUSTER_NAME", "west").replace("ISTHMUS_IMAGE", "isthmus:dev")
    if shutil.which("kubernetes-validate") is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    f = tmp_path / "hello.yaml"
    f.write_text(text)
    r = subprocess.run(["kubernetes-validate", "--strict", "--quiet", str(f)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    svc = [d for d in yaml.safe_load_all(text) if d["kind"] == "Service"][0]
    assert svc["metadata"]["annotations"]["isthmus.io/export"] == "true"


def test_dockerfile_runs_as_non_root_and_readme_says_it_cannot_be_built_here() -> None:
    image = KIND.parent / "deploy" / "image"
    dockerfile = (image / "Dockerfile").read_text()
    assert "USER 10001:10001" in dockerfile and 'ENTRYPOINT ["isthmus"]' in dockerfile
    assert "cannot be built on the project's own machines" in (image / "README.md").read_text()

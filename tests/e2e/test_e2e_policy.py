"""One policy, written once at the federation, enforced the same way at every cluster's door."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from federation.demo.harness import LocalFederation

from .conftest import logs_of

pytestmark = [pytest.mark.netns, pytest.mark.slow]

POLICIES = """\
kind: AuthorizationPolicy
name: no-admin-pages
action: DENY
selector: {namespace: default, service: web}
rules:
- to: [{paths: ["/admin*"]}]
---
kind: AuthorizationPolicy
name: greeter-only-from-west
action: ALLOW
selector: {namespace: default, service: greeter}
rules:
- from: [{clusters: [west]}]
"""


def isthmus(lf: LocalFederation, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation.cli", *args, "--federation", lf.fed_address, "--cert-dir", str(lf.admin_dir)],
        capture_output=True, text=True, timeout=60,
    )


def wait_status(lf: LocalFederation, cond, timeout: float = 30.0) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        r = isthmus(lf, "status", "-o", "json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        if cond(doc):
            return doc
        assert time.monotonic() < deadline, doc
        time.sleep(0.3)


def test_policy_applied_once_is_enforced_everywhere_and_so_is_its_deletion(
        federation: LocalFederation, tmp_path: Path) -> None:
    lf = federation
    for src, dst in (("east", "west"), ("west", "east")):
        assert lf.wait_for(lambda: lf.call_grpc(src, dst), 30).ok, logs_of(lf)
        assert lf.wait_for(lambda: lf.call_http(src, dst, path="/admin/users"), 30).ok

    f = tmp_path / "policies.yaml"
    f.write_text(POLICIES)
    r = isthmus(lf, "policy", "apply", "-f", str(f))
    assert r.returncode == 0, r.stdout + r.stderr

    # every gateway reports the same revision, and that it enforces the newest policy
    doc = wait_status(lf, lambda d: len(d["gateways"]) == 2 and all(
        g["enforces_policy"] and g["state"] == "SYNCED" for g in d["gateways"]))
    revisions = {g["applied_revision"] for g in doc["gateways"]}
    assert len(revisions) == 1 and revisions.pop() >= doc["policy_revision"] > 0, doc

    # DENY in both directions
    for src, dst in (("east", "west"), ("west", "east")):
        denied = lf.wait_for(lambda: lf.call_http(src, dst, path="/admin/users"), 20, want_ok=False)
        assert denied.status == 403 and "no-admin-pages" in denied.body, denied
        assert "spiffe://" not in denied.body  # names the policy, leaks nothing else
        assert lf.call_http(src, dst, path="/").ok
    # ALLOW selects greeter: only west may call it, wherever it runs
    denied = lf.wait_for(lambda: lf.call_grpc("east", "west"), 20, want_ok=False)
    assert denied.status == "PERMISSION_DENIED", denied
    allowed = lf.call_grpc("west", "east")
    assert allowed.ok and allowed.body == "hello west from east", allowed

    # the denial is counted with Istio's response flag
    m = lf.metrics("west")
    assert any('response_flags="RBAC"' in line and 'reporter="destination"' in line
               for line in m.splitlines() if line.startswith("istio_requests_total")), m[-2000:]

    # deleting the policies is enforced everywhere too
    for name in ("no-admin-pages", "greeter-only-from-west"):
        r = isthmus(lf, "policy", "delete", name)
        assert r.returncode == 0, r.stdout + r.stderr
    wait_status(lf, lambda d: all(g["enforces_policy"] for g in d["gateways"]))
    for src, dst in (("east", "west"), ("west", "east")):
        assert lf.wait_for(lambda: lf.call_http(src, dst, path="/admin/users"), 20).ok
        assert lf.wait_for(lambda: lf.call_grpc(src, dst), 20).ok


AUTHORIZER = ("import sys, time; sys.path.insert(0, sys.argv[1]);"
              "from tests.gateway.extauthz_servers import start_authorizer;"
              "s, port, _ = start_authorizer(); print(port, flush=True); time.sleep(1e9)")


def test_custom_policy_asks_the_authorizer_of_the_cluster_that_runs_the_service(
        federation: LocalFederation, tmp_path: Path) -> None:
    """An ext_authz gRPC server in west's namespace, named for west only: west's gateway
    asks it; east's web, under the same policy, has no authorizer and fails closed."""
    lf = federation
    repo = Path(__file__).resolve().parents[2]
    west = lf.clusters["west"]
    authz = subprocess.Popen(["ip", "netns", "exec", west.namespace, sys.executable, "-c", AUTHORIZER, str(repo)],
                             stdout=subprocess.PIPE, text=True)
    try:
        port = int(authz.stdout.readline())  # type: ignore[union-attr]
        f = tmp_path / "custom.yaml"
        f.write_text(f"""\
kind: ExtensionProvider
name: opa
ext_authz_grpc: {{addresses: {{west: "127.0.0.1:{port}"}}, timeout: 500ms}}
---
kind: AuthorizationPolicy
name: web-custom
action: CUSTOM
provider: opa
selector: {{namespace: default, service: web}}
rules: [{{to: [{{paths: ["/echo*"]}}]}}]
""")
        r = isthmus(lf, "apply", "-f", str(f))
        assert r.returncode == 0, r.stdout + r.stderr
        denied = lf.wait_for(lambda: lf.call_http("east", "west", path="/echo/deny"), 20, want_ok=False)
        assert denied.status == 418 and "denied by the test authorizer" in denied.body, denied
        assert lf.call_http("east", "west", path="/echo/fine").ok
        assert lf.call_http("east", "west", path="/").ok  # outside the rules: not asked
        closed = lf.wait_for(lambda: lf.call_http("west", "east", path="/echo/fine"), 20, want_ok=False)
        assert closed.status == 403, closed  # east has no address for opa: fail closed
        m = lf.metrics("west")
        assert 'isthmus_ext_authz_total{provider="opa",result="denied"} 1.0' in m, m[-2000:]
        assert 'isthmus_ext_authz_total{provider="opa",result="allowed"} 1.0' in m
        assert 'isthmus_ext_authz_total{provider="opa",result="error"}' in lf.metrics("east")
    finally:
        authz.kill()
        authz.wait()
        for kind, name in (("AuthorizationPolicy", "web-custom"), ("ExtensionProvider", "opa")):
            isthmus(lf, "delete", kind, name)

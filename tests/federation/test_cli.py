"""The CLI verbs against a real federation: token create, join, clusters, services, status, policy, serve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from federation.cli import cli

from .fixtures import REPO, Pki, free_port
from .test_exports import svc


def run(*args: str, env: dict[str, str] | None = None, input: str | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)


def admin_env(fed, pki: Pki) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"ISTHMUS_FEDERATION": fed.address, "ISTHMUS_CERT_DIR": str(pki.admin_dir)}


def test_token_create_join_clusters_services_status(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = admin_env(fed, pki)
    r = run("federation", "token", "create", "--ttl", "10m", "--cluster", "east", "-o", "json", env=env)
    assert r.exit_code == 0, r.output
    tok = json.loads(r.output)
    assert set(tok) >= {"token", "ca_pin"} and tok["ca_pin"] == pki.td.ca_pin()

    text = run("federation", "token", "create", env=env)
    assert text.exit_code == 0 and "ca-pin:  sha256:" in text.output and "isthmus federation join" in text.output

    out = tmp_path / "east"
    r = run(
        "federation", "join", "east", "--federation", fed.address, "--join-address", fed.join_address,
        "--token", tok["token"], "--ca-pin", tok["ca_pin"], "--out-dir", str(out),
        "--gateway-address", "192.0.2.10:15443", "--label", "region=eu-west-1", "--label", "cloud=aws",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "joined east (east.isthmus.local)" in r.output
    assert (out / "gateway" / "cert.pem").exists()

    with fed.client(out / "gateway") as gw:
        gw.publish("east", [svc("east", "web"), svc("east", "api", 9090)])
        gw.report_applied("", gw.status().config_revision)

    r = run("clusters", "-o", "json", env=env)
    assert r.exit_code == 0, r.output
    [c] = json.loads(r.output)
    assert c["name"] == "east" and c["labels"] == {"region": "eu-west-1", "cloud": "aws"} and c["exports"] == 2
    assert "ca_cert_pem" not in c
    r = run("clusters", env=env)
    assert r.exit_code == 0 and "east.isthmus.local" in r.output and "192.0.2.10:15443" in r.output

    r = run("services", "-o", "json", env=env)
    assert sorted(s["name"] for s in json.loads(r.output)) == ["api", "web"]
    r = run("services", "--cluster", "east", env=env)
    assert r.exit_code == 0 and "default/web" in r.output and "9090/HTTP" in r.output

    r = run("status", "-o", "json", env=env)
    st = json.loads(r.output)
    assert [g["state"] for g in st["gateways"]] == ["SYNCED"]
    r = run("status", env=env)
    assert r.exit_code == 0 and "SYNCED" in r.output


def test_policy_apply_list_delete(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = admin_env(fed, pki)
    f = tmp_path / "policies.yaml"
    f.write_text(
        """
kind: AuthorizationPolicy
name: allow-frontend
selector: {namespace: shop, service: cart}
rules:
  - from: [{principals: ["spiffe://east.isthmus.local/ns/shop/sa/frontend"]}]
---
kind: RequestAuthentication
name: jwt
jwt_rules: [{issuer: "https://idp.example", jwks_uri: "https://idp.example/jwks"}]
"""
    )
    r = run("policy", "apply", "-f", str(f), env=env)
    assert r.exit_code == 0, r.output
    assert "AuthorizationPolicy/allow-frontend configured" in r.output
    assert "RequestAuthentication/jwt configured" in r.output
    assert "unchanged" in run("policy", "apply", "-f", str(f), env=env).output

    r = run("policy", "list", "-o", "json", env=env)
    assert sorted(p["name"] for p in json.loads(r.output)) == ["allow-frontend", "jwt"]
    assert "allow-frontend" in run("policy", "list", env=env).output

    r = run("policy", "delete", "jwt", env=env)
    assert r.exit_code == 0 and "deleted 1 policy named jwt" in r.output
    assert [p["name"] for p in json.loads(run("policy", "list", "-o", "json", env=env).output)] == ["allow-frontend"]


def test_policy_apply_rejects_invalid_file_with_field_path(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "bad.yaml"
    f.write_text("kind: AuthorizationPolicy\nname: ok\n---\nkind: AuthorizationPolicy\nname: bad\nrules:\n  - to: [{ports: [http]}]\n")
    r = run("policy", "apply", "-f", str(f), env=admin_env(fed, pki))
    assert r.exit_code == 2  # bad input
    assert f"invalid policy file: {f} document 1: rules[0].to[0].ports[0]: Input should be a valid integer" in r.output
    assert json.loads(run("policy", "list", "-o", "json", env=admin_env(fed, pki)).output) == []  # nothing applied


def test_cli_errors_are_clear(fed, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    r = run("clusters", env={"ISTHMUS_FEDERATION": "", "ISTHMUS_CERT_DIR": ""})
    assert r.exit_code == 2 and "ISTHMUS_FEDERATION" in r.output
    r = run("clusters", "--federation", fed.address, "--cert-dir", "/nonexistent")
    assert r.exit_code == 2 and "/nonexistent is not a folder" in r.output


def test_serve_without_etcd_starts_and_stops_an_embedded_etcd(pki: Pki, tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(REPO), "ISTHMUS_LOG_FORMAT": "json"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "federation.cli", "federation", "serve", "--trust-dir", str(pki.trust_dir),
         "--listen", f"127.0.0.1:{port}", "--data-dir", str(data)],
        stderr=subprocess.PIPE, env=env, cwd=REPO, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if '"federation.serving"' in line:
                break
        else:
            raise AssertionError("".join(lines))
        embedded = [json.loads(x) for x in lines if '"etcd.embedded"' in x]
        assert embedded and "embedded single-member etcd" in embedded[0]["message"]
        etcd_pid = next(json.loads(x)["pid"] for x in lines if '"etcd.embedded.started"' in x)
        assert (data / "etcd-embedded" / "etcd").is_dir()
        r = run("clusters", "-o", "json", "--federation", f"127.0.0.1:{port}", "--cert-dir", str(pki.admin_dir))
        assert r.exit_code == 0 and json.loads(r.output) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert proc.returncode == 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(etcd_pid):
        time.sleep(0.05)
    assert not _alive(etcd_pid), "the embedded etcd must stop with the service"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_embedded_etcd_does_not_outlive_a_killed_service(pki: Pki, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ISTHMUS_LOG_FORMAT": "json"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "federation", "serve", "--trust-dir", str(pki.trust_dir),
         "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "data")],
        stderr=subprocess.PIPE, env=env, cwd=REPO, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    etcd_pid = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not etcd_pid:
        line = proc.stderr.readline()
        if '"etcd.embedded.started"' in line:
            etcd_pid = json.loads(line)["pid"]
    proc.kill()
    proc.wait()
    assert etcd_pid
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(etcd_pid):
        time.sleep(0.05)
    assert not _alive(etcd_pid)

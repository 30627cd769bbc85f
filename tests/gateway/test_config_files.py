"""A gateway.yaml's file names are relative to the file's folder, and ``gateway
check-config`` checks that the files it names exist and load (real ``isthmus`` processes)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import trust
from tests.clirun import expect, isthmus, isthmus_env


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """site/gateway.yaml naming site/gw/{cert,key,bundle}.pem by relative paths."""
    td = trust.TrustDir(tmp_path / "fed")
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2)
    td.init("isthmus.local", now=past)
    td.issue_cluster("east", now=past)
    site = tmp_path / "site"
    trust.ClusterCA(td.cluster_dir("east")).issue(trust.gateway_id("east.isthmus.local"), site / "gw")
    cfg = {
        "inbound": {"host": "127.0.0.1", "port": 0},
        "outbound": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "tls": {"cert_file": "gw/cert.pem", "key_file": "gw/key.pem", "bundle_file": "gw/bundle.pem"},
        "last_known_good": "state/lkg.json",
    }
    (site / "gateway.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "elsewhere").mkdir()
    return site


def _edit(site: Path, **changes: object) -> None:
    cfg = yaml.safe_load((site / "gateway.yaml").read_text())
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            cfg[section][key] = value
        else:
            cfg[section] = value
    (site / "gateway.yaml").write_text(yaml.safe_dump(cfg))


def test_relative_paths_resolve_against_the_config_folder(site: Path) -> None:
    r = isthmus("gateway", "check-config", str(site / "gateway.yaml"), cwd=site.parent / "elsewhere")
    cfg = json.loads(expect(r, 0))
    assert cfg["tls"]["cert_file"] == str(site / "gw" / "cert.pem")
    assert cfg["last_known_good"] == str(site / "state" / "lkg.json")


def test_gateway_run_finds_its_files_from_another_working_directory(site: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "federation.cli", "gateway", "run", "--config",
                          str(site / "gateway.yaml")], cwd=site.parent / "elsewhere", env=isthmus_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        started = False
        while time.monotonic() < deadline and not started:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            started = '"gateway.started"' in line
        assert started, p.stderr.read()  # type: ignore[union-attr]
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    assert p.returncode in (0, -signal.SIGTERM), err  # SIGTERM may beat its signal handler
    assert "Traceback" not in err


@pytest.mark.parametrize("remove", ["cert.pem", "key.pem", "bundle.pem"])
def test_check_config_refuses_missing_tls_files(site: Path, remove: str) -> None:
    (site / "gw" / remove).unlink()
    expect(isthmus("gateway", "check-config", "site/gateway.yaml", cwd=site.parent), 2,
           f"tls: {site / 'gw' / remove}", "not found")


def test_check_config_refuses_a_key_of_another_certificate(site: Path, tmp_path: Path) -> None:
    trust.TrustDir(tmp_path / "fed").issue_admin("x", tmp_path / "x")
    shutil.copy(tmp_path / "x" / "key.pem", site / "gw" / "key.pem")
    expect(isthmus("gateway", "check-config", str(site / "gateway.yaml")), 2,
           f"tls: {site / 'gw' / 'key.pem'}: private key does not match")


def test_check_config_refuses_an_expired_certificate(site: Path, tmp_path: Path) -> None:
    td = trust.TrustDir(tmp_path / "fed")
    trust.ClusterCA(td.cluster_dir("east")).issue(
        trust.gateway_id("east.isthmus.local"), site / "gw", validity=60,
        now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1))
    expect(isthmus("gateway", "check-config", str(site / "gateway.yaml")), 2, "tls: ", "has expired")


def test_check_config_refuses_a_bad_crl_and_a_bad_last_known_good(site: Path) -> None:
    (site / "crl.pem").write_text("not a CRL\n")
    (site / "state").mkdir()
    (site / "state" / "lkg.json").write_text("{oops")
    _edit(site, tls__crl_file="crl.pem")
    expect(isthmus("gateway", "check-config", str(site / "gateway.yaml")), 2,
           f"tls.crl_file: {site / 'crl.pem'}: no PEM CRL", f"last_known_good: {site / 'state' / 'lkg.json'}")


def test_check_config_checks_separate_federation_credentials(site: Path) -> None:
    _edit(site, federation={"address": "127.0.0.1:7443", "cert_file": "fed/cert.pem"})
    expect(isthmus("gateway", "check-config", str(site / "gateway.yaml")), 2,
           f"federation: {site / 'fed' / 'cert.pem'}", "not found")

"""The CLI's one error boundary: one line, exit 2 for bad input and 1 for a runtime
failure, for every command; never a traceback, an ExceptionGroup or a gRPC C-core line."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import yaml

import trust
from tests.clirun import assert_clean, expect, isthmus

from .fixtures import Pki


def _gateway_files(tmp_path: Path) -> Path:
    td = trust.TrustDir(tmp_path / "fed")
    td.init("isthmus.local")
    td.issue_cluster("east")
    ca = trust.ClusterCA(td.cluster_dir("east"))
    ca.issue(trust.gateway_id("east.isthmus.local"), tmp_path / "gw")
    return tmp_path / "gw"


def _gateway_yaml(tmp_path: Path, inbound_port: int) -> Path:
    gw = _gateway_files(tmp_path)
    cfg = {
        "inbound": {"host": "127.0.0.1", "port": inbound_port},
        "outbound": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "tls": {"cert_file": str(gw / "cert.pem"), "key_file": str(gw / "key.pem"),
                "bundle_file": str(gw / "bundle.pem")},
        "last_known_good": str(tmp_path / "lkg.json"),
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_gateway_run_with_its_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = isthmus("gateway", "run", "--config", str(_gateway_yaml(tmp_path, port)), timeout=30)
    out = expect(r, 1, f"cannot listen on 127.0.0.1:{port}: Address already in use")
    assert len([line for line in r.stderr.splitlines() if line.startswith("Error:")]) == 1, out


@pytest.mark.parametrize("argv", [
    ("export", "--cluster", "east", "-f", "exports.yaml"),
    ("federation", "serve", "--trust-dir", "fed"),
    ("agent", "run", "--cluster", "east", "--federation", "127.0.0.1:7443", "--cert-dir", "."),
    ("gateway", "run", "--config", "gateway.yaml"),
])
def test_log_level_is_a_choice_everywhere(argv: tuple[str, ...], tmp_path: Path) -> None:
    r = isthmus(*argv, "--log-level", "bogus", cwd=tmp_path)
    expect(r, 2, "Invalid value for '--log-level'", "'bogus' is not one of")


@pytest.mark.parametrize("argv", [
    ("clusters",),
    ("status",),
    ("policy", "list"),
    ("federation", "token", "create"),
    ("export", "--cluster", "east", "-f", "exports.yaml", "--once"),
    ("federation", "join", "east", "--token", "t", "--ca-pin", "sha256:00", "--out-dir", "x"),
    ("join-cluster", "east", "--dry-run"),
    ("policy", "check", "--from", "spiffe://east.isthmus.local/ns/a/sa/b", "--to", "shop/cart"),
])
@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1", "localhost:http"])
def test_federation_address_is_validated_before_anything_runs(argv: tuple[str, ...], address: str,
                                                               tmp_path: Path) -> None:
    r = isthmus(*argv, "--federation", address, cwd=tmp_path)
    expect(r, 2, "Invalid value for '--federation'", "HOST:PORT")


def test_federation_address_from_the_environment_is_validated_too(tmp_path: Path) -> None:
    r = isthmus("clusters", env={"ISTHMUS_FEDERATION": "127.0.0.1:99999", "ISTHMUS_CERT_DIR": "."}, cwd=tmp_path)
    expect(r, 2, "'127.0.0.1:99999'", "port from 1 to 65535")


def test_a_bad_trust_argument_is_exit_2_and_a_runtime_refusal_exit_1(tmp_path: Path) -> None:
    r = isthmus("trust", "init", "--dir", str(tmp_path / "fed"), "--trust-domain", "Bad.Domain")
    expect(r, 2, "lowercase")
    assert isthmus("trust", "init", "--dir", str(tmp_path / "fed"), "--trust-domain", "isthmus.local").returncode == 0
    r = isthmus("trust", "init", "--dir", str(tmp_path / "fed"), "--trust-domain", "isthmus.local")
    expect(r, 1, "--force")


def test_a_bad_gateway_config_is_exit_2(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text("inbound: {port: 99999}\n")
    for argv in (("gateway", "run", "--config", "gateway.yaml"), ("gateway", "check-config", "gateway.yaml")):
        expect(isthmus(*argv, cwd=tmp_path), 2, "inbound.port")


def test_policy_check_against_an_unreachable_federation_prints_no_stray_log_lines(pki: Pki) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    r = isthmus("policy", "check", "--from", "spiffe://east.isthmus.local/ns/web/sa/fe", "--to", "shop/cart",
                "--federation", f"127.0.0.1:{port},127.0.0.1:{port}", "--cert-dir", str(pki.admin_dir))
    out = expect(r, 2, "cannot list the federation's policies")
    assert "federation.failover" not in out and "[info" not in out


def test_federation_serve_prints_no_c_core_lines_when_clients_misbehave(pki: Pki, etcd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A plain-TCP client and a client without a certificate make gRPC's C core log
    handshake failures; none of it reaches the server's terminal."""
    import ssl
    import time

    from .fixtures import free_port

    port = free_port()
    proc = subprocess.Popen(
        [*_isthmus_argv(), "federation", "serve", "--trust-dir", str(pki.trust_dir), "--listen", f"127.0.0.1:{port}",
         "--join-listen", f"127.0.0.1:{free_port()}", "--etcd", etcd.endpoint, "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_clean_env())
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                    s.recv(100)
                break
            except OSError:
                time.sleep(0.2)
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        for _ in range(2):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                        ctx.wrap_socket(raw) as tls:
                    tls.recv(10)
            except (OSError, ssl.SSLError):
                pass
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert_clean(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert "federation.serving" in err  # it did run


def _isthmus_argv() -> list[str]:
    import sys

    return [sys.executable, "-m", "federation.cli"]


def _clean_env() -> dict[str, str]:
    from tests.clirun import isthmus_env

    return isthmus_env()


def test_gateway_with_a_broken_federation_certificate_prints_no_c_core_lines(tmp_path: Path) -> None:
    """grpc's C core logs 'Invalid cert chain file' on every connection attempt the
    gateway's federation client makes with such a file; the terminal stays clean."""
    import signal
    import sys
    import time

    from tests.clirun import isthmus_env

    from .fixtures import free_port

    path = _gateway_yaml(tmp_path, 0)
    cfg = yaml.safe_load(path.read_text())
    (tmp_path / "broken.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cfg["federation"] = {"address": f"127.0.0.1:{free_port()}", "cert_file": str(tmp_path / "broken.pem")}
    path.write_text(yaml.safe_dump(cfg))
    p = subprocess.Popen([sys.executable, "-m", "federation.cli", "gateway", "run", "--config", str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=isthmus_env())
    time.sleep(6)  # several reconnect attempts
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert_clean(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    assert "gateway.started" in out


@pytest.mark.parametrize("option", ["--listen", "--join-listen"])
def test_serve_listen_addresses_are_validated(option: str, tmp_path: Path) -> None:
    expect(isthmus("federation", "serve", "--trust-dir", "fed", option, "0.0.0.0:70000", cwd=tmp_path), 2,
           f"Invalid value for '{option}'")


def test_stdin_is_read_without_click_text_streams(tmp_path: Path) -> None:
    """click.get_text_stream goes in Click 9: stdin and tables use sys.stdin/sys.stdout."""
    import federation

    root = Path(federation.__file__).parents[1]
    users = [str(p) for pkg in ("federation", "gateway", "trust") for p in (root / pkg).rglob("*.py")
             if "get_text_stream" in p.read_text()]
    assert users == []
    policy = "kind: AuthorizationPolicy\nname: fine\nrules: [{}]\n"
    expect(isthmus("policy", "apply", "--dry-run", "-f", "-", input=policy), 0, "AuthorizationPolicy/fine valid")
    expect(isthmus("policy", "check", "--from", "spiffe://east.isthmus.local/ns/a/sa/b", "--to", "shop/cart",
                   "-f", "-", input=policy), 0, "ALLOWED", "policy:  fine")

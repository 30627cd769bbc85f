"""The mTLS-only outbound listener answers plain HTTP with a readable 400 (HTTP/2 with
prior knowledge: GOAWAY INADEQUATE_SECURITY), and a handshake without a client
certificate is logged as that.  A real ``isthmus gateway run`` process, real clients."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h2.connection
import h2.events
import httpx
import pytest
import yaml

import trust
from tests.clirun import assert_clean, isthmus_env


@dataclass
class RunningGateway:
    proc: subprocess.Popen[str]
    ports: dict[str, int]
    bundle: Path
    lines: list[str] = field(default_factory=list)

    def stop(self) -> tuple[str, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        self.lines += out.splitlines()
        return "\n".join(self.lines), err


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[RunningGateway]:
    td = trust.TrustDir(tmp_path / "fed")
    td.init("isthmus.local")
    td.issue_cluster("east")
    trust.ClusterCA(td.cluster_dir("east")).issue(trust.gateway_id("east.isthmus.local"), tmp_path / "gw",
                                                  dns_names=("localhost",))
    cfg = {
        "inbound": {"host": "127.0.0.1", "port": 0},
        "outbound": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "tls": {"cert_file": "gw/cert.pem", "key_file": "gw/key.pem", "bundle_file": "gw/bundle.pem"},
        "last_known_good": "lkg.json",
    }
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "federation.cli", "gateway", "run", "--config",
                             str(tmp_path / "gateway.yaml")], env=isthmus_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    gw = RunningGateway(proc, {}, tmp_path / "gw" / "bundle.pem")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not gw.ports:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, proc.stderr.read()  # type: ignore[union-attr]
        gw.lines.append(line)
        doc = json.loads(line)
        if doc.get("event") == "gateway.started":
            gw.ports = {k.removeprefix("port_"): v for k, v in doc.items() if k.startswith("port_")}
    time.sleep(0.5)  # its signal handler is installed right after it starts
    yield gw
    if proc.poll() is None:
        gw.stop()


def test_plain_http_gets_a_readable_400(gateway: RunningGateway) -> None:
    r = httpx.get(f"http://127.0.0.1:{gateway.ports['outbound']}/", headers={"host": "web.default.west.isthmus.local"})
    assert r.status_code == 400
    assert "this listener requires mTLS" in r.text
    body = b"x" * 100_000  # a request body the gateway does not read still gets the answer
    r = httpx.post(f"http://127.0.0.1:{gateway.ports['outbound']}/", content=body)
    assert r.status_code == 400 and "requires mTLS" in r.text
    logs, err = gateway.stop()
    assert "outbound.plain_refused" in logs
    assert "Traceback" not in err


def test_plain_http2_gets_goaway_inadequate_security(gateway: RunningGateway) -> None:
    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    with socket.create_connection(("127.0.0.1", gateway.ports["outbound"]), timeout=5) as s:
        s.sendall(conn.data_to_send())
        events: list[h2.events.Event] = []
        while not any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
            data = s.recv(65536)
            assert data, events
            events += conn.receive_data(data)
    [goaway] = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway.error_code == h2.errors.ErrorCodes.INADEQUATE_SECURITY
    assert b"this listener requires mTLS" in (goaway.additional_data or b"")


def test_a_handshake_without_a_client_certificate_is_logged_as_that(gateway: RunningGateway) -> None:
    ctx = ssl.create_default_context(cafile=str(gateway.bundle))
    ctx.check_hostname = False
    for listener in ("outbound", "inbound"):
        try:
            with socket.create_connection(("127.0.0.1", gateway.ports[listener]), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                tls.recv(100)
        except (ssl.SSLError, OSError):
            pass  # refused: the point is what the gateway logged
    logs, err = gateway.stop()
    failed = [json.loads(line) for line in logs.splitlines() if '"tls.handshake_failed"' in line]
    assert len(failed) == 2, logs
    assert all(f["reason"] == "no client certificate" for f in failed), failed
    assert "BrokenResourceError" not in logs
    assert_clean(subprocess.CompletedProcess([], 0, logs, err))

"""Which HTTP/2 core a gateway runs on: chosen once at start, shown in ``/config`` and the
``isthmus_http2_core`` gauge, printed by ``isthmus gateway run --check-core``; a core
that refuses sessions refuses those connections and, after a few, gives way to h2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h2.exceptions
import httpx
import pytest
import structlog
import trio

from gateway import Gateway, Limits
from gateway._h2 import FALLBACK_AFTER, ConnectionFactory, H2Core
from gateway.h2core import NgHttp2Connection, SessionInitError, select_core

from .conftest import Mesh, gateway_config

WEB = "web.default.west.isthmus.local:8080"
REPO = Path(__file__).resolve().parents[2]
both_cores = pytest.mark.both_cores


async def _admin(gw: Gateway, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as c:
        return await c.get(f"http://127.0.0.1:{gw.ports['admin']}{path}")


def core_gauge(gw: Gateway, core: str) -> float | None:
    return gw.metrics.registry.get_sample_value("isthmus_http2_core", {"core": core})


@both_cores
async def test_config_and_gauge_say_which_core_runs_and_why(mesh: Mesh, http2_core: str) -> None:
    doc = (await _admin(mesh.east, "/config")).json()["http2_core"]
    assert doc["core"] == http2_core
    if http2_core == "nghttp2":
        assert doc["self_test"] == "passed" and "self-test" in doc["reason"]
        assert doc["protections"] and doc["library"]
    else:
        assert doc["reason"] == "ISTHMUS_HTTP2_CORE=h2 asked for it"
    other = "h2" if http2_core == "nghttp2" else "nghttp2"
    assert core_gauge(mesh.east, http2_core) == 1 and core_gauge(mesh.east, other) == 0
    metrics = (await _admin(mesh.east, "/metrics")).text
    assert f'isthmus_http2_core{{core="{http2_core}"}} 1.0' in metrics
    # The connections that carried a request really are of that core, both sides.
    async with httpx.AsyncClient(http2=True, http1=False, timeout=5) as c:
        r = await c.get(f"http://127.0.0.1:{mesh.east_out}/echo", headers={"host": WEB})
    assert r.status_code == 200
    kind = NgHttp2Connection if http2_core == "nghttp2" else H2Core
    conns = [ep.conn for gw in (mesh.east, mesh.west) for ep in gw.endpoints]
    assert conns and all(type(c) is kind for c in conns)


async def test_refused_sessions_refuse_their_connection_then_fall_back_to_h2(
        mesh: Mesh, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    """A library that loads but refuses to create sessions (injected here: nghttp2 itself
    does not misbehave on demand): each such connection gets GOAWAY and is closed;
    after FALLBACK_AFTER of them in a row new connections run on h2, said once in the
    log, in /config and in the gauge."""
    monkeypatch.setenv("ISTHMUS_HTTP2_CORE", "nghttp2")
    import gateway._h2 as factory_module

    real = factory_module.h2core.from_limits
    refusals = {"left": FALLBACK_AFTER}

    def misbehaving(client: bool, limits: Limits, trusted: bool) -> NgHttp2Connection:
        if not client and refusals["left"]:
            refusals["left"] -= 1
            raise SessionInitError("nghttp2 session_new failed: error -901")
        return real(client, limits, trusted)

    monkeypatch.setattr(factory_module.h2core, "from_limits", misbehaving)
    gw = Gateway(gateway_config(mesh.pki, "east", mesh.tmp, access_log=False))
    await nursery.start(gw.run)
    gw.apply_snapshot(mesh.snapshot())
    url = f"http://127.0.0.1:{gw.ports['outbound']}/echo"
    with structlog.testing.capture_logs() as logs:
        for _ in range(FALLBACK_AFTER):
            async with httpx.AsyncClient(http2=True, http1=False, timeout=5) as c:
                with pytest.raises(httpx.HTTPError):
                    await c.get(url, headers={"host": WEB})
        async with httpx.AsyncClient(http2=True, http1=False, timeout=5) as c:
            assert (await c.get(url, headers={"host": WEB})).status_code == 200
    assert [e["consecutive"] for e in logs if e["event"] == "http2.session_refused"] == [1, 2, 3]
    fallback = [e for e in logs if e["event"] == "http2.core_fallback"]
    assert len(fallback) == 1 and "refused 3 sessions in a row" in fallback[0]["reason"]
    doc = (await _admin(gw, "/config")).json()["http2_core"]
    assert doc["core"] == "h2" and doc["reason"].startswith("fallback: nghttp2")
    assert core_gauge(gw, "h2") == 1 and core_gauge(gw, "nghttp2") == 0
    assert all(type(ep.conn) is H2Core for ep in gw.endpoints)
    gw.stop()


def test_a_success_resets_the_count_of_refusals() -> None:
    f = ConnectionFactory(select_core("nghttp2"), Limits(), fallback_after=2)
    f._refused(SessionInitError("once"))
    assert isinstance(f(False, False), NgHttp2Connection) and f.failures == 0
    f._refused(SessionInitError("again"))
    assert f.core == "nghttp2"
    f._refused(SessionInitError("and again"))
    assert f.core == "h2" and isinstance(f(False, False), H2Core)


@both_cores
def test_h2_core_counts_its_queued_bytes(http2_core: str) -> None:
    """``bytes_to_send``, the accessor the relay's output ceiling reads, on either core."""
    conn = ConnectionFactory(select_core(), Limits())(True, True)
    queued = conn.bytes_to_send
    assert queued > 0  # the preface and SETTINGS
    assert len(conn.data_to_send()) == queued and conn.bytes_to_send == 0
    with pytest.raises(h2.exceptions.ProtocolError):
        conn.reset_stream(99)


def _check_core(**env: str) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("ISTHMUS_")}
    e.update(env)
    return subprocess.run([sys.executable, "-c", "from federation.cli import main; main()",
                           "gateway", "run", "--check-core"], capture_output=True, text=True,
                          env=e, timeout=60)


@both_cores
def test_check_core_prints_the_core_its_version_and_self_test(http2_core: str) -> None:
    p = _check_core(ISTHMUS_HTTP2_CORE=http2_core)
    assert p.returncode == 0, p.stderr
    lines = dict(line.split(": ", 1) for line in p.stdout.splitlines())
    assert lines["core"].split()[0] == http2_core
    info = select_core(http2_core)
    assert lines["core"] == f"{http2_core} {info.version}"
    assert lines["self-test"] == ("passed" if http2_core == "nghttp2" else "not run")


def test_check_core_exits_1_when_nghttp2_cannot_run() -> None:
    p = _check_core(ISTHMUS_NGHTTP2_LIBRARY="libnghttp2-missing.so.14")
    assert p.returncode == 1
    assert "core: h2" in p.stdout and "reason: fallback: " in p.stdout
    assert "libnghttp2-14" in p.stdout  # what to install
    p = _check_core(ISTHMUS_NGHTTP2_LIBRARY="libnghttp2-missing.so.14",
                    ISTHMUS_HTTP2_CORE="nghttp2")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "nghttp2 was required" in p.stderr + p.stdout


def test_the_image_installs_libnghttp2_and_checks_the_core_at_build() -> None:
    dockerfile = (REPO / "deploy" / "image" / "Dockerfile").read_text()
    runtime = dockerfile.split("FROM python:${PYTHON}\n", 1)[1]
    assert "libnghttp2-14" in runtime
    assert "ISTHMUS_HTTP2_CORE=nghttp2 isthmus gateway run --check-core" in runtime

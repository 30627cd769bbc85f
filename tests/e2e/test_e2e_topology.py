"""The topology page in a real browser, and ``isthmus top``, over the network-namespace
federation with real traffic (issue 15).

A workload of east calls west's ``web`` (HTTP/2), ``greeter`` (gRPC) and ``echo`` (TCP)
in a loop (tests/e2e/traffic.py) while the gateways push their 5-second summaries.
Headless Debian chromium (Playwright, ``executable_path=/usr/bin/chromium``, no browser
download) opens the page the federation serves: the graph shows the east→west edge with
a non-zero rate; after west's services are killed the edge's success rate falls within
15 s (the gateways push every 5 s, the page polls every 3 s).  Screenshots are saved in
the test's tmp dir (and, with ``ISTHMUS_SCREENSHOT=path``, there too: the README's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import trust
from federation import names
from federation.demo._netns import netns_available
from federation.demo.harness import GRPC_PORT, HTTP_PORT, TCP_PORT, LocalFederation, Proc

from .conftest import logs_of
from tests.scratch import scratch_dir

pytestmark = [pytest.mark.netns, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
EDGE = "east>default/web@west"


def _wait(cond: Any, timeout: float, what: str, lf: LocalFederation) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = cond()
            if got:
                return got
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"no {what} after {timeout:.0f}s\n{logs_of(lf)}")


def topology(lf: LocalFederation) -> dict[str, Any]:
    return httpx.get(lf.web_url + "api/v1/topology", timeout=5).json()


def edge(lf: LocalFederation) -> dict[str, Any] | None:
    return next((e for e in topology(lf)["edges"] if e["id"] == EDGE), None)


@pytest.fixture(scope="module")
def busy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalFederation, Path]]:
    """east and west, east's workload calling west for the whole module."""
    why = netns_available()
    if why:
        pytest.skip(f"end-to-end tests need network namespaces: {why}")
    work = scratch_dir(request, tmp_path_factory, "topology")
    lf = LocalFederation(work / "fed", use_netns=True, lease_ttl=30)
    traffic: Proc | None = None
    try:
        lf.start(["east", "west"])
        east = lf.clusters["east"]
        svid = work / "cart"
        trust.ClusterCA(east.dir / "join" / "ca").issue(trust.workload_id("east.isthmus.local", "shop", "cart"), svid)
        traffic = Proc("traffic", ["ip", "netns", "exec", east.namespace or "", sys.executable,
                                   str(Path(__file__).with_name("traffic.py")), "--outbound", east.outbound,
                                   "--cert-dir", str(svid), "--seconds", "120",
                                   "--http-host", f"{names.outbound_host('web', 'default', 'west')}:{HTTP_PORT}",
                                   "--grpc-authority", f"{names.outbound_host('greeter', 'default', 'west')}:{GRPC_PORT}",
                                   "--tcp-authority", f"{names.outbound_host('echo', 'default', 'west')}:{TCP_PORT}"],
                       work / "traffic.log").start()
        # Both gateways push every 5 s, each on its own phase: wait for east's (the source
        # reporter, whose figures the page prefers), not only for whichever came first.
        _wait(lambda: (e := edge(lf)) and e["rps"] > 0 and e["success_rate"] == 1.0 and e["reporter"] == "source",
              30, "east→west edge reported by east", lf)
        yield lf, work
    finally:
        if traffic is not None:
            traffic.stop(timeout=5)
        lf.close()


def test_isthmus_top_once_json_lists_the_edges_of_the_traffic(busy) -> None:  # type: ignore[no-untyped-def]
    lf, _ = busy
    env = {**os.environ, "ISTHMUS_FEDERATION": lf.fed_address, "ISTHMUS_CERT_DIR": str(lf.admin_dir)}
    r = subprocess.run([sys.executable, "-m", "federation.cli", "top", "--once", "-o", "json", "--sort", "name"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    rows = {(e["source_cluster"], f"{e['namespace']}/{e['service']}", e["destination_cluster"]): e for e in doc["edges"]}
    for svc in ("default/web", "default/greeter", "default/echo"):
        assert ("east", svc, "west") in rows, rows.keys()
    web = rows[("east", "default/web", "west")]
    assert web["rps"] > 0 and web["success_rate"] == 1.0 and web["p99_ms"] > 0
    assert web["reporter"] == "source" and web["gateways"][0].startswith("east/")
    assert rows[("east", "default/echo", "west")]["tcp_opened"] > 0
    # --service narrows to one service; the table form names the edge.
    r = subprocess.run([sys.executable, "-m", "federation.cli", "top", "--once", "--service", "default/greeter"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    assert "east → default/greeter@west" in r.stdout and "default/web" not in r.stdout
    bad = subprocess.run([sys.executable, "-m", "federation.cli", "top", "--once", "--service", "greeter"],
                         capture_output=True, text=True, timeout=30, env=env)
    assert bad.returncode == 2 and "NAMESPACE/NAME" in bad.stderr


def _label(page: Any) -> str:
    return page.locator(f'g.edge[data-edge="{EDGE}"] text').text_content() or ""


def _success(label: str) -> float:
    m = re.search(r"· ([0-9.]+)% ·", label)
    assert m, label
    return float(m.group(1))


def test_the_page_shows_the_edge_live_in_a_browser_and_its_success_falls_when_west_fails(busy) -> None:  # type: ignore[no-untyped-def]
    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    lf, work = busy
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(lf.web_url)
            page.wait_for_selector(f'g.edge[data-edge="{EDGE}"]')
            label = _label(page)
            rps = float(label.split(" rps")[0])
            assert rps > 0 and _success(label) == 100.0, label
            assert "east" in page.locator("#clusters").inner_text() and "LIVE" in page.locator("#clusters").inner_text()
            assert "default/web" in page.locator("#services").inner_text()
            # Clicking the edge shows its recent RED figures.
            page.locator(f'g.edge[data-edge="{EDGE}"] path').click()
            page.wait_for_selector("#detail:not([hidden])")
            assert page.locator("#detail-red tbody tr").count() >= 1
            page.screenshot(path=str(work / "topology-healthy.png"), full_page=True)
            if os.environ.get("ISTHMUS_SCREENSHOT"):
                page.screenshot(path=os.environ["ISTHMUS_SCREENSHOT"], full_page=True)

            # West's services die: its gateway answers 503, east's edge turns red.
            lf.clusters["west"].procs["samples"].kill()
            killed = time.monotonic()
            page.wait_for_function(
                """(id) => { const t = document.querySelector(`g.edge[data-edge="${id}"] text`);
                             const m = t && t.textContent.match(/· ([0-9.]+)% ·/);
                             return m && parseFloat(m[1]) < 100; }""", arg=EDGE, timeout=15_000, polling=250)
            took = time.monotonic() - killed
            label = _label(page)
            assert _success(label) < 100.0 and took < 15, (label, took)
            page.screenshot(path=str(work / "topology-failing.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    shutil.copy(work / "topology-failing.png", work / "topology-artifact.png")
    assert (work / "topology-healthy.png").stat().st_size > 10_000

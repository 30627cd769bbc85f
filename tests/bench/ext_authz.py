"""What one CUSTOM check (Envoy ext_authz v3 gRPC, a local authorizer) adds to a request.

    python tests/bench/ext_authz.py            # 5 rounds x 400 requests per path
    python tests/bench/ext_authz.py --smoke    # 2 rounds x 25 (a few seconds)
    python tests/bench/ext_authz.py --json
    python tests/bench/ext_authz.py --body 8192   # POSTs of 8 kB, the body sent with the check

Two in-process gateways (east outbound -> west inbound, real mTLS between them), an HTTP/2
backend, and a real ext_authz gRPC server (``tests/gateway/extauthz_servers.py``) in its
own process.  West holds a CUSTOM policy for ``/echo/checked*`` only, so the baseline is
measured in the same run, on the same connections: sequential requests to
``/echo/plain`` (no check) and ``/echo/checked`` (one check), interleaved round by round.
With ``--body N`` both paths POST N bytes and the provider has ``include_request_body``
(``max_request_bytes: N``, ``pack_as_bytes``): the inbound holds the body for the check.
Printed: median and p99 latency per path, the added latency and its ratio, and the CPU
per request of this process (client + both gateways) and of the authorizer process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This folder's gateway.py (the gateway benchmark) would shadow the package: drop it.
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import structlog  # noqa: E402
import trio  # noqa: E402

import trust  # noqa: E402
from federation.models import AuthorizationPolicy, ExtensionProvider, Rule, RuleTo, Selector  # noqa: E402
from gateway import Gateway  # noqa: E402
from tests.gateway.backends import H2Backend, start_grpc_server, tcp_echo  # noqa: E402
from tests.gateway.conftest import FED_TD, Pki, gateway_config, make_snapshot  # noqa: E402

AUTHORIZER = ("import sys, time; sys.path.insert(0, sys.argv[1]);"
              "from tests.gateway.extauthz_servers import start_authorizer;"
              "s, port, _ = start_authorizer(); print(port, flush=True); time.sleep(1e9)")
HOST = "web.default.west.isthmus.local:8080"


def _pki(d: Path) -> Pki:
    root = trust.TrustDir(d / "root")
    root.init(FED_TD)
    p = Pki(root, d)
    for c in ("east", "west", "rogue"):
        p.cas[c] = root.issue_cluster(c, validity=86400)
        p.gw[c] = p.cas[c].issue(trust.gateway_id(p.td(c)), d / f"gw-{c}", validity=3600)
    return p


def _cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(rounds: int, n: int, tmp: Path, body: int = 0) -> dict[str, object]:
    pki = _pki(tmp)
    authz = subprocess.Popen([sys.executable, "-c", AUTHORIZER, str(REPO)], stdout=subprocess.PIPE, text=True)
    grpc_server, grpc_port = start_grpc_server()
    try:
        authz_port = int(authz.stdout.readline())  # type: ignore[union-attr]
        async with trio.open_nursery() as nursery:
            web = await nursery.start(H2Backend().serve)
            echo = await nursery.start(tcp_echo)
            west = Gateway(gateway_config(pki, "west", tmp, access_log=False))
            east = Gateway(gateway_config(pki, "east", tmp, access_log=False))
            await nursery.start(west.run)
            await nursery.start(east.run)
            snap = make_snapshot(pki, {"east": east.ports["inbound"], "west": west.ports["inbound"]},
                                 web.port, web.port, grpc_port, echo)
            snap = snap.model_copy(update={
                "policies": (AuthorizationPolicy(name="checked", selector=Selector(namespace="default", service="web"),
                                                 action="CUSTOM", provider="opa",
                                                 rules=(Rule(to=(RuleTo(paths=("/echo/checked*",)),)),)),),
                "extension_providers": (ExtensionProvider.model_validate(
                    {"name": "opa", "ext_authz_grpc": {"address": f"127.0.0.1:{authz_port}", "timeout": "1s", **(
                        {"include_request_body": {"max_request_bytes": body, "pack_as_bytes": True}} if body else {})}}),)})
            west.apply_snapshot(snap)
            east.apply_snapshot(snap)
            lat: dict[str, list[float]] = {"plain": [], "checked": []}
            cpu = {"plain": 0.0, "checked": 0.0}
            authz_cpu = {"plain": 0.0, "checked": 0.0}
            errors = 0
            payload = os.urandom(body)

            async def send(c: httpx.AsyncClient, path: str) -> httpx.Response:
                return await (c.post(f"/echo/{path}", content=payload) if body else c.get(f"/echo/{path}"))

            async with httpx.AsyncClient(http2=True, http1=False, headers={"host": HOST}, timeout=10,
                                         base_url=f"http://127.0.0.1:{east.ports['outbound']}") as c:
                for path in ("plain", "checked"):  # warm both paths and connections
                    for _ in range(5):
                        await send(c, path)
                for _ in range(rounds):
                    for path in ("plain", "checked"):
                        c0, a0 = time.process_time(), _cpu(authz.pid)
                        for _ in range(n):
                            t0 = time.perf_counter()
                            r = await send(c, path)
                            lat[path].append(time.perf_counter() - t0)
                            errors += r.status_code != 200
                        cpu[path] += time.process_time() - c0
                        authz_cpu[path] += _cpu(authz.pid) - a0
            east.stop()
            west.stop()
            nursery.cancel_scope.cancel()
    finally:
        authz.kill()
        authz.wait()
        grpc_server.stop(0)
    total = rounds * n

    def pct(xs: list[float], q: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1e3

    med = {p: statistics.median(v) * 1e3 for p, v in lat.items()}
    return {
        "requests_per_path": total, "errors": errors, "body_bytes": body,
        "plain_ms_median": med["plain"], "checked_ms_median": med["checked"],
        "plain_ms_p99": pct(lat["plain"], 0.99), "checked_ms_p99": pct(lat["checked"], 0.99),
        "added_ms_median": med["checked"] - med["plain"],
        "ratio_checked/plain_latency": med["checked"] / med["plain"],
        "plain_cpu_us": cpu["plain"] / total * 1e6, "checked_cpu_us": cpu["checked"] / total * 1e6,
        "added_cpu_us": (cpu["checked"] - cpu["plain"]) / total * 1e6,
        "ratio_checked/plain_cpu": cpu["checked"] / cpu["plain"] if cpu["plain"] else 0.0,
        "authorizer_cpu_us_per_check": (authz_cpu["checked"] - authz_cpu["plain"]) / total * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--body", type=int, default=0, metavar="BYTES",
                    help="POST this many bytes and send them with the check (include_request_body)")
    a = ap.parse_args()
    rounds, n = (2, 25) if a.smoke else (5, 400)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: the figures
    with tempfile.TemporaryDirectory() as d:
        r = trio.run(_measure, rounds, n, Path(d), a.body)
    if a.json:
        print(json.dumps(r))
        return
    print(f"requests per path      {r['requests_per_path']} (errors {r['errors']})"
          + (f", POSTs of {a.body} bytes, the body sent with the check" if a.body else ""))
    print(f"no check               {r['plain_ms_median']:7.3f} ms median  {r['plain_ms_p99']:7.3f} ms p99  "
          f"{r['plain_cpu_us']:7.0f} us CPU/request")
    print(f"one CUSTOM check       {r['checked_ms_median']:7.3f} ms median  {r['checked_ms_p99']:7.3f} ms p99  "
          f"{r['checked_cpu_us']:7.0f} us CPU/request")
    print(f"added                  {r['added_ms_median']:7.3f} ms ({r['ratio_checked/plain_latency']:.2f}x)  "
          f"{r['added_cpu_us']:7.0f} us CPU ({r['ratio_checked/plain_cpu']:.2f}x); authorizer "
          f"{r['authorizer_cpu_us_per_check']:.0f} us CPU/check")


if __name__ == "__main__":
    main()

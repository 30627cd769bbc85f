"""Gateway benchmark on loopback: h2load and a gRPC load script, three paths compared.

    python tests/bench/gateway.py            # full run (a few minutes)
    python tests/bench/gateway.py --smoke    # < 60 s, small numbers, same code paths
    python tests/bench/gateway.py --cores h2 # one HTTP/2 core only (default: nghttp2,h2)
    python tests/bench/gateway.py --tracing  # span export: off vs on (100%) vs a dead collector

Paths (all HTTP/2):
  (1) direct:   client -> server over TLS (h2load cannot present a client certificate,
                so the server does not ask for one; gRPC load uses mTLS)
  (2) isthmus:  client -h2c-> gateway(east) outbound =mTLS h2= gateway(west) inbound -h2c-> server
  (3) nginx:    client -h2c-> nginx(east) =mTLS h2 (grpc_pass)= nginx(west) -h2c-> server

The server is nginx (h2c and TLS: "ok" and a 1 MiB file), so the server is never the
bottleneck.  Each gateway runs one worker process; so does each nginx.  Path (2) runs
once per HTTP/2 core (``--cores``; a pair of gateways each, ``ISTHMUS_HTTP2_CORE``): the
first core's path is ``isthmus``, the next ``isthmus_<core>``, all measured in the same run
against the same direct and nginx figures; each gateway's idle RSS is reported too.  Reported per
scenario: req/s, p50 and p99 latency (h2load --log-file, per request), at a fixed
concurrency, at half of the measured saturation rate (the latency target) and at
saturation; small unary and 1 MiB bodies; L4 throughput through a CONNECT tunnel;
a gRPC unary load (grpc.aio client) direct vs through the gateways.  Resilience (first core
only, small requests at saturation): a federated name under a route with a timeout, retries
and a breaker in force but never triggered, and one with 10 % mirrored, each against the
same federated name without either (``ratio resilience``: the added east-gateway CPU per
request, the issue's target being <= 5 us, and the throughput ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import trust  # noqa: E402
from federation.server import free_port  # noqa: E402


def wait_port(port: int, procs: Procs | None = None, timeout: float = 90.0) -> None:
    """Wait for ``port`` to accept connections; fail at once, with its log, when one of
    ``procs`` has exited meanwhile (a process that cannot start never opens its port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if procs is not None:
                procs.check()
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open in {timeout:.0f} s")


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.named: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[subprocess.Popen[bytes], Path] = {}

    def check(self) -> None:
        """Raise, with the end of its log, if a process started here has exited."""
        for p in self.procs:
            if p.poll() is not None:
                tail = self.logs[p].read_text(errors="replace")[-2000:] if self.logs[p].exists() else ""
                raise RuntimeError(f"{' '.join(map(str, p.args))[:200]} exited with {p.returncode}:\n{tail}")

    def start(self, args: list[str], log: Path, env: dict[str, str] | None = None,
              name: str = "") -> subprocess.Popen[bytes]:
        with open(log, "ab") as f:
            p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
        self.procs.append(p)
        self.logs[p] = log
        if name:
            self.named[name] = p
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


# ------------------------------------------------------------------ setup

def make_pki(d: Path) -> dict[str, trust.IssuedFiles]:
    root = trust.TrustDir(d / "root")
    root.init("isthmus.local")
    out: dict[str, trust.IssuedFiles] = {}
    for c in ("east", "west"):
        ca = root.issue_cluster(c)
        # DNS name only for nginx's upstream hostname check; Isthmus checks the SPIFFE ID.
        out[c] = ca.issue(trust.gateway_id(f"{c}.isthmus.local"), d / f"gw-{c}",
                          dns_names=("localhost",), validity=86400)
    out["server"] = root.issue_cluster("svc").issue(
        trust.workload_id("svc.isthmus.local", "default", "server"), d / "server",
        dns_names=("localhost",), validity=86400)
    out["client"] = root.issue_cluster("cli").issue(
        trust.workload_id("cli.isthmus.local", "default", "client"), d / "client", validity=86400)
    return out


NGINX_BASE = """worker_processes 1;
user root;
daemon off;
pid {d}/{name}.pid;
error_log {d}/{name}.err warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/{name}-body;
  proxy_temp_path {d}/{name}-proxy;
  fastcgi_temp_path {d}/{name}-fcgi;
  uwsgi_temp_path {d}/{name}-uwsgi;
  scgi_temp_path {d}/{name}-scgi;
  http2_max_concurrent_streams 1024;
  keepalive_requests 1000000;
{body}
}}
"""


def nginx_conf(d: Path, name: str, body: str) -> Path:
    p = d / f"{name}.conf"
    p.write_text(NGINX_BASE.format(d=d, name=name, body=body))
    return p


def suffix(i: int, core: str) -> str:
    """Port-name suffix of the gateway pair of the i-th core ("" for the first)."""
    return "" if i == 0 else f"_{core}"


GW_PORTS = ("west_in", "west_out", "west_admin", "east_in", "east_out", "east_admin", "east_tcp")


def setup(d: Path, procs: Procs, grpc_port: int = 0,
          cores: tuple[str, ...] = ("nghttp2",)) -> dict[str, int]:
    pki = make_pki(d)
    (d / "www").mkdir()
    (d / "www" / "big").write_bytes(os.urandom(1 << 20))
    ports = {k: free_port() for k in (
        "backend", "backend_tls", "tcp_sink", "ngx_east", "ngx_west", "ngx_hop")}
    for i, core in enumerate(cores):
        ports.update({k + suffix(i, core): free_port() for k in GW_PORTS})
    s = pki["server"]
    backend = f"""
  server {{
    listen 127.0.0.1:{ports['backend']} http2;
    listen 127.0.0.1:{ports['backend_tls']} ssl http2;
    ssl_certificate {s.cert}; ssl_certificate_key {s.key};
    ssl_client_certificate {s.bundle}; ssl_verify_client optional;
    ssl_protocols TLSv1.3;
    root {d}/www;
    location = /big {{ }}
    location / {{ return 200 "ok\\n"; }}
  }}"""
    # grpc_pass is nginx's only HTTP/2 upstream: it relays any h2 request.
    e, w = pki["east"], pki["west"]
    ngx_east = f"""
  upstream west {{ server 127.0.0.1:{ports['ngx_west']}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{ports['ngx_east']} http2;
    location / {{
      grpc_pass grpcs://west;
      grpc_ssl_certificate {e.cert}; grpc_ssl_certificate_key {e.key};
      grpc_ssl_trusted_certificate {e.bundle}; grpc_ssl_verify on; grpc_ssl_verify_depth 3;
      grpc_ssl_name localhost; grpc_ssl_session_reuse on; grpc_ssl_protocols TLSv1.3;
      grpc_buffer_size 64k;
    }}
  }}"""
    # One Isthmus hop: nginx plays the calling cluster's gateway (mTLS with east's gateway
    # certificate) in front of the west Isthmus gateway, so only west's work is measured.
    ngx_hop = f"""
  upstream isthmus_west {{ server 127.0.0.1:{ports['west_in']}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{ports['ngx_hop']} http2;
    location / {{
      grpc_pass grpcs://isthmus_west;
      grpc_set_header Host web.default.svc.cluster.local:80;
      grpc_ssl_certificate {e.cert}; grpc_ssl_certificate_key {e.key};
      grpc_ssl_trusted_certificate {e.bundle}; grpc_ssl_verify on; grpc_ssl_verify_depth 3;
      grpc_ssl_name localhost; grpc_ssl_session_reuse on; grpc_ssl_protocols TLSv1.3;
      grpc_buffer_size 64k;
    }}
  }}"""
    ngx_west = f"""
  upstream backend {{ server 127.0.0.1:{ports['backend']}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{ports['ngx_west']} ssl http2;
    ssl_certificate {w.cert}; ssl_certificate_key {w.key};
    ssl_client_certificate {w.bundle}; ssl_verify_client on; ssl_verify_depth 3;
    ssl_protocols TLSv1.3;
    location / {{ grpc_pass grpc://backend; grpc_buffer_size 64k; }}
  }}"""
    for name, body in (("backend", backend), ("ngx_east", ngx_east), ("ngx_west", ngx_west),
                       ("ngx_hop", ngx_hop)):
        procs.start(["nginx", "-c", str(nginx_conf(d, name, body))], d / f"{name}.log")
    # A TCP sink for L4 throughput: reads everything, answers with the byte count.
    procs.start([sys.executable, "-c", TCP_SINK, str(ports["tcp_sink"])], d / "sink.log")
    for i, core in enumerate(cores):
        _gateways(d, procs, pki, ports, grpc_port, core, suffix(i, core))
    for k in ("backend", "backend_tls", "ngx_east", "ngx_west", "ngx_hop", "tcp_sink"):
        wait_port(ports[k], procs)
    for i, core in enumerate(cores):
        for k in ("west_in", "east_out", "east_tcp"):
            wait_port(ports[k + suffix(i, core)], procs)
    ports["_pki"] = pki  # type: ignore[assignment]
    return ports


def _gateways(d: Path, procs: Procs, pki: dict, ports: dict, grpc_port: int, core: str,
              sfx: str, tracing: dict | None = None) -> None:
    """One east/west pair of gateway processes on ``core``."""
    static = {
        "revision": 1,
        "clusters": [{"name": c, "trust_domain": f"{c}.isthmus.local",
                      "gateway_addresses": [f"127.0.0.1:{ports[c + '_in' + sfx]}"]}
                     for c in ("east", "west")],
        "services": [
            {"cluster": "west", "namespace": "default", "name": "web",
             "ports": [{"port": 80, "protocol": "HTTP2", "target": f"127.0.0.1:{ports['backend']}"}]},
            {"cluster": "west", "namespace": "default", "name": "sink",
             "ports": [{"port": 9, "protocol": "TCP", "target": f"127.0.0.1:{ports['tcp_sink']}"}]},
            {"cluster": "west", "namespace": "default", "name": "echo",
             "ports": [{"port": 50051, "protocol": "GRPC", "target": f"127.0.0.1:{grpc_port or 1}"}]},
            # Resilience (issue 14): the same backend under other names (see GUARDED).
            *({"cluster": "west", "namespace": "default", "name": n,
               "ports": [{"port": 80, "protocol": "HTTP2", "target": f"127.0.0.1:{ports['backend']}"}]}
              for n in ("routed", "guarded", "mirrored", "mirrorsink")),
        ],
        **GUARDED,
    }
    for c in ("west", "east"):
        f = pki[c]
        cfg = {
            "cluster": c,
            "inbound": {"host": "127.0.0.1", "port": ports[f"{c}_in{sfx}"]},
            "outbound": {"host": "127.0.0.1", "port": ports[f"{c}_out{sfx}"]},
            "admin": {"host": "127.0.0.1", "port": ports[f"{c}_admin{sfx}"]},
            "tls": {"cert_file": str(f.cert), "key_file": str(f.key), "bundle_file": str(f.bundle)},
            "outbound_allow_plain": True,
            "access_log": False,
            "static": static,
            "last_known_good": str(d / f"{c}{sfx}-lkg.json"),
            "tcp_ports": [{"host": "127.0.0.1", "port": ports["east_tcp" + sfx],
                           "target": "sink.default.west.isthmus.local:9"}] if c == "east" else [],
        }
        if tracing is not None:
            cfg["tracing"] = tracing
        (d / f"{c}{sfx}.yaml").write_text(yaml.safe_dump(cfg))
        procs.start([sys.executable, "-c", "from federation.cli import main; main()", "gateway",
                     "run", "--config", str(d / f"{c}{sfx}.yaml"), "--log-level", "warning"],
                    d / f"gw-{c}{sfx}.log", name=f"gw_{c}{sfx}",
                    env={"ISTHMUS_HTTP2_CORE": core})


# routed: a route to west and nothing else; guarded: the same route with a timeout and
# retries and a TrafficPolicy whose breaker is in force, none of them triggered (the
# backend answers 200 at once); mirrored: the same route, 10 % copied to mirrorsink.
# guarded - routed is the guards' own cost; each is also compared with web's federated
# name (no route, no policy).
GUARDED = {
    "routes": [
        {"name": "routed", "host": {"namespace": "default", "service": "routed"}, "rules": [
            {"destinations": [{"cluster": "west"}]}]},
        {"name": "guarded", "host": {"namespace": "default", "service": "guarded"}, "rules": [
            {"destinations": [{"cluster": "west"}], "timeout": "10s",
             "retries": {"attempts": 2, "retry_on": ["connect-failure", "reset", "503"]}}]},
        {"name": "mirrored", "host": {"namespace": "default", "service": "mirrored"}, "rules": [
            {"destinations": [{"cluster": "west"}], "mirror": {"cluster": "west", "service": "mirrorsink", "percent": 10}}]},
    ],
    "traffic_policies": [{"name": "guarded", "host": {"namespace": "default", "service": "guarded"},
                          "connection_pool": {"max_requests": 100000, "max_pending": 100000, "max_retries": 1000}}],
}


TCP_SINK = r"""
import socket, sys, threading
def serve(c):
    n = 0
    while True:
        b = c.recv(1 << 20)
        if not b: break
        n += len(b)
    c.sendall(str(n).encode()); c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


# ------------------------------------------------------------------ measurement

def h2load(url: str, d: Path, *, clients: int, streams: int, duration: float,
           authority: str | None = None, rps: float | None = None, warmup: float = 0.5) -> dict:
    log = d / f"h2load-{time.monotonic_ns()}.log"
    args = ["h2load", "-c", str(clients), "-m", str(streams), "-D", f"{int(duration * 1000)}ms",
            "--warm-up-time", f"{int(warmup * 1000)}ms", "--log-file", str(log), "-t", "1"]
    if authority:
        args += ["-H", f":authority: {authority}"]
    if rps:
        args += ["--rps", str(max(1, int(rps / clients)))]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=duration + 60).stdout
    lat = []
    codes = {}
    if log.exists():
        for line in log.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                codes[parts[1]] = codes.get(parts[1], 0) + 1
                lat.append(int(parts[2]) / 1000.0)
        log.unlink()
    lat.sort()
    rate = 0.0
    for line in out.splitlines():
        if line.startswith("finished in"):
            rate = float(line.split(",")[1].strip().split()[0])
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    # Status 0: still in flight when the duration ended (at most clients*streams of them).
    unfinished = codes.get("0", 0)
    return {"rps": rate, "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99),
            "requests": len(lat), "ok": ok, "errors": len(lat) - ok - unfinished,
            "unfinished": unfinished, "in_flight_max": clients * streams, "codes": codes}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def l4_throughput(port: int, size: int) -> float:
    """MB/s of a one-way upload through the CONNECT tunnel."""
    chunk = b"\0" * (1 << 20)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        sent = 0
        while sent < size:
            s.sendall(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while b := s.recv(100):
            reply += b
    dt = time.perf_counter() - t0
    assert int(reply) == size, reply
    return size / dt / 1e6


GRPC_LOAD = r"""
import asyncio, json, sys, time, grpc
target, authority, conc, duration = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
async def main():
    opts = [("grpc.default_authority", authority)] if authority != "-" else []
    async with grpc.aio.insecure_channel(target, options=opts) as ch:
        call = ch.unary_unary("/isthmus.test.Echo/Unary")
        lat = []
        end = time.perf_counter() + duration
        errors = 0
        async def worker():
            nonlocal errors
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    await call(b"x" * 64, timeout=5)
                    lat.append((time.perf_counter() - t) * 1000)
                except grpc.RpcError:
                    errors += 1
        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(conc)])
        dt = time.perf_counter() - t0
        lat.sort()
        print(json.dumps({"rps": len(lat) / dt, "p50_ms": lat[len(lat)//2] if lat else None,
                          "p99_ms": lat[int(len(lat)*0.99)] if lat else None, "errors": errors}))
asyncio.run(main())
"""


def grpc_load(target: str, authority: str, conc: int, duration: float) -> dict:
    out = subprocess.run([sys.executable, "-c", GRPC_LOAD, target, authority, str(conc),
                          str(duration)], capture_output=True, text=True, timeout=duration + 60)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": out.stderr[-500:]}


RESILIENCE = (("fed", "web.default.isthmus.local:80"), ("routed", "routed.default.isthmus.local:80"),
              ("guarded", "guarded.default.isthmus.local:80"), ("mirrored", "mirrored.default.isthmus.local:80"))


def resilience(d: Path, procs: Procs, ports: dict, core: str, load: tuple[int, int], dur: float,
               rounds: int = 1) -> dict:
    """Small requests at saturation through the first core's east/west pair, one run per
    name of :data:`RESILIENCE` per round (the names interleaved, so that a machine's drift
    falls on all of them); per name the run with the median east-gateway CPU per request."""
    east = "gw_east" + suffix(0, core)
    base = f"http://127.0.0.1:{ports['east_out' + suffix(0, core)]}"
    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for name, host in RESILIENCE:
            h2load(base + "/", d, clients=2, streams=2, duration=0.3, authority=host, warmup=0.1)
            before = cpu_seconds(procs.named[east].pid)
            r = h2load(base + "/", d, clients=load[0], streams=load[1], duration=dur, authority=host)
            r["east_cpu_us_per_request"] = round((cpu_seconds(procs.named[east].pid) - before)
                                                 / max(1, r["requests"]) * 1e6, 1)
            runs.setdefault(name, []).append(r)
    out = {}
    for name, rs in runs.items():
        rs.sort(key=lambda r: r["east_cpu_us_per_request"])
        out[name] = dict(rs[len(rs) // 2])
        if rounds > 1:
            out[name]["east_cpu_us_per_request_runs"] = [r["east_cpu_us_per_request"] for r in rs]
    return out


def run_resilience(smoke: bool, duration: float, rounds: int, core: str) -> dict:
    """Only the resilience comparison (``--resilience``), on one core."""
    from tests.gateway.backends import start_grpc_server

    d = Path(tempfile.mkdtemp(prefix="isthmus-bench-"))
    procs = Procs()
    server, gport = start_grpc_server()
    results: dict = {"cores": {"isthmus": core}}
    try:
        ports = setup(d, procs, gport, (core,))
        load = (4, 16) if smoke else (8, 32)
        results["resilience"] = resilience(d, procs, ports, core, load, 1.0 if smoke else duration,
                                           1 if smoke else rounds)
    finally:
        procs.stop()
        server.stop(0)
        if not os.environ.get("ISTHMUS_BENCH_KEEP"):
            shutil.rmtree(d, ignore_errors=True)
    _ratios(results)
    return results


def run(smoke: bool, duration: float, concurrency: int,
        cores: tuple[str, ...] = ("nghttp2", "h2")) -> dict:
    from tests.gateway.backends import start_grpc_server

    d = Path(tempfile.mkdtemp(prefix="isthmus-bench-"))
    procs = Procs()
    results: dict = {}
    server, gport = start_grpc_server()
    try:
        ports = setup(d, procs, gport, cores)
        dur = 1.0 if smoke else duration
        auth = "web.default.west.isthmus.local:80"
        # Idle: started, config applied, no traffic yet.
        time.sleep(1.0)
        results["idle_rss_mib"] = {n: rss_mib(p.pid) for n, p in procs.named.items()}
        results["cores"] = {}
        paths = {"direct": (f"https://127.0.0.1:{ports['backend_tls']}", None)}
        for i, core in enumerate(cores):
            name = "isthmus" + suffix(i, core)
            results["cores"][name] = core
            paths[name] = (f"http://127.0.0.1:{ports['east_out' + suffix(i, core)]}", auth)
        paths.update({
            "nginx": (f"http://127.0.0.1:{ports['ngx_east']}", None),
            # nginx (as the calling gateway) -> one Isthmus gateway (the first core) -> server
            "1hop": (f"http://127.0.0.1:{ports['ngx_hop']}", None),
        })
        # Warm every path (connections, pools, TLS).
        for base, a in paths.values():
            h2load(base + "/", d, clients=2, streams=2, duration=0.3, authority=a, warmup=0.1)
        fixed_c, fixed_m = (2, 4) if smoke else (4, max(1, concurrency // 4))
        sat_c, sat_m = (4, 16) if smoke else (8, 32)
        gws = {n: p.pid for n, p in procs.named.items()}
        for name, (base, a) in paths.items():
            r = results.setdefault(name, {})
            r["small_fixed"] = h2load(base + "/", d, clients=fixed_c, streams=fixed_m,
                                      duration=dur, authority=a)
            before = {n: cpu_seconds(pid) for n, pid in gws.items()}
            r["small_saturation"] = h2load(base + "/", d, clients=sat_c, streams=sat_m,
                                           duration=dur, authority=a)
            n_req = max(1, r["small_saturation"]["requests"])
            r["small_saturation"]["gateway_cpu_us_per_request"] = {
                n: round((cpu_seconds(pid) - before[n]) / n_req * 1e6)
                for n, pid in gws.items() if cpu_seconds(pid) - before[n] > 0.05}
            half = r["small_saturation"]["rps"] / 2
            r["small_half_load"] = h2load(base + "/", d, clients=4, streams=1, duration=dur,
                                          authority=a, rps=half)
            if not smoke:
                r["big_fixed"] = h2load(base + "/big", d, clients=2, streams=2, duration=dur,
                                        authority=a)
            r["big_saturation"] = h2load(base + "/big", d, clients=4, streams=8, duration=dur,
                                         authority=a)
        results["resilience"] = resilience(d, procs, ports, cores[0], (sat_c, sat_m), dur)
        size = (32 if smoke else 512) << 20
        gd = 1.0 if smoke else duration
        results["l4_direct_MBps"] = round(l4_throughput(ports["tcp_sink"], size), 1)
        results["grpc_direct"] = grpc_load(f"127.0.0.1:{gport}", "-", 16, gd)
        for i, core in enumerate(cores):
            sfx = suffix(i, core)
            results["l4_connect_MBps" + sfx] = round(l4_throughput(ports["east_tcp" + sfx],
                                                                   size), 1)
            results["grpc_isthmus" + sfx] = grpc_load(
                f"127.0.0.1:{ports['east_out' + sfx]}", "echo.default.west.isthmus.local:50051",
                16, gd)
    finally:
        procs.stop()
        server.stop(0)
        if not os.environ.get("ISTHMUS_BENCH_KEEP"):
            shutil.rmtree(d, ignore_errors=True)
    _ratios(results)
    return results


def _ratios(results: dict) -> None:
    rat = {}
    for k in ("small_fixed", "small_saturation", "small_half_load", "big_fixed",
              "big_saturation"):
        try:
            if "1hop" in results:
                rat.setdefault(k, {})["1hop_added_p50_ms"] = round(
                    results["1hop"][k]["p50_ms"] - results["direct"][k]["p50_ms"], 3)
            dct, n = results["direct"][k]["rps"], results["nginx"][k]["rps"]
            for name in results.get("cores", {"isthmus": ""}):
                i = results[name][k]["rps"]
                rat.setdefault(k, {}).update({
                    f"{name}/direct": round(i / dct, 3) if dct else None,
                    f"{name}/nginx": round(i / n, 3) if n else None})
            if k == "small_half_load":
                nd = results["nginx"][k]["p50_ms"] - results["direct"][k]["p50_ms"]
                for name in results.get("cores", {"isthmus": ""}):
                    added = results[name][k]["p50_ms"] - results["direct"][k]["p50_ms"]
                    rat[k][f"{name}_added_p50/nginx_added_p50"] = (
                        round(added / nd, 2) if nd > 0 else None)
        except KeyError:
            pass
    for name in results.get("cores", {}):
        g, d = results.get("grpc_" + name, {}), results.get("grpc_direct", {})
        if g.get("rps") and d.get("rps"):
            rat.setdefault("grpc_unary", {})[f"{name}/direct"] = round(g["rps"] / d["rps"], 3)
    res = results.get("resilience", {})
    if {"fed", "routed", "guarded", "mirrored"} <= set(res):
        f, rt = res["fed"], res["routed"]
        cpu = {n: r["east_cpu_us_per_request"] for n, r in res.items()}
        rat["resilience"] = {
            # the issue's target: <= 5 us of gateway CPU per request for the guards in force
            # (timeout, retries, breaker) against the same route without them
            "guarded_overhead_us_per_request": round(cpu["guarded"] - cpu["routed"], 1),
            # the route's own cost (issue 13's routing) and both together
            "routed_overhead_us_per_request": round(cpu["routed"] - cpu["fed"], 1),
            "guarded_vs_fed_us_per_request": round(cpu["guarded"] - cpu["fed"], 1),
            "guarded/routed_rps": round(res["guarded"]["rps"] / rt["rps"], 3) if rt["rps"] else None,
            "guarded/fed_rps": round(res["guarded"]["rps"] / f["rps"], 3) if f["rps"] else None,
            "mirrored_10pct/fed_rps": round(res["mirrored"]["rps"] / f["rps"], 3) if f["rps"] else None,
            "mirrored_10pct/fed_p99": round(res["mirrored"]["p99_ms"] / f["p99_ms"], 3) if f["p99_ms"] else None,
        }
    results["ratios"] = rat


def report(results: dict) -> str:
    lines = [f"{'path':8} {'scenario':18} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
             "  gateway CPU us/request"]
    names = ["direct", *results.get("cores", {"isthmus": ""}), "nginx", "1hop"]
    for name in names:
        for k, v in results.get(name, {}).items():
            cpu = v.get("gateway_cpu_us_per_request") or ""
            lines.append(f"{name:8} {k:18} {v['rps']:10.0f} {v['p50_ms']:8.2f} {v['p99_ms']:8.2f} "
                         f"{v['errors']:7d}  {cpu}")
    for name, core in results.get("cores", {}).items():
        lines.append(f"{name} runs on HTTP/2 core {core}")
    for k, v in results.items():
        if k.startswith("l4_connect_MBps"):
            lines.append(f"L4 via CONNECT{k[len('l4_connect_MBps'):]}: {v} MB/s "
                         f"(direct {results.get('l4_direct_MBps')} MB/s)")
    if "idle_rss_mib" in results:
        lines.append(f"idle RSS MiB: {results['idle_rss_mib']}")
    for k in ("grpc_direct", *(k for k in results if k.startswith("grpc_isthmus"))):
        g = results.get(k, {})
        if "rps" in g:
            lines.append(f"{k:13} unary c=16 {g['rps']:8.0f} req/s  p50 {g['p50_ms']:.2f} ms  "
                         f"p99 {g['p99_ms']:.2f} ms  errors {g['errors']}")
        elif g:
            lines.append(f"{k}: {g}")
    for k, v in results.get("resilience", {}).items():
        lines.append(f"resilience {k:9} {v['rps']:10.0f} req/s p50 {v['p50_ms']:.2f} ms p99 {v['p99_ms']:.2f} ms "
                     f"errors {v['errors']} east CPU {v['east_cpu_us_per_request']} us/request")
    for k, v in results.get("ratios", {}).items():
        lines.append(f"ratio {k}: {v}")
    return "\n".join(lines)


# ------------------------------------------------------------------ --tracing

TRACING_MODES = ("off", "on", "dead")


def _metric_sum(port: int, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def run_tracing(smoke: bool, duration: float) -> dict:
    """Span export's cost on the request path: three gateway pairs on the same backend,
    tracing off, on at 100% to a real local OTLP/gRPC receiver, and on at 100% to a
    collector address nothing listens on (every span dropped and counted)."""
    from tests.gateway.otlp import Receiver

    d = Path(tempfile.mkdtemp(prefix="isthmus-bench-tracing-"))
    procs = Procs()
    receiver = Receiver()
    results: dict = {}
    try:
        pki = make_pki(d)
        ports = {k: free_port() for k in ("backend", "tcp_sink", "dead")}
        body = f"""
  server {{
    listen 127.0.0.1:{ports['backend']} http2;
    location / {{ return 200 "ok\\n"; }}
  }}"""
        procs.start(["nginx", "-c", str(nginx_conf(d, "backend", body))], d / "backend.log")
        collectors = {"on": receiver.address, "dead": f"127.0.0.1:{ports['dead']}"}
        for mode in TRACING_MODES:
            sfx = "" if mode == "off" else f"_{mode}"
            ports.update({k + sfx: free_port() for k in GW_PORTS})
            tracing = None if mode == "off" else {"collector": collectors[mode], "random_sampling_percentage": 100,
                                                  "export_timeout": 2}
            _gateways(d, procs, pki, ports, 0, "nghttp2", sfx, tracing)
        wait_port(ports["backend"], procs)
        for mode in TRACING_MODES:
            sfx = "" if mode == "off" else f"_{mode}"
            for k in ("west_in", "east_out", "west_admin", "east_admin"):
                wait_port(ports[k + sfx], procs)
        dur = 1.0 if smoke else duration
        auth = "web.default.west.isthmus.local:80"
        gws = {n: p.pid for n, p in procs.named.items()}
        for mode in TRACING_MODES:  # warm up: connections, pools, TLS, the exporters' channels
            sfx = "" if mode == "off" else f"_{mode}"
            h2load(f"http://127.0.0.1:{ports['east_out' + sfx]}/", d, clients=2, streams=2, duration=0.3,
                   authority=auth, warmup=0.1)
        for rnd in range(1 if smoke else 2):  # interleaved rounds: machine noise hits each mode alike
            for mode in TRACING_MODES:
                sfx = "" if mode == "off" else f"_{mode}"
                url = f"http://127.0.0.1:{ports['east_out' + sfx]}/"
                r = results.setdefault(mode, {})
                pids = {n: pid for n, pid in gws.items() if n.endswith(sfx) and (sfx or n in ("gw_east", "gw_west"))}
                r.setdefault("small_fixed", []).append(h2load(url, d, clients=2, streams=4, duration=dur, authority=auth))
                before = {n: cpu_seconds(pid) for n, pid in pids.items()}
                sat = h2load(url, d, clients=4, streams=16, duration=dur, authority=auth)
                n_req = max(1, sat["requests"])
                sat["gateway_cpu_us_per_request"] = {n: round((cpu_seconds(pid) - before[n]) / n_req * 1e6)
                                                     for n, pid in pids.items()}
                r.setdefault("small_saturation", []).append(sat)
        time.sleep(2.5)  # the last batches leave (or fail)
        for mode in ("on", "dead"):
            sfx = f"_{mode}"
            results[mode]["spans"] = {
                "exported": sum(_metric_sum(ports[f"{c}_admin{sfx}"], "isthmus_trace_spans_exported_total")
                                for c in ("east", "west")),
                "dropped": sum(_metric_sum(ports[f"{c}_admin{sfx}"], "isthmus_trace_spans_dropped_total")
                               for c in ("east", "west"))}
        results["on"]["spans"]["received"] = len(receiver.spans)
    finally:
        procs.stop()
        receiver.stop()
        if not os.environ.get("ISTHMUS_BENCH_KEEP"):
            shutil.rmtree(d, ignore_errors=True)
    for mode in TRACING_MODES:  # the best round of each (least disturbed by other load)
        for k in ("small_fixed", "small_saturation"):
            rounds = results[mode][k]
            results[mode][k] = max(rounds, key=lambda v: v["rps"])
    off = results["off"]
    results["ratios"] = {
        f"{mode}/off": {k: {"rps": round(results[mode][k]["rps"] / off[k]["rps"], 3) if off[k]["rps"] else None,
                            "p50": round(results[mode][k]["p50_ms"] / off[k]["p50_ms"], 3) if off[k]["p50_ms"] else None}
                        for k in ("small_fixed", "small_saturation")}
        for mode in ("on", "dead")}
    return results


def report_tracing(results: dict) -> str:
    lines = [f"{'tracing':8} {'scenario':18} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
             "  gateway CPU us/request"]
    for mode in TRACING_MODES:
        for k in ("small_fixed", "small_saturation"):
            v = results[mode][k]
            lines.append(f"{mode:8} {k:18} {v['rps']:10.0f} {v['p50_ms']:8.2f} {v['p99_ms']:8.2f} "
                         f"{v['errors']:7d}  {v.get('gateway_cpu_us_per_request') or ''}")
    for mode in ("on", "dead"):
        lines.append(f"spans ({mode}): {results[mode]['spans']}")
    for k, v in results["ratios"].items():
        lines.append(f"ratio {k}: {v}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="quick run (< 60 s)")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cores", default="nghttp2,h2",
                    help="HTTP/2 cores to run the gateways on, comma-separated (first: 'isthmus')")
    ap.add_argument("--tracing", action="store_true",
                    help="measure span export instead: tracing off vs on (100%%) vs a dead collector")
    ap.add_argument("--resilience", action="store_true",
                    help="only the resilience comparison (fed, routed, guarded, mirrored) on the first core")
    ap.add_argument("--rounds", type=int, default=3,
                    help="with --resilience: interleaved rounds per name, the median reported")
    a = ap.parse_args()
    if a.resilience:
        core = next(c.strip() for c in a.cores.split(",") if c.strip())
        results = run_resilience(a.smoke, a.duration, a.rounds, core)
        print(json.dumps(results, indent=2) if a.json else report(results))
        return
    if a.tracing:
        results = run_tracing(a.smoke, a.duration)
        print(json.dumps(results, indent=2) if a.json else report_tracing(results))
        return
    cores = tuple(c.strip() for c in a.cores.split(",") if c.strip())
    results = run(a.smoke, a.duration, a.concurrency, cores)
    print(json.dumps(results, indent=2) if a.json else report(results))


if __name__ == "__main__":
    main()

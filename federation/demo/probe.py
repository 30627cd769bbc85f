"""One client call, run inside a cluster's network namespace; prints one JSON line.

The demo and the end-to-end tests run this with ``ip netns exec <ns> python -m
federation.demo.probe ...`` so a call really originates inside a cluster.

    probe http URL [--host H] [--http2] [--method M] [--data TEXT] [--header K:V ...] [--cert-dir D] [--repeat N]
    probe grpc TARGET --authority A [--name N] [--timeout S] [--stream N]
    probe tcp HOST:PORT [--data TEXT]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any


def _http(a: argparse.Namespace) -> dict[str, Any]:
    import httpx

    headers = dict(h.split(":", 1) for h in a.header)
    if a.host:
        headers["host"] = a.host
    verify: Any = True
    if a.cert_dir:  # an https URL, as the workload whose SVID is in cert.pem/key.pem/bundle.pem
        import trust

        d = a.cert_dir.rstrip("/")
        verify = trust.client_context(f"{d}/bundle.pem", f"{d}/cert.pem", f"{d}/key.pem", alpn=None)
    # One client, built before the clock starts: a latency is the call (connect, TLS,
    # request, response), not the construction of an SSL context; --repeat N makes N calls
    # on it, the later ones over the kept-alive connection.
    with httpx.Client(http1=not a.http2, http2=a.http2, timeout=a.timeout, verify=verify) as c:
        latencies = []
        for _ in range(max(1, a.repeat)):
            t0 = time.perf_counter()
            r = c.request(a.method, a.url, headers=headers, content=a.data.encode() if a.data else None)
            body = r.text[:1_000_000]
            latencies.append((time.perf_counter() - t0) * 1000)
    return {
        "ok": 200 <= r.status_code < 300,
        "status": r.status_code,
        "body": body,
        "headers": dict(r.headers),
        "http_version": r.http_version,
        "latency_ms": latencies[0],
        "latencies_ms": latencies,
    }


def _grpc(a: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from .samples import GRPC_CHAT, GRPC_SAY

    opts = [("grpc.default_authority", a.authority)] if a.authority else []
    with grpc.insecure_channel(a.target, options=opts) as ch:  # lazy: it connects in the call
        t0 = time.perf_counter()
        try:
            if a.stream:
                call = ch.stream_stream(GRPC_CHAT)
                msgs = [r.decode() for r in call(iter([f"{a.name}-{i}".encode() for i in range(a.stream)]), timeout=a.timeout)]
                body = json.dumps(msgs)
            else:
                body = ch.unary_unary(GRPC_SAY)(a.name.encode(), timeout=a.timeout).decode()
            return {"ok": True, "status": "OK", "body": body, "latency_ms": (time.perf_counter() - t0) * 1000}
        except grpc.RpcError as exc:
            return {"ok": False, "status": exc.code().name, "body": exc.details() or "",  # type: ignore[attr-defined]
                    "latency_ms": (time.perf_counter() - t0) * 1000}


def _tcp(a: argparse.Namespace) -> dict[str, Any]:
    host, _, port = a.target.rpartition(":")
    t0 = time.perf_counter()
    with socket.create_connection((host.strip("[]"), int(port)), timeout=a.timeout) as s:
        payload = a.data.encode()
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return {"ok": got == payload, "status": "echoed" if got == payload else "short", "body": got.decode(errors="replace"),
            "latency_ms": (time.perf_counter() - t0) * 1000}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m federation.demo.probe")
    sub = p.add_subparsers(dest="kind", required=True)
    h = sub.add_parser("http")
    h.add_argument("url")
    h.add_argument("--host")
    h.add_argument("--http2", action="store_true")
    h.add_argument("--method", default="GET")
    h.add_argument("--data")
    h.add_argument("--header", action="append", default=[])
    h.add_argument("--cert-dir", help="call over mTLS with the SVID in this folder")
    h.add_argument("--timeout", type=float, default=5.0)
    h.add_argument("--repeat", type=int, default=1, help="calls to make on the one client")
    g = sub.add_parser("grpc")
    g.add_argument("target")
    g.add_argument("--authority")
    g.add_argument("--name", default="demo")
    g.add_argument("--stream", type=int, default=0)
    g.add_argument("--timeout", type=float, default=5.0)
    t = sub.add_parser("tcp")
    t.add_argument("target")
    t.add_argument("--data", default="ping")
    t.add_argument("--timeout", type=float, default=5.0)
    a = p.parse_args(argv)
    try:
        result = {"http": _http, "grpc": _grpc, "tcp": _tcp}[a.kind](a)
    except Exception as exc:  # a failed call is a result, not a crash
        result = {"ok": False, "status": type(exc).__name__, "body": str(exc)[:500], "latency_ms": None}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

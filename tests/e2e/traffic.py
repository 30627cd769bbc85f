"""Steady traffic from one workload to another cluster, for tests/e2e/test_e2e_prometheus.py.

Run inside the calling cluster's network namespace (``ip netns exec <ns> python
tests/e2e/traffic.py ...``) for ``--seconds``: in a loop, an HTTP/2 POST over mTLS as
the workload whose SVID is in ``--cert-dir``, a gRPC unary call (plain text: no
identity), and a CONNECT tunnel over mTLS that echoes a few bytes.  Prints one JSON line
of counts per kind, ``{"http": [ok, failed], ...}``.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import time

import grpc
import h2.config
import h2.connection
import h2.events
import httpx

import trust
from federation.demo.samples import GRPC_SAY


def tunnel(ctx: ssl.SSLContext, address: tuple[str, int], authority: bytes, data: bytes) -> bool:
    """CONNECT to ``authority``; on its 200 send ``data`` and end our side; True if the
    same bytes come back before the stream ends."""
    with socket.create_connection(address, timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="gateway") as s:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                     header_encoding=None))
        conn.initiate_connection()
        conn.send_headers(1, [(b":method", b"CONNECT"), (b":authority", authority)])
        s.sendall(conn.data_to_send())
        got = b""
        while chunk := s.recv(65536):
            for e in conn.receive_data(chunk):
                if isinstance(e, h2.events.ResponseReceived):
                    if dict(e.headers).get(b":status") != b"200":
                        return False
                    conn.send_data(1, data, end_stream=True)
                elif isinstance(e, h2.events.DataReceived):
                    got += e.data
                    conn.acknowledge_received_data(e.flow_controlled_length, 1)
                elif isinstance(e, h2.events.StreamEnded):
                    return got == data
                elif isinstance(e, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    return False
            s.sendall(conn.data_to_send())
        return False


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--outbound", required=True, help="HOST:PORT of the cluster's outbound listener")
    p.add_argument("--cert-dir", required=True, help="the workload's SVID (cert.pem, key.pem, bundle.pem)")
    p.add_argument("--http-host", required=True)
    p.add_argument("--grpc-authority", required=True)
    p.add_argument("--tcp-authority", required=True)
    p.add_argument("--seconds", type=float, default=8.0)
    a = p.parse_args()
    host, _, port = a.outbound.rpartition(":")
    d = a.cert_dir.rstrip("/")
    ctx = trust.client_context(f"{d}/bundle.pem", f"{d}/cert.pem", f"{d}/key.pem", alpn=("h2",))
    counts = {"http": [0, 0], "grpc": [0, 0], "tcp": [0, 0]}
    deadline = time.monotonic() + a.seconds
    with httpx.Client(http2=True, verify=ctx, timeout=5) as web, \
            grpc.insecure_channel(a.outbound, options=[("grpc.default_authority", a.grpc_authority)]) as ch:
        say = ch.unary_unary(GRPC_SAY)
        while time.monotonic() < deadline:
            try:
                r = web.post(f"https://{a.outbound}/echo", content=b"x" * 2000, headers={"host": a.http_host})
                counts["http"][r.status_code != 200] += 1
            except httpx.HTTPError:
                counts["http"][1] += 1
            try:
                say(b"east", timeout=5)
                counts["grpc"][0] += 1
            except grpc.RpcError:
                counts["grpc"][1] += 1
            try:
                counts["tcp"][not tunnel(ctx, (host, int(port)), a.tcp_authority.encode(), b"y" * 3000)] += 1
            except OSError:
                counts["tcp"][1] += 1
            time.sleep(0.05)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()

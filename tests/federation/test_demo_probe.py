"""The demo's probe times calls, not client set-up: one client, reused for --repeat calls
(a real HTTP server counts the connections it accepted)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Counting(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    peers: set[tuple[str, int]] = set()

    def do_GET(self) -> None:  # noqa: N802
        _Counting.peers.add(self.client_address)
        self.send_response(200)
        self.send_header("content-length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args: object) -> None:
        pass


def test_http_probe_reuses_one_client_and_reports_each_call() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = subprocess.run([sys.executable, "-m", "federation.demo.probe", "http",
                            f"http://127.0.0.1:{server.server_address[1]}/", "--repeat", "4"],
                           capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["ok"] and doc["body"] == "hello"
    assert len(doc["latencies_ms"]) == 4 and doc["latency_ms"] == doc["latencies_ms"][0]
    assert len(_Counting.peers) == 1  # four calls, one client, one kept-alive connection

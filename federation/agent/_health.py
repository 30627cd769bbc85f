"""The agent's health endpoint (``/healthz``, ``/readyz``) for kubelet probes.

Deliberately tiny: one request per connection, GET only, no body.  ``/readyz`` turns 200
after the first full sync (every kind listed, exports published, mirrors swept).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

MAX_REQUEST = 4096


def _response(status: int, reason: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


def respond(request_line: bytes, ready: Callable[[], bool]) -> bytes:
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return _response(405, "Method Not Allowed", b"GET /healthz or /readyz\n")
    path = parts[1].split(b"?", 1)[0]
    if path == b"/healthz":
        return _response(200, "OK", b"ok\n")
    if path == b"/readyz":
        return _response(200, "OK", b"ready\n") if ready() else _response(503, "Service Unavailable", b"not synced yet\n")
    return _response(404, "Not Found", b"try /healthz or /readyz\n")


async def serve_health(host: str, port: int, ready: Callable[[], bool], *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            with trio.move_on_after(5):
                while b"\r\n" not in data and len(data) < MAX_REQUEST:
                    chunk = await stream.receive_some(1024)
                    if not chunk:
                        return
                    data += chunk
            line = data.split(b"\r\n", 1)[0]
            try:
                await stream.send_all(respond(line, ready))
            except trio.BrokenResourceError:
                pass

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)

"""Admin listener (localhost by default): ``/healthz``, ``/readyz``, ``/metrics``, ``/config``,
``/explain``.

Plain HTTP/1.1 on h11, one request per connection is plenty for probes and scrapes.
``/readyz`` is 200 once a config (file, last-known-good or federation) is in force.

``/explain?host=H[&method=M][&path=P][&header=K:V ...][&tcp=1]`` says where such a
request would go from this gateway and why, without sending it: the same
:meth:`federation.traffic.RouteSet.explain` that ``isthmus route explain`` runs, on this
gateway's state and its live peer health (``isthmus route explain --live`` asks here).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import h11
import structlog
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


@dataclass(frozen=True)
class AdminView:
    """What the admin endpoint reads of a gateway, each time it is asked."""

    ready: Callable[[], bool]
    config: Callable[[], dict[str, Any]]  # the /config document
    registry: CollectorRegistry
    # (host, method, path, headers, tcp) -> the /explain document
    explain: Callable[[str, str, str, list[tuple[str, str]], bool], dict[str, Any]] | None = None


class _BadQuery(ValueError):
    pass


def _explain_args(query: str) -> tuple[str, str, str, list[tuple[str, str]], bool]:
    q = parse_qs(query, keep_blank_values=True, max_num_fields=64)
    host = q.get("host", [""])[0]
    if not host:
        raise _BadQuery("host= is required, e.g. /explain?host=cart.shop.isthmus.local:8080&path=/api")
    method = q.get("method", ["GET"])[0].upper() or "GET"
    path = q.get("path", ["/"])[0] or "/"
    if not path.startswith("/"):
        raise _BadQuery(f"path {path!r} must start with '/'")
    headers = []
    for h in q.get("header", []):
        k, sep, v = h.partition(":")
        if not sep or not k.strip():
            raise _BadQuery(f"header {h!r} must be NAME:VALUE")
        headers.append((k.strip().lower(), v.strip()))
    tcp = q.get("tcp", ["0"])[0].lower() in ("1", "true", "yes")
    return host, method, path, headers, tcp


def _respond(view: AdminView, method: bytes, target: bytes) -> tuple[int, bytes, bytes]:
    path, _, query = target.partition(b"?")
    if method not in (b"GET", b"HEAD"):
        return 405, b"text/plain", b"method not allowed\n"
    if path == b"/healthz":
        return 200, b"text/plain", b"ok\n"
    if path == b"/readyz":
        if view.ready():
            return 200, b"text/plain", b"ready\n"
        return 503, b"text/plain", b"no config yet\n"
    if path == b"/metrics":
        return 200, CONTENT_TYPE_LATEST.encode(), generate_latest(view.registry)
    if path == b"/config":
        return 200, b"application/json", json.dumps(view.config(), indent=2).encode()
    if path == b"/explain" and view.explain is not None:
        try:
            args = _explain_args(query.decode("latin-1"))
        except _BadQuery as exc:
            return 400, b"application/json", json.dumps({"error": str(exc)}).encode()
        return 200, b"application/json", json.dumps(view.explain(*args), indent=2).encode()
    return 404, b"text/plain", b"not found: try /healthz /readyz /metrics /config /explain\n"


async def _handle(view: AdminView, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        with trio.fail_after(10):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(16384))
                    continue
                break
            if not isinstance(event, h11.Request):
                return
            status, ctype, body = _respond(view, event.method, event.target)
            head = event.method == b"HEAD"
            data = conn.send(h11.Response(status_code=status, headers=[
                (b"content-type", ctype), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]))
            assert data is not None
            if not head:
                data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)
    except (trio.TooSlowError, trio.BrokenResourceError, h11.RemoteProtocolError, OSError):
        pass
    except Exception:  # noqa: BLE001 - the admin endpoint must never take the gateway down
        structlog.get_logger("isthmus.gateway").error("admin.failed", exc_info=True)
    finally:
        await trio.aclose_forcefully(stream)


async def serve_admin(view: AdminView, listener: trio.SocketListener) -> None:
    async with listener, trio.open_nursery() as nursery:
        while True:
            stream = await listener.accept()
            nursery.start_soon(_handle, view, stream)


__all__ = ["AdminView", "serve_admin"]

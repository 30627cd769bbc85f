"""The federation's topology page: an aiohttp server beside the gRPC API.

Routes (``GET`` unless said):

    /                    the page: clusters, gateways, exported services and the live
                         traffic graph, rendered here as HTML and SVG
    /api/v1/topology     the page's data as JSON (STABLE API: ``_webdata``, README)
    /static/topology.js  the page's script (ours: it polls the JSON and redraws)
    /static/topology.css
    /login               the login form; POST checks the token and sets the cookie

Access.  By default the page binds to loopback (``--web-listen 127.0.0.1:<port>``, reach
it with ``kubectl port-forward``) and needs no login.  Bound to any other address it
needs ``--web-token-file``: every route but ``/login`` and the static files then needs
the session cookie the login sets (HttpOnly, SameSite=Strict; its value is an HMAC of the
token, so any replica with the same token file accepts it) or ``Authorization: Bearer
<token>``; anything else gets 401.  The token is compared in constant time.

Escaping.  Cluster labels, service names and rejection reasons come from clusters: every
value reaches the HTML through :func:`html.escape` (and the script sets ``textContent``,
never markup), and the Content-Security-Policy allows only our own script.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from html import escape
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from .._errors import FederationError
from .._hostport import is_loopback
from ._summaries import traffic_json
from ._webdata import topology

if TYPE_CHECKING:
    from ._server import FederationService

log = structlog.get_logger("federation.web")

COOKIE = "isthmus_session"
POLL_SECONDS = 3
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
STATIC = {"topology.js": "application/javascript", "topology.css": "text/css"}


class WebListenFailed(FederationError):
    """The page's address cannot be bound (in use, not ours)."""


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise FederationError(f"--web-token-file {path}: cannot read it: {exc.strerror}") from None
    if len(token) < 16:
        raise FederationError(f"--web-token-file {path}: the token must have at least 16 characters "
                              "(e.g. `openssl rand -hex 24 > token`)")
    return token


class TopologyWeb:
    """The aiohttp application and the data source behind it."""

    def __init__(self, service: FederationService, token: str = "", prometheus: Any = None) -> None:
        self.service = service
        self.token = token
        self.session = hmac.new(token.encode(), b"isthmus-web-session-v1", hashlib.sha256).hexdigest() if token else ""
        self.prometheus = prometheus  # a _promtraffic.PrometheusTraffic, or None: the pushed summaries
        self.app = web.Application(middlewares=[self._guard])
        self.app.add_routes([
            web.get("/", self.page), web.get("/api/v1/topology", self.api),
            web.get("/login", self.login_form), web.post("/login", self.login),
            web.get("/static/{name}", self.static),
        ])

    # -- access ---------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        if not self.token:
            return True
        cookie = request.cookies.get(COOKIE, "")
        if cookie and hmac.compare_digest(cookie, self.session):
            return True
        auth = request.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip().encode(), self.token.encode())

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path in ("/login",) or request.path.startswith("/static/") or self._authorized(request):
            resp = await handler(request)
        elif request.path.startswith("/api/"):
            resp = web.json_response({"error": "unauthorized: log in at /login or send Authorization: Bearer <token>"},
                                     status=401)
        else:
            resp = self._login_page("", status=401)
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Cache-Control"] = "no-store"
        return resp

    def _login_page(self, problem: str, status: int = 200) -> web.Response:
        body = (f"<!doctype html><html><head><meta charset=utf-8><title>Isthmus — log in</title>"
                f"<link rel=stylesheet href=/static/topology.css></head><body><main class=login>"
                f"<h1>Isthmus federation</h1><form method=post action=/login>"
                f"<label>Token <input type=password name=token autofocus required></label>"
                f"<button type=submit>Log in</button></form>"
                f"{f'<p class=problem>{escape(problem)}</p>' if problem else ''}</main></body></html>")
        return web.Response(text=body, content_type="text/html", status=status)

    async def login_form(self, request: web.Request) -> web.Response:
        return self._login_page("")

    async def login(self, request: web.Request) -> web.Response:
        if not self.token:
            raise web.HTTPSeeOther("/")
        form = await request.post()
        given = str(form.get("token", "")).strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            log.warning("web.login_refused", peer=request.remote)
            return self._login_page("invalid token", status=401)
        resp = web.HTTPSeeOther("/")
        resp.set_cookie(COOKIE, self.session, httponly=True, samesite="Strict", path="/")
        raise resp

    # -- data -----------------------------------------------------------------------------
    async def data(self) -> dict[str, Any]:
        problems: list[str] = []
        if self.prometheus is not None:
            traffic = await self.prometheus.traffic()
            problems += self.prometheus.problems()
        else:
            traffic = traffic_json(await self.service.summaries.windows())
            traffic["source"] = "summaries"
        return await topology(self.service, traffic, problems)

    async def api(self, request: web.Request) -> web.Response:
        return web.json_response(await self.data(), dumps=safe_json)

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        text = resources.files(__package__).joinpath("static", name).read_text()
        return web.Response(text=text, content_type=STATIC[name])

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=render(await self.data()), content_type="text/html")


# ---------------------------------------------------------------------- HTML


def safe_json(doc: Any) -> str:
    """JSON with ``<``, ``>`` and ``&`` as ``\\u`` escapes (as Go's encoding/json writes
    them): the same data, and no markup even where a client sniffs it as HTML."""
    text = json.dumps(doc, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v * 100:.1f}%"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f} ms"


def edge_class(e: dict[str, Any]) -> str:
    """The colour of an edge: failing (success under 95%), degraded (under 99%), ok, idle."""
    sr = e.get("success_rate")
    if sr is None:
        return "tcp" if e.get("tcp_opened") or e.get("tcp_active") else "idle"
    return "failing" if sr < 0.95 else "degraded" if sr < 0.99 else "ok"


def _table(head: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f"<p class=empty>{escape(empty)}</p>"
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def edge_label(e: dict[str, Any]) -> str:
    """An edge's figures on the graph: requests, else (opaque TCP) connections."""
    if not e["requests"] and (e.get("tcp_opened") or e.get("tcp_active")):
        return f"{e.get('cps', 0.0):.1f} conn/s · {e['tcp_active']} open"
    return f"{e['rps']:.1f} rps · {_pct(e['success_rate'])} · p99 {_ms(e['p99_ms'])}"


def link_geometry(a: dict[str, Any], b: dict[str, Any], nth: int) -> tuple[str, float, float]:
    """The path of a link from cluster node ``a`` to service node ``b`` and where its label
    goes (just left of the service; the ``nth`` link into one service one line higher).
    The script draws the same (static/topology.js)."""
    x1, y1, x2, y2 = a["x"] + 60, a["y"], b["x"] - 70, b["y"]
    cx = (x1 + x2) / 2
    return f"M{x1},{y1} C{cx},{y1} {cx},{y2} {x2},{y2}", x2 - 8, y2 - 8 - 15 * nth


def render_graph(d: dict[str, Any]) -> str:
    g = d["graph"]
    pos = {n["id"]: n for n in g["nodes"]}
    edges = {e["id"]: e for e in d["edges"]}
    parts = [f'<svg id=graph xmlns="http://www.w3.org/2000/svg" width="{g["width"]}" height="{g["height"]}" '
             f'viewBox="0 0 {g["width"]} {g["height"]}" role=img aria-label="traffic graph">']
    into: dict[str, int] = {}
    for link in g["links"]:
        a, b, e = pos.get(link["source"]), pos.get(link["target"]), edges.get(link["edge"])
        if a is None or b is None or e is None:
            continue
        nth = into[link["target"]] = into.get(link["target"], -1) + 1
        path, lx, ly = link_geometry(a, b, nth)
        parts.append(f'<g class="edge {edge_class(e)}" data-edge="{escape(e["id"])}" tabindex=0>'
                     f'<path d="{path}"/><text class=label x="{lx}" y="{ly}">{escape(edge_label(e))}</text></g>')
    for n in g["nodes"]:
        cls = "cluster" if n["kind"] == "cluster" else "service"
        w = 120 if cls == "cluster" else 140
        parts.append(f'<g class="node {cls}" data-node="{escape(n["id"])}"><rect x="{n["x"] - w // 2}" '
                     f'y="{n["y"] - 20}" width="{w}" height="40" rx="8"/>'
                     f'<text x="{n["x"]}" y="{n["y"] + 5}">{escape(n["label"])}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def render(d: dict[str, Any]) -> str:
    """The whole page, server side (the script redraws the same from the JSON)."""
    clusters = _table(
        ["cluster", "state", "labels", "exports", "CA expires in"],
        [[escape(c["name"]), f'<span class="state {escape(c["state"].split()[0].lower())}">{escape(c["state"])}</span>',
          escape(", ".join(f"{k}={v}" for k, v in c["labels"].items())), str(c["exports"]),
          "–" if c["cert_days_left"] is None else f'{c["cert_days_left"]} days'] for c in d["clusters"]],
        "no cluster has joined yet")
    gateways = _table(
        ["gateway", "state", "config rev", "policies", "routes", "rejected"],
        [[escape(g["gateway_id"]), escape(g["state"].split(":")[0]), str(g["applied_revision"]),
          "applied" if g["enforces_policy"] else "behind", "applied" if g["routes_applied"] else "behind",
          (f'rev {g["rejected_revision"]}: {escape(g["rejected_reason"])}' if g["rejected_revision"] else "–")]
         for g in d["gateways"]],
        "no gateway reports")
    services = _table(
        ["service", "exported by", "may be imported by", "ports"],
        [[escape(f'{s["namespace"]}/{s["name"]}'), escape(", ".join(s["exported_by"])),
          escape(", ".join(s["importable_by"]) or "nobody"),
          escape(", ".join(f'{p["port"]}/{p["protocol"]}' for p in s["ports"]))] for s in d["services"]],
        "no service is exported")
    problems = "".join(f"<p class=problem>{escape(p)}</p>" for p in d["problems"])
    when = time.strftime("%H:%M:%S", time.gmtime(d["generated_at"]))
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Isthmus federation</title>"
        "<meta name=viewport content='width=device-width'>"
        "<link rel=stylesheet href=/static/topology.css></head>"
        f"<body data-poll='{POLL_SECONDS}'><header><h1>Isthmus federation</h1>"
        f"<span id=meta>config revision {d['config_revision']} · traffic of the last {int(d['window_seconds'])} s "
        f"from {escape(d['source'])} · updated <time id=updated>{when}</time> UTC</span></header>"
        f"<div id=problems>{problems}</div>"
        f"<section><h2>Traffic</h2><div id=graph-box>{render_graph(d)}</div>"
        "<aside id=detail hidden><h3 id=detail-title></h3><table id=detail-red><thead><tr><th>time</th>"
        "<th>req/s</th><th>errors/s</th><th>p99</th></tr></thead><tbody></tbody></table>"
        "<p>Routes: <span id=detail-routes></span></p><p>Policies: <span id=detail-policies></span></p></aside>"
        "</section>"
        f"<section><h2>Clusters</h2><div id=clusters>{clusters}</div></section>"
        f"<section><h2>Gateways</h2><div id=gateways>{gateways}</div></section>"
        f"<section><h2>Exported services</h2><div id=services>{services}</div></section>"
        "<script src=/static/topology.js defer></script></body></html>"
    )


# ---------------------------------------------------------------------- serving


async def start_web(service: FederationService, listen: str, token_file: Path | None = None,
                    prometheus_url: str = "") -> web.AppRunner:
    """Serve the page on ``listen`` (HOST:PORT); a non-loopback host needs a token file."""
    from ._serve import split_hostport

    host, port = split_hostport(listen, "--web-listen address")
    token = read_token(token_file) if token_file else ""
    if not is_loopback(host) and not token:
        raise FederationError(
            f"--web-listen {listen}: the topology page binds to a non-loopback address only with "
            "--web-token-file (a login token); or bind it to 127.0.0.1 and use kubectl port-forward")
    prom = None
    if prometheus_url:
        from ._promtraffic import PrometheusTraffic

        prom = PrometheusTraffic(prometheus_url)
    site_app = TopologyWeb(service, token, prom)
    runner = web.AppRunner(site_app.app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise WebListenFailed(f"--web-listen {listen}: cannot listen there: {exc.strerror}") from None
    log.info("web.serving", url=f"http://{listen}/", login=bool(token), source="prometheus" if prom else "summaries")
    return runner


// The topology page's script (Isthmus' own; no library).  Every few seconds it fetches
// /api/v1/topology (the stable JSON the server renders the page from) and redraws the
// graph and the tables.  Every value from the JSON is set as textContent or an
// attribute, never as markup: names come from clusters.
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const poll = (Number(document.body.dataset.poll) || 3) * 1000;
  let selected = null;
  let last = null;

  function el(tag, attrs, text, ns) {
    const e = ns ? document.createElementNS(SVG, tag) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  const pct = (v) => (v === null || v === undefined ? "–" : (v * 100).toFixed(1) + "%");
  const ms = (v) => (v === null || v === undefined ? "–" : v.toFixed(1) + " ms");
  function edgeClass(e) {
    const sr = e.success_rate;
    if (sr === null || sr === undefined) return e.tcp_opened || e.tcp_active ? "tcp" : "idle";
    return sr < 0.95 ? "failing" : sr < 0.99 ? "degraded" : "ok";
  }

  function edgeLabel(e) {
    if (!e.requests && (e.tcp_opened || e.tcp_active)) return `${(e.cps || 0).toFixed(1)} conn/s · ${e.tcp_active} open`;
    return `${e.rps.toFixed(1)} rps · ${pct(e.success_rate)} · p99 ${ms(e.p99_ms)}`;
  }

  function table(head, rows, empty) {
    if (!rows.length) return el("p", { class: "empty" }, empty);
    const t = el("table"), th = el("thead"), tr = el("tr"), tb = el("tbody");
    head.forEach((h) => tr.appendChild(el("th", {}, h)));
    th.appendChild(tr);
    rows.forEach((r) => {
      const row = el("tr");
      r.forEach((c) => row.appendChild(c instanceof Node ? wrap(c) : el("td", {}, c)));
      tb.appendChild(row);
    });
    t.append(th, tb);
    return t;
  }
  function wrap(node) { const td = el("td"); td.appendChild(node); return td; }
  function replace(id, node) { const box = document.getElementById(id); box.replaceChildren(node); }

  function drawGraph(d) {
    const g = d.graph;
    const svg = el("svg", { id: "graph", width: g.width, height: g.height,
      viewBox: `0 0 ${g.width} ${g.height}`, role: "img", "aria-label": "traffic graph" }, null, true);
    const pos = new Map(g.nodes.map((n) => [n.id, n]));
    const edges = new Map(d.edges.map((e) => [e.id, e]));
    const into = new Map();
    for (const link of g.links) {
      const a = pos.get(link.source), b = pos.get(link.target), e = edges.get(link.edge);
      if (!a || !b || !e) continue;
      // The same geometry as the server's (federation/server/_web.py, link_geometry).
      const nth = (into.has(link.target) ? into.get(link.target) : -1) + 1;
      into.set(link.target, nth);
      const x1 = a.x + 60, y1 = a.y, x2 = b.x - 70, y2 = b.y, cx = (x1 + x2) / 2;
      const grp = el("g", { class: "edge " + edgeClass(e) + (selected === e.id ? " selected" : ""),
        "data-edge": e.id, tabindex: 0 }, null, true);
      grp.appendChild(el("path", { d: `M${x1},${y1} C${cx},${y1} ${cx},${y2} ${x2},${y2}` }, null, true));
      grp.appendChild(el("text", { class: "label", x: x2 - 8, y: y2 - 8 - 15 * nth }, edgeLabel(e), true));
      svg.appendChild(grp);
    }
    for (const n of g.nodes) {
      const w = n.kind === "cluster" ? 120 : 140;
      const grp = el("g", { class: "node " + n.kind, "data-node": n.id }, null, true);
      grp.appendChild(el("rect", { x: n.x - w / 2, y: n.y - 20, width: w, height: 40, rx: 8 }, null, true));
      grp.appendChild(el("text", { x: n.x, y: n.y + 5 }, n.label, true));
      svg.appendChild(grp);
    }
    replace("graph-box", svg);
  }

  function drawTables(d) {
    replace("clusters", table(["cluster", "state", "labels", "exports", "CA expires in"],
      d.clusters.map((c) => [c.name, el("span", { class: "state " + c.state.split(" ")[0].toLowerCase() }, c.state),
        Object.entries(c.labels).map(([k, v]) => `${k}=${v}`).join(", "), String(c.exports),
        c.cert_days_left === null ? "–" : `${c.cert_days_left} days`]), "no cluster has joined yet"));
    replace("gateways", table(["gateway", "state", "config rev", "policies", "routes", "rejected"],
      d.gateways.map((g) => [g.gateway_id, g.state.split(":")[0], String(g.applied_revision),
        g.enforces_policy ? "applied" : "behind", g.routes_applied ? "applied" : "behind",
        g.rejected_revision ? `rev ${g.rejected_revision}: ${g.rejected_reason}` : "–"]), "no gateway reports"));
    replace("services", table(["service", "exported by", "may be imported by", "ports"],
      d.services.map((s) => [`${s.namespace}/${s.name}`, s.exported_by.join(", "),
        s.importable_by.join(", ") || "nobody", s.ports.map((p) => `${p.port}/${p.protocol}`).join(", ")]),
      "no service is exported"));
    const probs = document.getElementById("problems");
    probs.replaceChildren(...d.problems.map((p) => el("p", { class: "problem" }, p)));
    document.getElementById("updated").textContent = new Date(d.generated_at * 1000).toISOString().slice(11, 19);
  }

  function drawDetail(d) {
    const box = document.getElementById("detail");
    const e = selected && d.edges.find((x) => x.id === selected);
    if (!e) { box.hidden = true; return; }
    box.hidden = false;
    document.getElementById("detail-title").textContent =
      `${e.source_cluster} → ${e.namespace}/${e.service}@${e.destination_cluster}: ` +
      `${e.rps.toFixed(2)} req/s, ${pct(e.success_rate)} success, p50 ${ms(e.p50_ms)}, p99 ${ms(e.p99_ms)}, ` +
      `${e.tcp_active} TCP open`;
    const tb = document.querySelector("#detail-red tbody");
    tb.replaceChildren(...e.recent.slice().reverse().map((s) => {
      const tr = el("tr");
      [new Date(s.at * 1000).toISOString().slice(11, 19), s.rps.toFixed(2), s.error_rate.toFixed(2), ms(s.p99_ms)]
        .forEach((c) => tr.appendChild(el("td", {}, c)));
      return tr;
    }));
    document.getElementById("detail-routes").textContent = e.routes.join(", ") || "none";
    document.getElementById("detail-policies").textContent = e.policies.join(", ") || "none";
  }

  function draw(d) { last = d; drawGraph(d); drawTables(d); drawDetail(d); }

  document.getElementById("graph-box").addEventListener("click", (ev) => {
    const g = ev.target.closest("g.edge");
    selected = g ? g.getAttribute("data-edge") : null;
    if (last) draw(last);
  });

  async function refresh() {
    try {
      const r = await fetch("/api/v1/topology", { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { location.assign("/login"); return; }
      if (r.ok) draw(await r.json());
    } catch (err) {
      // The federation replica is away: keep what is shown, try again on the next tick.
    }
  }
  setInterval(refresh, poll);
  refresh();
})();

// The sidemesh dashboard page: renders what the server pushes over /events (server-sent events).
// All numbers are computed by the server (sidemesh/dashboard/*.py); this file only lays them out.
// The timeline is drawn by uPlot; the graph is plain SVG elements placed on the server's columns.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const MODE_COLOURS = { controlplane: "#2563eb", dns: "#d97706", cache: "#7c3aed", connecting: "#6b7280",
                         unreachable: "#dc2626", inbound: "#374151" };
  const SERVICE_COLOURS = ["#0f766e", "#2563eb", "#9333ea", "#c2410c", "#4d7c0f", "#be185d", "#0369a1"];
  const NODE_W = 210, COL_GAP = 520, ROW_GAP = 34, HEAD_H = 44, INST_H = 20, PAD = 16;

  const state = { view: null, points: [], events: [], historyS: 300, offset: 0, chart: null, chartKey: "" };
  window.sidemeshDashboard = state;  // for people poking at it in the console, and for tests

  // ----- small helpers -----
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, v);
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, v);
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function serverNow() { return Date.now() / 1000 + state.offset; }
  function age(seconds) {
    if (seconds === null || seconds === undefined || isNaN(seconds)) return "-";
    seconds = Math.max(0, seconds);
    if (seconds < 60) return seconds.toFixed(seconds < 10 ? 1 : 0) + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " m " + String(Math.floor(seconds % 60)).padStart(2, "0") + " s";
    return Math.floor(seconds / 3600) + " h " + String(Math.floor(seconds % 3600 / 60)).padStart(2, "0") + " m";
  }
  function clock(t) { return new Date(t * 1000).toLocaleTimeString([], { hour12: false }); }
  function rate(x) { return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2); }
  function modeClass(s) { return s.reachable ? (s.mode || "connecting") : "unreachable"; }
  function modeText(s) { return s.reachable ? (s.mode || "?") : (s.unit_state && s.unit_state !== "running" ? s.unit_state : "unreachable"); }
  function badge(text, cls) { return el("span", { class: "badge " + cls, "data-mode": cls }, text); }

  // ----- header -----
  function renderSummary(view) {
    const box = document.getElementById("summary");
    const cp = view.controlplane, sc = view.sidecars;
    const counts = {};
    for (const s of sc) { const m = modeClass(s); counts[m] = (counts[m] || 0) + 1; }
    const modes = Object.entries(counts).map(([m, n]) => `${n} on ${m}`).join(", ") || "no sidecars";
    const errors = view.graph.edges.reduce((a, e) => a + e.errors_rps, 0);
    const cpText = cp.reachable ? "control plane up" : `control plane ${cp.unit_state && cp.unit_state !== "running" ? cp.unit_state.toUpperCase() : "UNREACHABLE"}`;
    box.textContent = `${cpText} \u00b7 ${sc.length} sidecars: ${modes} \u00b7 ${rate(errors)} errors/s`;
    box.classList.toggle("outage", !cp.reachable);
    document.getElementById("window").textContent = `(rates, errors and p99 over the last ${view.window_s} s)`;
  }

  // ----- control plane -----
  function renderControlPlane(view) {
    const cp = view.controlplane, box = document.getElementById("cp");
    box.replaceChildren();
    const head = el("div", { class: "line" });
    head.append(cp.reachable ? badge("reachable", "ok") : badge(cp.unit_state && cp.unit_state !== "running" ? cp.unit_state : "unreachable", "bad"));
    head.append(" " + (cp.address || "address unknown"));
    head.id = "cp-state";
    head.dataset.reachable = String(!!cp.reachable);
    box.append(head);
    const version = cp.reachable ? cp.version : cp.last_version;
    box.append(el("div", { class: "line" }, `version ${version || "-"}${cp.reachable ? "" : " (last known)"}`));
    if (cp.started_at) {
      box.append(el("div", { class: "line" }, cp.reachable ? `up for ${age(serverNow() - cp.started_at)}` : `last started ${clock(cp.started_at)}`));
    }
    if (cp.warming_up) box.append(el("div", { class: "line" }, "warming up: holding its first push"));
    const faults = cp.faults || {};
    const active = [faults.empty_snapshot ? "empty-snapshot" : null, ...(faults.dropped_services || []).map(s => "drop-service " + s)].filter(Boolean);
    if (active.length) box.append(el("div", { class: "line problem" }, "faults: " + active.join(", ")));
    if (!cp.reachable) box.append(el("div", { class: "line problem" }, cp.error || "no answer"));
    if (cp.as_of) box.append(el("div", { class: "note" }, `ACK state as of its last answer, ${clock(cp.as_of)}`));
    const table = document.getElementById("acks");
    table.classList.toggle("stale", !!cp.as_of);
    const body = table.tBodies[0];
    body.replaceChildren();
    for (const a of cp.acks) {
      const tr = el("tr", { "data-node": a.node_id });
      tr.append(el("td", {}, a.node_id || `${a.service}@${a.address}`), el("td", { class: "num" }, a.acked_version || "-"));
      const st = el("td", { class: a.status === "synced" ? "" : "problem" }, a.status || "-");
      if (a.last_nack) st.title = "last NACK: " + a.last_nack;
      tr.append(st);
      body.append(tr);
    }
    if (!cp.acks.length) {
      const tr = el("tr");
      tr.append(el("td", { colspan: 3, class: "note" }, cp.reachable ? "no sidecar streams" : "never answered"));
      body.append(tr);
    }
  }

  // ----- sidecars -----
  function renderSidecars(view) {
    const body = document.querySelector("#sidecars tbody");
    body.replaceChildren();
    for (const s of view.sidecars) {
      const tr = el("tr", { "data-instance": s.instance || s.admin, "data-service": s.service });
      tr.append(el("td", {}, s.instance || "?"), el("td", {}, s.address || s.admin));
      const mode = el("td", { class: "mode" });
      mode.append(badge(modeText(s), modeClass(s)));
      tr.append(mode);
      tr.append(el("td", { class: "num since", "data-since": s.reachable ? s.mode_since : null }, s.reachable ? age(serverNow() - s.mode_since) : "-"));
      tr.append(el("td", { class: "num" }, s.route_version || "-"));
      tr.append(el("td", { class: "num" }, s.acked ? `${s.acked} (${s.synced})` : "-"));
      const guards = Object.entries(s.guards || {});
      tr.append(el("td", { class: guards.length ? "problem" : "" }, guards.map(([svc, why]) => `${svc}: ${why}`).join("; ") || "-"));
      const rej = el("td", { class: s.rejected ? "problem" : "" }, s.rejected ? `${s.rejected}, last: ${s.last_rejected.reason}` : "0");
      tr.append(rej);
      // the gRPC status code says enough in a table cell; the whole message is the cell's tooltip
      const why = s.controlplane_error || "not connected";
      const code = (why.match(/\b[A-Z][A-Z_]{3,}\b/) || [why.slice(0, 40)])[0];
      const link = !s.reachable ? (s.error || "no answer") : s.controlplane_connected ? "connected" : "lost: " + code;
      tr.append(el("td", { class: s.controlplane_connected ? "" : "problem", title: s.controlplane_connected ? null : why }, link));
      body.append(tr);
    }
  }
  function tickAges() {
    for (const td of document.querySelectorAll("#sidecars td.since[data-since]")) {
      td.textContent = age(serverNow() - Number(td.dataset.since));
    }
  }

  // ----- graph -----
  function renderGraph(view) {
    const g = document.getElementById("graph");
    const { nodes, edges } = view.graph;
    const pos = {}, colHeight = {};
    for (const n of nodes) {
      const h = HEAD_H + INST_H * Math.max(n.instances.length, n.kind === "clients" ? 0 : 1) + 8;
      const y = colHeight[n.column] || PAD;
      pos[n.id] = { x: PAD + n.column * COL_GAP, y: y, h: h };
      colHeight[n.column] = y + h + ROW_GAP;
    }
    const width = PAD * 2 + NODE_W + COL_GAP * Math.max(0, ...nodes.map(n => n.column));
    const height = Math.max(120, ...Object.values(colHeight));
    g.replaceChildren();
    g.setAttribute("width", width); g.setAttribute("height", height);
    g.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const defs = svg("defs");
    for (const [name, colour] of Object.entries(MODE_COLOURS)) {
      const m = svg("marker", { id: "arrow-" + name, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
      m.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: colour }));
      defs.append(m);
    }
    g.append(defs);
    for (const e of edges) {
      const a = pos[e.from], b = pos[e.to];
      if (!a || !b) continue;
      const x1 = a.x + NODE_W, y1 = a.y + a.h / 2, x2 = b.x - 2, y2 = b.y + b.h / 2, mx = (x1 + x2) / 2;
      const kind = (e.source || "").split("/")[0] || "connecting";
      const colour = MODE_COLOURS[kind] || MODE_COLOURS.connecting;
      const grp = svg("g", { class: "edge" + (e.errors_rps > 0 ? " errors" : ""), "data-edge": e.id, "data-rps": e.rps,
                             "data-error-rate": e.error_rate, "data-p99-ms": e.p99_ms, "data-source": e.source || "" });
      grp.append(svg("path", { d: `M ${x1} ${y1} C ${mx} ${y1}, ${mx} ${y2}, ${x2} ${y2}`, stroke: colour,
                               "marker-end": `url(#arrow-${MODE_COLOURS[kind] ? kind : "connecting"})` }));
      // labels over the last stretch of the edge, where it runs level into its target: edges that
      // leave one node for several targets keep their labels apart
      const lx = x1 + (x2 - x1) * 0.6;
      grp.append(svg("text", { x: lx, y: y2 - 22, "text-anchor": "middle", class: "rates" },
        `${rate(e.rps)} req/s \u00b7 ${(e.error_rate * 100).toFixed(1)}% errors`));
      grp.append(svg("text", { x: lx, y: y2 - 8, "text-anchor": "middle" },
        `p99 ${e.p99_ms === null ? "-" : e.p99_ms.toFixed(1) + " ms"} \u00b7 via ${e.source || "?"}`));
      const mix = Object.entries(e.sources || {}).filter(([, share]) => share < 0.995).map(([s, share]) => `${s} ${(share * 100).toFixed(0)}%`).join(", ");
      if (mix) grp.append(svg("text", { x: lx, y: y2 + 16, "text-anchor": "middle", class: "mix" }, `last ${state.view.window_s} s: ${mix}`));
      g.append(grp);
    }
    for (const n of nodes) {
      const p = pos[n.id];
      const grp = svg("g", { class: "node " + n.kind, "data-service": n.id, transform: `translate(${p.x},${p.y})` });
      grp.append(svg("rect", { class: "box", width: NODE_W, height: p.h, rx: 8 }));
      grp.append(svg("text", { x: 12, y: 20, class: "title" }, n.kind === "clients" ? "clients (outside the mesh)" : n.id));
      grp.append(svg("text", { x: 12, y: 36, class: "sub" }, n.kind === "clients" ? "" : `${rate(n.rps)} req/s in \u00b7 ${rate(n.errors_rps)} errors/s`));
      n.instances.forEach((inst, i) => {
        const mode = inst.reachable ? (inst.mode || "connecting") : "unreachable";
        const row = svg("g", { class: "instance", "data-instance": inst.instance, "data-mode": mode, transform: `translate(12,${HEAD_H + 6 + i * INST_H})` });
        row.append(svg("circle", { cx: 5, cy: 0, r: 5, fill: MODE_COLOURS[mode] || MODE_COLOURS.connecting }));
        row.append(svg("text", { x: 16, y: 4 }, `${inst.instance} \u00b7 ${mode} \u00b7 ${rate(inst.rps)} req/s`));
        grp.append(row);
      });
      g.append(grp);
    }
  }

  // ----- timeline (uPlot) -----
  function timelineData(services) {
    const pts = state.points;
    const xs = pts.map(p => p.t);
    const data = [xs];
    for (const s of services) data.push(pts.map(p => (p.s[s] ? p.s[s][0] : 0)));
    for (const s of services) data.push(pts.map(p => (p.s[s] ? p.s[s][1] : 0)));
    data.push(pts.map(p => (p.cp === 0 ? 1 : p.cp === 1 ? 0 : null)));
    const marks = { mode: xs.map(() => null), "controlplane-down": xs.map(() => null), "controlplane-up": xs.map(() => null) };
    for (const e of state.events) {
      if (!xs.length || !(e.kind in marks)) continue;
      let i = xs.findIndex(t => t >= e.at);
      if (i < 0) i = xs.length - 1;
      marks[e.kind][i] = 1;
    }
    data.push(marks.mode, marks["controlplane-down"], marks["controlplane-up"]);
    return data;
  }
  function timelineOpts(services, width) {
    const series = [{}];
    services.forEach((s, i) => series.push({ label: `${s} req/s`, stroke: SERVICE_COLOURS[i % SERVICE_COLOURS.length], width: 2, scale: "rps", value: (u, v) => v === null ? "-" : rate(v) }));
    services.forEach((s, i) => series.push({ label: `${s} errors/s`, stroke: "#dc2626", dash: [5, 4], width: 1.5, scale: "rps", value: (u, v) => v === null ? "-" : rate(v) }));
    const flag = { scale: "flag", points: { show: false }, value: (u, v) => (v ? "\u25cf" : "") };
    series.push({ ...flag, label: "control plane down", stroke: "rgba(220,38,38,0)", fill: "rgba(220,38,38,0.13)", width: 0, paths: uPlot.paths.stepped({ align: 1 }) });
    series.push({ ...flag, label: "mode change", stroke: "#d97706", fill: "#d97706", paths: uPlot.paths.bars({ size: [1, 3, 3] }) });
    series.push({ ...flag, label: "control plane killed/stopped", stroke: "#dc2626", fill: "#dc2626", paths: uPlot.paths.bars({ size: [1, 4, 4] }) });
    series.push({ ...flag, label: "control plane started", stroke: "#15803d", fill: "#15803d", paths: uPlot.paths.bars({ size: [1, 4, 4] }) });
    return {
      width: width, height: 240, series: series,
      scales: { x: { time: true }, rps: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] }, flag: { range: [0, 1] } },
      axes: [{}, { scale: "rps", label: "requests/s" }],
      legend: { live: true },
    };
  }
  function renderTimeline() {
    const services = [...new Set(state.points.flatMap(p => Object.keys(p.s)))].sort();
    const key = services.join(",");
    const box = document.getElementById("timeline");
    const data = timelineData(services);
    if (!state.chart || state.chartKey !== key) {
      if (state.chart) state.chart.destroy();
      state.chart = new uPlot(timelineOpts(services, Math.max(300, box.clientWidth)), data, box);
      state.chartKey = key;
    } else {
      state.chart.setData(data);
    }
  }
  function renderEvents() {
    const list = document.getElementById("events");
    list.replaceChildren();
    for (const e of state.events.slice(-200).reverse()) {
      const li = el("li", { class: e.kind, "data-kind": e.kind, "data-at": e.at });
      li.append(el("time", {}, clock(e.at)), document.createTextNode(e.text + (e.reason ? ` (${e.reason})` : "")));
      list.append(li);
    }
    document.getElementById("history").textContent = `(last ${Math.round(state.historyS / 60)} minutes; shaded: control plane down)`;
  }

  // ----- the stream -----
  function render() {
    const view = state.view;
    if (!view) return;
    renderSummary(view);
    renderControlPlane(view);
    renderSidecars(view);
    renderGraph(view);
    renderTimeline();
    renderEvents();
    document.getElementById("updated").textContent = "updated " + clock(view.at);
  }
  function setView(view) {
    if (!view) return;
    state.view = view;
    state.offset = view.at - Date.now() / 1000;
  }
  function connect() {
    const link = document.getElementById("link");
    const source = new EventSource("/events");
    source.addEventListener("open", () => { link.textContent = "live"; link.className = "link up"; });
    source.addEventListener("error", () => { link.textContent = "reconnecting"; link.className = "link down"; });
    source.addEventListener("history", (msg) => {
      const doc = JSON.parse(msg.data);
      state.points = doc.points; state.events = doc.events; state.historyS = doc.history_s;
      setView(doc.view);
      render();
    });
    source.addEventListener("tick", (msg) => {
      const doc = JSON.parse(msg.data);
      state.points.push(doc.point);
      state.events.push(...doc.events);
      const since = doc.point.t - state.historyS;
      while (state.points.length && state.points[0].t < since) state.points.shift();
      while (state.events.length && state.events[0].at < since) state.events.shift();
      setView(doc.view);
      render();
    });
  }
  window.addEventListener("resize", () => {
    if (state.chart) state.chart.setSize({ width: Math.max(300, document.getElementById("timeline").clientWidth), height: 240 });
  });
  setInterval(tickAges, 1000);
  connect();
})();

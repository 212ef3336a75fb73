// tidings console: live view of the broker over server-sent events, plain JavaScript.
// Everything the broker sends is put on the page as text (textContent), never as HTML.
"use strict";
(function () {
  const HISTORY = 120;             // points kept per rate series (two minutes at one per second)
  const state = {
    session: null, snap: null, page: "overview",
    rates: {in: [], out: []},      // the chart's series: rate_in / rate_out per snapshot
    peek: {name: null, offset: 0, limit: 20},
  };
  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- formatting

  function num(n) {
    if (n === null || n === undefined) return "–";
    return Math.round(n).toLocaleString("en-US");
  }
  function rate(n) {
    if (n === null || n === undefined) return "–";
    if (n >= 10000) return (n / 1000).toFixed(1) + "k";
    return n >= 100 ? Math.round(n).toLocaleString("en-US") : n.toFixed(n > 0 && n < 10 ? 1 : 0);
  }
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(n < 10 ? 1 : 0) : n) + " " + units[i];
  }
  function duration(s) {
    if (s === null || s === undefined) return "–";
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + (s % 60) + "s";
    return s + "s";
  }
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("data-")) e.setAttribute(k, v);
      else if (k === "title") e.title = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  function td(text, cls) { return el("td", {class: cls, text: text}); }

  function toast(message, error) {
    const t = el("div", {class: "toast" + (error ? " toast-error" : ""), role: error ? "alert" : "status", text: message});
    $("toasts").append(t);
    setTimeout(() => t.remove(), error ? 8000 : 4000);
  }

  // ---------------------------------------------------------------- requests

  async function api(method, path, body) {
    const headers = {};
    if (method !== "GET") {
      headers["X-CSRF-Token"] = state.session ? state.session.csrf : "";
      headers["Content-Type"] = "application/json";
    }
    const resp = await fetch(path, {method, headers, credentials: "same-origin",
                                    body: body === undefined ? undefined : JSON.stringify(body)});
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (resp.status === 401) { window.location.assign("/console/login"); throw new Error("signed out"); }
    if (!resp.ok) {
      const err = new Error(data && data.message ? data.message : "HTTP " + resp.status);
      err.code = data && data.error;
      throw err;
    }
    return data;
  }

  // ---------------------------------------------------------------- navigation

  function showPage() {
    const want = (location.hash.replace(/^#\//, "") || "overview");
    state.page = ["overview", "queues", "streams", "connections", "schemas"].includes(want) ? want : "overview";
    for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.page === state.page);
    for (const s of document.querySelectorAll(".page")) s.hidden = s.id !== "page-" + state.page;
    document.body.dataset.page = state.page;
    render();
  }

  // ---------------------------------------------------------------- overview

  function card(label, value, sub, warn) {
    return el("div", {class: "card" + (warn ? " warn" : "")},
              el("div", {class: "label", text: label}), el("div", {class: "value", text: value}),
              sub ? el("div", {class: "sub", text: sub}) : null);
  }

  function renderOverview(s) {
    const t = s.totals, r = s.resources, lim = s.limits;
    const cards = [
      card("In/s", rate(t.rate_in), s.scope === "broker" ? "published" : "your queues, streams"),
      card("Out/s", rate(t.rate_out), "delivered"),
      card("Connections", num(t.connections), s.scope === "broker" ? num(t.subscriptions) + " subscriptions" : "yours"),
      card("Queues", num(t.queues)), card("Streams", num(t.streams)),
    ];
    if (r) {
      cards.push(card("Memory", bytes(r.rss), lim && lim.memory_high_water ? "limit " + bytes(lim.memory_high_water) : "resident",
                      lim && lim.memory_high));
      cards.push(card("Disk free", bytes(r.disk_free), lim && lim.min_free_disk ? "min " + bytes(lim.min_free_disk) : "data directory",
                      lim && lim.disk_low));
      cards.push(card("Database", bytes(r.db_bytes), "WAL " + bytes(r.wal_bytes)));
    }
    cards.push(card("Durability", s.broker.durability, s.broker.durability === "full" ? "power-loss safe" : "crash safe"));
    $("cards").replaceChildren(...cards);
    const facts = [["Server", s.broker.server_name], ["Address", s.broker.address || "–"],
                   ["Uptime", duration(s.broker.uptime)], ["Ready", s.broker.ready ? "yes" : "no"],
                   ["Protocol", String(s.broker.version)], ["Process", String(s.broker.pid)],
                   ["Sign-in", s.broker.auth ? "broker users" : "none (loopback only)"], ["TLS", s.broker.tls ? "on" : "off"]];
    if (s.scope === "broker") {
      facts.push(["Published", num(t.published)], ["Confirmed", num(t.confirmed)],
                 ["Dropped (slow)", num(t.dropped)], ["Store backlog", num(t.store_pending)]);
    }
    $("facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {text: k}), el("dd", {text: v})]));
    drawChart();
  }

  function pushRates(s) {
    for (const [key, v] of [["in", s.totals.rate_in], ["out", s.totals.rate_out]]) {
      if (v === null || v === undefined) continue;
      const series = state.rates[key];
      series.push(v);
      if (series.length > HISTORY) series.shift();
    }
    const c = $("chart-rates");
    c.dataset.points = String(state.rates.in.length);
    c.dataset.lastIn = String(state.rates.in.length ? state.rates.in[state.rates.in.length - 1] : 0);
    c.dataset.lastOut = String(state.rates.out.length ? state.rates.out[state.rates.out.length - 1] : 0);
    c.dataset.maxIn = String(Math.max(0, ...state.rates.in));
  }

  function niceMax(v) {
    if (v <= 5) return 5;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function drawChart() {
    const c = $("chart-rates");
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth || 960, h = c.clientHeight || 260;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
    }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const pad = {l: 56, r: 14, t: 14, b: 26};
    const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
    const top = niceMax(Math.max(1, ...state.rates.in, ...state.rates.out));
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#637085"; g.strokeStyle = "#e2e7ee"; g.lineWidth = 1;
    g.textAlign = "right"; g.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = pad.t + ph - ph * i / 4;
      g.beginPath(); g.moveTo(pad.l, Math.round(y) + .5); g.lineTo(w - pad.r, Math.round(y) + .5); g.stroke();
      g.fillText(rate(top * i / 4) + "/s", pad.l - 8, y);
    }
    g.textAlign = "center"; g.textBaseline = "top";
    for (const sec of [120, 90, 60, 30, 0]) {
      const x = pad.l + pw - pw * sec / (HISTORY - 1);
      g.fillText(sec ? "-" + sec + "s" : "now", Math.min(Math.max(x, pad.l + 10), w - pad.r - 12), pad.t + ph + 8);
    }
    for (const [key, color] of [["out", "#16a34a"], ["in", "#2563eb"]]) {  // "in" drawn on top
      const series = state.rates[key];
      if (!series.length) continue;
      const x0 = pad.l + pw - pw * (series.length - 1) / (HISTORY - 1);
      const pts = series.map((v, i) => [x0 + pw * i / (HISTORY - 1), pad.t + ph - ph * Math.min(v / top, 1)]);
      g.beginPath();
      pts.forEach(([x, y], i) => (i ? g.lineTo(x, y) : g.moveTo(x, y)));
      g.strokeStyle = color; g.lineWidth = 2; g.lineJoin = "round"; g.stroke();
      g.lineTo(pts[pts.length - 1][0], pad.t + ph); g.lineTo(pts[0][0], pad.t + ph); g.closePath();
      g.globalAlpha = .08; g.fillStyle = color; g.fill(); g.globalAlpha = 1;
    }
  }

  // ---------------------------------------------------------------- tables

  function filterRows(rows, inputId, keys) {
    const f = $(inputId).value.trim().toLowerCase();
    if (!f) return rows;
    return rows.filter((r) => keys.some((k) => String(r[k] || "").toLowerCase().includes(f)));
  }

  function more(id, shown, total) {
    const p = $(id);
    p.hidden = total <= shown;
    p.textContent = total > shown ? "Showing " + shown + " of " + total + " (the first by name)." : "";
  }

  function renderQueues(s) {
    const rows = filterRows(s.queues.rows, "filter-queues", ["name"]);
    const body = $("queues").tBodies[0];
    body.replaceChildren(...rows.map((q) => {
      const btns = el("div", {class: "btns"});
      const actions = el("td", {class: "actions"}, btns);
      if (q.can_peek) btns.append(el("button", {class: "btn", type: "button", "data-action": "peek", "data-name": q.name, text: "Peek"}));
      if (q.can_admin && q.is_dlq) btns.append(el("button", {class: "btn", type: "button", "data-action": "redrive", "data-name": q.name, text: "Redrive"}));
      if (q.can_admin) btns.append(el("button", {class: "btn", type: "button", "data-action": "purge", "data-name": q.name, text: "Purge"}));
      const name = el("td", {class: "name"}, q.name);
      if (q.is_dlq) name.append(el("span", {class: "badge", text: "DLQ"}));
      if (q.bind && q.bind.length) name.title = "bound to " + q.bind.join(", ");
      return el("tr", {"data-queue": q.name}, name, td(num(q.depth), "num c-depth"), td(num(q.in_flight), "num c-inflight"),
                td(num(q.consumers), "num c-consumers"), td(q.dead_letter ? num(q.dlq_depth) : "–", "num c-dlq"),
                td(rate(q.rate_in), "num c-in"), td(rate(q.rate_out), "num c-out"), td(num(q.acked), "num"), actions);
    }));
    more("queues-more", s.queues.rows.length, s.queues.total);
    $("queues-empty").hidden = rows.length > 0;
  }

  function retention(r) {
    const parts = [];
    if (r.max_age) parts.push("age " + duration(r.max_age));
    if (r.max_messages) parts.push(num(r.max_messages) + " msgs");
    if (r.max_bytes) parts.push(bytes(r.max_bytes));
    return parts.length ? parts.join(", ") : "unlimited";
  }

  function renderStreams(s) {
    const rows = filterRows(s.streams.rows, "filter-streams", ["name"]);
    $("streams").replaceChildren(...rows.map((st) => {
      const head = el("div", {class: "stream-head"}, el("span", {class: "name", text: st.name}),
        el("span", {class: "stat"}, "partitions ", el("b", {text: String(st.partitions.length)})),
        el("span", {class: "stat"}, "messages ", el("b", {text: num(st.messages)})),
        el("span", {class: "stat"}, "in/s ", el("b", {class: "c-in", text: rate(st.rate_in)})),
        el("span", {class: "stat"}, "retention ", el("b", {text: retention(st.retention)})),
        el("span", {class: "stat"}, "readers ", el("b", {text: num(st.readers)})));
      const parts = el("table", {class: "grid"},
        el("thead", {}, el("tr", {}, el("th", {text: "Partition"}), el("th", {class: "num", text: "First"}),
                        el("th", {class: "num", text: "Next"}), el("th", {class: "num", text: "Messages"}))),
        el("tbody", {}, ...st.partitions.map((p) => el("tr", {}, td(String(p.partition)), td(num(p.first), "num"),
                                                       td(num(p.next), "num"), td(num(p.messages), "num")))));
      const groups = el("table", {class: "grid"},
        el("thead", {}, el("tr", {}, el("th", {text: "Group"}), el("th", {text: "Members"}),
                        el("th", {class: "num", text: "Lag"}), el("th", {class: "num", text: "Out/s"}),
                        el("th", {text: "Committed offsets"}))),
        el("tbody", {}, ...st.groups.map((g) => el("tr", {"data-group": g.name}, td(g.name, "name"),
          td(g.members.length ? g.members.map((m) => (m.client || "#" + m.connection) + " [" + m.partitions.join(",") + "]").join("; ") : "none", "patterns"),
          td(num(g.lag), "num c-lag"), td(rate(g.rate_out), "num"),
          td(g.partitions.map((p) => p.partition + ":" + p.committed).join("  "), "patterns")))));
      if (!st.groups.length) groups.append(el("tbody", {}, el("tr", {}, el("td", {class: "muted", colspan: "5", text: "No consumer groups."}))));
      return el("div", {class: "panel stream", "data-stream": st.name}, head,
                el("div", {class: "stream-body"}, el("div", {}, el("h3", {text: "Partitions"}), parts),
                   el("div", {}, el("h3", {text: "Consumer groups"}), groups)));
    }));
    more("streams-more", s.streams.rows.length, s.streams.total);
    $("streams-empty").hidden = rows.length > 0;
  }

  function renderConnections(s) {
    const rows = filterRows(s.connections.rows, "filter-connections", ["name", "peer", "user"]);
    const now = s.time;
    $("connections").tBodies[0].replaceChildren(...rows.map((c) => el("tr", {"data-connection": String(c.id)},
      td(String(c.id), "num"), td(c.name || "–", "name"), td(c.peer, "name"), td(c.user || "–"),
      el("td", {class: "patterns", title: c.patterns.join("\n")},
         c.subscriptions ? num(c.subscriptions) + ": " + c.patterns.join(", ") + (c.subscriptions > c.patterns.length ? ", …" : "") : "–"),
      td(num(c.consumers), "num"), td(bytes(c.pending_bytes), "num"), td(rate(c.rate_in), "num"), td(rate(c.rate_out), "num"),
      td(duration(now - c.opened) + " ago"))));
    more("connections-more", s.connections.rows.length, s.connections.total);
    $("connections-empty").hidden = rows.length > 0;
  }

  function renderSchemas(s) {
    const schemas = filterRows(s.schemas.rows, "filter-schemas", ["name"]);
    $("schemas").tBodies[0].replaceChildren(...schemas.map((x) => el("tr", {"data-schema": x.name},
      td(x.name, "name"), td(String(x.latest), "num"), td(num(x.versions), "num"), td(x.compatibility),
      td(num(x.valid), "num c-valid"), td(num(x.invalid), "num c-invalid"), td(num(x.dead_lettered), "num c-dead"))));
    more("schemas-more", s.schemas.rows.length, s.schemas.total);
    $("schemas-empty").hidden = schemas.length > 0;
    const bindings = filterRows(s.bindings.rows, "filter-schemas", ["pattern", "schema"]);
    $("bindings").tBodies[0].replaceChildren(...bindings.map((b) => el("tr", {"data-binding": b.pattern},
      td(b.pattern, "name"), td(b.schema, "name"), td(b.on_invalid === "dead_letter" ? "dead-letter" : "reject"),
      td(b.dead_letter || "–", "name"))));
    more("bindings-more", s.bindings.rows.length, s.bindings.total);
    $("bindings-empty").hidden = bindings.length > 0;
  }

  function render() {
    const s = state.snap;
    if (!s) return;
    $("server").textContent = s.broker.server_name + " · " + s.broker.durability;
    if (state.page === "overview") renderOverview(s);
    else if (state.page === "queues") renderQueues(s);
    else if (state.page === "streams") renderStreams(s);
    else if (state.page === "connections") renderConnections(s);
    else if (state.page === "schemas" && s.schemas) renderSchemas(s);
  }

  // ---------------------------------------------------------------- live updates

  function connect() {
    const live = $("live");
    const es = new EventSource("/console/events");
    es.addEventListener("open", () => { live.textContent = "live"; live.className = "live on"; });
    es.addEventListener("snapshot", (ev) => {
      const s = JSON.parse(ev.data);
      state.snap = s;
      pushRates(s);
      document.body.dataset.snapshots = String((+document.body.dataset.snapshots || 0) + 1);
      render();
    });
    es.addEventListener("end", () => {
      // the broker is shutting down, or the session ended: a 401 from the session check signs out
      es.close(); live.textContent = "stopped"; live.className = "live off";
      setTimeout(() => api("GET", "/console/api/session").then(connect, () => setTimeout(connect, 5000)), 3000);
    });
    es.addEventListener("error", () => {
      live.textContent = "reconnecting"; live.className = "live off";
      if (es.readyState === EventSource.CLOSED) setTimeout(connect, 3000);
    });
  }

  // ---------------------------------------------------------------- actions

  function confirmDialog(title, text, withTo) {
    return new Promise((resolve) => {
      const d = $("confirm");
      $("confirm-title").textContent = title;
      $("confirm-text").textContent = text;
      $("confirm-to-label").hidden = !withTo;
      $("confirm-to").value = "";
      const done = (ok) => {
        $("confirm-ok").removeEventListener("click", yes);
        $("confirm-cancel").removeEventListener("click", no);
        d.removeEventListener("cancel", no);
        d.close();
        resolve(ok ? {to: $("confirm-to").value.trim()} : null);
      };
      const yes = () => done(true), no = () => done(false);
      $("confirm-ok").addEventListener("click", yes);
      $("confirm-cancel").addEventListener("click", no);
      d.addEventListener("cancel", no);
      d.showModal();
    });
  }

  async function purge(name) {
    if (!await confirmDialog("Purge " + name + "?", "Every ready message of " + name + " is deleted. Messages in flight stay until they are settled. This cannot be undone.")) return;
    try {
      const r = await api("POST", "/console/api/queues/" + encodeURIComponent(name) + "/purge", {});
      toast("Purged " + r.purged + " message(s) from " + name + ".");
    } catch (e) { toast("Purge of " + name + " refused: " + e.message, true); }
  }

  async function redrive(name) {
    const answer = await confirmDialog("Redrive " + name + "?", "Move the messages of this dead-letter queue back to the queue they came from; their delivery counts start again.", true);
    if (!answer) return;
    try {
      const r = await api("POST", "/console/api/queues/" + encodeURIComponent(name) + "/redrive", answer.to ? {to: answer.to} : {});
      toast("Redrove " + r.redriven + " message(s) from " + name + (r.skipped ? " (" + r.skipped + " skipped: their source queue is gone)" : "") + ".");
    } catch (e) { toast("Redrive of " + name + " refused: " + e.message, true); }
  }

  async function peek(name, offset) {
    state.peek = {name, offset: Math.max(0, offset), limit: state.peek.limit};
    const d = $("peek");
    $("peek-name").textContent = name;
    const body = $("peek-body");
    try {
      const r = await api("GET", "/console/api/queues/" + encodeURIComponent(name) + "/messages?limit=" + state.peek.limit + "&offset=" + state.peek.offset);
      const from = state.peek.offset + 1, to = state.peek.offset + r.messages.length;
      $("peek-range").textContent = r.messages.length ? "messages " + from + "–" + to : "no messages from " + from;
      $("peek-prev").disabled = state.peek.offset === 0;
      $("peek-next").disabled = r.messages.length < state.peek.limit;
      body.replaceChildren(...(r.messages.length ? r.messages.map((m) => {
        const head = el("div", {class: "msg-head"}, el("span", {}, "id ", el("b", {text: String(m.id)})),
          el("span", {}, "subject ", el("b", {class: "name", text: m.subject})),
          el("span", {}, "published ", el("b", {text: new Date(m.published_ms).toISOString()})),
          el("span", {}, "deliveries ", el("b", {text: String(m.deliveries)})),
          m.msg_id ? el("span", {}, "msg_id ", el("b", {text: m.msg_id})) : null,
          el("span", {}, "payload ", el("b", {text: bytes(m.payload.size) + (m.payload.kind === "hex" ? " binary (hex)" : "") + (m.payload.truncated ? ", cut" : "")})));
        const hdrs = Object.entries(m.headers);
        return el("div", {class: "msg", "data-msg": String(m.id)}, head,
                  hdrs.length ? el("div", {class: "headers", text: hdrs.map(([k, v]) => k + ": " + v).join("   ")}) : null,
                  el("pre", {class: "payload payload-" + m.payload.kind, text: m.payload.data + (m.payload.truncated ? " …" : "")}));
      }) : [el("p", {class: "empty", text: "No stored messages here."})]));
      if (!d.open) d.showModal();
    } catch (e) { toast("Peek into " + name + " refused: " + e.message, true); }
  }

  document.addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-action]");
    if (!b) return;
    const name = b.dataset.name;
    if (b.dataset.action === "purge") purge(name);
    else if (b.dataset.action === "redrive") redrive(name);
    else if (b.dataset.action === "peek") peek(name, 0);
  });

  // ---------------------------------------------------------------- start

  async function start() {
    window.addEventListener("hashchange", showPage);
    for (const id of ["filter-queues", "filter-streams", "filter-connections", "filter-schemas"]) $(id).addEventListener("input", render);
    $("peek-close").addEventListener("click", () => $("peek").close());
    $("peek-prev").addEventListener("click", () => peek(state.peek.name, state.peek.offset - state.peek.limit));
    $("peek-next").addEventListener("click", () => peek(state.peek.name, state.peek.offset + state.peek.limit));
    window.addEventListener("resize", () => { if (state.page === "overview") drawChart(); });
    try {
      state.session = await api("GET", "/console/api/session");
    } catch (e) {
      toast("Cannot reach the broker: " + e.message, true);
      return;
    }
    const sess = state.session;
    if (sess.auth) {
      $("whoami").textContent = sess.user;
      const out = $("signout");
      out.hidden = false;
      out.addEventListener("click", async () => {
        try { await api("POST", "/console/logout", {}); } catch (e) { /* gone already */ }
        window.location.assign("/console/login");
      });
    } else {
      const n = $("notice");
      n.textContent = "No users are configured: the console needs no sign-in, and like the broker's ports it answers on loopback only.";
      n.hidden = false;
    }
    if (sess.schemas) document.querySelector('#tabs a[data-page="schemas"]').hidden = false;
    showPage();
    connect();
  }
  start();
})();

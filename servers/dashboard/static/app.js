// The modelctl dashboard: polls api/state and api/logs, posts actions to api/action.
// Everything from the server is shown as text: the DOM is built with textContent and
// setAttribute, never from HTML strings, so a name, a model or a log line cannot run.
"use strict";

const TOKEN_KEY = "modelctl-ui-token";
const LOG_LINES_KEPT = 2000;
const LOG_POLL_MS = 1000;
const STATE_CLASS = {
  ready: "ok", idle: "rest", stopped: "rest", starting: "busy", stopping: "busy", unhealthy: "warn",
  backoff: "warn", crashed: "bad", failed: "bad", broken: "bad",
};

let token = takeToken();
let canAct = false;
let pollTimer = null;
let interval = 2000;
const rendered = new Map(); // element key -> signature of what it shows
const log = { server: null, cursor: null, timer: null };

// ------------------------------------------------------------------ small helpers
function takeToken() {
  // the URL's fragment carries the token (never sent to the server, never logged);
  // it is kept for this tab and taken out of the address bar
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = String(v);
    else if (k.startsWith("data-") || k === "class" || k === "title" || k === "type" || k === "role" || k.startsWith("aria-")) node.setAttribute(k, String(v));
    else throw new Error("el: attribute " + k + " is not allowed");
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(typeof c === "string" ? document.createTextNode(c) : c);
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function link(url) {
  // only http(s) URLs become links; anything else (javascript:, data:) is plain text
  if (!/^https?:\/\/[^\s]+$/i.test(url || "")) return el("span", { text: url || "-" });
  const a = document.createElement("a");
  a.href = url;
  a.textContent = url;
  a.rel = "noopener noreferrer";
  a.target = "_blank";
  return a;
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? String(v) : v.toFixed(v < 10 ? 1 : 0)) + " " + units[i];
}

function duration(s) {
  if (s === null || s === undefined) return "-";
  if (s < 60) return Math.floor(s) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + Math.floor(s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
}

function ms(v) {
  return v === null || v === undefined ? "-" : num(v) + " ms";
}

function num(v) {
  return v === null || v === undefined ? "-" : String(v < 10 ? v.toFixed(1) : Math.round(v));
}

function notice(text, bad) {
  const n = document.getElementById("notice");
  n.textContent = text;
  n.className = bad ? "bad" : "ok";
  clearTimeout(notice.timer);
  notice.timer = setTimeout(() => { n.textContent = ""; n.className = ""; }, 8000);
}

function headers(json) {
  const h = {};
  if (token) h.Authorization = "Bearer " + token;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

// replace `node`'s place in `parent` under `key` only when what it shows changed
function keep(parent, key, signature, build, before) {
  let node = parent.querySelector(":scope > [data-key=\"" + CSS.escape(key) + "\"]");
  if (!node || rendered.get(key) !== signature) {
    const fresh = build();
    fresh.setAttribute("data-key", key);
    if (node) node.replaceWith(fresh); else parent.insertBefore(fresh, before || null);
    rendered.set(key, signature);
    node = fresh;
  }
  return node;
}

// ------------------------------------------------------------------ charts
function peak(values) {
  return Math.max(0, ...values.filter((v) => v !== null));
}

function spark(values, width, height, cls, top) {
  const g = svg("polyline", { class: cls, fill: "none", points: "" });
  const n = values.length;
  const pts = [];
  values.forEach((v, i) => {
    if (v === null) return;
    const x = n > 1 ? (i / (n - 1)) * (width - 2) + 1 : width / 2;
    const y = top > 0 ? height - 2 - (v / top) * (height - 4) : height - 2;
    pts.push(x.toFixed(1) + "," + y.toFixed(1));
  });
  g.setAttribute("points", pts.join(" "));
  return g;
}

function trafficCell(t) {
  if (!t) return el("span", { class: "muted", text: "no metrics" });
  const w = 96;
  const h = 26;
  const rate = svg("svg", { class: "chart", width: w, height: h, viewBox: `0 0 ${w} ${h}`, role: "img" });
  rate.append(spark(t.req_s, w, h, "line-rate", peak(t.req_s)));
  rate.setAttribute("aria-label", "requests per second");
  const lat = svg("svg", { class: "chart", width: w, height: h, viewBox: `0 0 ${w} ${h}`, role: "img" });
  const top = peak(t.p90_ms.concat(t.p50_ms)); // one scale for both lines, so that they compare
  lat.append(spark(t.p90_ms, w, h, "line-p90", top), spark(t.p50_ms, w, h, "line-p50", top));
  lat.setAttribute("aria-label", "latency p50 and p90");
  return el("div", { class: "traffic" },
    el("div", {}, rate, el("span", { class: "figure", text: t.now.req_s.toFixed(1) + " req/s" })),
    el("div", {}, lat, el("span", { class: "figure", text: "p50 " + num(t.now.p50_ms) + " · p90 " + ms(t.now.p90_ms) })));
}

// ------------------------------------------------------------------ the servers
const COLUMNS = ["server", "state", "URL", "uptime", "restarts", "memory", "traffic", "last exit", ""];

// a table cell whose content is one block, so that a phone's card shows it beside its label
function cell(label, cls, ...children) {
  return el("td", { "data-label": label, class: cls }, el("div", { class: "cell" }, ...children));
}

function serverRow(s) {
  const state = [el("span", { class: "state " + (STATE_CLASS[s.state] || ""), text: s.state })];
  if (s.progress !== null) state.push(el("div", { class: "phase", text: s.progress + "%" }));
  if (s.detail) state.push(el("div", { class: "phase", title: s.detail, text: s.detail }));
  if (s.start === "on-demand") {
    const wake = s.last_wake_seconds === null ? "" : ` (last ${s.last_wake_seconds.toFixed(1)}s)`;
    state.push(el("div", { class: "muted small", text: `wakes ${s.wakes}${wake} · idle stops ${s.idle_stops} · evictions ${s.evictions}` }));
  }

  const mem = [el("div", { class: "rss", text: bytes(s.rss) })];
  if (s.footprint !== null) mem.push(el("div", { class: "muted", text: (s.footprint_learned ? "learned " : "declared ") + bytes(s.footprint) }));
  if (s.gpu_memory !== null) mem.push(el("div", { class: "muted", text: "GPU " + bytes(s.gpu_memory) }));

  const exit = [];
  if (s.last_exit) exit.push(el("div", { text: s.last_exit }));
  if (s.last_error) exit.push(el("div", { class: "error-line", title: s.last_error, text: s.last_error }));

  const actions = el("td", { class: "actions" });
  for (const [act, label] of [["start", s.state === "idle" ? "wake" : "start"], ["stop", "stop"], ["restart", "restart"]]) {
    actions.append(actionButton(act, label, { server: s.id }));
  }
  const logs = el("button", { type: "button", class: "log-button", "data-server": s.id, text: "log" });
  logs.addEventListener("click", () => openLog(s.id));
  actions.append(logs);

  return el("tr", { "data-server": s.id, "data-state": s.state, "data-pid": s.pid },
    cell("server", "", el("div", { class: "name", text: s.name }), el("div", { class: "muted model", title: s.model, text: s.model || s.kind })),
    cell("state", "", ...state),
    cell("URL", "", link(s.url), el("div", { class: "muted", text: "socket " + s.socket + (s.start === "on-demand" ? " · on demand" : "") })),
    cell("uptime", "num uptime", duration(s.uptime)),
    cell("restarts", "num", String(s.restarts)),
    cell("memory", "num", ...mem),
    cell("traffic", "", trafficCell(s.traffic)),
    cell("last exit", "exit", ...exit),
    actions);
}

function actionButton(action, label, target) {
  const b = el("button", { type: "button", "data-action": action, text: label,
    title: canAct ? null : "actions need the token" });
  b.disabled = !canAct;
  b.addEventListener("click", () => act(action, target, b));
  return b;
}

function budgetBar(kind, label, b) {
  const pct = b.limit > 0 ? Math.min(100, (100 * b.used) / b.limit) : 0;
  const bar = el("div", { class: "bar" + (b.used > b.limit ? " over" : ""), role: "meter" });
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", String(b.limit));
  bar.setAttribute("aria-valuenow", String(b.used));
  b.servers.forEach((s, i) => {
    const seg = el("div", { class: "seg seg" + (i % 6), title: s.id + ": " + bytes(s.bytes) });
    seg.style.width = (b.limit > 0 ? Math.min(100, (100 * s.bytes) / b.limit) : 0) + "%";
    bar.append(seg);
  });
  return el("div", { class: "budget", "data-kind": kind, "data-used": b.used, "data-limit": b.limit },
    el("span", { class: "budget-label", text: label }), bar,
    el("span", { class: "budget-figure", text: `${bytes(b.used)} of ${bytes(b.limit)} (${pct.toFixed(0)}%)` }));
}

function profileSection(p) {
  const head = el("div", { class: "profile-head" }, el("h2", {}, "profile ", el("span", { class: "pname", text: p.name })));
  const acts = el("div", { class: "profile-actions" });
  for (const a of ["start", "stop", "restart"]) acts.append(actionButton(a, a + " all", { profile: p.name }));
  head.append(acts);
  const section = el("section", { class: "profile", "data-profile": p.name }, head);
  if (p.budget) {
    const budgets = el("div", { class: "budgets" });
    if (p.budget.memory) budgets.append(budgetBar("memory", "memory" + (p.budget.shared ? " (shared)" : ""), p.budget.memory));
    for (const [gpu, b] of Object.entries(p.budget.gpus || {})) budgets.append(budgetBar("gpu" + gpu, "GPU " + gpu, b));
    section.append(budgets);
  }
  const table = el("table", { class: "servers" });
  const thead = el("thead", {}, el("tr", {}, ...COLUMNS.map((c) => el("th", { text: c }))));
  const tbody = el("tbody");
  table.append(thead, tbody);
  section.append(el("div", { class: "table-wrap" }, table));
  return section;
}

function renderProfiles(profiles) {
  const root = document.getElementById("profiles");
  const loading = document.getElementById("loading");
  if (loading) loading.remove();
  const keys = new Set();
  for (const p of profiles) {
    const key = "profile:" + p.name;
    keys.add(key);
    const sig = JSON.stringify([p.budget, canAct]);
    const section = keep(root, key, sig, () => profileSection(p));
    const tbody = section.querySelector("tbody");
    const rows = new Set();
    for (const s of p.servers) {
      const rkey = "server:" + s.id;
      rows.add(rkey);
      const row = keep(tbody, rkey, JSON.stringify([{ ...s, uptime: s.uptime === null }, canAct]), () => serverRow(s));
      row.querySelector(".uptime .cell").textContent = duration(s.uptime); // ticks every poll: no new row for it
    }
    for (const tr of [...tbody.children]) if (!rows.has(tr.getAttribute("data-key"))) tr.remove();
    // keep the order the server sends
    p.servers.forEach((s) => tbody.append(tbody.querySelector(":scope > [data-key=\"" + CSS.escape("server:" + s.id) + "\"]")));
  }
  for (const sec of [...root.children]) if (!keys.has(sec.getAttribute("data-key"))) sec.remove();
  profiles.forEach((p) => root.append(root.querySelector(":scope > [data-key=\"" + CSS.escape("profile:" + p.name) + "\"]")));
  if (!profiles.length && !root.querySelector(".empty")) root.append(el("p", { class: "muted empty", text: "No servers: start some with modelctl up." }));
  else if (profiles.length) root.querySelector(".empty")?.remove();
}

function renderEvents(events) {
  const ol = document.getElementById("events");
  const sig = JSON.stringify(events.slice(0, 50));
  if (rendered.get("events") === sig) return;
  rendered.set("events", sig);
  ol.replaceChildren(...events.slice(0, 50).map((e) => el("li", { class: "event ev-" + e.kind.replace(/[^a-z]/g, "-") },
    el("time", { text: clock(e.at) }), " ", el("span", { class: "ev-server", text: e.server }), " ",
    el("span", { class: "ev-kind", text: e.kind }), " ", el("span", { class: "ev-text", text: e.text }))));
  if (!events.length) ol.append(el("li", { class: "muted", text: "nothing yet" }));
}

// ------------------------------------------------------------------ polling
async function poll() {
  clearTimeout(pollTimer);
  try {
    const r = await fetch("api/state", { headers: headers(false), cache: "no-store" });
    if (r.status === 403) {
      askToken();
      return;
    }
    if (!r.ok) throw new Error("the dashboard answered " + r.status);
    const data = await r.json();
    document.getElementById("token-form").hidden = true;
    interval = Math.max(500, (data.interval || 2) * 1000);
    canAct = !!data.can_act && !!token;
    const sup = data.supervisor;
    document.getElementById("supervisor").textContent = sup ? "supervisor pid " + sup.pid + (sup.responding ? "" : " NOT RESPONDING") : "no supervisor running";
    document.getElementById("updated").textContent = "updated " + clock(data.at);
    document.body.setAttribute("data-updated", String(data.at));
    renderProfiles(data.profiles);
    renderEvents(data.events);
  } catch (e) {
    document.getElementById("updated").textContent = "cannot reach the dashboard: " + e.message;
  }
  pollTimer = setTimeout(poll, document.hidden ? interval * 5 : interval);
}

function askToken() {
  const form = document.getElementById("token-form");
  form.hidden = false;
  document.getElementById("updated").textContent = "";
}

async function act(action, target, button) {
  button.disabled = true;
  const what = target.server || "profile " + target.profile;
  notice(action + " " + what + "…");
  try {
    const r = await fetch("api/action", { method: "POST", headers: headers(true), body: JSON.stringify({ action, ...target }) });
    const body = await r.json().catch(() => ({}));
    if (r.ok) notice(body.message || action + " " + what + ": done");
    else notice(action + " " + what + " refused (" + r.status + "): " + ((body.error && body.error.message) || r.statusText), true);
  } catch (e) {
    notice(action + " " + what + " failed: " + e.message, true);
  }
  button.disabled = !canAct;
  poll();
}

// ------------------------------------------------------------------ the log pane
function openLog(server) {
  clearTimeout(log.timer);
  log.server = server;
  log.cursor = null;
  document.getElementById("log-server").textContent = server;
  document.getElementById("log").replaceChildren();
  document.getElementById("log-box").setAttribute("data-server", server);
  pollLog();
  if (window.matchMedia("(max-width: 900px)").matches) document.getElementById("log-box").scrollIntoView();
}

async function pollLog() {
  const server = log.server;
  if (!server) return;
  try {
    const q = "api/logs?server=" + encodeURIComponent(server) + (log.cursor === null ? "" : "&cursor=" + log.cursor);
    const r = await fetch(q, { headers: headers(false), cache: "no-store" });
    if (server !== log.server) return;
    if (r.ok) {
      const data = await r.json();
      appendLog(data.lines, data.note);
      log.cursor = data.cursor;
    }
  } catch (e) {
    // the next poll tries again
  }
  if (server === log.server) log.timer = setTimeout(pollLog, document.hidden ? LOG_POLL_MS * 5 : LOG_POLL_MS);
}

function appendLog(lines, note) {
  const pre = document.getElementById("log");
  const atEnd = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
  const frag = document.createDocumentFragment();
  if (note) frag.append(el("div", { class: "log-note", text: "— " + note + " —" }));
  for (const line of lines) frag.append(el("div", { class: "line", text: line }));
  pre.append(frag);
  while (pre.childElementCount > LOG_LINES_KEPT) pre.firstChild.remove();
  if (document.getElementById("log-follow").checked && (atEnd || lines.length)) pre.scrollTop = pre.scrollHeight;
}

// ------------------------------------------------------------------ start
document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = document.getElementById("token-input").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  document.getElementById("token-input").value = "";
  poll();
});
document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
poll();

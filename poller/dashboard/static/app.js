// The dashboard: asks /api/status every 5 s and draws it. Every value from the database goes
// into the page as text (textContent, attributes): never as HTML.
"use strict";

const REFRESH_MS = 5000;
const OUTCOMES = ["sent", "failed", "expired", "unknown", "cancelled"];
const SVG = "http://www.w3.org/2000/svg";
let csrf = "";
let filter = new URLSearchParams();
let timer = null;

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function text(value) {
  return value === null || value === undefined || value === "" ? "-" : String(value);
}

function when(iso, now) {
  if (!iso) return "-";
  const at = new Date(iso);
  if (Number.isNaN(at.getTime())) return text(iso);  // not a date: shown as it is
  const ahead = (at - new Date(now)) / 1000;
  const span = Math.abs(ahead);
  const rel = span < 120 ? `${Math.round(span)} s` : span < 7200 ? `${Math.round(span / 60)} min` : `${(span / 3600).toFixed(1)} h`;
  return `${at.toISOString().slice(0, 19).replace("T", " ")} UTC (${ahead >= 0 ? "in " + rel : rel + " ago"})`;
}

function table(section, head, rows) {
  const node = document.querySelector(`#${section} table`);
  node.replaceChildren(
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))),
    el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((c) => (c instanceof Node ? el("td", {}, c) : el("td", { text: text(c) })))))),
  );
}

function show(section, visible) {
  document.getElementById(section).hidden = !visible;
}

function drawPollers(data) {
  show("pollers", true);
  const rows = data.instances.map((b) => [
    b.instance || b._id, b.host, b.version, b.ticking ? "ticking" : "ticks stopped",
    when(b.lastTickAt, data.now),
    b.lastTick ? `sent ${b.lastTick.sent}, failed ${b.lastTick.failed}` : "-",
  ]);
  if (!rows.length) rows.push(["none: nothing is sending", "", "", "", "", ""]);
  table("pollers", ["poller", "host", "version", "state", "last tick", "last tick did"], rows);
}

function drawRefused(data) {
  const node = document.getElementById("refused");
  node.textContent = data.eventsRefusedText || "";
  node.hidden = !data.eventsRefusedText;
}

function drawServers(data) {
  show("servers", data.servers.length > 0);
  table("servers", ["server", "url", "state"], data.servers.map((s) => [s.name, s.url, s.state]));
}

function drawSessions(data) {
  show("sessions", data.sessions.length > 0);
  const where = {};
  for (const s of data.servers) for (const x of s.sessions || []) if (x.status === "WORKING") where[x.name] = s.name;
  table("sessions", ["session", "server", "waiting", "next planned send", "sent today", "not sending because"], data.sessions.map((s) => [
    s.session, where[s.session], s.waiting, when(s.nextPlannedAt, data.now),
    s.dailyCap === null ? s.sentToday : `${s.sentToday} of ${s.dailyCap}`, s.notSending,
  ]));
}

function act(campaign, action) {
  return async () => {
    if (action === "cancel" && !window.confirm("Cancel this campaign? Its unsent messages end cancelled.")) return;
    const response = await fetch(`/api/campaigns/${encodeURIComponent(campaign)}/${action}`, {
      method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf },
    });
    await refresh();
    if (!response.ok) problem(`The campaign could not be changed (${response.status}).`);
  };
}

function drawCampaigns(data) {
  show("campaigns", data.campaigns.length > 0);
  const list = document.querySelector("#campaigns .list");
  list.replaceChildren(...data.campaigns.map((c) => {
    const stats = c.stats || {};
    const total = stats.total || 0;
    const bar = el("div", { class: "progress", role: "img", "aria-label": "progress" });
    for (const outcome of ["sent", "failed", "expired", "cancelled"]) {
      const part = el("span", { class: outcome, title: `${outcome} ${stats[outcome] || 0}` });
      part.style.width = total ? `${(100 * (stats[outcome] || 0)) / total}%` : "0%";
      bar.append(part);
    }
    const done = ["sent", "failed", "expired", "cancelled"].reduce((n, k) => n + (stats[k] || 0), 0);
    const paused = c.status === "paused";
    const actions = el("span", { class: "actions" },
      paused ? el("button", { text: "Resume", onclick: act(c._id, "resume") })
             : el("button", { text: "Pause", onclick: act(c._id, "pause") }),
      el("button", { text: "Cancel", class: "danger", onclick: act(c._id, "cancel") }));
    return el("div", { class: "campaign", "data-id": String(c._id) },
      el("div", { class: "head" },
        el("span", { class: "name", text: text(c.name || c._id) }),
        el("span", { class: "muted status", text: text(c.status) }), actions),
      bar,
      el("div", { class: "muted counts", text:
        `${done} of ${total} done: sent ${stats.sent || 0}, failed ${stats.failed || 0}, expired ${stats.expired || 0}, ` +
        `cancelled ${stats.cancelled || 0}; delivered ${stats.delivered || 0}, read ${stats.read || 0}; eta ${when(c.eta, data.now)}` }));
  }));
}

function drawSchedules(data) {
  show("schedules", data.schedules.length > 0);
  table("schedules", ["schedule", "cron", "time zone", "next occurrence", "problem"], data.schedules.map((s) => [
    s.name, s.cron, s.timezone, when(s.nextOccurrenceAt, data.now), s.lastError,
  ]));
}

function drawNotSent(data) {
  const rows = data.notSent.map((m) => [
    m.status, m.chatId, m.session, m.campaignId, when(m.finishedAt, data.now),
    typeof m.content === "string" ? m.content.slice(0, 80) : "", m.lastError,
  ]);
  if (!rows.length) rows.push(["none", "", "", "", "", "", ""]);
  table("notsent", ["status", "chat", "session", "campaign", "ended", "text", "why"], rows);
}

function drawChart(data) {
  const rows = data.perMinute || [];
  show("chart", rows.length > 0);
  if (!rows.length) return;
  const end = Math.floor(new Date(data.now).getTime() / 60000);
  const start = end - 24 * 60;
  const series = Object.fromEntries(OUTCOMES.map((o) => [o, new Array(24 * 60 + 1).fill(0)]));
  for (const row of rows) {
    const minute = Math.floor(new Date(row.minute + ":00Z").getTime() / 60000);
    if (series[row.status] && minute >= start && minute <= end) series[row.status][minute - start] += row.n;
  }
  const top = Math.max(1, ...OUTCOMES.flatMap((o) => series[o]));
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${24 * 60} 100`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "messages per minute by outcome");
  for (const outcome of OUTCOMES) {
    const points = series[outcome].map((n, x) => `${x},${100 - (98 * n) / top}`).join(" ");
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points);
    line.setAttribute("fill", "none");
    line.setAttribute("class", `line-${outcome}`);
    line.setAttribute("stroke", getComputedStyle(document.documentElement).getPropertyValue(`--${outcome}`).trim());
    line.setAttribute("stroke-width", "1.5");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(line);
  }
  document.querySelector("#chart .figure").replaceChildren(svg);
  const totals = OUTCOMES.map((o) => [o, series[o].reduce((a, b) => a + b, 0)]);
  document.querySelector("#chart .legend").replaceChildren(
    ...totals.map(([o, n]) => el("span", {}, el("i", { class: o }), `${o} ${n}`)),
    el("span", { class: "muted", text: `peak ${top}/min` }));
}

function drawLateness(data) {
  const buckets = data.lateness || [];
  const total = buckets.reduce((n, b) => n + b.n, 0);
  show("lateness", total > 0);
  if (!total) return;
  const top = Math.max(...buckets.map((b) => b.n));
  document.querySelector("#lateness .bars").replaceChildren(...buckets.map((b, i) => {
    const next = buckets[i + 1];
    const label = next ? `${b.from}–${next.from} s` : `${b.from} s or more`;
    const bar = el("span", { class: "bar" });
    bar.style.width = `${(60 * b.n) / top}%`;
    return el("div", { class: "row" }, el("span", { class: "label", text: label }), bar, el("span", { text: String(b.n) }));
  }));
}

function problem(message) {
  const node = document.getElementById("problem");
  node.textContent = message || "";
  node.hidden = !message;
}

async function refresh() {
  clearTimeout(timer);
  timer = setTimeout(refresh, REFRESH_MS);
  let response;
  try {
    response = await fetch(`/api/status?${filter}`, { credentials: "same-origin" });
  } catch (error) {
    problem("The poller does not answer.");
    return;
  }
  if (response.status === 401) {
    window.location.reload();  // logged out, or the token changed: back to the log-in form
    return;
  }
  if (!response.ok) {
    problem(`The poller answered ${response.status}.`);
    return;
  }
  const data = await response.json();
  csrf = data.csrf;
  problem("");
  drawPollers(data);
  drawRefused(data);
  drawServers(data);
  drawSessions(data);
  drawCampaigns(data);
  drawSchedules(data);
  drawChart(data);
  drawLateness(data);
  drawNotSent(data);
  document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

document.getElementById("filter").addEventListener("submit", (event) => {
  event.preventDefault();
  filter = new URLSearchParams();
  for (const [key, value] of new FormData(event.target)) if (value.trim()) filter.set(key, value.trim());
  refresh();
});
refresh();

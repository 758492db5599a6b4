// The dashboard: asks /api/status every 5 s and draws it. Every value from the database goes
// into the page as text (textContent, attributes): never as HTML. Its two forms post to the API
// (a test message, a campaign from a CSV file) with the page's CSRF token.
"use strict";

const REFRESH_MS = 5000;
const OUTCOMES = ["sent", "failed", "expired", "unknown", "cancelled"];
const SVG = "http://www.w3.org/2000/svg";
const WINDOWS = { "1h": "last hour", "24h": "last 24 hours" };
const MIN_CHART_MINUTES = 15;  // the chart spans its data, but never fewer minutes than this
const FOLLOW_MS = 1500;  // a test message is asked about this often until it has ended
let csrf = "";
let filter = new URLSearchParams();
let activityWindow = "1h";
let timer = null;
let asked = 0;  // refreshes started: only the latest one's answer is drawn
let followed = null;  // the id of the test message whose progress is shown
let previewed = null;  // the campaign the preview shows: Confirm posts it as it was previewed

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

// A span of seconds in whole units, rounded down: under 120 s in s, under 120 min in min,
// under 48 h in h, then in days ("5 days"). `poller status` words spans the same way.
function span(seconds) {
  const s = Math.abs(seconds);
  if (s < 120) return `${Math.floor(s)} s`;
  if (s < 7200) return `${Math.floor(s / 60)} min`;
  if (s < 172800) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} days`;
}

// "10:15:02 UTC" (or "10:15 UTC" without seconds): UTC, 24-hour, as every time on the page.
function utc(at, seconds = true) {
  return `${at.toISOString().slice(11, seconds ? 19 : 16)} UTC`;
}

function when(iso, now) {
  if (!iso) return "-";
  const at = new Date(iso);
  if (Number.isNaN(at.getTime())) return text(iso);  // not a date: shown as it is
  const ahead = (at - new Date(now)) / 1000;
  return `${at.toISOString().slice(0, 19).replace("T", " ")} UTC (${ahead >= 0 ? "in " + span(ahead) : span(ahead) + " ago"})`;
}

// Each cell carries its column's name (data-label): on a phone's screen a row shows as a card
// of "name: value" lines (app.css).
function table(section, head, rows) {
  const node = document.querySelector(`#${section} table`);
  const cell = (c, i) => {
    const td = c instanceof Node ? el("td", {}, c) : el("td", { text: text(c) });
    td.dataset.label = head[i];
    return td;
  };
  node.replaceChildren(
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))),
    el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map(cell)))),
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
  // The server that lists the session, whatever its status (a WORKING one first).
  for (const s of data.servers) {
    for (const x of s.sessions || []) if (!(x.name in where) || x.status === "WORKING") where[x.name] = s.name;
  }
  table("sessions", ["session", "server", "waiting", "next planned send", "sent today", "not sending because"], data.sessions.map((s) => [
    s.session, where[s.session], s.paused ? `${s.waiting} (${s.paused} paused)` : s.waiting, when(s.nextPlannedAt, data.now),
    s.dailyCap === null ? s.sentToday : `${s.sentToday} of ${s.dailyCap}`, s.notSending,
  ]));
}

function act(campaign, action) {
  return async (event) => {
    if (action === "cancel" && !window.confirm("Cancel this campaign? Its unsent messages end cancelled.")) return;
    event.currentTarget.disabled = true;  // once: the picture drawn next has the campaign's new buttons
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
        `cancelled ${stats.cancelled || 0}; delivered ${stats.delivered || 0}, read ${stats.read || 0}; ` +
        (paused ? "paused: nothing goes out until it is resumed" : `eta ${when(c.eta, data.now)}`) }));
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
    m.status, m.chatId, m.session, m.campaignName || m.campaignId, when(m.finishedAt, data.now),
    typeof m.content === "string" ? m.content.slice(0, 80) : "", m.lastError,
  ]);
  if (!rows.length) rows.push(["none", "", "", "", "", "", ""]);
  table("notsent", ["status", "chat", "session", "campaign", "ended", "text", "why"], rows);
}

function drawChart(data) {
  const rows = data.perMinute || [];
  show("chart", true);
  for (const button of document.querySelectorAll("#chart .toggle button")) {
    button.setAttribute("aria-pressed", String(button.dataset.window === data.window));
  }
  const named = WINDOWS[data.window] || data.window;
  for (const node of document.querySelectorAll(".window")) node.textContent = `, ${named}`;
  const figure = document.querySelector("#chart .figure");
  const legend = document.querySelector("#chart .legend");
  const axis = document.querySelector("#chart .axis");
  if (!rows.length) {
    figure.replaceChildren(el("p", { class: "muted", text: `No message ended in the ${named}.` }));
    legend.replaceChildren();
    axis.replaceChildren();
    return;
  }
  // From the first minute with data (the window's start at the most) to the minute read.
  const end = Math.floor(new Date(data.activityAt || data.now).getTime() / 60000);
  const earliest = end - (data.window === "24h" ? 24 * 60 : 60);
  const minutes = rows.map((row) => Math.floor(new Date(row.minute + ":00Z").getTime() / 60000));
  const start = Math.max(earliest, Math.min(end - MIN_CHART_MINUTES, ...minutes));
  const width = end - start;
  const series = Object.fromEntries(OUTCOMES.map((o) => [o, new Array(width + 1).fill(0)]));
  rows.forEach((row, i) => {
    if (series[row.status] && minutes[i] >= start && minutes[i] <= end) series[row.status][minutes[i] - start] += row.n;
  });
  // One column a minute, its outcomes stacked.
  const sums = series.sent.map((_, x) => OUTCOMES.reduce((n, o) => n + series[o][x], 0));
  const top = Math.max(1, ...sums);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width + 1} 100`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "messages per minute by outcome");
  sums.forEach((_, x) => {
    let y = 100;
    for (const outcome of OUTCOMES) {
      const n = series[outcome][x];
      if (!n) continue;
      const height = (98 * n) / top;
      y -= height;
      const bar = document.createElementNS(SVG, "rect");
      for (const [key, value] of Object.entries({ x: x + 0.1, y, width: 0.8, height, class: outcome })) bar.setAttribute(key, value);
      svg.append(bar);
    }
  });
  figure.replaceChildren(svg);
  axis.replaceChildren(el("span", { text: utc(new Date(start * 60000), false) }), el("span", { text: `${utc(new Date(end * 60000), false)} (read every minute)` }));
  const totals = OUTCOMES.map((o) => [o, series[o].reduce((a, b) => a + b, 0)]);
  legend.replaceChildren(
    ...totals.map(([o, n]) => el("span", {}, el("i", { class: o }), `${o} ${n}`)),
    el("span", { class: "muted", text: `peak ${top}/min` }));
}

// "0–1 s", "60 s–2 min", "6 h or more": a bucket from `from` up to the next one's.
function bucket(from, next) {
  if (next === undefined) return `${span(from)} or more`;
  const [a, b] = [span(from), span(next)];
  const unit = (x) => x.split(" ")[1];
  return unit(a) === unit(b) ? `${a.split(" ")[0]}–${b}` : `${a}–${b}`;
}

function drawBars(section, buckets) {
  buckets = buckets || [];
  const total = buckets.reduce((n, b) => n + b.n, 0);
  show(section, total > 0);
  if (!total) return;
  const top = Math.max(...buckets.map((b) => b.n));
  document.querySelector(`#${section} .bars`).replaceChildren(...buckets.map((b, i) => {
    const bar = el("span", { class: "bar" });
    bar.style.width = `${(60 * b.n) / top}%`;
    const next = buckets[i + 1];
    return el("div", { class: "row" }, el("span", { class: "label", text: bucket(b.from, next && next.from) }), bar, el("span", { text: String(b.n) }));
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
  const mine = ++asked;
  const query = new URLSearchParams(filter);
  query.set("window", activityWindow);
  let response, data;
  try {
    response = await fetch(`/api/status?${query}`, { credentials: "same-origin" });
    data = response.ok ? await response.json() : null;
  } catch (error) {
    if (mine === asked) problem("The poller does not answer.");
    return;
  }
  if (mine !== asked) return;  // a later refresh (after an action, say) was asked: its picture wins
  if (response.status === 401) {
    window.location.reload();  // logged out, or the token changed: back to the log-in form
    return;
  }
  if (!response.ok) {
    problem(`The poller answered ${response.status}.`);
    return;
  }
  csrf = data.csrf;
  problem("");
  drawPollers(data);
  drawRefused(data);
  drawServers(data);
  drawSessions(data);
  drawCampaigns(data);
  drawSchedules(data);
  drawChart(data);
  drawBars("lateness", data.lateness);
  drawBars("pacing", data.pacingDelay);
  drawNotSent(data);
  drawSessionNames(data);
  document.getElementById("updated").textContent = `updated ${utc(new Date(data.now))}`;
}

// The sessions the forms offer: those the poller knows of, and those WAHA lists.
function drawSessionNames(data) {
  const names = new Set(data.sessions.map((s) => s.session));
  for (const server of data.servers) for (const s of server.sessions || []) names.add(s.name);
  document.getElementById("session-names").replaceChildren(...[...names].sort().map((name) => el("option", { value: name })));
}

// -- the forms: a test message, a campaign from a CSV file ----------------------------------------

async function post(path, body) {
  // The CSRF token comes with the page's first picture: a form sent before it came waits for it.
  if (!csrf) await refresh();
  const response = await fetch(path, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf }, body: JSON.stringify(body),
  });
  let data = null;
  try {
    data = await response.json();
  } catch (error) {
    data = null;  // not JSON: the server's own refusal (a body too large, say)
  }
  return { response, data };
}

// What came back in `section`: a line of result, or the problems of a refused request, one a line.
function answered(section, line, problems) {
  const result = document.querySelector(`#${section} .result`);
  const list = document.querySelector(`#${section} .problems`);
  result.textContent = line || "";
  result.hidden = !line;
  const shown = (problems || []).slice(0, 100);
  if (problems && problems.length > shown.length) shown.push(`and ${problems.length - shown.length} more`);
  list.replaceChildren(...shown.map((p) => el("li", { text: p })));
  list.hidden = !shown.length;
}

function refusal(response, data) {
  if (data && Array.isArray(data.problems)) return data.problems;
  if (data && data.error) return [data.error];
  if (response.status === 413) return ["Too large for the poller (413): send fewer rows at a time."];
  return [`The poller answered ${response.status}.`];
}

// A message's progress in words: waiting, planned, being sent, sent, or how it ended and why.
function progress(m) {
  const now = new Date().toISOString();
  const why = m.lastError ? ` (${m.lastError})` : "";
  if (m.status === "waiting") return `waiting for a poller to see it, due ${when(m.scheduledAt, now)}${why}`;
  if (m.status === "planned") return `planned for ${when(m.plannedAt, now)}${why}`;
  if (m.status === "claimed" || m.status === "sending") return "being sent…";
  if (m.status === "sent") return `sent ${when(m.sentAt, now)}`;
  if (m.status === "done") return "not sent by the poller: the web app marked it done";
  return `${m.status}${why}`;
}

function showProgress(m) {
  answered("send", `Message ${m.id}: ${progress(m)}`);
  document.querySelector("#send .result").dataset.status = m.status;
}

async function follow(id) {
  followed = id;
  while (followed === id) {
    await new Promise((resolve) => setTimeout(resolve, FOLLOW_MS));
    let response;
    try {
      response = await fetch(`/api/messages/${encodeURIComponent(id)}`, { credentials: "same-origin" });
    } catch (error) {
      continue;  // the poller does not answer: ask again
    }
    if (followed !== id) return;
    if (response.status === 401) window.location.reload();
    if (!response.ok) continue;
    const m = await response.json();
    showProgress(m);
    if (m.final) {
      followed = null;
      refresh();
    }
  }
}

async function sendTest(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const fields = new FormData(form);
  const button = form.querySelector("button");
  button.disabled = true;
  followed = null;
  try {
    const body = { to: fields.get("to").trim(), session: fields.get("session").trim(), text: fields.get("text") };
    const { response, data } = await post("/api/messages", body);
    if (response.status !== 201) {
      answered("send", "Not sent:", refusal(response, data));
      return;
    }
    showProgress(data.messages[0]);
    follow(data.ids[0]);
  } catch (error) {
    answered("send", "The poller does not answer.");
  } finally {
    button.disabled = false;
  }
}

function drawPreview(data) {
  const plan = data.preview;
  const node = document.querySelector("#import .preview");
  const now = new Date().toISOString();
  node.querySelector(".summary").textContent = `${plan.messages} messages for campaign “${data.name}”; ` +
    (plan.eta ? `the last goes out ${when(plan.eta, now)}.` : "none can be planned now.");
  table("import", ["session", "messages", "first send", "last send", "not sending because"],
    Object.entries(plan.sessions).map(([name, s]) => [name, s.messages, when(s.first, now), when(s.last, now), s.notSending]));
  node.hidden = false;
}

function forgetPreview() {
  previewed = null;
  document.querySelector("#import .preview").hidden = true;
}

async function previewCampaign(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const fields = new FormData(form);
  const button = form.querySelector("button");
  forgetPreview();
  button.disabled = true;
  try {
    const file = form.elements.file.files[0];
    const body = { name: fields.get("name").trim(), text: fields.get("text"), session: fields.get("session").trim(), csv: await file.text() };
    if (fields.get("at")) body.at = new Date(fields.get("at")).toISOString();  // the browser's local time
    const { response, data } = await post("/api/campaigns", { ...body, dryRun: true });
    if (response.status !== 200) {
      answered("import", "Nothing was written:", refusal(response, data));
      return;
    }
    answered("import", "");
    previewed = body;
    drawPreview(data);
  } catch (error) {
    answered("import", "The poller does not answer.");
  } finally {
    button.disabled = false;
  }
}

async function confirmCampaign(event) {
  const button = event.currentTarget;
  if (!previewed) return;
  button.disabled = true;
  try {
    const { response, data } = await post("/api/campaigns", { ...previewed, dryRun: false });
    if (response.status !== 201) {
      answered("import", "Nothing was written:", refusal(response, data));
      return;
    }
    forgetPreview();
    answered("import", data.new || data.written
      ? `Campaign “${data.name}” written: ${data.written} of its ${data.messages} messages new. It shows under Running campaigns once a poller has seen its messages.`
      : `Campaign “${data.name}” was written before, with these messages: nothing new.`);
    refresh();
  } catch (error) {
    answered("import", "The poller does not answer.");
  } finally {
    button.disabled = false;
  }
}

document.getElementById("send-form").addEventListener("submit", sendTest);
const importForm = document.getElementById("import-form");
importForm.addEventListener("submit", previewCampaign);
importForm.addEventListener("input", forgetPreview);  // what was previewed is no longer what the form says
importForm.addEventListener("change", forgetPreview);
document.querySelector("#import .confirm").addEventListener("click", confirmCampaign);

for (const button of document.querySelectorAll("#chart .toggle button")) {
  button.addEventListener("click", () => {
    activityWindow = button.dataset.window;
    refresh();
  });
}

document.getElementById("filter").addEventListener("submit", (event) => {
  event.preventDefault();
  filter = new URLSearchParams();
  for (const [key, value] of new FormData(event.target)) if (value.trim()) filter.set(key, value.trim());
  refresh();
});
refresh();

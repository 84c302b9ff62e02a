// pandasync's dashboard: asks for the admin token once (kept in this tab's sessionStorage,
// sent only as a bearer header), then polls /status, /admin/dead-letters and
// /admin/throughput. Every value from the service goes into the page as text (textContent),
// never as markup.
"use strict";

const TOKEN_KEY = "pandasync.admin_token";
const REFRESH_MS = 5000;
const LETTERS_SHOWN = 200;
const SVG = "http://www.w3.org/2000/svg";

let timer = null;

function $(id) {
  return document.getElementById(id);
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

class Refused extends Error {}

async function call(path, options = {}) {
  const headers = { Authorization: `Bearer ${token()}`, ...(options.headers || {}) };
  const answer = await fetch(path, { ...options, headers, cache: "no-store" });
  if (answer.status === 401) {
    throw new Refused("the admin token was refused");
  }
  if (!answer.ok) {
    let detail = `${answer.status}`;
    try {
      detail += `: ${(await answer.json()).detail}`;
    } catch (_) {
      // an answer without a JSON body: the status says enough
    }
    throw new Error(`${path} answered ${detail}`);
  }
  return answer.json();
}

function post(path, body) {
  return call(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function cut(text, width) {
  return text.length <= width ? text : `${text.slice(0, width - 1)}…`;
}

function seconds(value) {
  if (value < 1) return "now";
  if (value < 120) return `${Math.round(value)} s`;
  if (value < 7200) return `${Math.round(value / 60)} min`;
  return `${Math.round(value / 3600)} h`;
}

function sparkline(counts, slots) {
  // One point per sampled interval on a fixed time axis (the newest at the right edge), so
  // a service that just started draws a short line, not a stretched one.
  const width = 180;
  const height = 24;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", String(width));
  svg.setAttribute("height", String(height));
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "spark");
  const shown = counts.length === 1 ? [counts[0], counts[0]] : counts.slice(-slots);
  const top = Math.max(1, ...shown);
  const step = width / Math.max(1, slots - 1);
  const points = shown.map((count, index) => {
    const x = width - (shown.length - 1 - index) * step;
    const y = height - 1 - (count / top) * (height - 2);
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  const axis = document.createElementNS(SVG, "line");
  axis.setAttribute("class", "axis");
  axis.setAttribute("x1", "0");
  axis.setAttribute("x2", String(width));
  axis.setAttribute("y1", String(height - 0.5));
  axis.setAttribute("y2", String(height - 0.5));
  svg.appendChild(axis);
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", points.join(" "));
  svg.appendChild(line);
  const title = document.createElementNS(SVG, "title");
  title.textContent = `most in one interval: ${Math.max(0, ...counts)}`;
  svg.appendChild(title);
  return svg;
}

function stateOf(name, report, delivery) {
  const dataset = delivery.datasets[name] || {};
  if (report.feed) return report.feed.state.replace("_", " ");
  return dataset.paused ? "paused" : "accepting webhooks";
}

function lastErrorOf(name, report, delivery) {
  const feed = report.feed || {};
  const dataset = delivery.datasets[name] || {};
  if (feed.reason) return feed.reason;
  if (delivery.stopped_sources[name]) return delivery.stopped_sources[name];
  if (feed.last_error) return feed.last_error;
  if (dataset.breaker_open) return `PANDA failing, next try at ${dataset.retry_at}`;
  return "";
}

function lagOf(report) {
  const parts = [`${report.pending} queued`];
  if (report.pending > 0) parts.push(`oldest ${seconds(report.lag_s)}`);
  if (report.feed && report.feed.couchdb_pending) {
    parts.push(`${report.feed.couchdb_pending} unread in CouchDB`);
  }
  return parts.join(", ");
}

function pausedOf(name, report, delivery) {
  const dataset = delivery.datasets[name] || {};
  return Boolean(dataset.paused || (report.feed && report.feed.held));
}

function showSources(status, throughput) {
  const body = $("sources").tBodies[0];
  body.replaceChildren();
  const perMinute = Math.max(1, Math.round(60 / throughput.every_s));
  for (const [name, report] of Object.entries(status.sources)) {
    const row = document.createElement("tr");
    row.dataset.source = name;
    const dataset = status.delivery.datasets[name] || {};
    cell(row, name, "name");
    cell(row, dataset.slug || "");
    cell(row, stateOf(name, report, status.delivery), "state");
    const checkpoint = report.checkpoint === null ? "-" : JSON.stringify(report.checkpoint);
    cell(row, cut(checkpoint, 24), "mono").title = checkpoint;
    cell(row, lagOf(report), "lag");
    const counts = throughput.sources[name] || [];
    const spark = cell(row, "", "throughput");
    spark.appendChild(sparkline(counts, throughput.intervals));
    const lastMinute = counts.slice(-perMinute).reduce((sum, count) => sum + count, 0);
    const label = document.createElement("span");
    label.textContent = ` ${lastMinute}/min`;
    spark.appendChild(label);
    cell(row, report.dead_letters, report.dead_letters ? "problem" : "");
    cell(row, lastErrorOf(name, report, status.delivery), "problem");
    const paused = pausedOf(name, report, status.delivery);
    const act = cell(row, "", "actions");
    act.appendChild(button(paused ? "Resume" : "Pause", () => pauseOrResume(name, paused)));
    body.appendChild(row);
  }
}

function button(label, action) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = label;
  element.addEventListener("click", async () => {
    element.disabled = true;
    try {
      await action();
    } catch (error) {
      failed(error);
    } finally {
      element.disabled = false;
    }
  });
  return element;
}

function lastAnswer(letter) {
  const answer = letter.answers[letter.answers.length - 1];
  if (!answer) return "-";
  return `${answer.status === null ? "no answer" : answer.status}: ${answer.detail}`;
}

function showLetters(letters, total) {
  const body = $("letters").tBodies[0];
  body.replaceChildren();
  for (const letter of letters) {
    const row = document.createElement("tr");
    row.dataset.letter = String(letter.id);
    cell(row, letter.id);
    cell(row, letter.source);
    cell(row, letter.doc_id, "mono doc-id");
    cell(row, letter.op);
    cell(row, letter.attempts);
    cell(row, letter.created_at.slice(0, 19).replace("T", " "));
    cell(row, lastAnswer(letter), "answer");
    const act = cell(row, "", "actions");
    act.appendChild(button("Replay", () => replay(letter.id)));
    act.appendChild(button("Discard", () => discard(letter.id)));
    body.appendChild(row);
  }
  $("letters").hidden = letters.length === 0;
  const shown = letters.length < total ? ` (the oldest ${letters.length} shown)` : "";
  $("letters-count").textContent =
    total === 0 ? "No dead letters." : `${total} dead letter${total === 1 ? "" : "s"}${shown}.`;
}

function showDelivery(delivery) {
  const line = $("delivery");
  if (delivery.paused) {
    line.textContent = `Delivery paused: ${delivery.paused}`;
    line.className = "problem";
  } else if (delivery.last_error) {
    line.textContent = `Delivering. Last delivery error: ${delivery.last_error}`;
    line.className = "problem";
  } else {
    line.textContent = `Delivering: ${delivery.delivered} delivered, ${delivery.dead_lettered} dead-lettered since start.`;
    line.className = "quiet";
  }
}

function notify(text) {
  $("notice").textContent = text;
}

async function replay(id) {
  const done = await post("/admin/dead-letters/replay", { ids: [id] });
  if (done.replayed.includes(id)) notify(`Dead letter ${id} replayed: it is back in the outbox.`);
  else if (done.superseded.includes(id)) {
    notify(`Dead letter ${id} was not replayed: its document has a newer change (discard it).`);
  } else if (done.unmapped.includes(id)) {
    notify(`Dead letter ${id} is a document that could not be mapped: replay it with \`pandasync dead-letters replay ${id}\`, which reads it again from CouchDB.`);
  } else notify(`Dead letter ${id} is gone already.`);
  await refresh();
}

async function discard(id) {
  if (!window.confirm(`Discard dead letter ${id} for good? Its change will not be sent.`)) return;
  await post("/admin/dead-letters/discard", { ids: [id] });
  notify(`Dead letter ${id} discarded.`);
  await refresh();
}

async function pauseOrResume(name, paused) {
  await post(`/admin/sources/${encodeURIComponent(name)}/${paused ? "resume" : "pause"}`);
  notify(`Source ${name} ${paused ? "resumed" : "paused"}.`);
  await refresh();
}

function failed(error) {
  if (error instanceof Refused) {
    signOut("The admin token was refused: sign in again.");
    return;
  }
  notify(`Could not refresh: ${error.message}`);
}

async function refresh() {
  const [status, letters, throughput] = await Promise.all([
    call("/status"),
    call(`/admin/dead-letters?limit=${LETTERS_SHOWN}`),
    call("/admin/throughput"),
  ]);
  const total = Object.values(status.sources).reduce((sum, report) => sum + report.dead_letters, 0);
  showDelivery(status.delivery);
  showSources(status, throughput);
  showLetters(letters, Math.max(total, letters.length));
  $("updated").textContent = new Date().toLocaleTimeString();
}

async function poll() {
  try {
    await refresh();
  } catch (error) {
    failed(error);
  }
  if (token()) timer = window.setTimeout(poll, REFRESH_MS);
}

function showBoard() {
  $("login").hidden = true;
  $("board").hidden = false;
  $("sign-out").hidden = false;
  poll();
}

function signOut(reason) {
  window.clearTimeout(timer);
  sessionStorage.removeItem(TOKEN_KEY);
  $("board").hidden = true;
  $("sign-out").hidden = true;
  $("delivery").textContent = "";
  $("login").hidden = false;
  $("login-error").textContent = reason || "";
  $("token").value = "";
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  try {
    await call("/status");
  } catch (error) {
    if (error instanceof Refused) {
      signOut("That is not the admin token.");
      return;
    }
  }
  $("login-error").textContent = "";
  showBoard();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut(""));
  if (token()) showBoard();
  else signOut("");
});

// Scherzer live view: REST for state, server-sent events for live updates. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
let me = null;            // {name, role}
let currentJob = null;    // JobInfo of the running job
let frameBusy = false;    // an <img> load is in flight
let frameNext = null;     // the newest frame event waiting for it
let refreshTimer = null;

// Absolute URLs: fetch() refuses a relative URL when the page was opened as http://user:token@…
const url = (path) => location.origin + path;

function say(text) { $("message").textContent = text || ""; }

async function getJSON(path) {
  const r = await fetch(url(path), { credentials: "same-origin", cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

async function act(path) {
  const r = await fetch(url(path), { method: "POST", credentials: "same-origin",
                                headers: { "X-Scherzer-Request": "1" } });
  const body = await r.json().catch(() => ({}));
  say(r.ok ? "" : `refused (HTTP ${r.status}): ${body.error ? body.error.message : ""}`);
  scheduleRefresh();
  return r.status;
}

function cell(row, text) { const td = row.insertCell(); td.textContent = text; return td; }
function frames(j) { return `${j.frames_done}/${j.frames_total}`; }
function when(t) { return t ? new Date(t * 1000).toLocaleTimeString() : ""; }

function fillQueue(jobs) {
  const body = $("queue").tBodies[0];
  body.replaceChildren();
  for (const j of jobs) {
    const row = body.insertRow();
    row.dataset.jobId = j.job_id;
    [j.job_id, j.name, j.kind, frames(j), j.submitter].forEach((v) => cell(row, v));
    const b = document.createElement("button");
    b.textContent = "Cancel"; b.className = "op"; b.disabled = !isOperator();
    b.onclick = (ev) => { ev.stopPropagation(); act(`/api/jobs/${j.job_id}/cancel`); };
    row.insertCell().append(b);
  }
}

function fillHistory(jobs) {
  const body = $("history").tBodies[0];
  body.replaceChildren();
  for (const j of jobs) {
    const row = body.insertRow();
    row.dataset.jobId = j.job_id;
    [j.job_id, j.name, j.kind, j.state, frames(j), when(j.finished_s)].forEach((v) => cell(row, v));
    row.onclick = () => showJob(j.job_id);
  }
}

function isOperator() { return me && me.role === "operator"; }

function showCurrent(job, progress) {
  currentJob = job;
  $("current").textContent = job ? `#${job.job_id} ${job.name || job.kind} — ${job.state}` : "none";
  $("current").dataset.jobId = job ? job.job_id : "";
  $("cancel-current").disabled = !(job && isOperator());
  if (job) showProgress(progress && progress.job_id === job.job_id ? progress :
    { job_id: job.job_id, frames_done: job.frames_done, frames_total: job.frames_total });
}

function showProgress(p) {
  $("progress").max = Math.max(p.frames_total, 1);
  $("progress").value = p.frames_done;
  const eta = p.eta_s;
  $("eta").textContent = eta == null ? "ETA –" : `ETA ${Math.round(eta)} s`;
}

function showFrame(f) {
  $("frame-counter").textContent = `frame ${f.index + 1} / ${f.total}`;
  $("frame-counter").dataset.index = f.index + 1;
  if (frameBusy) { frameNext = f; return; }
  frameBusy = true;
  const img = $("frame-img");
  img.onload = img.onerror = () => {
    if (img.complete && img.naturalWidth > 0) {
      img.dataset.frameId = f.frame_id;
      img.dataset.shown = Number(img.dataset.shown || 0) + 1;
    }
    frameBusy = false;
    if (frameNext) { const n = frameNext; frameNext = null; showFrame(n); }
  };
  $("frame-caption").textContent = `job ${f.job_id} · ${f.signal} · frame id ${f.frame_id}`;
  img.src = `/api/frames/${f.frame_id}.png`;
}

async function refresh() {
  try {
    const o = await getJSON("/api/overview");
    me = o.user;
    $("who").textContent = `${me.name} (${me.role})`;
    $("state").textContent = `daemon: ${o.status.state}`;
    $("queue-state").textContent = o.paused ? "queue PAUSED" : `queued: ${o.queue.length}`;
    for (const id of ["pause", "resume"]) $(id).disabled = !isOperator();
    fillQueue(o.queue);
    showCurrent(o.current, o.last_progress);
    if (o.last_frame && !$("frame-img").dataset.frameId) showFrame(o.last_frame);
    fillHistory((await getJSON("/api/history?limit=30")).jobs);
    fillReports((await getJSON("/api/reports")).reports);
  } catch (e) { say(String(e)); }
}

function scheduleRefresh() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 150);
}

function gallery(el, urls) {
  el.replaceChildren(...urls.map((u) => {
    const img = document.createElement("img"); img.src = u; img.loading = "lazy"; return img;
  }));
}

async function showJob(id) {
  const d = await getJSON(`/api/jobs/${id}`);
  $("job-title").textContent = `#${id} ${d.job.name || d.job.kind}`;
  const j = d.job;
  $("job-detail").textContent = JSON.stringify({ state: j.state, frames: frames(j),
    file: j.output_file, error: j.error, plan: j.plan }, null, 1);
  gallery($("plots"), d.plots.map((n) => `/api/jobs/${id}/plots/${encodeURIComponent(n)}`));
}

function fillReports(stems) {
  $("reports").replaceChildren(...stems.map((s) => {
    const li = document.createElement("li"); const a = document.createElement("a");
    a.href = "#"; a.textContent = s;
    a.onclick = async (ev) => {
      ev.preventDefault();
      const r = await getJSON(`/api/reports/${encodeURIComponent(s)}`);
      $("report-text").textContent = r.markdown;
      gallery($("report-images"),
        r.images.map((n) => `/api/reports/${encodeURIComponent(s)}/${encodeURIComponent(n)}`));
    };
    li.append(a); return li;
  }));
}

function showLive(l) {
  // the running, drift-compensated average: the daemon names it in the frame cache
  const img = $("live-img");
  img.onload = () => { img.dataset.frameId = l.frame_id; img.dataset.frames = l.frames_averaged; };
  $("live-caption").textContent = `job ${l.job_id} · ${l.signal} · ${l.frames_averaged} frames`
    + (l.frames_skipped ? ` (${l.frames_skipped} left out)` : "")
    + ` · last shift (${l.shift_px.map((v) => v.toFixed(2)).join(", ")}) px`;
  img.src = `/api/frames/${l.frame_id}.png`;
}

function listen() {
  const es = new EventSource(url("/api/events"));
  es.onopen = () => { $("live").textContent = "live"; $("live").className = "pill"; refresh(); };
  es.onerror = () => { $("live").textContent = "live: reconnecting"; $("live").className = "pill off"; };
  const data = (ev) => JSON.parse(ev.data);
  es.addEventListener("frame", (ev) => showFrame(data(ev)));
  es.addEventListener("live", (ev) => showLive(data(ev)));
  es.addEventListener("progress", (ev) => {
    const p = data(ev);
    if (currentJob && p.job_id === currentJob.job_id) showProgress(p); else scheduleRefresh();
  });
  es.addEventListener("job", scheduleRefresh);
  es.addEventListener("queue", scheduleRefresh);
  es.addEventListener("heartbeat", (ev) => { $("state").textContent = `daemon: ${data(ev).state}`; });
}

window.addEventListener("DOMContentLoaded", () => {
  $("pause").onclick = () => act("/api/queue/pause");
  $("resume").onclick = () => act("/api/queue/resume");
  $("cancel-current").onclick = () => currentJob && act(`/api/jobs/${currentJob.job_id}/cancel`);
  refresh();
  listen();
});

// peftlab ui: runs, live metrics, compare, new run, chat. Plain JS over the JSON API (app.py).
"use strict";

const $ = sel => document.querySelector(sel);
const el = (tag, props = {}, ...children) => {
  const e = Object.assign(document.createElement(tag), props);
  for (const c of children) e.append(c);
  return e;
};
const fmt = v => (typeof v === "number" ? niceNumber(v) : (v ?? "–"));
const state = {runs: [], detail: null, records: [], next: 0, timer: null, compare: null};

async function api(path, options) {
  const resp = await fetch(path, options);
  const body = await resp.json().catch(() => ({error: `HTTP ${resp.status}`}));
  if (!resp.ok) throw new Error(body.error || (body.detail && JSON.stringify(body.detail)) ||
    `HTTP ${resp.status}`);
  return body;
}

function badge(st) {
  return el("span", {className: `badge state-${st}`, textContent: st});
}

// ---- views ---------------------------------------------------------------------------
function show(view) {
  document.querySelectorAll(".view").forEach(v => { v.hidden = v.id !== `view-${view}`; });
  document.querySelectorAll("nav button").forEach(b => {
    b.classList.toggle("active", b.dataset.view === view);
  });
  if (view === "compare") renderCompare();
}
document.querySelectorAll("nav button").forEach(b => b.onclick = () => show(b.dataset.view));

// ---- runs ------------------------------------------------------------------------------
async function refreshRuns() {
  let data;
  try { data = await api("/api/runs"); } catch (e) { return; }
  state.runs = data.runs;
  $("#root").textContent = data.root;
  const selected = new Set([...document.querySelectorAll(".run-pick:checked")].map(c => c.value));
  const tbody = $("#runs-table tbody");
  tbody.replaceChildren(...data.runs.map(r => {
    const st = r.status.state;
    const box = el("input", {type: "checkbox", className: "run-pick", value: r.name,
      checked: selected.has(r.name)});
    box.onclick = ev => ev.stopPropagation();
    const status = el("td", {}, badge(st));
    if (r.status.error) status.append(el("div", {className: "error", textContent: r.status.error}));
    const row = el("tr", {className: "clickable"}, el("td", {}, box),
      el("td", {textContent: r.name}), status, el("td", {textContent: r.task ?? ""}),
      el("td", {textContent: r.method ?? ""}), el("td", {textContent: r.model ?? ""}),
      el("td", {textContent: r.max_steps ? `${r.steps}/${r.max_steps}` : r.steps}),
      el("td", {textContent: fmt(r.final_loss)}),
      el("td", {textContent: r.best_value == null ? "–" : `${r.best_metric} ${fmt(r.best_value)}`}));
    row.dataset.run = r.name;
    row.onclick = () => showRun(r.name);
    return row;
  }));
  $("#jobs-table tbody").replaceChildren(...data.jobs.map(j => {
    const stop = el("button", {textContent: "stop", className: "stop-job",
      disabled: !["queued", "running"].includes(j.state)});
    stop.onclick = async () => { await api(`/api/jobs/${j.id}/stop`, {method: "POST"});
      refreshRuns(); };
    const row = el("tr", {}, el("td", {textContent: j.id}), el("td", {textContent: j.name}),
      el("td", {}, badge(j.state)), el("td", {className: "error", textContent: j.error ?? ""}),
      el("td", {}, stop));
    row.dataset.job = j.name;
    return row;
  }));
  fillChatRuns();
  fillComparePicks();
}

async function showRun(name) {
  clearTimeout(state.timer);
  const d = await api(`/api/runs/${encodeURI(name)}/detail`);
  state.detail = name; state.records = []; state.next = 0;
  $("#run-detail").hidden = false;
  $("#detail-title").textContent = name;
  $("#detail-config").textContent = JSON.stringify(d.config, null, 2);
  $("#detail-data").textContent = d.data_report ? JSON.stringify(d.data_report, null, 2) : "–";
  await pollMetrics();
}

async function pollMetrics() {
  const name = state.detail;
  let m;
  try { m = await api(`/api/runs/${encodeURI(name)}/metrics?since=${state.next}`); }
  catch (e) { return; }
  if (name !== state.detail) return;
  state.records.push(...m.records);
  state.next = m.next;
  const st = m.status;
  const status = $("#detail-status");
  status.replaceChildren(badge(st.state));
  if (st.error) status.append(" ", el("span", {className: "error", textContent: st.error}));
  drawRunCharts();
  const final = {};
  for (const r of state.records) for (const [k, v] of Object.entries(r)) {
    if (typeof v === "number" && k !== "epoch") final[k] = v;
  }
  $("#detail-metrics").replaceChildren(...Object.entries(final).map(([k, v]) =>
    el("tr", {}, el("th", {textContent: k}), el("td", {textContent: fmt(v)}))));
  if (st.state === "running") state.timer = setTimeout(pollMetrics, 2000);
}

function series(records, key) {
  return records.filter(r => typeof r[key] === "number").map(r => [r.step, r[key]]);
}

function metricKeys(records) {
  const keys = new Set();
  for (const r of records) for (const [k, v] of Object.entries(r)) {
    if (typeof v === "number" && k !== "step" && k !== "epoch") keys.add(k);
  }
  const order = ["loss", "lr", "tokens_per_s"];
  return [...order.filter(k => keys.has(k)), ...[...keys].filter(k => !order.includes(k)).sort()];
}

function drawRunCharts() {
  $("#detail-charts").replaceChildren(...metricKeys(state.records).map(k =>
    lineChart(k, [{label: k, points: series(state.records, k)}])));
}

// ---- compare ---------------------------------------------------------------------------
function fillComparePicks() {
  const picked = new Set([...document.querySelectorAll(".compare-pick:checked")].map(c => c.value));
  $("#compare-picks").replaceChildren(...state.runs.map(r => {
    const box = el("input", {type: "checkbox", className: "compare-pick", value: r.name,
      checked: picked.has(r.name)});
    box.onchange = renderCompare;
    return el("label", {}, box, " " + r.name);
  }));
  const sweeps = [...new Set(state.runs.filter(r => r.name.includes("/"))
    .map(r => r.name.split("/").slice(0, -1).join("/")))];
  const sel = $("#sweep-select"), current = sel.value;
  sel.replaceChildren(el("option", {value: "", textContent: "(pick runs below)"}),
    ...sweeps.map(s => el("option", {value: s, textContent: s})));
  sel.value = sweeps.includes(current) ? current : "";
}

$("#sweep-select").onchange = () => {
  const prefix = $("#sweep-select").value;
  if (!prefix) return;
  document.querySelectorAll(".compare-pick").forEach(c => {
    c.checked = c.value.startsWith(prefix + "/");
  });
  renderCompare();
};

$("#compare-selected").onclick = () => {
  const names = new Set([...document.querySelectorAll(".run-pick:checked")].map(c => c.value));
  document.querySelectorAll(".compare-pick").forEach(c => { c.checked = names.has(c.value); });
  show("compare");
};

async function renderCompare() {
  const names = [...document.querySelectorAll(".compare-pick:checked")].map(c => c.value);
  if (names.length === 0) {
    $("#compare-chart").replaceChildren(el("p", {className: "muted",
      textContent: "Pick runs (or a sweep) to compare."}));
    $("#compare-table tbody").replaceChildren();
    return;
  }
  const q = names.map(n => `run=${encodeURIComponent(n)}`).join("&");
  const data = await api(`/api/compare?${q}`);
  state.compare = data;
  const keys = [...new Set(Object.values(data.metrics).flatMap(metricKeys))];
  const sel = $("#compare-metric"), best = data.runs[0]?.best_metric;
  const current = keys.includes(sel.value) ? sel.value : (keys.includes(best) ? best : keys[0]);
  sel.replaceChildren(...keys.map(k => el("option", {value: k, textContent: k})));
  sel.value = current;
  drawCompareChart();
  $("#compare-table tbody").replaceChildren(...data.runs.map((r, i) => el("tr", {},
    el("td", {textContent: i + 1}), el("td", {textContent: r.name}),
    el("td", {textContent: r.method ?? ""}),
    el("td", {textContent: `${r.best_metric} (${r.lower_is_better ? "lower" : "higher"} is better)`}),
    el("td", {textContent: fmt(r.best_value)}), el("td", {textContent: r.best_step ?? "–"}),
    el("td", {textContent: fmt(r.final_loss)}), el("td", {}, badge(r.status.state)))));
}

function drawCompareChart() {
  const key = $("#compare-metric").value, data = state.compare;
  if (!data || !key) return;
  const lines = Object.entries(data.metrics).map(([name, recs]) =>
    ({label: name, points: series(recs, key)}));
  $("#compare-chart").replaceChildren(lineChart(key, lines, 640, 320));
}
$("#compare-metric").onchange = drawCompareChart;

// ---- new run ---------------------------------------------------------------------------
let schema = null;

function fieldInput(f) {
  const text = Array.isArray(f.default) ? JSON.stringify(f.default) : String(f.default ?? "null");
  let input;
  if (f.type === "bool" || f.choices) {
    input = el("select", {name: f.key});
    input.append(el("option", {value: "", textContent: `default (${text})`}));
    for (const c of f.choices ?? ["true", "false"]) input.append(el("option", {value: c,
      textContent: c}));
  } else {
    input = el("input", {name: f.key, placeholder: text});
  }
  input.dataset.field = "1";
  return el("label", {}, el("span", {textContent: f.key.split(".").slice(1).join(".")}),
    input, el("span", {className: "type", textContent: f.type}));
}

function renderFields(target, fields, skip = []) {
  target.replaceChildren(...fields.filter(f => !skip.includes(f.key)).map(fieldInput));
}

async function loadSchema() {
  schema = await api("/api/schema");
  const form = $("#new-form");
  form.task.replaceChildren(...schema.tasks.map(t => el("option", {value: t, textContent: t})));
  form.method.replaceChildren(...Object.keys(schema.methods).map(m =>
    el("option", {value: m, textContent: m})));
  form.task.value = "sft";
  form.method.value = "lora";
  $("#model-list").replaceChildren(...schema.models.map(m =>
    el("option", {value: m.name, textContent: m.description})));
  $("#data-list").replaceChildren(...schema.data_files.map(p => el("option", {value: p})));
  renderFields($("#fields-train"), schema.sections.train);
  renderFields($("#fields-data"), schema.sections.data, ["data.train", "data.validation"]);
  renderFields($("#fields-eval"), schema.sections.eval);
  renderFields($("#fields-method"), schema.methods[form.method.value]);
  form.method.onchange = () => renderFields($("#fields-method"), schema.methods[form.method.value]);
}

$("#new-form").onsubmit = async ev => {
  ev.preventDefault();
  const form = ev.target, msg = $("#new-message");
  const values = {};
  for (const input of form.querySelectorAll("[data-field], [name='data.train'], [name='data.validation']")) {
    if (input.value.trim() !== "") values[input.name] = input.value.trim();
  }
  const body = {name: form.name.value.trim(), model: form.model.value.trim(),
    task: form.task.value, method: form.method.value, values, yaml: form.yaml.value,
    overwrite: form.overwrite.checked};
  try {
    const job = await api("/api/jobs", {method: "POST", headers: {"Content-Type":
      "application/json"}, body: JSON.stringify(body)});
    msg.className = "ok";
    msg.textContent = `queued #${job.id}: ${job.name}`;
    await refreshRuns();
  } catch (e) {
    msg.className = "error";
    msg.textContent = e.message;
  }
};

// ---- chat ------------------------------------------------------------------------------
function fillChatRuns() {
  const sel = $("#chat-run"), current = sel.value;
  const ok = state.runs.filter(r => r.has_adapter && r.status.state === "finished");
  sel.replaceChildren(...ok.map(r => el("option", {value: r.name,
    textContent: `${r.name} (${r.method ?? "?"} on ${r.model ?? "?"})`})));
  if (ok.some(r => r.name === current)) sel.value = current;
}

$("#chat-send").onclick = async () => {
  const msg = $("#chat-message");
  msg.className = "muted";
  msg.textContent = "generating…";
  $("#chat-base").textContent = ""; $("#chat-adapter").textContent = "";
  try {
    const r = await api("/api/chat", {method: "POST", headers: {"Content-Type":
      "application/json"}, body: JSON.stringify({run: $("#chat-run").value,
      prompt: $("#chat-prompt").value, max_new_tokens: Number($("#chat-tokens").value)})});
    $("#chat-base").textContent = r.base;
    $("#chat-adapter").textContent = r.adapter;
    msg.className = "ok";
    msg.textContent = "done";
  } catch (e) {
    msg.className = "error";
    msg.textContent = e.message;
  }
};

// ---- start -----------------------------------------------------------------------------
loadSchema();
refreshRuns();
setInterval(refreshRuns, 3000);

// The softprompt playground: plain JS over the public HTTP API (nothing the API refuses is shown).
"use strict";
const $ = (sel) => document.querySelector(sel);
const keyInput = $("#api-key");
keyInput.value = localStorage.getItem("softprompt-api-key") || "";
keyInput.addEventListener("change", () => {
  const k = keyInput.value.trim();
  if (k === (localStorage.getItem("softprompt-api-key") || "")) return;
  localStorage.setItem("softprompt-api-key", k);
  loadAll();
  pollHealth();
});

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const k = keyInput.value.trim();
  if (k) h["Authorization"] = "Bearer " + k;
  return h;
}

// The API's error as one readable line: `error.message` of OpenAI's shape, else the status.
async function errorOf(resp) {
  let msg = `HTTP ${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) msg = `${resp.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  if (resp.status === 429 && resp.headers.get("Retry-After")) msg += ` (retry after ${resp.headers.get("Retry-After")} s)`;
  return msg;
}

async function api(path) {
  const resp = await fetch(path, { headers: headers(false) });
  if (!resp.ok) throw new Error(await errorOf(resp));
  return resp;
}

function banner(msg) {
  const b = $("#banner");
  b.textContent = msg || "";
  b.hidden = !msg;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

// --- models and the store table -----------------------------------------------------------------
let baseModel = "base";

function fmtBytes(n) {
  if (n == null) return "";
  if (n < 1024) return n + " B";
  if (n < 1 << 20) return (n / 1024).toFixed(1) + " KiB";
  return (n / (1 << 20)).toFixed(1) + " MiB";
}

function fmtMetrics(m) {
  return Object.entries(m || {}).map(([k, v]) => `${k} ${typeof v === "number" ? +v.toFixed(4) : v}`).join(", ");
}

async function loadTasks() {
  const data = await (await api("/v1/tasks")).json();
  baseModel = data.base_model || baseModel;
  const checked = new Set([...document.querySelectorAll("#models input:checked")].map((i) => i.value));
  const box = $("#models");
  box.replaceChildren();
  const names = [baseModel, ...data.data.map((r) => r.name)];
  for (const name of names) {
    const input = el("input", { type: "checkbox", value: name, name: "model" });
    input.checked = checked.has(name);
    box.append(el("label", { class: name === baseModel ? "base" : "", title: name === baseModel ? "the base model, no task" : "" },
      input, name === baseModel ? `${name} (base)` : name));
  }
  const body = $("#tasks tbody");
  body.replaceChildren();
  for (const r of data.data) {
    const tr = el("tr", { "data-name": r.name },
      el("td", { text: r.name }), el("td", { class: "num", text: r.version ?? "" }), el("td", { text: r.method || "" }),
      el("td", { class: "num", text: fmtBytes(r.bytes) }), el("td", { text: fmtMetrics(r.metrics) }),
      el("td", { text: r.created || "" }));
    tr.addEventListener("click", () => openTask(r.name, tr));
    body.append(tr);
  }
  if (!data.data.length) body.append(el("tr", {}, el("td", { colspan: "6", class: "muted", text: "no task yet" })));
}

async function openTask(name, tr) {
  document.querySelectorAll("#tasks tr.sel").forEach((x) => x.classList.remove("sel"));
  tr.classList.add("sel");
  const d = $("#detail");
  d.hidden = false;
  d.replaceChildren(el("p", { class: "muted", text: "loading " + name + "…" }));
  const ref = encodeURIComponent(name);
  const left = el("div"), right = el("div");
  try {
    const card = await (await api(`/v1/tasks/${ref}/card`)).json();
    left.append(el("h3", { text: `card of ${name}` + (card.version ? `@${card.version}` : "") }),
      el("pre", { text: JSON.stringify(card.card ?? card, null, 2) }));
  } catch (e) {
    left.append(el("div", { class: "err", text: e.message }));
  }
  right.append(el("h3", { text: "training curves" }));
  try {
    const blob = await (await api(`/v1/tasks/${ref}/plot`)).blob();
    right.append(el("img", { src: URL.createObjectURL(blob), alt: `training curves of ${name}` }));
  } catch (e) {
    right.append(el("p", { class: "muted", text: "no training plot recorded for this task" }));
  }
  right.append(el("h3", { text: "inspection" }));
  try {
    const insp = await (await api(`/v1/tasks/${ref}/inspection`)).json();
    right.append(el("pre", { text: JSON.stringify(insp, null, 2) }));
  } catch (e) {
    right.append(el("p", { class: "muted", text: "no inspection summary yet" }));
  }
  d.replaceChildren(left, right);
}

async function loadAll() {
  try {
    await loadTasks();
    banner("");
  } catch (e) {
    banner(e.message);
  }
}

// --- health from /metrics -----------------------------------------------------------------------
function parseMetrics(text) {
  const m = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const [k, v] = line.split(/\s+/);
    m[k] = parseFloat(v);
  }
  return m;
}

async function pollHealth() {
  const dot = $("#h-state");
  try {
    const m = parseMetrics(await (await api("/metrics")).text());
    const g = (k) => m["softprompt_" + k] ?? m["softprompt_" + k + "_total"];
    $("#h-queue").textContent = g("queue_length") ?? "–";
    $("#h-running").textContent = g("running_rows") ?? "–";
    const mb = g("mean_batch_rows");
    $("#h-batch").textContent = mb == null ? "–" : mb.toFixed(2);
    $("#h-hits").textContent = g("prefix_cache_hits") ?? "–";
    $("#h-misses").textContent = g("prefix_cache_misses") ?? "–";
    dot.className = "dot ok";
    dot.title = "server up";
  } catch (e) {
    dot.className = "dot bad";
    dot.title = e.message;
  }
}

// --- side-by-side streaming ---------------------------------------------------------------------
$("#sampling").addEventListener("change", () => { $("#temperature").disabled = $("#sampling").value === "greedy"; });

function makePanel(model) {
  const stats = el("span", { class: "stats", text: "waiting…" });
  const text = el("div", { class: "text" });
  const panel = el("div", { class: "panel running", "data-model": model },
    el("div", { class: "head" }, el("span", { class: "name", text: model }), stats), text);
  return { panel, stats, text };
}

async function runOne(model, prompt, params) {
  const p = makePanel(model);
  $("#outputs").append(p.panel);
  const t0 = performance.now();
  let first = null, pieces = 0, out = "";
  const fail = (msg) => {
    p.panel.append(el("div", { class: "err", text: msg }));
    p.stats.textContent = "error";
  };
  try {
    const resp = await fetch("/v1/completions", {
      method: "POST", headers: headers(true),
      body: JSON.stringify({ model, prompt, stream: true, ...params }),
    });
    if (!resp.ok) {
      fail(await errorOf(resp));
      if (resp.status === 404) loadAll();  // the task is gone: refresh the list and the table
      return;
    }
    const reader = resp.body.getReader();
    const dec = new TextDecoder();
    let buf = "", finished = null;
    const show = () => {
      const ms = performance.now() - t0;
      const tps = pieces && ms > 0 ? (pieces / (ms / 1000)).toFixed(1) : "–";  // streamed pieces over the whole request
      p.stats.textContent = `latency: first ${first == null ? "–" : first.toFixed(0)} ms, total ${ms.toFixed(0)} ms · ${pieces} tok · ${tps} tok/s`;
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i);
        buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) { fail(msg.error.message); continue; }
          const c = msg.choices && msg.choices[0];
          if (!c) continue;
          if (c.text) {
            if (first == null) first = performance.now() - t0;
            pieces += 1;
            out += c.text;
            p.text.textContent = out;
          }
          if (c.finish_reason) finished = c.finish_reason;
        }
        show();
      }
    }
    show();
    if (finished) p.stats.textContent += ` · ${finished === "length" ? "max tokens" : finished}`;
  } catch (e) {
    fail(String(e.message || e));
  } finally {
    p.panel.classList.remove("running");
    p.panel.setAttribute("data-done", "1");
  }
}

$("#send").addEventListener("click", async () => {
  const models = [...document.querySelectorAll("#models input:checked")].map((i) => i.value);
  const prompt = $("#prompt").value;
  $("#outputs").replaceChildren();
  if (!models.length) { banner("pick at least one task (or the base model)"); return; }
  banner("");
  const params = { max_tokens: parseInt($("#max-tokens").value, 10) };
  params.temperature = $("#sampling").value === "greedy" ? 0 : parseFloat($("#temperature").value);
  $("#send").disabled = true;
  try {
    await Promise.all(models.map((m) => runOne(m, prompt, params)));
  } finally {
    $("#send").disabled = false;
    pollHealth();
  }
});

$("#refresh").addEventListener("click", loadAll);
loadAll();
pollHealth();
setInterval(pollHealth, 2000);

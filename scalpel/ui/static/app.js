// The scalpel dashboard: vanilla JS, no external assets. Reads /ui/api/state (client key), draws the store,
// the update log and the jobs, and calls the adapter routes for promote/rollback with the typed key.
"use strict";

const KEY_ITEM = "scalpel.apiKey";
const SVG_NS = "http://www.w3.org/2000/svg";
let state = null;
let selected = null; // {adapter, version}
let pollTimer = null;
const blobUrls = [];
const results = {}; // adapter name -> {text, kind}: the last admin action's outcome, kept across re-renders

// ----- helpers -----

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(0)}%`);
const num = (x, d = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const when = (t) => (t ? String(t).replace("T", " ").replace("+00:00", "Z") : "–");

function key() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (key()) h.Authorization = `Bearer ${key()}`;
  return h;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || body.detail || JSON.stringify(body);
  } catch (_) {
    return resp.statusText;
  }
}

function showStatus(text, kind, source) {
  const box = document.getElementById("status");
  box.textContent = text;
  box.className = `status ${kind || ""}`;
  box.dataset.source = source || "action";
}

async function api(path, options) {
  const resp = await fetch(path, Object.assign({}, options, { headers: headers((options || {}).headers) }));
  if (!resp.ok) {
    const err = new Error(`${resp.status} ${await errorText(resp)}`);
    err.status = resp.status;
    throw err;
  }
  return resp;
}

// ----- loading -----

async function refresh() {
  try {
    state = await (await api("/ui/api/state")).json();
  } catch (err) {
    state = null;
    document.body.dataset.loaded = "error";
    const hint = err.status === 401 ? " (type the server's API key above)" : "";
    showStatus(`cannot read the dashboard's state: ${err.message}${hint}`, "error", "read");
    schedule(15000);
    return;
  }
  if (document.getElementById("status").dataset.source === "read") showStatus("", "");
  render();
  document.body.dataset.loaded = "yes";
  const running = state.jobs.some((j) => j.status === "running" || j.status === "queued");
  schedule(running ? 2000 : 15000);
}

function schedule(ms) {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(refresh, ms);
}

function render() {
  document.getElementById("serving").textContent = `serving ${state.serving}`;
  renderBases();
  renderAdapters();
  renderRetention();
  renderUpdates();
  renderJobs();
  renderModels();
  if (selected) renderDetail();
}

function fillBody(tableId, rows, empty, columns) {
  const tbody = document.querySelector(`#${tableId} tbody`);
  tbody.replaceChildren(...rows);
  if (!rows.length) tbody.append(el("tr", {}, el("td", { colspan: columns, class: "muted" }, empty)));
}

function renderBases() {
  const rows = state.bases.map((b) =>
    el(
      "tr",
      { "data-base": b.name, class: b.serving ? "live" : null },
      el("td", {}, b.name),
      el("td", {}, b.format),
      el("td", {}, b.architecture),
      el("td", { class: "mono" }, b.fingerprint),
      el("td", {}, when(b.created_at)),
      el("td", {}, b.serving ? el("span", { class: "badge live-badge" }, "serving") : ""),
    ),
  );
  fillBody("bases", rows, "no base registered", 6);
}

// ----- adapters, versions and lineage -----

function suiteCells(v) {
  const ev = v.eval;
  if (!ev) return el("span", { class: "muted" }, "not gated");
  const parts = Object.entries(ev.suites).map(([s, r]) => `${s} ${pct(r.accuracy)}`);
  return parts.join(", ") || "–";
}

function lineageText(a, v) {
  const chain = [];
  const byName = Object.fromEntries(a.versions.map((x) => [x.version, x]));
  let cur = v;
  const seen = new Set();
  while (cur && !seen.has(cur.version)) {
    seen.add(cur.version);
    chain.push(cur.version);
    cur = cur.parent_version ? byName[cur.parent_version] || { version: cur.parent_version } : null;
  }
  return chain.reverse().join(" → ");
}

function renderAdapters() {
  const box = document.getElementById("adapters");
  if (!state.adapters.length) {
    box.replaceChildren(el("p", { class: "muted" }, "no adapter in the store yet"));
    return;
  }
  box.replaceChildren(
    ...state.adapters.map((a) => {
      const rows = a.versions.map((v) => {
        const live = v.version === a.live;
        const decision = v.eval ? (v.eval.promoted ? "promoted" : "rejected") : "–";
        return el(
          "tr",
          {
            "data-adapter": a.name,
            "data-version": v.version,
            "data-live": live ? "true" : "false",
            class: [live ? "live" : "", selected && selected.adapter === a.name && selected.version === v.version ? "selected" : ""].join(" "),
          },
          el("td", {}, el("a", { href: "#", class: "version-link", onclick: (e) => { e.preventDefault(); select(a.name, v.version); } }, v.version),
            live ? el("span", { class: "badge live-badge" }, "live") : ""),
          el("td", { class: "mono" }, lineageText(a, v)),
          el("td", {}, when(v.created_at)),
          el("td", {}, num(v.final_loss)),
          el("td", {}, suiteCells(v)),
          el("td", {}, v.eval && v.eval.base_regression ? pct(v.eval.base_regression.agreement) : "–"),
          el("td", { class: decision }, decision),
          el("td", {}, live ? "" : el("button", { class: "promote", onclick: () => promote(a.name, v.version) }, "Promote")),
        );
      });
      return el(
        "div",
        { class: "card", "data-adapter-card": a.name },
        el(
          "div",
          { class: "card-head" },
          el("h3", {}, a.name),
          el("span", { class: "muted" }, `live: ${a.live || "none"}`),
          a.available ? "" : el("span", { class: "badge bad" }, `unavailable: ${a.problem || "damaged"}`),
          el("button", { class: "rollback", onclick: () => rollback(a.name) }, "Roll back"),
          el("span", { class: `action-result ${(results[a.name] || {}).kind || ""}`, "data-result-for": a.name }, (results[a.name] || {}).text || ""),
        ),
        el(
          "table",
          { class: "versions" },
          el("thead", {}, el("tr", {}, ...["version", "lineage", "created", "final loss", "eval", "base agreement", "gate", ""].map((h) => el("th", {}, h)))),
          el("tbody", {}, rows),
        ),
        a.history.length
          ? el("details", {}, el("summary", {}, `live-pointer history (${a.history.length})`),
              el("ul", {}, a.history.slice().reverse().map((h) => el("li", {}, `${when(h.at)}  ${h.version}  ${h.reason || ""}`))))
          : "",
      );
    }),
  );
}

async function adminAction(name, what, body) {
  let text, kind;
  try {
    const resp = await api(`/api/adapters/${encodeURIComponent(name)}/${what}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body || {}),
    });
    const info = await resp.json();
    [text, kind] = [`${what} ${name}: ${info.previous_version || "–"} → ${info.active_version} is live`, "ok"];
  } catch (err) {
    const hint = err.status === 401 || err.status === 403 ? " — this needs the admin key: type it above" : "";
    [text, kind] = [`${what} ${name} refused: ${err.message}${hint}`, "error"];
  }
  // the store as it is now first, then the outcome: once the outcome shows, the page is up to date
  results[name] = { text, kind };
  await refresh();
  showStatus(text, kind);
}

function promote(name, version) {
  if (!window.confirm(`Make ${name}@${version} the live version?`)) return;
  return adminAction(name, "promote", { version });
}

function rollback(name) {
  if (!window.confirm(`Roll ${name} back to the version that was live before?`)) return;
  return adminAction(name, "rollback", {});
}

// ----- one version: scores, base agreement, plots, report -----

function select(adapter, version) {
  selected = { adapter, version };
  renderAdapters();
  renderDetail();
}

async function renderDetail() {
  const a = state.adapters.find((x) => x.name === selected.adapter);
  const v = a && a.versions.find((x) => x.version === selected.version);
  const section = document.getElementById("detail-section");
  if (!v) { section.hidden = true; return; }
  section.hidden = false;
  const title = `${a.name}@${v.version}`;
  const box = document.getElementById("detail");
  if (box.dataset.shown === `${title}:${JSON.stringify(v)}`) return; // unchanged: keep the images
  box.dataset.shown = `${title}:${JSON.stringify(v)}`;
  document.getElementById("detail-title").textContent = title + (v.version === a.live ? " (live)" : "");
  const parts = [
    el("p", {}, `parent ${v.parent_version || "none"} · base ${v.base || "–"} · ${v.steps ?? "–"} steps · ${v.examples ?? "–"} examples · final loss ${num(v.final_loss)}`
      + (v.job_id ? ` · job ${v.job_id}` : "")),
  ];
  if (v.problems.length) parts.push(el("p", { class: "error" }, `damaged: ${v.problems.join("; ")}`));
  const ev = v.eval;
  if (ev) {
    const rows = [];
    for (const [suite, r] of Object.entries(ev.suites)) {
      rows.push(el("tr", { class: "suite" }, el("th", {}, suite), el("td", {}, pct(r.accuracy)), el("td", {}, ev.retention && suite in ev.retention ? pct(ev.retention[suite]) : "–")));
      for (const [c, acc] of Object.entries(r.per_concept)) rows.push(el("tr", {}, el("td", { class: "concept" }, c), el("td", {}, pct(acc)), el("td", {})));
    }
    parts.push(el("table", { class: "scores" }, el("thead", {}, el("tr", {}, el("th", {}, "suite / concept"), el("th", {}, "accuracy"), el("th", {}, "retention"))), el("tbody", {}, rows)));
    const b = ev.base_regression;
    parts.push(el("p", {}, b ? `base agreement ${pct(b.agreement)} · perplexity change ${b.perplexity_change >= 0 ? "+" : ""}${pct(b.perplexity_change)}` : "no base-regression check"));
    const g = ev.general;
    if (g) parts.push(el("p", {}, `general questions ${g.passed}/${g.total} (the bare base: ${g.base_passed}/${g.total})`));
    const verdict = ev.first_version ? "first version: published live (nothing earlier to gate against)" : "gates passed: promoted";
    parts.push(el("p", { class: ev.promoted ? "ok" : "error" }, ev.promoted ? verdict : `rejected: ${ev.reasons.join("; ")}`));
  } else {
    parts.push(el("p", { class: "muted" }, "no gate evaluation (published without `scalpel update`)"));
  }
  const plots = el("div", { class: "plots" });
  parts.push(plots);
  const report = el("pre", { class: "report" });
  if (v.report) parts.push(el("details", {}, el("summary", {}, "report.md"), report));
  box.replaceChildren(...parts);
  while (blobUrls.length) URL.revokeObjectURL(blobUrls.pop());
  const base = `/ui/api/adapters/${encodeURIComponent(a.name)}/${encodeURIComponent(v.version)}`;
  for (const p of v.plots) {
    try {
      const url = URL.createObjectURL(await (await api(`${base}/plots/${p}`)).blob());
      blobUrls.push(url);
      plots.append(el("figure", {}, el("img", { src: url, alt: p, "data-plot": p }), el("figcaption", {}, p)));
    } catch (err) {
      plots.append(el("p", { class: "error" }, `${p}: ${err.message}`));
    }
  }
  if (v.report) {
    try { report.textContent = await (await api(`${base}/report`)).text(); } catch (err) { report.textContent = err.message; }
  }
}

// ----- retention heatmap -----

function heatColor(x) {
  // red (0) -> amber -> green (1)
  const h = Math.max(0, Math.min(1, x)) * 120;
  return `hsl(${h.toFixed(0)}, 65%, 45%)`;
}

function renderRetention() {
  const box = document.getElementById("retention");
  const maps = [];
  for (const a of state.adapters) {
    if (!a.versions.some((v) => v.eval && Object.keys(v.eval.suites).length)) continue;
    const rows = a.versions; // every version, so the matrix reads as the adapter's history
    const suites = [];
    for (const v of rows) for (const s of Object.keys((v.eval || {}).suites || {})) if (!suites.includes(s)) suites.push(s);
    const cell = 56, left = 70, top = 90, w = left + cell * suites.length + 10, h = top + cell * rows.length + 10;
    const g = svg("svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}`, class: "heatmap", "data-heatmap": a.name, role: "img" });
    suites.forEach((s, j) => {
      const x = left + j * cell + cell / 2;
      g.append(svg("text", { x, y: top - 8, transform: `rotate(-40 ${x} ${top - 8})`, class: "axis" }, s));
    });
    rows.forEach((v, i) => {
      const y = top + i * cell;
      g.append(svg("text", { x: left - 8, y: y + cell / 2 + 4, "text-anchor": "end", class: v.version === a.live ? "axis live-axis" : "axis" }, v.version + (v.version === a.live ? " ●" : "")));
      suites.forEach((s, j) => {
        const x = left + j * cell;
        const r = v.eval && v.eval.suites[s];
        if (!r) {
          const empty = svg("rect", { x, y, width: cell - 2, height: cell - 2, class: "empty-cell" });
          empty.append(svg("title", {}, `${a.name}@${v.version}: not evaluated on ${s}`));
          g.append(empty);
          return;
        }
        const kept = v.eval.retention[s];
        const rect = svg("rect", { x, y, width: cell - 2, height: cell - 2, fill: heatColor(r.accuracy), "data-cell": `${v.version}:${s}` });
        rect.append(svg("title", {}, `${a.name}@${v.version} on ${s}: accuracy ${pct(r.accuracy)}` + (kept !== undefined ? `, retention ${pct(kept)}` : "")));
        g.append(rect, svg("text", { x: x + cell / 2 - 1, y: y + cell / 2 + 4, "text-anchor": "middle", class: "cell-text" }, pct(r.accuracy)));
      });
    });
    maps.push(el("figure", {}, g, el("figcaption", {}, a.name)));
  }
  box.replaceChildren(...(maps.length ? maps : [el("p", { class: "muted" }, "no evaluated versions yet: `scalpel update` evaluates each candidate")]));
}

// ----- update log -----

function renderUpdates() {
  const rows = state.updates.map((u) =>
    el(
      "tr",
      { class: u.promoted ? "promoted-row" : "rejected-row" },
      el("td", {}, when(u.at)),
      el("td", {}, u.adapter),
      el("td", {}, u.version),
      el("td", { class: u.promoted ? "promoted" : "rejected" }, u.promoted ? "promoted" : "rejected"),
      el("td", {}, (u.reasons || []).length ? el("ul", {}, u.reasons.map((r) => el("li", {}, r))) : "all gates passed"),
      el("td", {}, (u.candidates || []).map((c) => `${c.version} ${c.promoted ? "✓" : "✗"}`).join(", ")),
      el("td", {}, Object.entries(u.suites || {}).map(([s, a]) => `${s} ${pct(a)}`).join(", ")),
      el("td", {}, pct(u.base_agreement)),
    ),
  );
  fillBody("updates", rows, "no evening update yet", 8);
}

// ----- jobs and the live loss chart -----

function renderJobs() {
  const rows = state.jobs.map((j) => {
    const p = j.progress || {};
    return el(
      "tr",
      { "data-job": j.id, class: j.status },
      el("td", { class: "mono" }, j.id),
      el("td", {}, j.kind),
      el("td", {}, j.adapter),
      el("td", {}, j.status),
      el("td", {}, p.step !== undefined ? `${p.step}${p.max_steps ? "/" + p.max_steps : ""}` : "–"),
      el("td", {}, num(p.loss ?? (j.result && j.result.final_loss))),
      el("td", {}, j.version || "–"),
    );
  });
  fillBody("jobs", rows, state.jobs_served ? "no job yet" : "jobs are served by `scalpel serve`", 7);
  const chart = document.getElementById("loss-chart");
  const live = state.jobs.find((j) => j.status === "running" && j.loss_history);
  chart.replaceChildren(live ? lossChart(live) : el("p", { class: "muted" }, "no running job"));
}

function lossChart(job) {
  const pts = job.loss_history.filter((p) => typeof p.loss === "number");
  const W = 560, H = 220, L = 48, R = 12, T = 20, B = 30;
  const g = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "loss", "data-loss-chart": job.id });
  g.append(svg("text", { x: L, y: 14, class: "axis" }, `${job.id} (${job.adapter}): training loss`));
  if (!pts.length) {
    g.append(svg("text", { x: L, y: H / 2, class: "axis" }, "waiting for the first logged step"));
    return g;
  }
  const xs = pts.map((p) => p.step), ys = pts.map((p) => p.loss);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys, 0), y1 = Math.max(...ys) * 1.05 || 1;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  g.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "frame" }), svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "frame" }));
  for (const t of [y0, (y0 + y1) / 2, y1]) g.append(svg("text", { x: L - 4, y: sy(t) + 4, "text-anchor": "end", class: "axis" }, t.toFixed(2)));
  g.append(svg("text", { x: W - R, y: H - 8, "text-anchor": "end", class: "axis" }, `step ${x1}`));
  g.append(svg("polyline", { points: pts.map((p) => `${sx(p.step).toFixed(1)},${sy(p.loss).toFixed(1)}`).join(" "), class: "line" }));
  const evals = job.loss_history.filter((p) => typeof p.eval_loss === "number");
  for (const p of evals) g.append(svg("circle", { cx: sx(p.step), cy: sy(p.eval_loss), r: 3, class: "eval-dot" }));
  return g;
}

// ----- chat playground -----

function renderModels() {
  const select = document.getElementById("chat-model");
  const current = select.value;
  const ids = state.models;
  if (select.options.length === ids.length && [...select.options].every((o, i) => o.value === ids[i])) return;
  select.replaceChildren(...ids.map((id) => el("option", { value: id }, id === state.serving ? `${id} (base)` : id)));
  if (ids.includes(current)) select.value = current;
}

async function sendChat(event) {
  event.preventDefault();
  const input = document.getElementById("chat-input");
  const model = document.getElementById("chat-model").value;
  const text = input.value.trim();
  if (!text || !model) return;
  const log = document.getElementById("chat-log");
  log.append(el("div", { class: "msg user" }, el("b", {}, "you → ", model, ": "), text));
  const reply = el("div", { class: "msg assistant" }, el("i", {}, "…"));
  log.append(reply);
  const button = document.getElementById("chat-send");
  button.disabled = true;
  try {
    const resp = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages: [{ role: "user", content: text }], max_tokens: Number(document.getElementById("chat-max").value) || 64 }),
    });
    const body = await resp.json();
    reply.replaceChildren(el("b", {}, `${model}: `), body.choices[0].message.content);
  } catch (err) {
    reply.className = "msg error";
    reply.textContent = `chat refused: ${err.message}`;
  } finally {
    button.disabled = false;
  }
}

// ----- the key -----

function showKeyState() {
  document.getElementById("key-state").textContent = key() ? "key set for this tab" : "no key: read-only";
}

document.getElementById("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = document.getElementById("key");
  if (input.value) sessionStorage.setItem(KEY_ITEM, input.value);
  input.value = "";
  showKeyState();
  refresh();
});
document.getElementById("key-clear").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_ITEM);
  showKeyState();
  refresh();
});
document.getElementById("chat-form").addEventListener("submit", sendChat);
showKeyState();
refresh();

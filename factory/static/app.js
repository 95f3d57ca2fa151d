// The factory dashboard: polls the read-only JSON API of `factory serve` and redraws.
// No framework and nothing fetched from elsewhere: the server's Content-Security-Policy
// allows this origin only. Text from the workspace goes in with textContent, never as HTML.
"use strict";

const POLL_MS = 1000;
const PREFERRED_QUANT_COLUMNS = ["type", "size_bytes", "bits_per_weight", "size_within_bounds", "score", "merged_score",
  "relative_score_drop", "perplexity_ratio", "mean_kl", "tokenizer_agreement", "generation_stops", "path"];
const seen = { trainingSeq: undefined, evaluate: undefined, quantize: undefined };

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value === "number") {
    if (Number.isInteger(value)) return value.toLocaleString("en-US");
    const abs = Math.abs(value);
    return abs !== 0 && (abs < 1e-3 || abs >= 1e6) ? value.toExponential(2) : String(Number(value.toPrecision(4)));
  }
  if (Array.isArray(value)) {  // per-example records are counted, not spelled out in a cell
    return value.some((v) => v && typeof v === "object") ? `${value.length} entries` : "[" + value.map(fmt).join(", ") + "]";
  }
  if (typeof value === "object") return Object.entries(value).map(([k, v]) => `${k} ${fmt(v)}`).join(", ");
  return String(value);
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
  if (seconds < 60) return seconds.toFixed(1) + "s";
  const m = Math.floor(seconds / 60), s = Math.round(seconds % 60);
  if (m < 60) return `${m}m ${String(s).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

function fmtBytes(bytes) {
  if (typeof bytes !== "number") return fmt(bytes);
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
  return `${bytes.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function secondsSince(iso) {
  return iso ? (Date.now() - Date.parse(iso)) / 1000 : null;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  return { ok: response.ok, status: response.status, body, headers: response.headers };
}

function table(columns, rows, caption) {
  const head = el("tr", null, ...columns.map((c) => el("th", { scope: "col" }, c)));
  const body = rows.map((cells) => el("tr", null, ...cells.map((cell) =>
    cell instanceof Node ? cell : el("td", null, cell))));
  return el("table", null, caption ? el("caption", null, caption) : null, el("thead", null, head), el("tbody", null, ...body));
}

// --- the pipeline ------------------------------------------------------------------------

function renderBanner(status, alive) {
  const banner = $("state");
  const running = status.phases.find((p) => p.state === "running");
  let state = status.state, title, detail = "";
  if (state === "idle") {
    title = "Idle: no run has started in this workspace.";
    detail = "Start one with `factory run`; this page follows it.";
  } else if (state === "running" && !alive) {
    state = "stopped";
    title = `Stopped: the run (pid ${status.pid}) ended without writing its final state.`;
    detail = "It was killed. `factory run` resumes it; finetune continues from its last checkpoint.";
  } else if (state === "running") {
    title = running ? `Running: ${running.name}` : "Running";
    detail = running ? running.summary || "" : "";
  } else if (state === "succeeded") {
    title = "Finished: the run succeeded.";
    detail = `Target ${status.target || "all phases"}, ${fmtDuration(durationOf(status))}.`;
  } else if (state === "failed") {
    title = "Failed.";
    detail = status.error ? `${status.error.type}: ${status.error.message}` : "";
  } else if (state === "cancelled") {
    title = "Cancelled.";
    detail = status.error ? status.error.message : "";
  } else {
    title = state;
  }
  banner.dataset.state = state;
  banner.replaceChildren(title, detail ? el("span", { class: "detail" }, detail) : "");
}

function durationOf(status) {
  if (!status.started_at) return null;
  const end = status.ended_at ? Date.parse(status.ended_at) : Date.now();
  return (end - Date.parse(status.started_at)) / 1000;
}

function renderTimeline(status, alive) {
  const items = status.phases.map((p) => {
    let seconds = p.duration_seconds;
    if (p.state === "running" && alive) seconds = secondsSince(p.started_at);
    const gates = p.gates.map((g) => el("div", { class: `gate ${g.passed ? "passed" : "failed"}` },
      `${g.passed ? "✓" : "✗"} ${g.name}`));
    const note = p.error ? `${p.error.type}` : p.state === "skipped" ? "unchanged" : "";
    return el("li", { "data-phase": p.name, "data-state": p.state, title: p.reason || p.summary || "" },
      el("div", { class: "name" }, p.name),
      el("div", { class: "state" }, p.state + (note ? ` (${note})` : "")),
      el("div", { class: "duration" }, seconds === null ? "" : fmtDuration(seconds)),
      ...gates);
  });
  $("timeline").replaceChildren(...items);
}

function renderProgress(status, alive, training) {
  const phase = status.state === "running" && alive ? status.phases.find((p) => p.state === "running") : null;
  $("progress").hidden = !phase;
  if (!phase) return;
  $("progress-phase").textContent = phase.name;
  const progress = phase.progress;
  const live = training && training.running && training.phase === phase.name ? training : null;
  let fraction = null, eta = null;
  if (progress && progress.total) {
    fraction = progress.done / progress.total;
    const elapsed = secondsSince(phase.started_at);
    if (progress.done > 0 && elapsed) eta = elapsed / progress.done * (progress.total - progress.done);
  }
  if (live && live.total_steps) {
    fraction = live.step / live.total_steps;
    eta = live.eta_seconds;
  }
  const fill = $("progress-fill");
  fill.style.width = fraction === null ? "0" : `${Math.min(100, 100 * fraction).toFixed(1)}%`;
  fill.parentElement.setAttribute("aria-valuenow", fraction === null ? "0" : (100 * fraction).toFixed(0));
  $("progress-done").textContent = progress
    ? `${fmt(progress.done)}${progress.total ? " / " + fmt(progress.total) : ""} ${progress.unit}` : "starting…";
  $("step").textContent = live ? `${live.step} / ${fmt(live.total_steps)}` : "—";
  $("epoch").textContent = live ? `${fmt(live.epoch)} / ${fmt(live.total_epochs)}` : "—";
  $("eta").textContent = fmtDuration(eta);
}

// --- training chart ----------------------------------------------------------------------

function renderTrainingSummary(training) {
  const line = $("training-summary");
  if (!training) {
    line.textContent = "No training has started in this workspace yet.";
    return;
  }
  const validation = training.eval_loss === null || training.eval_loss === undefined ? ""
    : ` · validation loss ${fmt(training.eval_loss)} (best ${fmt(training.best_eval_loss)})`;
  line.textContent = `${training.phase}: ${training.status} · step ${training.step} / ${fmt(training.total_steps)}` +
    ` · loss ${fmt(training.loss)}${validation} · learning rate ${fmt(training.learning_rate)}` +
    ` · backend ${fmt(training.backend)}` + (training.error ? ` · error: ${training.error}` : "");
}

function renderChart(points, totalSteps) {
  const chart = $("chart");
  const W = 800, H = 260, left = 60, right = 70, top = 12, bottom = 30;
  // A history point has the training loss and learning rate, the validation loss, or both.
  const plotted = points.filter((p) => typeof p.loss === "number");
  const evaluated = points.filter((p) => typeof p.eval_loss === "number");
  chart.dataset.points = String(plotted.length);
  chart.dataset.evalPoints = String(evaluated.length);
  chart.replaceChildren();
  chart.append(svg("line", { class: "axis", x1: left, y1: H - bottom, x2: W - right, y2: H - bottom }));
  chart.append(svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: H - bottom }));
  chart.append(svg("line", { class: "axis", x1: W - right, y1: top, x2: W - right, y2: H - bottom }));
  if (!plotted.length && !evaluated.length) {
    chart.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no loss logged yet"));
    return;
  }
  const maxStep = Math.max(totalSteps || 0, ...plotted.map((p) => p.step), ...evaluated.map((p) => p.step), 1);
  const losses = plotted.map((p) => p.loss);
  const evalLosses = evaluated.map((p) => p.eval_loss);
  let lo = Math.min(...losses, ...evalLosses), hi = Math.max(...losses, ...evalLosses);
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const rates = plotted.map((p) => p.learning_rate || 0);
  const maxRate = Math.max(...rates) || 1;
  const x = (step) => left + (W - left - right) * step / maxStep;
  const yLoss = (v) => H - bottom - (H - top - bottom) * (v - lo) / (hi - lo);
  const yRate = (v) => H - bottom - (H - top - bottom) * v / maxRate;
  for (let i = 0; i <= 4; i++) {
    const f = i / 4, y = H - bottom - (H - top - bottom) * f;
    chart.append(svg("text", { x: left - 6, y: y + 4, "text-anchor": "end" }, fmt(lo + f * (hi - lo))));
    chart.append(svg("text", { x: W - right + 6, y: y + 4 }, fmt(f * maxRate)));
    const step = Math.round(f * maxStep);
    chart.append(svg("text", { x: x(step), y: H - bottom + 16, "text-anchor": "middle" }, fmt(step)));
  }
  chart.append(svg("text", { x: (W - right + left) / 2, y: H - 2, "text-anchor": "middle" }, "step"));
  const line = (series, y, values, cls) => chart.append(svg("polyline", {
    class: cls, points: series.map((p, i) => `${x(p.step).toFixed(1)},${y(values[i]).toFixed(1)}`).join(" "),
  }));
  line(plotted, yRate, rates, "lr");
  line(plotted, yLoss, losses, "loss");
  line(evaluated, yLoss, evalLosses, "eval");
  for (const p of evaluated) {  // evaluations are sparse: each one is marked
    chart.append(svg("circle", { class: "eval", cx: x(p.step).toFixed(1), cy: yLoss(p.eval_loss).toFixed(1), r: 2.5 }));
  }
}

// --- gates -------------------------------------------------------------------------------

function renderGates(results) {
  const box = $("gates");
  if (!results.length) {
    box.replaceChildren(el("p", { class: "muted" }, "No gate has been checked yet."));
    return;
  }
  box.replaceChildren(...results.map((gate) => {
    const rows = gate.criteria.map((c) => {
      const verdict = c.passed === true ? ["pass", "pass"] : c.passed === false ? ["fail", "fail"] : ["skipped", "skip"];
      const required = c.required !== null && typeof c.value === "string" ? `${fmt(c.required)} (${c.value})`
        : fmt(c.required !== null ? c.required : c.value);
      return [c.metric, fmt(c.observed), c.op, required, el("td", { class: verdict[1] }, verdict[0]),
        c.description || ""];
    });
    const when = new Date(gate.checked_at).toLocaleTimeString();
    const caption = `${gate.gate} (after ${gate.after}): ${gate.passed ? "PASSED" : "FAILED"} · checked ${when}`;
    const t = table(["metric", "observed", "op", "required", "result", "criterion"], rows, caption);
    t.dataset.gate = gate.gate;
    t.dataset.passed = String(gate.passed);
    return t;
  }));
}

// --- evaluation and quantization ---------------------------------------------------------

function renderEvaluation(evaluation) {
  $("evaluation").hidden = !evaluation;
  if (!evaluation) return;
  const scoreRows = Object.entries(evaluation.per_metric || {}).map(([name, m]) =>
    [name + (name === evaluation.primary ? " (primary)" : ""), fmt(m.baseline), fmt(m.finetuned),
      (m.improvement > 0 ? "+" : "") + fmt(m.improvement)]);
  $("evaluation-scores").replaceChildren(table(["metric", "baseline", "fine-tuned", "change"], scoreRows,
    `Scores on ${fmt(evaluation.num_examples)} test examples`));
  const c = evaluation.comparison || {};
  const stats = [
    ["examples (paired)", fmt(c.n)],
    ["improvement", fmt(c.improvement)],
    ["relative improvement", fmt(c.relative_improvement)],
    [`${c.test_name || "paired test"} p`, fmt(c.p_value)],
    ["Wilcoxon signed-rank p", fmt(c.wilcoxon_p_value)],
    ["bootstrap 95% interval", fmt(c.ci95)],
    ["significant", fmt(c.significant)],
  ];
  $("evaluation-statistics").replaceChildren(table(["statistic", "value"], stats, `Statistics on ${c.metric || "the primary metric"}`));
  const flipped = evaluation.flipped || { examples: {} };
  const parts = [];
  for (const direction of ["improved", "regressed"]) {
    const examples = (flipped.examples || {})[direction] || [];
    const rows = examples.slice(0, 10).map((e) => [
      el("td", { class: "text" }, e.prompt), el("td", { class: "text" }, e.reference),
      el("td", { class: "text" }, e.baseline), el("td", { class: "text" }, e.finetuned)]);
    const caption = `${direction}: ${fmt(flipped[direction])} examples` + (examples.length ? ` (first ${rows.length})` : "");
    parts.push(rows.length ? table(["prompt", "reference", "baseline answer", "fine-tuned answer"], rows, caption)
      : el("p", { class: "muted" }, caption));
  }
  $("evaluation-flipped").replaceChildren(...parts);
}

function renderQuantization(quantization) {
  $("quantization").hidden = !quantization;
  if (!quantization) return;
  const types = quantization.types || [];
  const present = new Set(types.flatMap((t) => Object.keys(t)));
  const columns = [...PREFERRED_QUANT_COLUMNS.filter((c) => present.has(c)),
    ...[...present].filter((c) => !PREFERRED_QUANT_COLUMNS.includes(c)).sort()];
  const rows = types.map((t) => columns.map((c) => c === "size_bytes" ? fmtBytes(t[c]) : fmt(t[c])));
  const summary = `${fmt(quantization.gguf_files)} GGUF file(s) · worst relative score drop ` +
    `${fmt(quantization.worst_relative_score_drop)} · sizes within bounds: ${fmt(quantization.all_sizes_within_bounds)}`;
  // every key the phase wrote gets a column, so the table scrolls sideways rather than drop one
  $("quantization-table").replaceChildren(el("div", { class: "scroll" },
    table(columns.map((c) => c.replace(/_/g, " ")), rows, summary)));
}

// A phase's metrics are shown once it succeeded (or was skipped as unchanged) in the current
// run, and fetched again only when that changes.
async function refreshPhaseMetrics(status, name, render) {
  const phase = status.phases.find((p) => p.name === name);
  const done = phase && (phase.state === "succeeded" || phase.state === "skipped");
  const key = done ? `${status.run_id}/${phase.ended_at}` : null;
  if (key === seen[name]) return;
  seen[name] = key;
  if (!done) { render(null); return; }
  const response = await getJSON(`/api/metrics/${name}`);
  render(response.ok ? response.body : null);
}

// --- the loop ----------------------------------------------------------------------------

async function poll() {
  try {
    const [status, training, gates] = await Promise.all(
      [getJSON("/api/status"), getJSON("/api/training"), getJSON("/api/gates")]);
    if (!status.ok) {
      const banner = $("state");
      banner.dataset.state = "failed";
      banner.replaceChildren(`The factory server answered ${status.status}.`,
        el("span", { class: "detail" }, (status.body && status.body.error) || ""));
      return;
    }
    const alive = status.headers.get("X-Factory-Run-Alive") === "true";
    const live = training.ok ? training.body : null;
    renderBanner(status.body, alive);
    renderTimeline(status.body, alive);
    renderProgress(status.body, alive, live);
    renderTrainingSummary(live);
    const trainingSeq = live ? `${live.run_id}/${live.seq}` : null;
    if (trainingSeq !== seen.trainingSeq) {
      const history = live ? await getJSON("/api/training/history") : { ok: true, body: [] };
      if (history.ok) {
        seen.trainingSeq = trainingSeq;
        renderChart(history.body, live && live.total_steps);
      }
    }
    renderGates(gates.ok ? gates.body : []);
    await refreshPhaseMetrics(status.body, "evaluate", renderEvaluation);
    await refreshPhaseMetrics(status.body, "quantize", renderQuantization);
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()} (status seq ${status.body.seq})`;
  } catch (error) {
    const banner = $("state");
    banner.dataset.state = "offline";
    banner.replaceChildren("Cannot reach the factory server.",
      el("span", { class: "detail" }, `${error.message}. Is \`factory serve\` still running? Retrying every second.`));
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();

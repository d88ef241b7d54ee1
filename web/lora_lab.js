// LoRA Lab: the training cockpit in the ComfyUI frontend.
//
// * LoRALabTrain: a live chart (loss per step, smoothed loss, validation and bleed loss with their
//   step-0 values dashed, LR strip) fed by the
//   "lora_lab.progress" websocket event while training runs, rebuilt from the full history when the
//   node finishes (output.lora_lab), with the diagnosis headline and an ETA line. A downsampled copy
//   is kept in node.properties.lora_lab_chart, so it survives a page reload with the workflow.
// * LoRALabOptimizer: a preview of the LR schedule, computed by the server (POST
//   /lora_lab/schedule_preview, the same function the trainer uses), redrawn as the widgets change.
// * LoRALabDataset: the dataset summary (output.text) in a read-only text box; LoRALabApplyLoRA and
//   LoRALabStrengthSweep show their warning (output.text) the same way.
// * A deleted LoRALabTrain node tells the server (POST /lora_lab/release), which frees its training
//   session; clearing the graph to load another workflow does not.
//
// Plain ES module, no build step. Draw code never throws: a failed frame is skipped.
// Read-only debug hook for tests: node.loraLab ({points, liveMessages, diagnosis, ...}).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXT = "LoRALab.Cockpit";
const PROGRESS_EVENT = "lora_lab.progress";
const PREVIEW_ROUTE = "/lora_lab/schedule_preview";
const RELEASE_ROUTE = "/lora_lab/release";
const CHART_PROP = "lora_lab_chart";
const SUMMARY_PROP = "lora_lab_summary";
const STORED_POINTS = 160; // points kept in the saved workflow
const LIVE_POINTS = 4000; // live points kept in memory before thinning
const MIN_REDRAW_MS = 100; // at most ~10 chart redraws per second
const PREVIEW_DEBOUNCE_MS = 250;
const DEFAULT_PREVIEW_STEPS = 1000;
const LOG_SCALE_RATIO = 20; // same rule as the PNG report: log axis when max / min exceeds this
const SCHEDULE_WIDGETS = ["scheduler", "warmup_ratio", "warmup_steps", "min_lr_ratio", "cycles", "power", "unet_lr"];

const C = {
  bg: "#17191e",
  panel: "#1d2026",
  grid: "#2c3038",
  axis: "#5c6370",
  text: "#d5d9e0",
  muted: "#8b93a1",
  raw: "rgba(126, 160, 214, 0.55)",
  smoothed: "#4d9bff",
  val: "#ff9f1a",
  base: "#b98cf0",
  bleed: "#2ec4c4",
  nan: "#ff4d4f",
  lr: "#42c384",
  lrFill: "rgba(66, 195, 132, 0.16)",
  error: "#ff7b72",
};
const VERDICT_COLORS = {
  learning: "#3fb950",
  converged: "#3fb950",
  warming_up: "#8b93a1",
  no_trend: "#8b93a1",
  not_learning: "#e3a008",
  overfitting: "#e3a008",
  diverged: "#f85149",
  nan: "#f85149",
  bleeding: "#e3a008",
};
const FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Arial, sans-serif";

let warnedDraw = false;
function safely(label, fn) {
  try {
    return fn();
  } catch (e) {
    if (!warnedDraw) {
      warnedDraw = true;
      console.warn(`[LoRA Lab] ${label} skipped:`, e);
    }
    return undefined;
  }
}

// ------------------------------------------------------------------ numbers and ticks

const finite = (v) => typeof v === "number" && Number.isFinite(v);

function niceStep(span, count) {
  // d3's rule: the step of 1, 2 or 5 x 10^k whose tick count is closest to `count`.
  const raw = span / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const r = raw / mag;
  return (r >= 7.07 ? 10 : r >= 3.16 ? 5 : r >= 1.41 ? 2 : 1) * mag;
}

function linearTicks(lo, hi, count) {
  if (!(hi > lo) || !finite(lo) || !finite(hi)) return finite(lo) ? [lo] : [];
  const step = niceStep(hi - lo, count);
  const first = Math.ceil(lo / step - 1e-9);
  const out = [];
  for (let i = first; (i * step) <= hi + step * 1e-9 && out.length < 50; i++) out.push(Number((i * step).toPrecision(12)));
  return out;
}

function logTicks(lo, hi) {
  const out = [];
  const a = Math.floor(Math.log10(lo));
  const b = Math.ceil(Math.log10(hi));
  for (const mult of b - a > 2 ? [1] : [1, 2, 5]) {
    for (let e = a; e <= b; e++) {
      const v = mult * Math.pow(10, e);
      if (v >= lo * 0.999 && v <= hi * 1.001) out.push(v);
    }
  }
  return out.sort((x, y) => x - y);
}

function fmtNum(v) {
  if (!finite(v)) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) {
    const [m, e] = v.toExponential(1).split("e");
    return `${m.replace(/\.0$/, "")}e${Number(e)}`;
  }
  return String(Number(v.toPrecision(3)));
}

function fmtStep(v) {
  if (!finite(v)) return "–";
  if (Math.abs(v) >= 10000) return `${Number((v / 1000).toPrecision(3))}k`;
  return String(Math.round(v));
}

function fmtDuration(s) {
  if (!finite(s) || s < 0) return "–";
  s = Math.round(s);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

function yScale(values, forceLinear) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (finite(v)) {
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  if (!finite(lo)) return null;
  const positive = values.filter((v) => finite(v) && v > 0);
  const minPos = positive.length ? Math.min(...positive) : 0;
  const log = !forceLinear && lo > 0 && minPos > 0 && hi / minPos > LOG_SCALE_RATIO;
  if (log) {
    return { log: true, lo: minPos / 1.15, hi: hi * 1.15 };
  }
  if (hi === lo) {
    const pad = Math.abs(hi) * 0.1 || 1;
    return { log: false, lo: lo - pad, hi: hi + pad };
  }
  const pad = (hi - lo) * 0.06;
  return { log: false, lo: lo >= 0 && lo - pad < 0 ? 0 : lo - pad, hi: hi + pad };
}

// ------------------------------------------------------------------ canvas helpers

function prepareCanvas(canvas) {
  const w = Math.max(1, Math.floor(canvas.clientWidth));
  const h = Math.max(1, Math.floor(canvas.clientHeight));
  const dpr = Math.min(3, window.devicePixelRatio || 1);
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  if (!ctx) return null;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { ctx, w, h };
}

function font(size, weight = "") {
  return `${weight} ${size}px ${FONT}`.trim();
}

function wrapText(ctx, text, width, maxLines) {
  const words = String(text || "").split(/\s+/).filter(Boolean);
  const lines = [];
  let line = "";
  for (const word of words) {
    const cand = line ? `${line} ${word}` : word;
    if (ctx.measureText(cand).width <= width || !line) {
      line = cand;
    } else {
      lines.push(line);
      line = word;
    }
  }
  if (line) lines.push(line);
  if (lines.length > maxLines) {
    const kept = lines.slice(0, maxLines);
    let last = kept[maxLines - 1];
    while (last.length > 1 && ctx.measureText(`${last}…`).width > width) last = last.slice(0, -1);
    kept[maxLines - 1] = `${last}…`;
    return kept;
  }
  return lines;
}

// A plot area with an x range and a y scale; maps data to pixels.
function makePlot(box, x0, x1, scale) {
  const ly = (v) => (scale.log ? Math.log10(Math.max(v, scale.lo)) : v);
  const ylo = ly(scale.lo);
  const yhi = ly(scale.hi);
  return {
    box,
    scale,
    x: (s) => box.x + ((s - x0) / (x1 - x0 || 1)) * box.w,
    y: (v) => box.y + box.h - ((ly(v) - ylo) / (yhi - ylo || 1)) * box.h,
  };
}

function drawFrame(ctx, plot, yTicks, xTicks, { yLabel, showX, xLabel }) {
  const { box } = plot;
  ctx.fillStyle = C.panel;
  ctx.fillRect(box.x, box.y, box.w, box.h);
  ctx.lineWidth = 1;
  ctx.font = font(10);
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  for (const t of yTicks) {
    const y = Math.round(plot.y(t)) + 0.5;
    if (y < box.y - 0.5 || y > box.y + box.h + 0.5) continue;
    ctx.strokeStyle = C.grid;
    ctx.beginPath();
    ctx.moveTo(box.x, y);
    ctx.lineTo(box.x + box.w, y);
    ctx.stroke();
    ctx.fillStyle = C.muted;
    ctx.fillText(fmtNum(t), box.x - 5, y);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const t of xTicks) {
    const x = Math.round(plot.x(t)) + 0.5;
    if (x < box.x - 0.5 || x > box.x + box.w + 0.5) continue;
    ctx.strokeStyle = C.grid;
    ctx.beginPath();
    ctx.moveTo(x, box.y);
    ctx.lineTo(x, box.y + box.h);
    ctx.stroke();
    if (showX) {
      ctx.strokeStyle = C.axis;
      ctx.beginPath();
      ctx.moveTo(x, box.y + box.h);
      ctx.lineTo(x, box.y + box.h + 4);
      ctx.stroke();
      ctx.fillStyle = C.muted;
      ctx.fillText(fmtStep(t), x, box.y + box.h + 6);
    }
  }
  ctx.strokeStyle = C.axis;
  ctx.beginPath();
  ctx.moveTo(box.x + 0.5, box.y);
  ctx.lineTo(box.x + 0.5, box.y + box.h + 0.5);
  ctx.lineTo(box.x + box.w, box.y + box.h + 0.5);
  ctx.stroke();
  if (yLabel) {
    ctx.save();
    ctx.fillStyle = C.text;
    ctx.font = font(10, "600");
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    ctx.translate(4, box.y + box.h / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(yLabel, 0, 0);
    ctx.restore();
  }
  if (showX && xLabel) {
    ctx.fillStyle = C.text;
    ctx.font = font(10, "600");
    ctx.textAlign = "right";
    ctx.textBaseline = "top";
    ctx.fillText(xLabel, box.x + box.w, box.y + box.h + 18);
  }
}

function strokeSeries(ctx, plot, xs, ys, color, width) {
  ctx.save();
  ctx.beginPath();
  ctx.rect(plot.box.x, plot.box.y - 1, plot.box.w + 1, plot.box.h + 2);
  ctx.clip();
  ctx.strokeStyle = color;
  ctx.lineWidth = width;
  ctx.lineJoin = "round";
  ctx.lineCap = "round";
  ctx.beginPath();
  let pen = false;
  let drawn = 0;
  let lone = null;
  const n = Math.min(xs.length, ys.length);
  for (let i = 0; i < n; i++) {
    if (!finite(xs[i]) || !finite(ys[i])) {
      pen = false;
      continue;
    }
    const px = plot.x(xs[i]);
    const py = plot.y(ys[i]);
    if (pen) ctx.lineTo(px, py);
    else ctx.moveTo(px, py);
    pen = true;
    drawn += 1;
    lone = [px, py];
  }
  ctx.stroke();
  if (drawn === 1 && lone) {
    // A single point (the first live step) is no line yet: show it as a dot.
    ctx.fillStyle = color;
    ctx.beginPath();
    ctx.arc(lone[0], lone[1], Math.max(2, width), 0, Math.PI * 2);
    ctx.fill();
  }
  ctx.restore();
}

// ------------------------------------------------------------------ training chart state

function emptyChart() {
  return { step: [], loss: [], smoothed: [], lr: [], val_step: [], val_loss: [], bleed_step: [], bleed_loss: [], nan_steps: [], base: null, bleedBase: null, total: 0, eta_s: null, diagnosis: null, notes: [], live: false, finished: false };
}

function asNumbers(list) {
  return Array.isArray(list) ? list.map((v) => (typeof v === "number" ? v : v == null ? NaN : Number(v))) : [];
}

function chartFromOutput(entry) {
  const h = (entry && entry.history) || {};
  const chart = emptyChart();
  chart.step = asNumbers(h.step);
  chart.loss = asNumbers(h.loss);
  chart.smoothed = asNumbers(h.smoothed);
  chart.lr = asNumbers(h.lr);
  chart.val_step = asNumbers(h.val_step);
  chart.val_loss = asNumbers(h.val_loss);
  chart.nan_steps = asNumbers(h.nan_steps);
  chart.base = finite(h.base_val_loss) ? h.base_val_loss : null;
  chart.bleed_step = asNumbers(h.bleed_step);
  chart.bleed_loss = asNumbers(h.bleed_loss);
  chart.bleedBase = finite(h.base_bleed_loss) ? h.base_bleed_loss : null;
  chart.total = finite(entry && entry.total) ? entry.total : chart.step.length ? chart.step[chart.step.length - 1] : 0;
  const d = entry && entry.diagnosis;
  chart.diagnosis = d && typeof d === "object" ? { verdict: String(d.verdict || ""), headline: String(d.headline || ""), advice: Array.isArray(d.advice) ? d.advice.map(String).slice(0, 3) : [] } : null;
  chart.notes = Array.isArray(entry && entry.notes) ? entry.notes.map(String) : [];
  chart.finished = true;
  return chart;
}

// Evenly spaced indices, first and last kept.
function pickIndices(n, max) {
  if (n <= max) return [...Array(n).keys()];
  const out = new Set();
  for (let i = 0; i < max; i++) out.add(Math.round((i * (n - 1)) / (max - 1)));
  return [...out].sort((a, b) => a - b);
}

const round4 = (v) => (finite(v) ? Number(v.toPrecision(5)) : null);

function compactChart(chart) {
  const keep = pickIndices(chart.step.length, STORED_POINTS);
  const vkeep = pickIndices(chart.val_step.length, STORED_POINTS);
  const bkeep = pickIndices(chart.bleed_step.length, STORED_POINTS);
  const take = (arr, idx, f) => idx.map((i) => f(arr[i]));
  return {
    step: take(chart.step, keep, (v) => v),
    loss: take(chart.loss, keep, round4),
    smoothed: take(chart.smoothed, keep, round4),
    lr: take(chart.lr, keep, round4),
    val_step: take(chart.val_step, vkeep, (v) => v),
    val_loss: take(chart.val_loss, vkeep, round4),
    nan_steps: chart.nan_steps.slice(-STORED_POINTS),
    base_val_loss: chart.base,
    bleed_step: take(chart.bleed_step, bkeep, (v) => v),
    bleed_loss: take(chart.bleed_loss, bkeep, round4),
    base_bleed_loss: chart.bleedBase,
    total: chart.total,
    diagnosis: chart.diagnosis,
    notes: chart.notes.slice(0, 3),
  };
}

function thinLive(chart) {
  if (chart.step.length <= LIVE_POINTS) return;
  const keep = pickIndices(chart.step.length, LIVE_POINTS / 2);
  for (const k of ["step", "loss", "smoothed", "lr"]) chart[k] = keep.map((i) => chart[k][i]);
}

function matchesNode(node, id) {
  if (id == null) return false;
  id = String(id);
  if (id === String(node.id)) return node.graph === app.graph || !node.graph;
  // Inside a subgraph the execution id is "outer:inner".
  return node.graph && node.graph !== app.graph && id.endsWith(`:${node.id}`);
}

// ------------------------------------------------------------------ training chart drawing

function drawTrainChart(canvas, state) {
  const prep = prepareCanvas(canvas);
  if (!prep) return;
  const { ctx, w, h } = prep;
  const chart = state.chart;
  ctx.fillStyle = C.bg;
  ctx.fillRect(0, 0, w, h);

  const pad = 8;
  let y = pad;

  // Header, row 1: verdict pill (or the run's state) on the left, progress on the right.
  const d = chart.diagnosis;
  const steps = chart.step;
  const lastStep = steps.length ? steps[steps.length - 1] : 0;
  const showVerdict = d && d.verdict && !chart.live;
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  let pillW = 0;
  if (showVerdict) {
    const label = d.verdict.replace(/_/g, " ").toUpperCase();
    ctx.font = font(11, "700");
    pillW = ctx.measureText(label).width + 16;
    ctx.fillStyle = VERDICT_COLORS[d.verdict] || C.muted;
    ctx.beginPath();
    if (ctx.roundRect) ctx.roundRect(pad, y, pillW, 19, 9.5);
    else ctx.rect(pad, y, pillW, 19);
    ctx.fill();
    ctx.fillStyle = "#0d1117";
    ctx.fillText(label, pad + 8, y + 4);
  } else {
    ctx.font = font(12, "700");
    ctx.fillStyle = chart.live ? C.smoothed : C.muted;
    const msg = chart.live ? "TRAINING…" : steps.length && !chart.finished ? "FINISHING…" : steps.length ? "LAST RUN" : "NO TRAINING YET";
    ctx.fillText(msg, pad, y + 3);
    pillW = ctx.measureText(msg).width;
  }
  if (steps.length) {
    ctx.font = font(11);
    ctx.fillStyle = C.muted;
    ctx.textAlign = "right";
    const total = chart.total || lastStep;
    const pct = total ? ` (${Math.round((100 * lastStep) / total)}%)` : "";
    const prog = chart.live ? `step ${lastStep} / ${total}${pct}` : `step ${lastStep} / ${total}`;
    if (ctx.measureText(prog).width < w - 3 * pad - pillW) ctx.fillText(prog, w - pad, y + 4);
    ctx.textAlign = "left";
  }
  y += 24;

  // Row 2: the diagnosis headline, or what to do / how long is left.
  ctx.font = font(12, "600");
  ctx.fillStyle = C.text;
  let lines;
  if (showVerdict) lines = wrapText(ctx, d.headline, w - 2 * pad, 2);
  else if (chart.live) lines = [`ETA ${fmtDuration(chart.eta_s)} · ${Math.max(0, (chart.total || 0) - lastStep)} steps to go`];
  else if (!steps.length) lines = wrapText(ctx, "Queue the workflow: the loss appears here while the LoRA trains.", w - 2 * pad, 2);
  else lines = [];
  if (!showVerdict) ctx.font = font(11);
  lines.forEach((line, i) => ctx.fillText(line, pad, y + i * 16));
  y += lines.length * 16 + (lines.length ? 4 : 0);

  // Legend (right-aligned row).
  ctx.font = font(10);
  ctx.textBaseline = "middle";
  const legend = [
    ["loss", C.raw, 1.2, false],
    ["smoothed", C.smoothed, 3, false],
    ["validation", C.val, 2, true],
    ...(finite(chart.base) ? [["base model", C.base, 1.5, false]] : []),
    ...(chart.bleed_step.length ? [["bleed", C.bleed, 2, true]] : []),
    ["lr", C.lr, 2, false],
  ];
  let lx = w - pad;
  for (let i = legend.length - 1; i >= 0; i--) {
    const [name, color, lw, marker] = legend[i];
    const tw = ctx.measureText(name).width;
    lx -= tw;
    ctx.fillStyle = C.muted;
    ctx.textAlign = "left";
    ctx.fillText(name, lx, y + 6);
    lx -= 20;
    ctx.strokeStyle = color;
    ctx.lineWidth = lw;
    ctx.beginPath();
    ctx.moveTo(lx, y + 6);
    ctx.lineTo(lx + 15, y + 6);
    ctx.stroke();
    if (marker) {
      ctx.fillStyle = color;
      ctx.beginPath();
      ctx.arc(lx + 7.5, y + 6, 3, 0, Math.PI * 2);
      ctx.fill();
    }
    lx -= 12;
  }
  y += 16;

  const footerH = 18;
  const left = 54;
  const right = w - 12;
  const xAxisH = 30;
  const lrH = Math.max(34, Math.min(70, (h - y - footerH - xAxisH) * 0.24));
  const lossH = h - y - footerH - xAxisH - lrH - 10;
  if (lossH < 30 || right - left < 60) return;

  const firstStep = steps.length ? Math.min(steps[0], 0) : 0;
  const xMax = Math.max(chart.total || 0, lastStep, 1);
  const xTicks = linearTicks(firstStep, xMax, Math.max(2, Math.floor((right - left) / 70)));

  // Loss panel.
  const base = finite(chart.base) ? [chart.base] : [];
  const bleedBase = finite(chart.bleedBase) && chart.bleed_step.length ? [chart.bleedBase] : [];
  const lossScale = yScale([...chart.loss, ...chart.smoothed, ...chart.val_loss, ...base, ...chart.bleed_loss, ...bleedBase]) || { log: false, lo: 0, hi: 1 };
  const lossPlot = makePlot({ x: left, y, w: right - left, h: lossH }, firstStep, xMax, lossScale);
  const yTicks = lossScale.log ? logTicks(lossScale.lo, lossScale.hi) : linearTicks(lossScale.lo, lossScale.hi, Math.max(2, Math.floor(lossH / 32)));
  drawFrame(ctx, lossPlot, yTicks, xTicks, { yLabel: lossScale.log ? "loss (log)" : "loss", showX: false });
  if (steps.length) {
    strokeSeries(ctx, lossPlot, steps, chart.loss, C.raw, 1.2);
    strokeSeries(ctx, lossPlot, steps, chart.smoothed, C.smoothed, 3);
  }
  // The step-0 references, dashed: validation and bleed of the model without the LoRA. Below = better.
  for (const [value, color] of [...base.map((v) => [v, C.base]), ...bleedBase.map((v) => [v, C.bleed])]) {
    ctx.save();
    ctx.setLineDash([6, 4]);
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    ctx.moveTo(left, lossPlot.y(value));
    ctx.lineTo(right, lossPlot.y(value));
    ctx.stroke();
    ctx.restore();
  }
  for (const [xs, ys, color] of [[chart.val_step, chart.val_loss, C.val], [chart.bleed_step, chart.bleed_loss, C.bleed]]) {
    if (!xs.length) continue;
    strokeSeries(ctx, lossPlot, xs, ys, color, 1.5);
    ctx.fillStyle = color;
    ctx.strokeStyle = C.bg;
    ctx.lineWidth = 1;
    for (let i = 0; i < xs.length; i++) {
      if (!finite(xs[i]) || !finite(ys[i])) continue;
      ctx.beginPath();
      ctx.arc(lossPlot.x(xs[i]), lossPlot.y(ys[i]), 3.5, 0, Math.PI * 2);
      ctx.fill();
      ctx.stroke();
    }
  }
  ctx.fillStyle = C.nan;
  for (const s of chart.nan_steps) {
    if (finite(s)) ctx.fillRect(lossPlot.x(s) - 1, y + lossH - 6, 2, 6);
  }
  if (!steps.length) {
    ctx.fillStyle = C.muted;
    ctx.font = font(11);
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("waiting for the first step", left + (right - left) / 2, y + lossH / 2);
  }

  // LR strip.
  const lrY = y + lossH + 10;
  const lrMax = Math.max(0, ...chart.lr.filter(finite));
  const lrScale = { log: false, lo: 0, hi: lrMax > 0 ? lrMax * 1.1 : 1 };
  const lrPlot = makePlot({ x: left, y: lrY, w: right - left, h: lrH }, firstStep, xMax, lrScale);
  drawFrame(ctx, lrPlot, lrMax > 0 ? [0, lrMax] : [0], xTicks, { yLabel: "lr", showX: true, xLabel: "step" });
  if (steps.length) strokeSeries(ctx, lrPlot, steps, chart.lr, C.lr, 2);

  // Footer: latest values.
  const parts = [];
  const sm = chart.smoothed.length ? chart.smoothed[chart.smoothed.length - 1] : NaN;
  if (finite(sm)) parts.push(`smoothed loss ${fmtNum(sm)}`);
  let best = -1;
  chart.val_loss.forEach((v, i) => {
    if (finite(v) && (best < 0 || v < chart.val_loss[best])) best = i;
  });
  if (best >= 0) parts.push(`best val ${fmtNum(chart.val_loss[best])} @ ${fmtStep(chart.val_step[best])}`);
  const lr = chart.lr.length ? chart.lr[chart.lr.length - 1] : NaN;
  if (finite(lr)) parts.push(`lr ${fmtNum(lr)}`);
  if (chart.nan_steps.length) parts.push(`${chart.nan_steps.length} NaN steps`);
  ctx.font = font(11);
  ctx.fillStyle = C.text;
  ctx.textAlign = "left";
  ctx.textBaseline = "bottom";
  // Drop trailing items until the line fits.
  while (parts.length > 1 && ctx.measureText(parts.join("  ·  ")).width > w - 2 * pad) parts.pop();
  ctx.fillText(wrapText(ctx, parts.join("  ·  "), w - 2 * pad, 1)[0] || "", pad, h - 4);
}

// ------------------------------------------------------------------ schedule preview drawing

function drawSchedule(canvas, state) {
  const prep = prepareCanvas(canvas);
  if (!prep) return;
  const { ctx, w, h } = prep;
  ctx.fillStyle = C.bg;
  ctx.fillRect(0, 0, w, h);
  const pad = 6;
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  ctx.font = font(11, "600");
  ctx.fillStyle = C.text;
  const src = state.stepsFromTrain ? "steps from Train" : "default length";
  ctx.fillText(`LR schedule · ${fmtStep(state.steps)} steps (${src})`, pad, pad);
  if (state.error) {
    ctx.font = font(11);
    ctx.fillStyle = C.error;
    wrapText(ctx, state.error, w - 2 * pad, 4).forEach((line, i) => ctx.fillText(line, pad, pad + 20 + i * 15));
    return;
  }
  const pts = state.points || [];
  const left = 54;
  const right = w - 10;
  const top = pad + 20;
  const bottom = h - 30;
  if (!pts.length || bottom - top < 20 || right - left < 40) {
    ctx.font = font(11);
    ctx.fillStyle = C.muted;
    ctx.fillText(pts.length ? "" : "computing…", pad, top + 4);
    return;
  }
  const xs = pts.map((p) => p[0]);
  const ys = pts.map((p) => p[1]);
  const lrMax = Math.max(...ys.filter(finite), 0);
  const xMax = Math.max(state.steps || 1, xs[xs.length - 1] + 1);
  const plot = makePlot({ x: left, y: top, w: right - left, h: bottom - top }, 0, xMax, { log: false, lo: 0, hi: lrMax > 0 ? lrMax * 1.08 : 1 });
  const xTicks = linearTicks(0, xMax, Math.max(2, Math.floor((right - left) / 70)));
  drawFrame(ctx, plot, lrMax > 0 ? [0, lrMax / 2, lrMax] : [0], xTicks, { yLabel: "lr", showX: true, xLabel: "step" });
  // Area under the curve, then the curve.
  ctx.save();
  ctx.beginPath();
  ctx.moveTo(plot.x(xs[0]), plot.y(0));
  for (let i = 0; i < xs.length; i++) ctx.lineTo(plot.x(xs[i]), plot.y(ys[i]));
  ctx.lineTo(plot.x(xs[xs.length - 1]), plot.y(0));
  ctx.closePath();
  ctx.fillStyle = C.lrFill;
  ctx.fill();
  ctx.restore();
  strokeSeries(ctx, plot, xs, ys, C.lr, 2);
  if (state.warmup > 0) {
    const x = plot.x(state.warmup);
    ctx.save();
    ctx.setLineDash([3, 3]);
    ctx.strokeStyle = C.muted;
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(x, top);
    ctx.lineTo(x, bottom);
    ctx.stroke();
    ctx.restore();
    ctx.font = font(10);
    ctx.fillStyle = C.muted;
    ctx.textAlign = x > right - 90 ? "right" : "left";
    ctx.fillText(`warmup ${state.warmup}`, x + (x > right - 90 ? -4 : 4), top + 2);
  }
}

// ------------------------------------------------------------------ widgets

function makeCanvasWidget(node, name, minHeight, draw) {
  const el = document.createElement("div");
  el.className = "lora-lab-chart";
  el.style.cssText = "width:100%;height:100%;box-sizing:border-box;padding:0;overflow:hidden;border-radius:6px;";
  const canvas = document.createElement("canvas");
  canvas.style.cssText = "display:block;width:100%;height:100%;";
  el.appendChild(canvas);
  const widget = node.addDOMWidget(name, "lora_lab_chart", el, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => minHeight,
    getValue: () => "",
    setValue: () => {},
  });
  widget.serialize = false;

  let frame = 0;
  let last = 0;
  let timer = 0;
  const paint = () => {
    frame = 0;
    last = performance.now();
    if (!canvas.isConnected || canvas.clientWidth < 2 || canvas.clientHeight < 2) return;
    safely("chart draw", () => draw(canvas));
  };
  // Bounded redraw rate: at most one frame per MIN_REDRAW_MS, coalesced into animation frames.
  const schedule = () => {
    if (frame || timer) return;
    const wait = MIN_REDRAW_MS - (performance.now() - last);
    const go = () => {
      timer = 0;
      frame = requestAnimationFrame(paint);
    };
    if (wait > 0) timer = setTimeout(go, wait);
    else go();
  };
  if (typeof ResizeObserver !== "undefined") {
    const ro = new ResizeObserver(() => schedule());
    ro.observe(el);
    widget.onRemove = ((orig) =>
      function () {
        ro.disconnect();
        if (timer) clearTimeout(timer);
        if (frame) cancelAnimationFrame(frame);
        return orig?.apply(this, arguments);
      })(widget.onRemove);
  }
  return { widget, canvas, el, schedule };
}

// Properties changed outside a user gesture: tell the workflow's change tracker, so the new state
// is what the browser keeps across a reload (and what Save writes).
function markChanged() {
  safely("change tracking", () => {
    const canvas = app.canvas;
    if (canvas?.emitBeforeChange && canvas?.emitAfterChange) {
      canvas.emitBeforeChange();
      canvas.emitAfterChange();
    }
  });
}

function fitNode(node, minWidth) {
  safely("resize", () => {
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0], minWidth), Math.max(node.size[1], size[1])]);
  });
}

// --- LoRALabTrain

const trainNodes = new Set();

function setupTrainNode(node) {
  const state = { chart: emptyChart(), liveMessages: 0 };
  const view = makeCanvasWidget(node, "lora_lab_chart", 280, (canvas) => drawTrainChart(canvas, state));
  view.el.dataset.loraLab = "train-chart";
  state.redraw = view.schedule;
  node.loraLab = {
    get points() {
      return state.chart.step.length;
    },
    get valPoints() {
      return state.chart.val_step.length;
    },
    get base() {
      return state.chart.base;
    },
    get bleedPoints() {
      return state.chart.bleed_step.length;
    },
    get bleedBase() {
      return state.chart.bleedBase;
    },
    get liveMessages() {
      return state.liveMessages;
    },
    get diagnosis() {
      return state.chart.diagnosis ? { ...state.chart.diagnosis } : null;
    },
    get live() {
      return state.chart.live;
    },
    get total() {
      return state.chart.total;
    },
    element: view.el,
    canvas: view.canvas,
    redraw: view.schedule,
  };
  node._loraLabState = state;
  trainNodes.add(node);
  fitNode(node, 460);
  return state;
}

function onProgress(event) {
  const data = event && event.detail;
  if (!data || typeof data !== "object") return;
  for (const node of trainNodes) {
    if (!node.graph || !matchesNode(node, data.node)) continue;
    const state = node._loraLabState;
    if (!state) continue;
    safely("progress", () => {
      const c = state.chart;
      const step = Number(data.step);
      if (!finite(step)) return;
      const lastStep = c.step.length ? c.step[c.step.length - 1] : -Infinity;
      if (step < lastStep || c.finished) {
        // A new queue: keep the history when it continues, start over when it restarted.
        const continuing = c.finished && step > lastStep;
        const prev = c;
        state.chart = emptyChart();
        if (continuing) {
          for (const k of ["step", "loss", "smoothed", "lr", "val_step", "val_loss", "bleed_step", "bleed_loss", "nan_steps"]) state.chart[k] = prev[k].slice();
          state.chart.base = prev.base;
          state.chart.bleedBase = prev.bleedBase;
        }
      }
      const chart = state.chart;
      chart.live = step < Number(data.total);
      chart.finished = false;
      chart.total = finite(Number(data.total)) ? Number(data.total) : chart.total;
      chart.eta_s = finite(data.eta_s) ? data.eta_s : null;
      if (finite(data.base_val_loss)) chart.base = data.base_val_loss;
      if (finite(data.base_bleed_loss)) chart.bleedBase = data.base_bleed_loss;
      if (!chart.step.length || step > chart.step[chart.step.length - 1]) {
        chart.step.push(step);
        chart.loss.push(finite(data.loss) ? data.loss : NaN);
        chart.smoothed.push(finite(data.smoothed) ? data.smoothed : NaN);
        chart.lr.push(finite(data.lr) ? data.lr : NaN);
        if (!finite(data.loss)) chart.nan_steps.push(step);
      }
      for (const kind of ["val", "bleed"]) {
        const xs = chart[`${kind}_step`], ys = chart[`${kind}_loss`];
        const vs = Array.isArray(data[`${kind}_step`]) ? data[`${kind}_step`] : [];
        const vl = Array.isArray(data[`${kind}_loss`]) ? data[`${kind}_loss`] : [];
        for (let i = 0; i < Math.min(vs.length, vl.length); i++) {
          if (finite(vs[i]) && vs[i] > (xs.length ? xs[xs.length - 1] : -Infinity)) {
            xs.push(vs[i]);
            ys.push(finite(vl[i]) ? vl[i] : NaN);
          }
        }
      }
      thinLive(chart);
      state.liveMessages += 1;
      state.redraw();
    });
  }
}

function onTrainExecuted(node, output) {
  const state = node._loraLabState;
  const entry = output && Array.isArray(output.lora_lab) ? output.lora_lab[0] : null;
  if (!state || !entry) return;
  safely("executed", () => {
    state.chart = chartFromOutput(entry);
    node.properties = node.properties || {};
    node.properties[CHART_PROP] = compactChart(state.chart);
    state.redraw();
    markChanged();
  });
}

function restoreTrainChart(node) {
  const state = node._loraLabState;
  const saved = node.properties && node.properties[CHART_PROP];
  if (!state || !saved || typeof saved !== "object") return;
  safely("restore", () => {
    state.chart = chartFromOutput({ history: saved, diagnosis: saved.diagnosis, notes: saved.notes, total: saved.total });
    state.redraw();
  });
}

// --- LoRALabOptimizer

function connectedTrainSteps(node) {
  try {
    const out = node.outputs && node.outputs[0];
    const graph = node.graph;
    if (!out || !out.links || !graph) return null;
    for (const linkId of out.links) {
      const link = graph.links instanceof Map ? graph.links.get(linkId) : graph.links?.[linkId];
      if (!link) continue;
      const target = graph.getNodeById(link.target_id);
      if (!target || (target.comfyClass || target.type) !== "LoRALabTrain") continue;
      const steps = target.widgets?.find((w) => w.name === "steps");
      const epochs = target.widgets?.find((w) => w.name === "epochs");
      if (epochs && Number(epochs.value) > 0) continue; // length depends on the dataset: unknown here
      const v = Number(steps?.value);
      // The Train node's id too: when it holds a session, the server draws its continuation.
      if (Number.isInteger(v) && v >= 1) return { steps: v, node: String(target.id) };
    }
  } catch (e) {
    return null;
  }
  return null;
}

function setupOptimizerNode(node) {
  const state = { points: [], error: "", steps: DEFAULT_PREVIEW_STEPS, stepsFromTrain: false, warmup: 0, requests: 0, answered: 0, signature: "" };
  const view = makeCanvasWidget(node, "lora_lab_schedule", 130, (canvas) => drawSchedule(canvas, state));
  view.el.dataset.loraLab = "schedule-preview";
  state.redraw = view.schedule;
  let timer = 0;
  let seq = 0;

  const values = () => {
    const body = {};
    for (const name of SCHEDULE_WIDGETS) {
      const w = node.widgets?.find((x) => x.name === name);
      if (w) body[name] = w.value;
    }
    const fromTrain = connectedTrainSteps(node);
    body.steps = fromTrain ? fromTrain.steps : DEFAULT_PREVIEW_STEPS;
    if (fromTrain) body.train_node = fromTrain.node;
    body.points = 200;
    return { body, fromTrain: !!fromTrain };
  };

  const fetchPreview = async () => {
    timer = 0;
    const { body, fromTrain } = values();
    const mine = ++seq;
    state.requests += 1;
    try {
      const res = await api.fetchApi(PREVIEW_ROUTE, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      const data = await res.json().catch(() => ({ error: `preview: HTTP ${res.status}` }));
      if (mine !== seq) return; // a newer request is on its way
      state.steps = Number(data && data.steps) || body.steps;
      state.stepsFromTrain = fromTrain;
      if (data && Array.isArray(data.points)) {
        state.points = data.points;
        state.warmup = Number(data.warmup_steps) || 0;
        state.error = "";
      } else {
        state.points = [];
        state.error = String((data && data.error) || "preview unavailable");
      }
    } catch (e) {
      if (mine !== seq) return;
      state.points = [];
      state.error = "preview unavailable (server not reachable)";
    }
    state.answered += 1;
    state.redraw();
  };

  const refresh = () => {
    if (timer) clearTimeout(timer);
    timer = setTimeout(fetchPreview, PREVIEW_DEBOUNCE_MS);
  };
  // Catches every way a value can change (typing, undo, paste, Train's steps): compared on draw.
  const check = () => {
    const { body } = values();
    const sig = JSON.stringify(body);
    if (sig !== state.signature) {
      state.signature = sig;
      refresh();
    }
  };
  for (const w of node.widgets || []) {
    if (!SCHEDULE_WIDGETS.includes(w.name)) continue;
    const orig = w.callback;
    w.callback = function () {
      const r = orig?.apply(this, arguments);
      check();
      return r;
    };
  }
  node.loraLab = {
    get points() {
      return state.points.length;
    },
    get error() {
      return state.error;
    },
    get steps() {
      return state.steps;
    },
    get answered() {
      return state.answered;
    },
    get lastPoint() {
      return state.points.length ? state.points[state.points.length - 1].slice() : null;
    },
    element: view.el,
    canvas: view.canvas,
    refresh: check,
  };
  node._loraLabCheck = check;
  node._loraLabRefresh = refresh;
  fitNode(node, 320);
  setTimeout(check, 0);
}

// --- LoRALabDataset

function setupDatasetNode(node, placeholder = "Dataset stats appear here after a run.", kind = "dataset-summary") {
  const area = document.createElement("textarea");
  area.className = "comfy-multiline-input";
  area.readOnly = true;
  area.placeholder = placeholder;
  area.dataset.loraLab = kind;
  area.style.cssText = "font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px;line-height:1.35;resize:none;opacity:0.9;";
  const widget = node.addDOMWidget("lora_lab_summary", "lora_lab_summary", area, {
    hideOnZoom: false,
    serialize: false,
    getMinHeight: () => 110,
    getValue: () => area.value,
    setValue: () => {},
  });
  widget.serialize = false;
  node.loraLab = {
    get text() {
      return area.value;
    },
    element: area,
  };
  node._loraLabSummary = (text) => {
    area.value = text;
  };
}

function onDatasetExecuted(node, output) {
  const text = output && output.text;
  if (text == null || !node._loraLabSummary) return;
  const s = Array.isArray(text) ? text.map(String).join("\n") : String(text);
  node._loraLabSummary(s);
  node.properties = node.properties || {};
  node.properties[SUMMARY_PROP] = s.slice(0, 4000);
  markChanged();
}

// --- LoRALabApplyLoRA, LoRALabStrengthSweep: a warning (a LoRA that only partly fits) in a text box,
// added when the first one arrives and emptied by a run without one.
function onWarningExecuted(node, output) {
  const text = output && output.text;
  const s = text == null ? "" : Array.isArray(text) ? text.map(String).join("\n") : String(text);
  if (!s && !node._loraLabSummary) return;
  if (!node._loraLabSummary) {
    setupDatasetNode(node, "", "node-warning");
    fitNode(node, 0);
  }
  node._loraLabSummary(s);
}

// ------------------------------------------------------------------ session release

// LGraph.clear() (loading or switching a workflow, undo) also calls onRemoved on every node, after
// resetting the graph's node counter; a graph that still holds a node has counted up to its id.
// Those nodes are not being deleted: their training sessions stay.
function graphIsClearing(graph) {
  const last = graph.state?.lastNodeId;
  return typeof last === "number" ? last === 0 : graph.id === "00000000-0000-0000-0000-000000000000";
}

// A deleted Train node gives its training session (weights, optimizer state) back to the server.
// Nodes inside a subgraph run under another id and are left alone.
function releaseSession(node) {
  const graph = node.graph;
  if (!graph || graph.isRootGraph === false || node.id == null || graphIsClearing(graph)) return;
  const body = JSON.stringify({ node_id: String(node.id) });
  api.fetchApi(RELEASE_ROUTE, { method: "POST", headers: { "Content-Type": "application/json" }, body }).catch(() => {});
}

// ------------------------------------------------------------------ registration

function chain(proto, name, after) {
  const orig = proto[name];
  proto[name] = function () {
    const r = orig?.apply(this, arguments);
    safely(name, () => after.apply(this, arguments));
    return r;
  };
}

app.registerExtension({
  name: EXT,
  setup() {
    api.addEventListener(PROGRESS_EVENT, onProgress);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData && nodeData.name;
    if (name === "LoRALabTrain") {
      chain(nodeType.prototype, "onNodeCreated", function () {
        setupTrainNode(this);
      });
      chain(nodeType.prototype, "onExecuted", function (output) {
        onTrainExecuted(this, output);
        // Its session moved on: the connected Optimizer's preview now shows the continuation.
        for (const n of this.graph?._nodes || []) n._loraLabRefresh?.();
      });
      chain(nodeType.prototype, "onConfigure", function () {
        restoreTrainChart(this);
        fitNode(this, 0);
      });
      chain(nodeType.prototype, "onRemoved", function () {
        trainNodes.delete(this);
        releaseSession(this);
      });
      // The optimizer preview follows this node's steps.
      chain(nodeType.prototype, "onWidgetChanged", function () {
        for (const n of this.graph?._nodes || []) n._loraLabCheck?.();
      });
    } else if (name === "LoRALabOptimizer") {
      chain(nodeType.prototype, "onNodeCreated", function () {
        setupOptimizerNode(this);
      });
      chain(nodeType.prototype, "onConfigure", function () {
        fitNode(this, 0);
        this._loraLabCheck?.();
      });
      chain(nodeType.prototype, "onConnectionsChange", function () {
        this._loraLabCheck?.();
      });
      chain(nodeType.prototype, "onDrawForeground", function () {
        this._loraLabCheck?.();
      });
    } else if (name === "LoRALabApplyLoRA" || name === "LoRALabStrengthSweep") {
      chain(nodeType.prototype, "onExecuted", function (output) {
        onWarningExecuted(this, output);
      });
    } else if (name === "LoRALabDataset") {
      chain(nodeType.prototype, "onNodeCreated", function () {
        setupDatasetNode(this);
      });
      chain(nodeType.prototype, "onExecuted", function (output) {
        onDatasetExecuted(this, output);
      });
      chain(nodeType.prototype, "onConfigure", function () {
        const saved = this.properties && this.properties[SUMMARY_PROP];
        if (typeof saved === "string" && this._loraLabSummary) this._loraLabSummary(saved);
        fitNode(this, 0);
      });
    }
  },
});

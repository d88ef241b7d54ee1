// LoRA Lab: drawing the training chart and the LR schedule preview on a canvas (used by lora_lab.js).
// Plain ES module, no side effects: ComfyUI loads every file of the extension folder.

const LOG_SCALE_RATIO = 20; // same rule as the PNG report: log axis when max / min exceeds this

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
export function safely(label, fn) {
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

export const finite = (v) => typeof v === "number" && Number.isFinite(v);

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

export function font(size, weight = "") {
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

export function drawTrainChart(canvas, state) {
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

export function drawSchedule(canvas, state) {
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

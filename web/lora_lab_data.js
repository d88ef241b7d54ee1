// LoRA Lab: the training chart's data (from the Train node's output, compacted for the saved
// workflow, thinned while live). Plain ES module, no side effects; used by lora_lab.js.

import { finite } from "./lora_lab_draw.js";

export const STORED_POINTS = 160; // points kept in the saved workflow
export const LIVE_POINTS = 4000; // live points kept in memory before thinning
// ------------------------------------------------------------------ training chart state

export function emptyChart() {
  return { step: [], loss: [], smoothed: [], lr: [], val_step: [], val_loss: [], bleed_step: [], bleed_loss: [], nan_steps: [], base: null, bleedBase: null, total: 0, eta_s: null, diagnosis: null, notes: [], live: false, finished: false };
}

function asNumbers(list) {
  return Array.isArray(list) ? list.map((v) => (typeof v === "number" ? v : v == null ? NaN : Number(v))) : [];
}

export function chartFromOutput(entry) {
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

export function compactChart(chart) {
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

export function thinLive(chart) {
  if (chart.step.length <= LIVE_POINTS) return;
  const keep = pickIndices(chart.step.length, LIVE_POINTS / 2);
  for (const k of ["step", "loss", "smoothed", "lr"]) chart[k] = keep.map((i) => chart[k][i]);
}

export function matchesNode(node, id) {
  if (id == null) return false;
  id = String(id);
  if (id === String(node.id)) return node.graph === app.graph || !node.graph;
  // Inside a subgraph the execution id is "outer:inner".
  return node.graph && node.graph !== app.graph && id.endsWith(`:${node.id}`);
}

// ------------------------------------------------------------------ training chart drawing

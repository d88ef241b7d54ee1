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
import { drawSchedule, drawTrainChart, finite, font, safely } from "./lora_lab_draw.js";
import { chartFromOutput, compactChart, emptyChart, matchesNode, thinLive } from "./lora_lab_data.js";

const EXT = "LoRALab.Cockpit";
const PROGRESS_EVENT = "lora_lab.progress";
const PREVIEW_ROUTE = "/lora_lab/schedule_preview";
const RELEASE_ROUTE = "/lora_lab/release";
const CHART_PROP = "lora_lab_chart";
const SUMMARY_PROP = "lora_lab_summary";
const MIN_REDRAW_MS = 100; // at most ~10 chart redraws per second
const PREVIEW_DEBOUNCE_MS = 250;
const DEFAULT_PREVIEW_STEPS = 1000;
const SCHEDULE_WIDGETS = ["scheduler", "warmup_ratio", "warmup_steps", "min_lr_ratio", "cycles", "power", "unet_lr"];

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

"""The browser extension (web/lora_lab.js, drawing in lora_lab_draw.js, chart data in lora_lab_data.js) in a real ComfyUI frontend, driven by headless Chromium.

Needs, besides COMFYUI_PATH (see conftest.py):
    * Chromium: Debian/Ubuntu `apt-get install chromium` (/usr/bin/chromium; another binary via
      LORA_LAB_CHROMIUM=/path/to/chrome)
    * Playwright for Python: `pip install playwright` (only the Python package: the system
      Chromium above is used, no `playwright install` browser download)
The browser tests skip with the reason when either is missing; the schedule-route tests only need
the server.

What is checked: the example workflow loads, the Dataset / Optimizer / Train nodes get their
widgets, the schedule preview follows widget edits, queueing the workflow feeds the Train node's
chart live (websocket progress events, with the base model's validation as the step-0 reference)
and then with the full history and the diagnosis, the chart
survives a page reload, and the extension logs no errors. The screenshot goes to
test-artifacts/frontend_chart.png.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tiny_models import DATASET_DIR_NAME, TINY_CKPT_NAME

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
from headless.workflow import DATASET, OPTIMIZER, TRAIN, TrainingOptions, training_prompt  # noqa: E402
from trainer.schedule import ScheduleConfig, preview  # noqa: E402

EXAMPLE_WORKFLOW = REPO_ROOT / "example_workflows" / "train_sd15_lora.json"
ARTIFACTS = REPO_ROOT / "test-artifacts"
SCREENSHOT = ARTIFACTS / "frontend_chart.png"
ROUTE = "/lora_lab/schedule_preview"
EXTENSION_URL = "/extensions/lora_lab/"
STEPS = 30
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]


def options() -> TrainingOptions:
    return TrainingOptions(
        checkpoint=TINY_CKPT_NAME, dataset=DATASET_DIR_NAME, output_name="frontend_test", resolution=64, steps=STEPS,
        mixed_precision="fp32", gradient_checkpointing=False, unet_lr=2e-3, scheduler="cosine", warmup_ratio=0.1,
        validation_split=0.25, test_size=64, test_steps=4, test_cfg=2.0, test_prompt="a photo of sks object",
        strengths="0, 1.0",
    )


def post(url: str, body, timeout: float = 30.0):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


# ------------------------------------------------------------------ the schedule route (HTTP only)

@pytest.mark.parametrize("prefix", ["", "/api"])
@pytest.mark.parametrize("settings, expected_config, steps", [
    ({"scheduler": "cosine", "warmup_ratio": 0.05, "unet_lr": 1e-4}, ScheduleConfig("cosine", warmup_ratio=0.05), 1000),
    ({"scheduler": "cosine_with_restarts", "warmup_ratio": 0.0, "warmup_steps": 7, "cycles": 3, "min_lr_ratio": 0.1, "unet_lr": 3e-4},
     ScheduleConfig("cosine_with_restarts", warmup_steps=7, cycles=3, min_lr_ratio=0.1), 120),
    ({"scheduler": "polynomial", "warmup_ratio": 0.1, "power": 2.0, "unet_lr": 1e-3}, ScheduleConfig("polynomial", warmup_ratio=0.1, power=2.0), 5000),
    # the Optimizer node's rules: warmup_steps > 0 wins over the ratio; 'constant' drops warmup
    ({"scheduler": "linear", "warmup_ratio": 0.05, "warmup_steps": 10, "unet_lr": 1e-4}, ScheduleConfig("linear", warmup_steps=10), 200),
    ({"scheduler": "constant", "warmup_ratio": 0.05, "unet_lr": 5e-5}, ScheduleConfig("constant"), 50),
])
def test_schedule_route_matches_trainer_preview(comfy_server, prefix, settings, expected_config, steps):
    status, body = post(comfy_server.url + prefix + ROUTE, {**settings, "steps": float(steps)})
    assert status == 200, body
    assert "error" not in body, body
    lr = settings["unet_lr"]
    want = preview(expected_config, lr, steps)
    assert [p[0] for p in body["points"]] == [s for s, _ in want]
    for (_, got), (_, exp) in zip(body["points"], want):
        assert math.isclose(got, exp, rel_tol=1e-12, abs_tol=0.0)
    assert body["steps"] == steps and body["base_lr"] == lr


def test_schedule_route_names_the_wrong_field(comfy_server):
    status, body = post(comfy_server.url + ROUTE, {"scheduler": "linear", "warmup_steps": 50, "warmup_ratio": 0.0, "steps": 40})
    assert status == 200 and body["field"] == "warmup_steps", body
    assert body["error"].startswith("warmup_steps: ")
    status, body = post(comfy_server.url + ROUTE, {"scheduler": "nope", "steps": 40})
    assert status == 200 and body["field"] == "scheduler", body
    status, body = post(comfy_server.url + ROUTE, {"unet_lr": 0, "steps": 40})
    assert status == 200 and body["field"] == "unet_lr", body
    status, body = post(comfy_server.url + ROUTE, [1, 2])
    assert status == 400 and "error" in body


def test_extension_is_served(comfy_server):
    with urllib.request.urlopen(comfy_server.url + "/extensions") as r:
        listed = json.loads(r.read())
    for name in ("lora_lab.js", "lora_lab_draw.js", "lora_lab_data.js"):  # the extension and the modules it imports
        assert any(p.endswith("/lora_lab/" + name) for p in listed), (name, listed)
    with urllib.request.urlopen(comfy_server.url + EXTENSION_URL + "lora_lab.js") as r:
        assert b"registerExtension" in r.read()


# ------------------------------------------------------------------ the browser

def chromium_path():
    explicit = os.environ.get("LORA_LAB_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if Path(name).is_file():
            return name
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("frontend tests need Playwright for Python: pip install playwright (no browser download needed)")
    exe = chromium_path()
    if not exe:
        pytest.skip("frontend tests need Chromium: apt-get install chromium (or set LORA_LAB_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Console:
    """Everything the page reports, and the part of it that comes from this extension."""

    def __init__(self, page):
        self.entries = []
        page.on("console", lambda m: self.entries.append((m.type, m.text, (m.location or {}).get("url", ""))))
        page.on("pageerror", lambda e: self.entries.append(("pageerror", f"{e}\n{getattr(e, 'stack', '') or ''}", "")))
        page.on("response", lambda r: r.status >= 400 and self.entries.append(("http", f"HTTP {r.status} {r.url}", r.url)))

    def ours(self):
        marks = ("lora_lab", "LoRA Lab", "loraLab")
        return [e for e in self.entries
                if e[0] in ("error", "warning", "pageerror", "http") and any(m in e[1] or m in e[2] for m in marks)]


def open_page(browser, url):
    # Mark the first-run tutorial done, or a template dialog covers the graph.
    post(url + "/settings/Comfy.TutorialCompleted", True)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    console = Console(page)
    page.goto(url + "/")
    page.wait_for_function(
        "() => window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.LoRALabTrain",
        timeout=120_000)
    return page, console


LOAD_WORKFLOW_JS = """
async ([workflow, prompt]) => {
  const app = window.comfyAPI.app.app;
  let source = "api";
  if (workflow) {
    await app.loadGraphData(workflow, true, true, "train_sd15_lora");
    const ok = Object.entries(prompt).every(([id, n]) => app.graph.getNodeById(Number(id))?.type === n.class_type);
    if (ok) source = "example"; else app.graph.clear();
  }
  if (source === "api") await app.loadApiJson(prompt, "train_sd15_lora");
  // The example workflow trains a real SD1.5 for 500 steps: use the test's tiny settings, and the
  // defaults for everything the prompt leaves out (so an input added since the example was last
  // written cannot shift the saved values onto the wrong widgets).
  for (const [id, n] of Object.entries(prompt)) {
    const node = app.graph.getNodeById(Number(id));
    const fresh = window.LiteGraph.createNode(n.class_type);
    for (const w of node.widgets || []) {
      if (w.serialize === false || w.name === "control_after_generate") continue;
      const has = Object.prototype.hasOwnProperty.call(n.inputs, w.name);
      const value = has ? n.inputs[w.name] : fresh?.widgets?.find((f) => f.name === w.name)?.value;
      if (Array.isArray(value) || value === undefined) continue;
      w.value = value;
      w.callback?.(value);
    }
    fresh?.onRemoved?.();
  }
  app.graph.setDirtyCanvas(true, true);
  return source;
}
"""

FOCUS_JS = """
(ids) => {
  // Scroll the canvas so these nodes sit at the top left, at 100%.
  const app = window.comfyAPI.app.app;
  const nodes = ids.map((id) => app.graph.getNodeById(id));
  const ds = app.canvas.ds;
  ds.scale = 1;
  ds.offset[0] = -(Math.min(...nodes.map((n) => n.pos[0])) - 20);
  ds.offset[1] = -(Math.min(...nodes.map((n) => n.pos[1])) - 60);
  app.canvas.setDirty(true, true);
  return [app.canvas.canvas.width, app.canvas.canvas.height];
}
"""


BLEED_PIXELS_JS = """
(id) => {
  // Pixels of the bleed colour (#2ec4c4, the chart's C.bleed) on the Train node's chart.
  const c = window.comfyAPI.app.app.graph.getNodeById(id).loraLab.canvas;
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i] - 46) + Math.abs(d[i + 1] - 196) + Math.abs(d[i + 2] - 196) < 24) n++;
  return n;
}
"""


def node_info(page, node_id):
    return page.evaluate(
        """(id) => {
          const n = window.comfyAPI.app.app.graph.getNodeById(id);
          const l = n && n.loraLab;
          if (!l) return null;
          const out = {};
          for (const k of ["points", "valPoints", "base", "bleedPoints", "bleedBase", "liveMessages", "diagnosis", "live", "total", "error", "steps", "answered", "lastPoint", "text"]) {
            try { if (k in l) out[k] = l[k]; } catch (e) {}
          }
          const el = l.element;
          out.visible = !!el && el.isConnected && el.getBoundingClientRect().width > 50;
          return out;
        }""",
        int(node_id))


def wait_for(page, node_id, predicate, timeout, what):
    deadline = time.monotonic() + timeout
    info = None
    while time.monotonic() < deadline:
        info = node_info(page, node_id)
        if info is not None and predicate(info):
            return info
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; node {node_id}: {info}")


def set_widget(page, node_id, name, value):
    page.evaluate(
        """([id, name, value]) => {
          const n = window.comfyAPI.app.app.graph.getNodeById(id);
          const w = n.widgets.find((w) => w.name === name);
          w.value = value;
          w.callback?.(value);
        }""",
        [int(node_id), name, value])


def queue_idle(url):
    with urllib.request.urlopen(url + "/queue") as r:
        q = json.loads(r.read())
    return not q.get("queue_running") and not q.get("queue_pending")


def wait_idle(url, timeout):
    deadline = time.monotonic() + timeout
    while not queue_idle(url):
        if time.monotonic() > deadline:
            raise AssertionError(f"the ComfyUI queue is still busy after {timeout}s")
        time.sleep(0.5)


def test_cockpit_in_the_browser(comfy_server, browser):
    url = comfy_server.url
    page, console = open_page(browser, url)
    try:
        _run_cockpit(page, console, comfy_server)
    finally:
        page.close()


def _run_cockpit(page, console, srv):
    url = srv.url
    prompt = training_prompt(options())
    workflow = json.loads(EXAMPLE_WORKFLOW.read_text()) if EXAMPLE_WORKFLOW.is_file() else None
    source = page.evaluate(LOAD_WORKFLOW_JS, [workflow, prompt])
    assert source == ("example" if workflow else "api")

    # Schedule preview: the server's curve for the Train node's 30 steps, redrawn on edits.
    opt = wait_for(page, OPTIMIZER, lambda i: i["points"] > 0 and i["steps"] == STEPS, 30, "the schedule preview")
    assert opt["visible"] and not opt["error"], opt
    expected = preview(ScheduleConfig("cosine", warmup_ratio=0.1), 2e-3, STEPS)
    assert opt["points"] == len(expected)
    assert opt["lastPoint"][0] == expected[-1][0] and math.isclose(opt["lastPoint"][1], expected[-1][1], rel_tol=1e-12)
    set_widget(page, OPTIMIZER, "min_lr_ratio", 0.5)
    edited = wait_for(page, OPTIMIZER, lambda i: i["answered"] > opt["answered"] and i["lastPoint"][1] > opt["lastPoint"][1], 15, "the preview to follow an edit")
    assert math.isclose(edited["lastPoint"][1], preview(ScheduleConfig("cosine", warmup_ratio=0.1, min_lr_ratio=0.5), 2e-3, STEPS)[-1][1], rel_tol=1e-12)
    set_widget(page, OPTIMIZER, "warmup_steps", 40)  # longer than the run: the error is shown, not thrown
    wait_for(page, OPTIMIZER, lambda i: i["error"].startswith("warmup_steps:"), 15, "the preview to show the error")
    set_widget(page, OPTIMIZER, "warmup_steps", 0)
    set_widget(page, OPTIMIZER, "min_lr_ratio", 0.0)
    wait_for(page, OPTIMIZER, lambda i: not i["error"] and i["points"] == len(expected), 15, "the preview to recover")

    set_widget(page, TRAIN, "mode", "restart")  # a fresh LoRA whatever ran on this server before
    train = node_info(page, TRAIN)
    assert train is not None and train["visible"] and train["points"] == 0, train

    # Queue from the page, as a user would: live progress, then the full history.
    wait_idle(url, 600)  # progress from an earlier prompt would look like ours
    srv.free()
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST", timeout=60_000) as queued:
        page.evaluate("() => window.comfyAPI.app.app.queuePrompt(0, 1)")
    assert queued.value.status == 200, f"the page's prompt was rejected: {queued.value.text()[:3000]}"
    live = wait_for(page, TRAIN, lambda i: i["liveMessages"] > 0, 600, "live progress events")
    assert live["total"] == STEPS, live
    assert live["base"] > 0, live  # the base model's validation: the step-0 reference line
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate(FOCUS_JS, [int(TRAIN), int(OPTIMIZER)])
    time.sleep(0.5)
    page.locator('[data-lora-lab="train-chart"]').screenshot(path=str(ARTIFACTS / "frontend_chart_live.png"))
    done = wait_for(page, TRAIN, lambda i: i["diagnosis"] is not None and not i["live"], 900, "the diagnosis")
    assert done["points"] >= STEPS // 2, done  # the full history replaced the sampled live points
    assert done["valPoints"] >= 2 and done["base"] > 0, done
    assert done["diagnosis"]["verdict"] and done["diagnosis"]["headline"], done
    # Concept bleed (the Dataset node's default control set): its series, its step-0 value, and
    # the line in its own colour on the canvas.
    assert done["bleedPoints"] == done["valPoints"] and done["bleedBase"] > 0, done
    assert page.evaluate(BLEED_PIXELS_JS, int(TRAIN)) > 30
    wait_idle(url, 600)
    wait_for(page, DATASET, lambda i: "encoded:" in i["text"], 30, "the dataset summary")

    size = page.evaluate(FOCUS_JS, [int(TRAIN), int(OPTIMIZER)])
    assert size[0] > 0
    time.sleep(1.0)
    page.screenshot(path=str(SCREENSHOT))
    page.locator('[data-lora-lab="train-chart"]').screenshot(path=str(ARTIFACTS / "frontend_chart_widget.png"))
    page.evaluate(FOCUS_JS, [int(DATASET)])
    wait_for(page, DATASET, lambda i: i["visible"], 10, "the dataset summary on screen")
    page.locator('[data-lora-lab="dataset-summary"]').screenshot(path=str(ARTIFACTS / "frontend_dataset.png"))

    # The chart is kept (downsampled) with the workflow: it is back after a reload.
    page.reload()
    page.wait_for_function(
        "(id) => window.comfyAPI?.app?.app?.graph?.getNodeById(id)?.loraLab", arg=int(TRAIN), timeout=120_000)
    restored = wait_for(page, TRAIN, lambda i: i["points"] > 0 and i["diagnosis"] is not None, 30, "the chart after a reload")
    assert restored["diagnosis"] == done["diagnosis"] and restored["base"] == pytest.approx(done["base"], rel=1e-4)

    assert console.ours() == [], console.ours()

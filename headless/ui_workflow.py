"""API-format prompt -> ComfyUI UI-format (LiteGraph) workflow, and the example workflow files.

    ui = api_to_ui(prompt, object_info, layout=None, groups=None)

``prompt`` is an API-format graph ({id: {"class_type", "inputs"}}), ``object_info`` the JSON of
ComfyUI's GET /object_info (at least the classes the prompt uses). The result is the workflow JSON
the frontend saves and loads (version 0.4): nodes with sockets, outputs and ``widgets_values``,
links ``[id, from_node, from_slot, to_node, to_slot, type]``, groups, ``extra.ds``.

``widgets_values`` follow the frontend's rules (ComfyUI_frontend 1.2x, litegraphService + widgets):
every widget input (INT, FLOAT, STRING, BOOLEAN, COMBO; not ``forceInput``), required then optional,
each in ``input_order`` (dict order where a class has none), and right after an INT named seed /
noise_seed (or any INT/COMBO with ``control_after_generate``) the value of its control widget, here
always "fixed" so a loaded workflow re-runs with the values written in it. Inputs the prompt leaves
out get their defaults. Sockets are written the way the frontend exports them: every non-widget
input (``link`` null when unconnected), plus widget inputs only where a link feeds them.

``layout`` maps a prompt node id to {"pos": [x, y], "size": [w, h], "title", "color", "bgcolor"}
(any key optional; a bare [x, y] is a pos); nodes without one are placed in columns by depth.
``groups`` is a list of {"title", "nodes": [prompt ids]} (bounding computed around them) or
{"title", "bounding": [x, y, w, h]}, each with an optional "color".

The example workflows are example_workflows/train_{sd15,sdxl,flux}_lora.json (EXAMPLES), each with a
.jpg thumbnail: a diagram of its graph. Regenerate all of them from the repo root with

    COMFYUI_PATH=/path/to/ComfyUI python -m headless.ui_workflow example_workflows/
    python -m headless.ui_workflow OUT.json --family sdxl --object-info object_info.json

(a file named like an example gets that example's family unless --family says otherwise).

No ComfyUI imports: this is data (the thumbnail needs Pillow).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .workflow import (
    CKPT, CLIP_LOADER, DATASET, FAMILIES, GUIDANCE, LATENT, NEG, NETWORK, OPTIMIZER, POS, PRECISION, PREVIEW, REPORT,
    REPORT_SAVE, SAVE, SWEEP, SWEEP_SAVE, TRAIN, VAE_LOADER, TrainingOptions, training_prompt,
)

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_NAMES = ("seed", "noise_seed")  # INT inputs the frontend gives a control_after_generate widget
CONTROL_VALUE = "fixed"

# LiteGraph metrics (px) used to size nodes so their widgets fit.
TITLE_H, SLOT_H, WIDGET_H, NODE_W = 30, 20, 24, 320
# Room for the pack's own drawn widgets (web/lora_lab.js): (minimum width, extra height).
EXTRA_ROOM = {"LoRALabTrain": (460, 300), "LoRALabOptimizer": (NODE_W, 140), "LoRALabDataset": (NODE_W, 110)}
GROUP_PAD, GROUP_HEADER = 24, 40

_EXAMPLE_COMMON = dict(dataset="lora_dataset", output_name="my_lora", trigger_word="sks",
                       test_prompt="a photo of sks person", preview_every=100)
# family -> (file name without extension in example_workflows/, the options it is built from)
EXAMPLES = {
    "sd15": ("train_sd15_lora", TrainingOptions(checkpoint="v1-5-pruned-emaonly.safetensors", **_EXAMPLE_COMMON)),
    "sdxl": ("train_sdxl_lora", TrainingOptions(family="sdxl", checkpoint="sd_xl_base_1.0.safetensors", **_EXAMPLE_COMMON)),
    "flux": ("train_flux_lora", TrainingOptions(family="flux", checkpoint="flux1-dev.safetensors", **_EXAMPLE_COMMON)),
    "qwen_image": ("train_qwen_image_lora", TrainingOptions(family="qwen_image", checkpoint="qwen_image_fp8_e4m3fn.safetensors", **_EXAMPLE_COMMON)),
    "wan": ("train_wan_video_lora", TrainingOptions(family="wan", checkpoint="wan2.1_t2v_1.3B_fp16.safetensors", **_EXAMPLE_COMMON)),
}
EXAMPLE_OPTIONS = EXAMPLES["sd15"][1]


# ----------------------------------------------------------------- node definitions
def ordered_inputs(info: dict) -> list[tuple[str, list, bool]]:
    """[(name, spec, optional)] in the frontend's order: required then optional, each by input_order."""
    spec = info.get("input") or {}
    order = info.get("input_order") or {}
    out = []
    for section, optional in (("required", False), ("optional", True)):
        inputs = spec.get(section) or {}
        names = [n for n in order.get(section, []) if n in inputs]
        names += [n for n in inputs if n not in names]
        out += [(n, list(inputs[n]) if isinstance(inputs[n], (list, tuple)) else [inputs[n]], optional) for n in names]
    return out


def _opts(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def input_type(spec) -> str:
    t = spec[0] if spec else "*"
    return "COMBO" if isinstance(t, (list, tuple)) else str(t)


def is_widget(spec) -> bool:
    return input_type(spec) in WIDGET_TYPES and not _opts(spec).get("forceInput")


def has_control(name: str, spec) -> bool:
    t, o = input_type(spec), _opts(spec)
    if t == "INT":
        return bool(o.get("control_after_generate", name in CONTROL_NAMES))
    return t == "COMBO" and bool(o.get("control_after_generate"))


def default_value(spec):
    t, o = input_type(spec), _opts(spec)
    if "default" in o:
        return o["default"]
    if t == "COMBO":
        options = spec[0] if isinstance(spec[0], (list, tuple)) else o.get("options") or []
        return options[0] if options else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[t]


def widget_names(info: dict) -> list[str | None]:
    """Names of the widgets in widgets_values order; None marks a control_after_generate value."""
    out = []
    for name, spec, _ in ordered_inputs(info):
        if is_widget(spec):
            out.append(name)
            if has_control(name, spec):
                out.append(None)
    return out


def outputs_of(info: dict) -> list[tuple[str, str]]:
    types = [t if isinstance(t, str) else "COMBO" for t in info.get("output") or []]
    names = list(info.get("output_name") or types)
    return [(names[i] if i < len(names) else t, t) for i, t in enumerate(types)]


def types_match(out_type: str, in_type: str) -> bool:
    if "*" in (out_type, in_type) or out_type == in_type:
        return True
    return bool(set(out_type.split(",")) & set(in_type.split(",")))


def node_size(class_type: str, object_info: dict) -> list[int]:
    """A size (body, below the title bar) that fits the node's sockets and widgets."""
    info = object_info[class_type]
    specs = ordered_inputs(info)
    sockets = sum(1 for _, s, _ in specs if not is_widget(s))
    rows = max(sockets, len(outputs_of(info)))
    width, height = NODE_W, rows * SLOT_H + 10
    for name, spec, _ in specs:
        if not is_widget(spec):
            continue
        if input_type(spec) == "STRING" and _opts(spec).get("multiline"):
            width, height = 400, height + 150
        else:
            height += WIDGET_H * (2 if has_control(name, spec) else 1)
    if info.get("output_node") and not info.get("output"):  # SaveImage & co: room for the preview
        width, height = 440, height + 300
    min_width, extra = EXTRA_ROOM.get(class_type, (0, 0))
    return [max(width, min_width), max(height + extra, 46)]


# ----------------------------------------------------------------- conversion
def _is_link(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def _ui_ids(prompt: dict) -> dict:
    if all(str(k).isdigit() for k in prompt):
        return {k: int(k) for k in prompt}
    ids, nxt = {}, max([int(k) for k in prompt if str(k).isdigit()] or [0]) + 1
    for k in prompt:
        if str(k).isdigit():
            ids[k] = int(k)
        else:
            ids[k], nxt = nxt, nxt + 1
    return ids


def _topo_order(prompt: dict, ids: dict) -> dict:
    deps = {k: {v[0] for v in n["inputs"].values() if _is_link(v)} for k, n in prompt.items()}
    order, done = {}, set()
    while len(done) < len(prompt):
        ready = sorted((k for k in prompt if k not in done and deps[k] <= done), key=lambda k: ids[k])
        if not ready:
            raise ValueError(f"the prompt has a cycle among nodes {sorted(set(prompt) - done)}")
        for k in ready:
            order[k] = len(order)
            done.add(k)
    return order


def _auto_positions(prompt: dict, ids: dict, sizes: dict) -> dict:
    depth = {}

    def d(k):
        if k not in depth:
            srcs = [v[0] for v in prompt[k]["inputs"].values() if _is_link(v)]
            depth[k] = 1 + max((d(s) for s in srcs), default=-1)
        return depth[k]

    cols: dict[int, list] = {}
    for k in sorted(prompt, key=lambda k: ids[k]):
        cols.setdefault(d(k), []).append(k)
    pos, x = {}, 0
    for c in sorted(cols):
        y = 0
        for k in cols[c]:
            pos[k] = [x, y]
            y += sizes[k][1] + TITLE_H + 30
        x += max(sizes[k][0] for k in cols[c]) + 60
    return pos


def group_bounding(nodes: list[dict]) -> list[int]:
    x0 = min(n["pos"][0] for n in nodes) - GROUP_PAD
    y0 = min(n["pos"][1] for n in nodes) - TITLE_H - GROUP_PAD - GROUP_HEADER
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes) + GROUP_PAD
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes) + GROUP_PAD
    return [x0, y0, x1 - x0, y1 - y0]


def api_to_ui(prompt: dict, object_info: dict, layout: dict | None = None, groups: list | None = None) -> dict:
    """The UI-format workflow of an API-format prompt (see the module docstring)."""
    layout = {str(k): (v if isinstance(v, dict) else {"pos": list(v)}) for k, v in (layout or {}).items()}
    missing = sorted({n["class_type"] for n in prompt.values()} - set(object_info))
    if missing:
        raise ValueError(f"object_info lacks the node classes {missing}")
    ids = _ui_ids(prompt)
    order = _topo_order(prompt, ids)
    keys = sorted(prompt, key=lambda k: ids[k])
    sizes = {k: list(layout.get(k, {}).get("size") or node_size(prompt[k]["class_type"], object_info)) for k in keys}
    auto = _auto_positions(prompt, ids, sizes)

    nodes, links = {}, []
    out_links: dict[tuple, list] = {}
    for k in keys:  # sockets and widget values, links numbered in node order then socket order
        node, info = prompt[k], object_info[prompt[k]["class_type"]]
        given = dict(node["inputs"])
        specs = ordered_inputs(info)
        unknown = sorted(set(given) - {n for n, _, _ in specs})
        if unknown:
            raise ValueError(f"node {k} ({node['class_type']}): unknown inputs {unknown}")
        inputs, values = [], []
        for name, spec, _ in specs:
            value = given.get(name)
            widget = is_widget(spec)
            if _is_link(value):
                src, slot = value
                if src not in prompt:
                    raise ValueError(f"node {k} input {name!r} links to missing node {src!r}")
                src_outputs = outputs_of(object_info[prompt[src]["class_type"]])
                if not 0 <= slot < len(src_outputs):
                    raise ValueError(f"node {k} input {name!r} links to output {slot} of node {src}, which has {len(src_outputs)}")
                ltype, itype = src_outputs[slot][1], input_type(spec)
                if not types_match(ltype, itype):
                    raise ValueError(f"node {k} input {name!r} ({itype}) is fed {ltype} by node {src}")
                link_id = len(links) + 1
                links.append([link_id, ids[src], slot, ids[k], len(inputs), ltype])
                out_links.setdefault((src, slot), []).append(link_id)
                sock = {"name": name, "type": itype, "link": link_id}
                if widget:
                    sock["widget"] = {"name": name}
                inputs.append(sock)
            elif not widget:
                inputs.append({"name": name, "type": input_type(spec), "link": None})
            if widget:
                values.append(default_value(spec) if value is None or _is_link(value) else value)
                if has_control(name, spec):
                    values.append(CONTROL_VALUE)
        lay = layout.get(k, {})
        ui = {"id": ids[k], "type": node["class_type"], "pos": list(lay.get("pos") or auto[k]), "size": sizes[k],
              "flags": {}, "order": order[k], "mode": 0, "inputs": inputs, "outputs": [],
              "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": values}
        for key in ("title", "color", "bgcolor"):
            if lay.get(key):
                ui[key] = lay[key]
        nodes[k] = ui
    for k in keys:
        nodes[k]["outputs"] = [{"name": name, "type": t, "links": out_links.get((k, i), []), "slot_index": i}
                               for i, (name, t) in enumerate(outputs_of(object_info[prompt[k]["class_type"]]))]

    ui_groups = []
    for g in groups or []:
        if "bounding" in g:
            bounding = list(g["bounding"])
        else:
            bounding = group_bounding([nodes[str(n)] for n in g["nodes"]])
        ui_groups.append({"title": g["title"], "bounding": bounding, "color": g.get("color", "#3f789e"),
                          "font_size": 24, "flags": {}})

    all_nodes = [nodes[k] for k in keys]
    x0 = min([n["pos"][0] for n in all_nodes] + [g["bounding"][0] for g in ui_groups])
    y0 = min([n["pos"][1] - TITLE_H for n in all_nodes] + [g["bounding"][1] for g in ui_groups])
    return {
        "last_node_id": max(ids.values()),
        "last_link_id": len(links),
        "nodes": all_nodes,
        "links": links,
        "groups": ui_groups,
        "config": {},
        "extra": {"ds": {"scale": 0.55, "offset": [40 - x0, 40 - y0]}},
        "version": 0.4,
    }


# ----------------------------------------------------------------- the example workflow
TRAIN_COLUMNS = [[CKPT, CLIP_LOADER, VAE_LOADER, DATASET], [NETWORK, OPTIMIZER, PRECISION], [TRAIN], [SAVE, REPORT, REPORT_SAVE]]
TEST_COLUMNS = [[POS, GUIDANCE, NEG, LATENT], [SWEEP, PREVIEW], [SWEEP_SAVE]]
TITLES = {  # node id -> (title, color, bgcolor); a family's title where it differs
    POS: ("Test prompt (positive)", "#232", "#353"),
    NEG: ("Test prompt (negative)", "#322", "#533"),
    ("flux", NEG): ("Negative: zeroed (Flux-dev samples at cfg 1.0)", "#322", "#533"),
    ("flux", GUIDANCE): ("Test guidance (Flux)", "#232", "#353"),
}


def example_layout(object_info: dict, prompt: dict, family: str = "sd15") -> tuple[dict, list]:
    """Training on the left, the strength-sweep test on the right, data flowing left to right."""
    size = {k: node_size(n["class_type"], object_info) for k, n in prompt.items()}
    gap_x, gap_y = 50, 40
    layout, x, prev = {}, 0, None
    for group, columns in (("train", TRAIN_COLUMNS), ("test", TEST_COLUMNS)):
        for col in columns:
            col = [k for k in col if k in prompt]
            if prev is not None and group != prev:
                x += 2 * GROUP_PAD + 80  # room between the two groups
            y = 0
            for k in col:
                layout[k] = {"pos": [x, y], "size": size[k]}
                y += size[k][1] + TITLE_H + gap_y
            x += max(size[k][0] for k in col) + gap_x
            prev = group
    for k in prompt:
        title = TITLES.get((family, k)) or TITLES.get(k)
        if title:
            layout[k].update(zip(("title", "color", "bgcolor"), title))
    present = lambda columns: [k for col in columns for k in col if k in prompt]  # noqa: E731
    groups = [
        {"title": "Training", "nodes": present(TRAIN_COLUMNS), "color": "#3f789e"},
        {"title": "Test: strength sweep (and previews while training)", "nodes": present(TEST_COLUMNS), "color": "#8A8"},
    ]
    return layout, groups


def example_workflow(object_info: dict, options: TrainingOptions = EXAMPLE_OPTIONS) -> dict:
    """The UI twin of training_prompt(options): the content of example_workflows/train_<family>_lora.json."""
    prompt = training_prompt(options)
    layout, groups = example_layout(object_info, prompt, options.family)
    return api_to_ui(prompt, object_info, layout, groups)


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------- thumbnail
# What the thumbnail draws per family: title, training group title, loaders, test inputs.
THUMBNAILS = {
    "sd15": ("LoRA Lab: train an SD1.5 LoRA", "Training", ("Checkpoint",), ("Prompts", "Latent")),
    "sdxl": ("LoRA Lab: train an SDXL LoRA", "Training (1024 px)", ("SDXL ckpt",), ("Prompts", "Latent 1024")),
    "flux": ("LoRA Lab: train a Flux LoRA", "Training (1024 px, fp8 base)", ("Flux UNet", "CLIP-L + T5", "VAE (ae)"),
             ("Prompt", "Guidance", "SD3 latent")),
    "qwen_image": ("LoRA Lab: train a Qwen-Image LoRA", "Training (1024 px, fp8 base)", ("Qwen UNet", "Qwen2.5-VL", "VAE"),
                   ("Prompts", "SD3 latent")),
    "wan": ("LoRA Lab: train a Wan video LoRA", "Training (clips + images, fp8 base)", ("Wan UNet", "umT5", "Wan VAE"),
            ("Prompts", "Video latent")),
}


def render_thumbnail(path, width: int = 400, height: int = 300, family: str = "sd15"):
    """A small diagram of the family's example workflow (the template browser shows it next to the JSON)."""
    title, train_title, loaders, test_inputs = THUMBNAILS[family]
    from PIL import Image, ImageDraw, ImageFont

    def font(size):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            return ImageFont.load_default()

    img = Image.new("RGB", (width, height), "#1e1f22")
    draw = ImageDraw.Draw(img)
    for gx in range(0, width, 20):  # canvas grid
        draw.line([(gx, 0), (gx, height)], fill="#25262a")
    for gy in range(0, height, 20):
        draw.line([(0, gy), (width, gy)], fill="#25262a")
    draw.text((width // 2, 22), title, font=font(19), fill="#e8e8e8", anchor="mm")

    def group(box, title, color):
        x0, y0, x1, y1 = box
        draw.rounded_rectangle(box, radius=6, fill="#2a2d33", outline=color, width=2)
        draw.rectangle([x0 + 2, y0 + 2, x1 - 2, y0 + 20], fill=color)
        draw.text((x0 + 8, y0 + 11), title, font=font(12), fill="white", anchor="lm")

    def node(cx, cy, label, w=92, h=26, color="#4a505a"):
        box = [cx - w // 2, cy - h // 2, cx + w // 2, cy + h // 2]
        draw.rounded_rectangle(box, radius=5, fill=color, outline="#8a9099")
        draw.text((cx, cy), label, font=font(12), fill="white", anchor="mm")
        return box

    def arrow(a, b, color="#d0d0d0"):
        (x0, y0), (x1, y1) = a, b
        draw.line([a, b], fill=color, width=2)
        dx, dy = x1 - x0, y1 - y0
        n = max((dx * dx + dy * dy) ** 0.5, 1e-6)
        ux, uy = dx / n, dy / n
        draw.polygon([(x1, y1), (x1 - 8 * ux + 4 * uy, y1 - 8 * uy - 4 * ux), (x1 - 8 * ux - 4 * uy, y1 - 8 * uy + 4 * ux)],
                     fill=color)

    group([10, 40, 390, 190], train_title, "#3f789e")
    group([10, 200, 390, 292], "Test: strength sweep", "#5f8f5f")
    train = node(205, 121, "Train", w=84, h=56, color="#3d5f85")
    inputs = loaders + ("Dataset", "Network", "Optimizer", "Precision")
    step = min(22, 102 // (len(inputs) - 1))  # stacked inside the group, under its title bar
    for i, label in enumerate(inputs):
        cy = 121 - step * (len(inputs) - 1) // 2 + step * i
        node(62, cy, label, w=90, h=min(18, step - 3))
        arrow((108, cy), (train[0] - 1, 121 + (cy - 121) // 3))
    for cy, label in ((100, "Save LoRA"), (142, "Report")):
        node(335, cy, label, w=80, h=22)
        arrow((train[2] + 1, 121 + (cy - 121) // 3), (294, cy))
    sweep = node(205, 252, "Strength sweep", w=104, h=36, color="#3d6b4a")
    step = 31 if len(test_inputs) == 2 else 21
    for i, label in enumerate(test_inputs):
        cy = 252 - step * (len(test_inputs) - 1) // 2 + step * i
        node(62, cy, label, w=90, h=min(22, step - 3))
        arrow((108, cy), (sweep[0] - 1, 252 + (cy - 252) // 3))
    arrow((205, train[3] + 1), (205, sweep[1] - 1), color="#a8c8e8")  # the trained LoRA into the sweep
    for i, s in enumerate(("0", "0.5", "1", "1.5", "1.8")):  # the sweep grid: one cell per strength
        x0 = 268 + i * 24
        shade = 70 + i * 30
        draw.rectangle([x0, 238, x0 + 20, 258], fill=(shade // 2, shade, shade // 2), outline="#9aa")
        draw.text((x0 + 10, 271), s, font=font(11), fill="#d8d8d8", anchor="mm")
    arrow((sweep[2] + 1, 248), (265, 248))
    img.save(path, "JPEG", quality=90)
    return path


# ----------------------------------------------------------------- command line
def live_object_info(comfyui_path) -> dict:
    """GET /object_info from a throw-away ComfyUI server with this pack installed."""
    from .server import ComfyServer

    with tempfile.TemporaryDirectory(prefix="lora_lab_object_info_") as base:
        with ComfyServer(comfyui_path, base) as srv:
            return srv.object_info()


def targets(out: str, family: str | None) -> list[tuple[Path, str]]:
    """(file, family) to write: a folder gets every example under its own name; a file named like an
    example gets that example's family unless one is given."""
    path = Path(out)
    if path.is_dir() or out.endswith(("/", os.sep)):
        families = [family] if family else list(EXAMPLES)
        return [(path / f"{EXAMPLES[f][0]}.json", f) for f in families]
    named = next((f for f, (name, _) in EXAMPLES.items() if path.stem == name), None)
    return [(path, family or named or "sd15")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m headless.ui_workflow",
                                description="Write the example workflows (UI format) and their thumbnails.")
    p.add_argument("out", help="a folder (every family's example, e.g. example_workflows/) or one .json file")
    p.add_argument("--family", choices=list(EXAMPLES), help="the example to write (default: from the file name, else sd15)")
    p.add_argument("--object-info", help="a saved GET /object_info JSON (default: ask a temporary ComfyUI at $COMFYUI_PATH)")
    p.add_argument("--no-thumbnail", action="store_true", help="don't write the .jpg next to the .json")
    a = p.parse_args(argv)
    if a.object_info:
        object_info = json.loads(Path(a.object_info).read_text(encoding="utf-8"))
    elif os.environ.get("COMFYUI_PATH"):
        object_info = live_object_info(os.environ["COMFYUI_PATH"])
    else:
        p.error("give --object-info FILE or set COMFYUI_PATH to a ComfyUI checkout")
    for out, family in targets(a.out, a.family):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dumps(example_workflow(object_info, EXAMPLES[family][1])), encoding="utf-8")
        print(f"wrote {out} ({family})")
        if not a.no_thumbnail:
            render_thumbnail(out.with_suffix(".jpg"), family=family)
            print(f"wrote {out.with_suffix('.jpg')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

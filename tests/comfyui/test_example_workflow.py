"""example_workflows/train_sd15_lora.json against the node definitions of a real ComfyUI (GET /object_info).

No training: the checks are about the file. Regenerate it with
`COMFYUI_PATH=... python -m headless.ui_workflow example_workflows/train_sd15_lora.json`.
"""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from headless.ui_workflow import EXAMPLE_OPTIONS, example_workflow  # noqa: E402
from headless.workflow import training_prompt  # noqa: E402

EXAMPLE = REPO / "example_workflows" / "train_sd15_lora.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
REGENERATE = "regenerate it: COMFYUI_PATH=... python -m headless.ui_workflow example_workflows/train_sd15_lora.json"


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def workflow():
    return json.loads(EXAMPLE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def prompt():
    return training_prompt(EXAMPLE_OPTIONS)


def specs(info):
    """(name, type, options) in the frontend's order; written here independently of headless/ui_workflow.py."""
    out = []
    for section in ("required", "optional"):
        inputs = info["input"].get(section, {})
        names = info.get("input_order", {}).get(section) or list(inputs)
        for name in names:
            spec = inputs[name]
            typ = "COMBO" if isinstance(spec[0], list) else spec[0]
            out.append((name, typ, spec[1] if len(spec) > 1 else {}))
    return out


def decode_widgets(node, info):
    """{input name: value} from widgets_values, checking the control_after_generate slots say 'fixed'."""
    values, out = list(node["widgets_values"]), {}
    for name, typ, opts in specs(info):
        if typ not in WIDGET_TYPES or opts.get("forceInput"):
            continue
        assert values, f"node {node['id']} ({node['type']}): widgets_values ends before {name!r}"
        out[name] = values.pop(0)
        control = (opts.get("control_after_generate", name in ("seed", "noise_seed")) if typ == "INT"
                   else typ == "COMBO" and opts.get("control_after_generate"))
        if control:
            assert values and values.pop(0) == "fixed", f"node {node['id']}: no 'fixed' control value after {name!r}"
    assert not values, f"node {node['id']} ({node['type']}): extra widget values {values}"
    return out


def test_every_node_type_exists(workflow, object_info):
    missing = {n["type"] for n in workflow["nodes"]} - set(object_info)
    assert not missing, missing


def test_nodes_are_the_builders_nodes(workflow, prompt):
    assert {n["id"]: n["type"] for n in workflow["nodes"]} == {int(k): v["class_type"] for k, v in prompt.items()}


def test_widget_values_are_the_builders_values_in_frontend_order(workflow, object_info, prompt):
    for node in workflow["nodes"]:
        info = object_info[node["type"]]
        got = decode_widgets(node, info)
        given = prompt[str(node["id"])]["inputs"]
        for name, typ, opts in specs(info):
            if name not in got:
                continue
            want = given[name] if name in given else opts.get("default")
            assert got[name] == want and type(got[name]) is type(want), (node["id"], node["type"], name, got[name], want)
        literal = {k for k, v in given.items() if not isinstance(v, list)}
        assert literal <= set(got), (node["type"], literal - set(got))


def test_links_match_the_builder_and_the_types(workflow, object_info, prompt):
    nodes = {n["id"]: n for n in workflow["nodes"]}
    got = {}
    for link_id, src, src_slot, dst, dst_slot, typ in workflow["links"]:
        out_type = object_info[nodes[src]["type"]]["output"][src_slot]
        sock = nodes[dst]["inputs"][dst_slot]
        in_type = dict((n, t) for n, t, _ in specs(object_info[nodes[dst]["type"]]))[sock["name"]]
        assert typ == out_type == in_type == sock["type"], (link_id, typ, out_type, in_type)
        assert sock["link"] == link_id and link_id in nodes[src]["outputs"][src_slot]["links"]
        got[(dst, sock["name"])] = (src, src_slot)
    want = {(int(k), name): (int(v[0]), v[1]) for k, n in prompt.items() for name, v in n["inputs"].items()
            if isinstance(v, list)}
    assert got == want
    for node in workflow["nodes"]:  # outputs as object_info declares them
        info = object_info[node["type"]]
        assert [(o["name"], o["type"]) for o in node["outputs"]] == list(zip(info["output_name"], info["output"]))


def test_committed_file_is_what_the_generator_writes_now(workflow, object_info):
    def strip(ui):
        ui = json.loads(json.dumps(ui))
        for n in ui["nodes"]:
            n.pop("pos"), n.pop("size")
        for g in ui["groups"]:
            g.pop("bounding")
        ui["extra"].pop("ds", None)
        return ui

    assert strip(example_workflow(object_info)) == strip(workflow), REGENERATE

"""API prompt -> UI workflow conversion (headless/ui_workflow.py), on a hand-written object_info."""

import json
from pathlib import Path

import pytest
from PIL import Image

from headless.ui_workflow import (
    CONTROL_VALUE, EXAMPLE_OPTIONS, api_to_ui, main, node_size, render_thumbnail, widget_names,
)
from headless.workflow import training_prompt

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "example_workflows" / "train_sd15_lora.json"

OBJECT_INFO = {
    "Loader": {
        "input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
        "input_order": {"required": ["ckpt_name"]},
        "output": ["MODEL", "CLIP"], "output_name": ["MODEL", "CLIP"], "output_node": False,
    },
    "Sampler": {  # dict order differs from input_order on purpose: input_order wins
        "input": {
            "required": {
                "steps": ["INT", {"default": 20, "min": 1}],
                "model": ["MODEL", {}],
                "seed": ["INT", {"default": 0}],
                "sampler": [["euler", "heun"], {"default": "heun"}],
                "text": ["STRING", {"multiline": True}],
            },
            "optional": {
                "denoise": ["FLOAT", {"default": 1.0}],
                "extra": ["LATENT", {}],
                "noise_seed": ["INT", {"default": 5, "control_after_generate": False}],
                "pick": [["x", "y"], {"control_after_generate": True}],
                "cond": ["CONDITIONING", {"forceInput": True}],
            },
        },
        "input_order": {"required": ["model", "seed", "steps", "sampler", "text"],
                        "optional": ["extra", "denoise", "noise_seed", "pick", "cond"]},
        "output": ["IMAGE"], "output_name": ["image"], "output_node": False,
    },
    "Save": {
        "input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
        "output": [], "output_name": [], "output_node": True,
    },
}

PROMPT = {
    "1": {"class_type": "Loader", "inputs": {"ckpt_name": "b.safetensors"}},
    "2": {"class_type": "Sampler", "inputs": {"model": ["1", 0], "seed": 7, "steps": 4, "sampler": "euler", "text": "hi"}},
    "3": {"class_type": "Save", "inputs": {"images": ["2", 0], "filename_prefix": "out"}},
}


def by_id(ui):
    return {n["id"]: n for n in ui["nodes"]}


def test_top_level_format():
    ui = api_to_ui(PROMPT, OBJECT_INFO)
    assert ui["version"] == 0.4 and ui["config"] == {} and "ds" in ui["extra"]
    assert ui["last_node_id"] == 3 and ui["last_link_id"] == len(ui["links"]) == 2
    for n in ui["nodes"]:
        assert set(n) >= {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs",
                          "properties", "widgets_values"}
        assert n["properties"] == {"Node name for S&R": n["type"]} and n["mode"] == 0
    json.dumps(ui)  # plain JSON


def test_links_and_sockets():
    ui = api_to_ui(PROMPT, OBJECT_INFO)
    nodes = by_id(ui)
    assert ui["links"] == [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "IMAGE"]]
    # every non-widget socket, in input order, unconnected ones with link None; forceInput is a socket
    assert nodes[2]["inputs"] == [{"name": "model", "type": "MODEL", "link": 1},
                                  {"name": "extra", "type": "LATENT", "link": None},
                                  {"name": "cond", "type": "CONDITIONING", "link": None}]
    assert nodes[1]["inputs"] == []
    assert nodes[1]["outputs"] == [{"name": "MODEL", "type": "MODEL", "links": [1], "slot_index": 0},
                                   {"name": "CLIP", "type": "CLIP", "links": [], "slot_index": 1}]
    assert nodes[2]["outputs"] == [{"name": "image", "type": "IMAGE", "links": [2], "slot_index": 0}]
    assert nodes[3]["outputs"] == []
    for link_id, src, src_slot, dst, dst_slot, typ in ui["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[dst]["inputs"][dst_slot]["type"] == typ
    assert [nodes[i]["order"] for i in (1, 2, 3)] == [0, 1, 2]


def test_widget_values_order_defaults_and_control_widgets():
    ui = api_to_ui(PROMPT, OBJECT_INFO)
    nodes = by_id(ui)
    assert nodes[1]["widgets_values"] == ["b.safetensors"]
    # seed gets its control value right after it; noise_seed has control_after_generate False; a COMBO
    # with control_after_generate gets one too; absent optional inputs take their defaults
    assert nodes[2]["widgets_values"] == [7, CONTROL_VALUE, 4, "euler", "hi", 1.0, 5, "x", CONTROL_VALUE]
    assert widget_names(OBJECT_INFO["Sampler"]) == ["seed", None, "steps", "sampler", "text", "denoise",
                                                    "noise_seed", "pick", None]
    assert nodes[3]["widgets_values"] == ["out"]


def test_linked_widget_input_becomes_a_socket():
    info = dict(OBJECT_INFO, Number={"input": {"required": {"value": ["INT", {"default": 3}]}},
                                     "output": ["INT"], "output_name": ["INT"], "output_node": False})
    prompt = json.loads(json.dumps(PROMPT))
    prompt["4"] = {"class_type": "Number", "inputs": {"value": 9}}
    prompt["2"]["inputs"]["steps"] = ["4", 0]
    ui = api_to_ui(prompt, info)
    sampler = by_id(ui)[2]
    steps = [i for i in sampler["inputs"] if i["name"] == "steps"]
    assert steps == [{"name": "steps", "type": "INT", "link": steps[0]["link"], "widget": {"name": "steps"}}]
    link = next(lk for lk in ui["links"] if lk[0] == steps[0]["link"])
    assert link[1:4] == [4, 0, 2] and link[5] == "INT" and sampler["inputs"][link[4]]["name"] == "steps"
    assert sampler["widgets_values"][2] == 20  # the widget keeps a value (its default)
    assert by_id(ui)[4]["order"] < sampler["order"]


def test_cycle_is_refused():
    info = dict(OBJECT_INFO, Pass={"input": {"required": {"image": ["IMAGE", {}]}},
                                   "output": ["IMAGE"], "output_name": ["IMAGE"], "output_node": False})
    prompt = {"1": {"class_type": "Pass", "inputs": {"image": ["2", 0]}},
              "2": {"class_type": "Pass", "inputs": {"image": ["1", 0]}}}
    with pytest.raises(ValueError, match="cycle"):
        api_to_ui(prompt, info)


def test_errors():
    with pytest.raises(ValueError, match="lacks"):
        api_to_ui({"1": {"class_type": "Nope", "inputs": {}}}, OBJECT_INFO)
    bad = json.loads(json.dumps(PROMPT))
    bad["2"]["inputs"]["bogus"] = 1
    with pytest.raises(ValueError, match="unknown inputs"):
        api_to_ui(bad, OBJECT_INFO)
    bad = json.loads(json.dumps(PROMPT))
    bad["3"]["inputs"]["images"] = ["1", 1]  # CLIP into IMAGE
    with pytest.raises(ValueError, match="CLIP"):
        api_to_ui(bad, OBJECT_INFO)
    bad["3"]["inputs"]["images"] = ["1", 5]
    with pytest.raises(ValueError, match="output 5"):
        api_to_ui(bad, OBJECT_INFO)


def test_layout_titles_and_groups():
    layout = {"1": {"pos": [10, 20], "size": [300, 90], "title": "Model"}, "3": [900, 0]}
    groups = [{"title": "Load", "nodes": ["1"]}, {"title": "Fixed", "bounding": [0, 0, 50, 50], "color": "#8A8"}]
    ui = api_to_ui(PROMPT, OBJECT_INFO, layout, groups)
    nodes = by_id(ui)
    assert nodes[1]["pos"] == [10, 20] and nodes[1]["size"] == [300, 90] and nodes[1]["title"] == "Model"
    assert nodes[3]["pos"] == [900, 0] and nodes[3]["size"] == node_size("Save", OBJECT_INFO)
    assert "title" not in nodes[2]
    load, fixed = ui["groups"]
    assert load["title"] == "Load" and fixed == {"title": "Fixed", "bounding": [0, 0, 50, 50], "color": "#8A8",
                                                  "font_size": 24, "flags": {}}
    x, y, w, h = load["bounding"]
    assert x < 10 and y < 20 - 30 and x + w > 310 and y + h > 110  # around the node and its title bar


def test_auto_layout_places_nodes_left_to_right():
    nodes = by_id(api_to_ui(PROMPT, OBJECT_INFO))
    assert nodes[1]["pos"][0] < nodes[2]["pos"][0] < nodes[3]["pos"][0]
    assert node_size("Sampler", OBJECT_INFO)[1] > node_size("Loader", OBJECT_INFO)[1]


def test_example_workflow_file_is_the_builders_graph():
    ui = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    prompt = training_prompt(EXAMPLE_OPTIONS)
    nodes = by_id(ui)
    assert {i: n["type"] for i, n in nodes.items()} == {int(k): v["class_type"] for k, v in prompt.items()}
    want_links = {(int(k), name): (int(v[0]), v[1]) for k, n in prompt.items()
                  for name, v in n["inputs"].items() if isinstance(v, list)}
    got_links = {}
    for link_id, src, src_slot, dst, dst_slot, typ in ui["links"]:
        sock = nodes[dst]["inputs"][dst_slot]
        assert sock["link"] == link_id and sock["type"] == typ
        assert link_id in nodes[src]["outputs"][src_slot]["links"] and nodes[src]["outputs"][src_slot]["type"] == typ
        got_links[(dst, sock["name"])] = (src, src_slot)
    assert got_links == want_links
    assert [g["title"] for g in ui["groups"]] == ["Training", "Test: strength sweep (and previews while training)"]
    assert ui["last_node_id"] == 15 and ui["last_link_id"] == len(ui["links"])


def test_thumbnail(tmp_path):
    committed = Image.open(EXAMPLE.with_suffix(".jpg"))
    assert committed.format == "JPEG" and committed.size == (400, 300)
    out = render_thumbnail(tmp_path / "t.jpg")
    assert Image.open(out).size == (400, 300)


def test_command_needs_an_object_info_source(monkeypatch, tmp_path):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x.json")])

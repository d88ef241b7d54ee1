"""example_workflows/train_{sd15,sdxl,flux,qwen_image,wan_video}_lora.json against the node definitions of a real ComfyUI
(GET /object_info), each against the builder's API graph of that family.

No training: the checks are about the files (tests/comfyui/test_family_examples.py runs the SDXL and
Flux graphs). Regenerate them with `COMFYUI_PATH=... python -m headless.ui_workflow example_workflows/`.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from headless.ui_workflow import EXAMPLES, example_workflow, render_thumbnail  # noqa: E402
from headless.workflow import training_prompt  # noqa: E402

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
REGENERATE = "regenerate them: COMFYUI_PATH=... python -m headless.ui_workflow example_workflows/"
# Combo inputs that name model files: the test server has other files, so their values are not in the list.
MODEL_FILE_INPUTS = {"ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "vae_name"}


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


@pytest.fixture(scope="module", params=list(EXAMPLES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def workflow(family):
    return json.loads((REPO / "example_workflows" / f"{EXAMPLES[family][0]}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def prompt(family):
    return training_prompt(EXAMPLES[family][1])


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


def test_choice_values_are_offered_by_the_node(workflow, object_info):
    # e.g. DualCLIPLoader type "flux", UNETLoader weight_dtype, the sweep's scheduler, Train's timestep_sampling
    for node in workflow["nodes"]:
        info = object_info[node["type"]]
        choices = {name: info["input"].get("required", {}).get(name, info["input"].get("optional", {}).get(name))[0]
                   for name, typ, _ in specs(info) if typ == "COMBO"}
        for name, value in decode_widgets(node, info).items():
            if name in choices and name not in MODEL_FILE_INPUTS:
                assert value in choices[name], (node["id"], node["type"], name, value, choices[name])


def widgets_by_type(workflow, object_info):
    return {n["type"]: decode_widgets(n, object_info[n["type"]]) for n in workflow["nodes"]}


def test_family_settings_are_in_the_file(family, workflow, object_info):
    w = widgets_by_type(workflow, object_info)
    assert w["LoRALabStrengthSweep"]["strengths"] == "0, 0.5, 1.0, 1.5, 1.8"
    assert w["LoRALabTrain"]["preview_every"] > 0 and "LoRALabPreview" in w
    if family == "sd15":
        assert w["CheckpointLoaderSimple"]["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"
        assert w["LoRALabDataset"]["resolution"] == 512 and w["EmptyLatentImage"]["width"] == 512
    elif family == "sdxl":
        assert w["CheckpointLoaderSimple"]["ckpt_name"] == "sd_xl_base_1.0.safetensors"
        assert w["LoRALabDataset"]["resolution"] == 1024
        assert w["EmptyLatentImage"]["width"] == w["EmptyLatentImage"]["height"] == 1024
        assert w["LoRALabPrecision"]["gradient_checkpointing"] is True
    elif family == "wan":
        assert w["UNETLoader"] == {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"}
        assert w["CLIPLoader"] == {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan", "device": "default"}
        assert w["VAELoader"]["vae_name"] == "wan_2.1_vae.safetensors"
        assert (w["LoRALabDataset"]["frames"], w["LoRALabDataset"]["fps"]) == (17, 16.0)
        assert w["EmptyHunyuanLatentVideo"]["length"] == 17 and w["LoRALabTrain"]["expert"] == "none"
    elif family == "qwen_image":
        assert w["UNETLoader"] == {"unet_name": "qwen_image_fp8_e4m3fn.safetensors", "weight_dtype": "default"}
        assert w["CLIPLoader"] == {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image", "device": "default"}
        assert w["VAELoader"]["vae_name"] == "qwen_image_vae.safetensors"
        assert w["LoRALabPrecision"]["fp8_base"] is True and w["LoRALabPrecision"]["mixed_precision"] == "bf16"
        assert w["LoRALabTrain"]["timestep_sampling"] == "shift" and w["LoRALabDataset"]["resolution"] == 1024
        assert w["LoRALabStrengthSweep"]["cfg"] == 2.5 and "FluxGuidance" not in w
        assert w["EmptySD3LatentImage"]["width"] == 1024
    else:
        assert w["UNETLoader"] == {"unet_name": "flux1-dev.safetensors", "weight_dtype": "fp8_e4m3fn"}
        assert w["DualCLIPLoader"] == {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                       "type": "flux", "device": "default"}
        assert w["VAELoader"]["vae_name"] == "ae.safetensors"
        assert w["LoRALabPrecision"]["fp8_base"] is True and w["LoRALabPrecision"]["gradient_checkpointing"] is True
        assert w["LoRALabPrecision"]["mixed_precision"] == "bf16"
        assert w["LoRALabTrain"]["timestep_sampling"] == "flux_shift" and w["LoRALabTrain"]["guidance"] == 1.0
        assert w["LoRALabTrain"]["min_snr_gamma"] == 0.0  # Flux refuses min-SNR
        assert w["LoRALabStrengthSweep"]["cfg"] == 1.0 and w["LoRALabStrengthSweep"]["scheduler"] == "simple"
        assert w["FluxGuidance"]["guidance"] == 3.5
        assert w["EmptySD3LatentImage"]["width"] == w["EmptySD3LatentImage"]["height"] == 1024
        nodes = {n["id"]: n for n in workflow["nodes"]}
        fed = {(nodes[dst]["type"], nodes[dst]["inputs"][slot]["name"]): nodes[src]["type"]
               for _, src, _, dst, slot, _ in workflow["links"]}
        assert fed[("LoRALabStrengthSweep", "positive")] == fed[("LoRALabPreview", "positive")] == "FluxGuidance"
        assert fed[("LoRALabDataset", "clip")] == "DualCLIPLoader" and fed[("LoRALabDataset", "vae")] == "VAELoader"


def test_thumbnail_is_the_generators_diagram(family, tmp_path):
    committed = Image.open(REPO / "example_workflows" / f"{EXAMPLES[family][0]}.jpg")
    assert committed.format == "JPEG" and committed.size == (400, 300)
    fresh = Image.open(render_thumbnail(tmp_path / "t.jpg", family=family))
    diff = np.abs(np.asarray(committed.convert("RGB"), dtype=np.float32) - np.asarray(fresh.convert("RGB"), dtype=np.float32))
    assert diff.mean() < 1.0, REGENERATE


def test_committed_file_is_what_the_generator_writes_now(family, workflow, object_info):
    def strip(ui):
        ui = json.loads(json.dumps(ui))
        for n in ui["nodes"]:
            n.pop("pos"), n.pop("size")
        for g in ui["groups"]:
            g.pop("bounding")
        ui["extra"].pop("ds", None)
        return ui

    assert strip(example_workflow(object_info, EXAMPLES[family][1])) == strip(workflow), REGENERATE

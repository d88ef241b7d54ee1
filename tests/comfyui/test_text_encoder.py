"""Text-encoder LoRA (train_text_encoder) on SD1.5, queued over HTTP against a real ComfyUI on CPU.

The tiny checkpoint carries a full-size CLIP-L (ComfyUI fixes its config), so this is ComfyUI's
own text encoder, its tokenizer and its LoRA key map, trained for real.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from comfy_server import execution_error, status_str
from tiny_models import DATASET_DIR_NAME, TINY_CKPT_NAME

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from headless.workflow import CKPT, NETWORK, OPTIMIZER, PRECISION, SAVE, TRAIN, TrainingOptions, training_prompt  # noqa: E402

from test_sd15_workflow import base_image, train_ui  # noqa: E402

STEPS = 12
TE_LR = 1e-3
# sd-scripts' text-encoder modules for SD1.5: 6 Linear layers in each of CLIP-L's 12 encoder layers.
TE_LAYERS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
EXPECTED_TE = {f"lora_te_text_model_encoder_layers_{i}_{m}" for i in range(12) for m in TE_LAYERS}


def prompt(name, train_te=True, steps=STEPS, clip=True):
    o = TrainingOptions(
        checkpoint=TINY_CKPT_NAME, dataset=DATASET_DIR_NAME, output_name=name, resolution=64, steps=steps,
        mixed_precision="fp32", gradient_checkpointing=False, unet_lr=2e-3, scheduler="constant", warmup_ratio=0.0,
        test_size=64, test_steps=4, test_cfg=2.0, test_prompt="a photo of sks object",
    )
    p = training_prompt(o)
    p[NETWORK]["inputs"]["train_text_encoder"] = train_te
    p[OPTIMIZER]["inputs"]["text_encoder_lr"] = TE_LR
    if clip:
        p[TRAIN]["inputs"]["clip"] = [CKPT, 1]
    p[TRAIN]["inputs"]["mode"] = "restart"
    return p


def modules_of(path):
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        ups = {k.rsplit(".", 2)[0]: f.get_tensor(k) for k in keys if k.endswith(".lora_up.weight")}
        return keys, ups, f.metadata()


@pytest.fixture(scope="module")
def runs(comfy_server):
    srv = comfy_server
    srv.free()
    before = base_image(srv, "te_before")
    with_te = srv.run(prompt("te_on"), timeout=900)
    without_te = srv.run(prompt("te_off", train_te=False), timeout=900)
    return srv, before, with_te, without_te


def test_file_has_sd_scripts_text_encoder_names_and_lr(runs):
    _, _, entry, _ = runs
    keys, ups, meta = modules_of(entry["outputs"][SAVE]["text"][0])
    te = {m for m in ups if m.startswith("lora_te")}
    assert te == EXPECTED_TE, sorted(te ^ EXPECTED_TE)[:5]
    assert any(m.startswith("lora_unet_") for m in ups)
    assert all(f"{m}.alpha" in keys and f"{m}.lora_down.weight" in keys for m in te)
    assert meta["ss_text_encoder_lr"] == str(TE_LR)
    # The text-encoder LoRA really trained: its up-projections left their zero init.
    assert all(float(ups[m].abs().max()) > 0 for m in te)


def test_unet_only_run_writes_no_text_encoder_keys(runs):
    _, _, _, entry = runs
    _, ups, meta = modules_of(entry["outputs"][SAVE]["text"][0])
    assert ups and not any(m.startswith("lora_te") for m in ups)
    assert meta["ss_text_encoder_lr"] == "None"


def test_first_step_matches_cached_conditioning(runs):
    """At step 0 the text-encoder LoRA is zero: encoding the captions inside the step must give
    the conditioning the Dataset node cached, so the first losses of both runs are equal."""
    _, _, on, off = runs
    first_on, first_off = train_ui(on)["history"]["loss"][0], train_ui(off)["history"]["loss"][0]
    assert first_on == pytest.approx(first_off, rel=1e-5, abs=1e-7)
    assert train_ui(on)["history"]["loss"][1:] != train_ui(off)["history"]["loss"][1:]


def test_stock_loraloader_applies_every_text_encoder_key(runs):
    srv, before, entry, _ = runs
    name = Path(entry["outputs"][SAVE]["text"][0]).name
    log_before = srv.log_text()
    # CLIP only: strength_model 0, so any change in the image comes from the text-encoder LoRA.
    nodes = {"20": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name, "strength_model": 0.0, "strength_clip": 1.0}}}
    prompt_nodes = dict(nodes)
    image = _sample(srv, "te_stock", prompt_nodes, clip_ref=("20", 1), model_ref=("20", 0))
    new_log = srv.log_text()[len(log_before):]
    assert "lora key not loaded" not in new_log and "NOT LOADED" not in new_log
    assert np.abs(image - before).mean() > 0.1


def test_apply_lora_with_clip_equals_stock_loader(runs):
    srv, _, entry, _ = runs
    name = Path(entry["outputs"][SAVE]["text"][0]).name
    stock = {"20": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name, "strength_model": 1.5, "strength_clip": 1.5}}}
    ours = {"21": {"class_type": "LoRALabApplyLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], "strength": 1.5, "lora_name": name}}}
    a = _sample(srv, "te_stock_15", stock, clip_ref=("20", 1), model_ref=("20", 0))
    b = _sample(srv, "te_ours_15", ours, clip_ref=("21", 1), model_ref=("21", 0))
    assert np.array_equal(a, b)


def test_missing_clip_is_refused_naming_the_input(runs):
    srv = runs[0]
    entry = srv.run(prompt("te_noclip", clip=False, steps=1), timeout=300, check=False)
    error = execution_error(entry)
    assert status_str(entry) == "error" and error["node_id"] == TRAIN
    text = error["exception_message"]
    assert text.startswith("clip:") and "train_text_encoder" in text, text
    assert "Traceback" not in text


def _sample(srv, prefix, extra_nodes, clip_ref, model_ref):
    from comfy_server import txt2img_prompt

    from test_sd15_workflow import image_of

    p = txt2img_prompt(TINY_CKPT_NAME, seed=7, filename_prefix=prefix, positive="a photo of sks object")
    p.update(extra_nodes)
    p["5"]["inputs"]["model"] = list(model_ref)
    p["2"]["inputs"]["clip"] = list(clip_ref)
    p["3"]["inputs"]["clip"] = list(clip_ref)
    return image_of(srv, srv.run(p, timeout=300), "7")


def test_strength_sweep_with_clip_applies_the_text_encoder_part(runs):
    """With clip connected the sweep encodes the prompt through the LoRA'd CLIP at each strength:
    its cells equal stock LoraLoader (model and clip at that strength) + CLIPTextEncode + KSampler."""
    srv, before, _, _ = runs
    train = prompt("te_sweep")
    train[PRECISION]["inputs"]["save_dtype"] = "fp32"  # the file holds exactly the weights the sweep used
    train["40"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    train["41"] = {"class_type": "LoRALabStrengthSweep", "inputs": {
        "model": [CKPT, 0], "lora": [TRAIN, 1], "vae": [CKPT, 2], "latent": ["40", 0], "strengths": "0, 1.5", "seed": 7,
        "steps": 4, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
        "clip": [CKPT, 1], "prompt": "a photo of sks object", "negative_prompt": "blurry"}}
    train["42"] = {"class_type": "SaveImage", "inputs": {"images": ["41", 1], "filename_prefix": "te_sweep_cells"}}
    out = srv.run(train, timeout=900)
    cells = [np.asarray(Image.open(srv.output_file(info)).convert("RGB"), dtype=np.float32) for info in out["outputs"]["42"]["images"]]
    name = Path(out["outputs"][SAVE]["text"][0]).name
    stock = {"20": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name, "strength_model": 1.5, "strength_clip": 1.5}}}
    expected = _sample(srv, "te_stock_sweep", stock, clip_ref=("20", 1), model_ref=("20", 0))
    assert np.array_equal(cells[0], before)
    assert np.array_equal(cells[1], expected)
    assert np.abs(cells[1] - before).mean() > 0.5

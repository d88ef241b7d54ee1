"""SDXL and Flux LoRAs through the same engine, queued over HTTP against a real ComfyUI on CPU.

The SDXL UNet is a real SDXL-format file (tiny_models.make_tiny_sdxl_unet) that the stock UNETLoader
detects as SDXL. Real SDXL / Flux text encoders are gigabytes and ComfyUI fixes their sizes, and its
Flux detection fixes the width at 3072, so a test-only node pack (tiny_models.install_test_nodes)
supplies stand-in CLIP / VAE objects with the real conditioning shapes and a narrow Flux built
in-process from ComfyUI's own Flux classes. Everything else is the pack's nodes and stock ComfyUI:
Dataset -> Train -> Save LoRA, then LoraLoaderModelOnly -> KSampler.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from comfy_server import execution_error
from tiny_models import DATASET_DIR_NAME, SDXL_CLIP_LAYERS, SIZED_DIR, TINY_SDXL_UNET_NAME

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from headless.workflow import DATASET, NETWORK, OPTIMIZER, PRECISION, SAVE, TRAIN  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL, ENCODERS, INFO = "1", "15", "16"
PROMPT = "a photo of sks object"


@pytest.fixture(scope="module")
def server(family_server):
    return family_server


def model_node(family):
    if family == "sdxl":
        return {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_SDXL_UNET_NAME, "weight_dtype": "default"}}
    return {"class_type": "LoRALabTestTinyFlux", "inputs": {"seed": 0}}


def base_nodes(family, folder=DATASET_DIR_NAME):
    return {
        MODEL: model_node(family),
        ENCODERS: {"class_type": "LoRALabTestEncoders", "inputs": {"family": family}},
        DATASET: {"class_type": "LoRALabDataset", "inputs": {
            "folder": folder, "vae": [ENCODERS, 1], "clip": [ENCODERS, 0], "resolution": 64, "bucket": True,
            "repeats": 1, "trigger_word": ""}},
    }


def train_prompt(family, output_name, steps, lr, gradient_checkpointing=False, **train_inputs):
    p = base_nodes(family)
    p.update({
        NETWORK: {"class_type": "LoRALabNetwork", "inputs": {
            "rank": 8, "alpha": 8.0, "targets": "attn_mlp", "conv_rank": 0, "conv_alpha": 1.0, "dropout": 0.0}},
        OPTIMIZER: {"class_type": "LoRALabOptimizer", "inputs": {
            "optimizer": "AdamW", "unet_lr": lr, "text_encoder_lr": 5e-5, "weight_decay": 0.01, "scheduler": "constant",
            "warmup_ratio": 0.0, "warmup_steps": 0, "min_lr_ratio": 0.0, "cycles": 1, "power": 1.0}},
        PRECISION: {"class_type": "LoRALabPrecision", "inputs": {
            "mixed_precision": "fp32", "fp8_base": False, "gradient_checkpointing": gradient_checkpointing,
            "save_dtype": "fp16", "max_grad_norm": 1.0}},
        TRAIN: {"class_type": "LoRALabTrain", "inputs": dict({
            "model": [MODEL, 0], "dataset": [DATASET, 0], "network": [NETWORK, 0], "optimizer": [OPTIMIZER, 0],
            "precision": [PRECISION, 0], "steps": steps, "batch_size": 1, "gradient_accumulation": 1, "seed": 42,
            "mode": "restart", "output_name": output_name}, **train_inputs)},
        SAVE: {"class_type": "LoRALabSaveLoRA", "inputs": {"lora": [TRAIN, 1], "filename": output_name, "overwrite": True}},
    })
    return p


def image(srv, family, prefix, lora_name=None):
    """txt2img with stock nodes (LoraLoaderModelOnly when lora_name is given); float32 RGB array."""
    p = {
        MODEL: model_node(family),
        ENCODERS: {"class_type": "LoRALabTestEncoders", "inputs": {"family": family}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": [ENCODERS, 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": [ENCODERS, 0]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": [MODEL, 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 7,
            "steps": 3, "cfg": 1.0 if family == "flux" else 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": [ENCODERS, 1]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
    if lora_name:
        p["20"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": [MODEL, 0], "lora_name": lora_name, "strength_model": 1.0}}
        p["5"]["inputs"]["model"] = ["20", 0]
    entry = srv.run(p, timeout=300)
    info = entry["outputs"]["7"]["images"][0]
    return np.asarray(Image.open(srv.output_file(info)).convert("RGB"), dtype=np.float32)


def train_ui(entry):
    return entry["outputs"][TRAIN]["lora_lab"][0]


def lora_file(srv, entry):
    path = Path(entry["outputs"][SAVE]["text"][0])
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha_dims = {f.get_tensor(k).ndim for k in keys if k.endswith(".alpha")}
    modules = {k.rsplit(".", 2)[0] for k in keys if k.endswith(".lora_down.weight")}
    assert modules and all(f"{m}.lora_up.weight" in keys and f"{m}.alpha" in keys for m in modules)
    assert alpha_dims == {0}
    return path, modules, meta


def check_stock_loader_applies_every_key(srv, family, path, before):
    log_before = srv.log_text()
    with_lora = image(srv, family, f"{family}_stock_lora", path.name)
    new_log = srv.log_text()[len(log_before):]
    assert "lora key not loaded" not in new_log and "NOT LOADED" not in new_log, new_log[-3000:]
    assert np.abs(with_lora - before).mean() > 0.5  # the LoRA changes the image


# ---------------------------------------------------------------- SDXL

SDXL_STEPS = 12


@pytest.fixture(scope="module")
def sdxl(server):
    before = image(server, "sdxl", "sdxl_before")
    entry = server.run(train_prompt("sdxl", "sdxl_test", SDXL_STEPS, 3e-3, validation_split=0.125), timeout=900)
    return server, entry, before


def test_sdxl_size_conditioning_is_each_images_real_size_and_crop(server):
    p = base_nodes("sdxl", SIZED_DIR)
    p[INFO] = {"class_type": "LoRALabTestDatasetInfo", "inputs": {"dataset": [DATASET, 0]}}
    rows = {r["name"]: r for r in json.loads(server.run(p, timeout=300)["outputs"][INFO]["text"][0])}
    # 96x80 -> covers 64x64 at 77x64, centred crop 6 px from the left; 64x128 -> 64x128, 32 px from the top.
    assert rows["wide.png"]["extra"] == [{"width": 96, "height": 80, "crop_w": 6, "crop_h": 0, "target_width": 64, "target_height": 64}]
    assert rows["tall.png"]["extra"] == [{"width": 64, "height": 128, "crop_w": 0, "crop_h": 32, "target_width": 64, "target_height": 64}]


def test_sdxl_trains_and_validation_loss_falls(sdxl):
    _, entry, _ = sdxl
    ui = train_ui(entry)
    assert ui["step"] == SDXL_STEPS
    val = ui["history"]["val_loss"]  # one held-out image at fixed noise levels and noise
    assert len(val) >= 3 and val[-1] < 0.97 * val[0], val


def test_sdxl_file_has_sd_scripts_names_and_loads_in_stock_loader(sdxl):
    srv, entry, before = sdxl
    path, modules, meta = lora_file(srv, entry)
    assert all(m.startswith("lora_unet_") for m in modules)
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # LDM paths, like sd-scripts
                 "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k",
                 "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_output_blocks_5_1_proj_out"):
        assert name in modules, name
    assert not any("down_blocks" in m for m in modules)
    assert meta["ss_base_model_version"].startswith("sdxl_") and meta["ss_network_dim"] == "8"
    check_stock_loader_applies_every_key(srv, "sdxl", path, before)


# SDXL with the text-encoder LoRA: a real ComfyUI SDXL CLIP (CLIP-L + CLIP-G at their real widths,
# 3 layers each: tiny_models.tiny_sdxl_clip) so its key map, tokenizer and in-place layers are ComfyUI's.
SDXL_CLIP = "17"
TE_LAYERS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def sdxl_clip_image(srv, prefix, lora_name=None):
    p = {
        MODEL: model_node("sdxl"),
        ENCODERS: {"class_type": "LoRALabTestEncoders", "inputs": {"family": "sdxl"}},
        SDXL_CLIP: {"class_type": "LoRALabTestSDXLClip", "inputs": {"seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": [SDXL_CLIP, 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": [SDXL_CLIP, 0]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": [MODEL, 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 7,
            "steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": [ENCODERS, 1]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
    if lora_name:  # CLIP only: any change in the image comes from the text-encoder LoRA
        p["20"] = {"class_type": "LoraLoader", "inputs": {"model": [MODEL, 0], "clip": [SDXL_CLIP, 0], "lora_name": lora_name, "strength_model": 0.0, "strength_clip": 1.0}}
        p["2"]["inputs"]["clip"] = p["3"]["inputs"]["clip"] = ["20", 1]
        p["5"]["inputs"]["model"] = ["20", 0]
    entry = srv.run(p, timeout=300)
    return np.asarray(Image.open(srv.output_file(entry["outputs"]["7"]["images"][0])).convert("RGB"), dtype=np.float32)


def test_sdxl_text_encoder_lora_writes_te1_te2_and_loads_in_stock_loader(server):
    before = sdxl_clip_image(server, "sdxl_te_before")
    p = train_prompt("sdxl", "sdxl_te", 6, 3e-3)
    p[SDXL_CLIP] = {"class_type": "LoRALabTestSDXLClip", "inputs": {"seed": 0}}
    p[DATASET]["inputs"]["clip"] = [SDXL_CLIP, 0]
    p[NETWORK]["inputs"]["train_text_encoder"] = True
    p[OPTIMIZER]["inputs"]["text_encoder_lr"] = 2e-3
    p[TRAIN]["inputs"]["clip"] = [SDXL_CLIP, 0]
    entry = server.run(p, timeout=900)
    path, modules, meta = lora_file(server, entry)
    expected = {f"lora_te{n}_text_model_encoder_layers_{i}_{m}" for n in (1, 2) for i in range(SDXL_CLIP_LAYERS) for m in TE_LAYERS}
    assert {m for m in modules if m.startswith("lora_te")} == expected
    assert any(m.startswith("lora_unet_input_blocks_") for m in modules)
    assert meta["ss_base_model_version"].startswith("sdxl_") and meta["ss_text_encoder_lr"] == "0.002" and meta["ss_unet_lr"] == "0.003"
    with safe_open(str(path), "pt") as f:
        moved = {m for m in expected if float(f.get_tensor(f"{m}.lora_up.weight").float().abs().max()) > 0}
    # Both encoders' LoRAs trained (left their zero init), except CLIP-L's last layer: SDXL reads
    # CLIP-L's penultimate layer, so (as in sd-scripts' files) that layer's LoRA is written but stays zero.
    unused = {m for m in expected if m.startswith(f"lora_te1_text_model_encoder_layers_{SDXL_CLIP_LAYERS - 1}_")}
    assert moved == expected - unused, sorted(expected - unused - moved)
    log_before = server.log_text()
    with_lora = sdxl_clip_image(server, "sdxl_te_lora", path.name)
    new_log = server.log_text()[len(log_before):]
    assert "lora key not loaded" not in new_log and "NOT LOADED" not in new_log, new_log[-3000:]
    assert np.abs(with_lora - before).mean() > 0.05


# ---------------------------------------------------------------- Flux

FLUX_STEPS = 40


@pytest.fixture(scope="module")
def flux(server):
    before = image(server, "flux", "flux_before")
    entry = server.run(train_prompt("flux", "flux_test", FLUX_STEPS, 3e-3, validation_split=0.125,
                                    timestep_sampling="flux_shift", guidance=1.0), timeout=900)
    return server, entry, before


def test_flux_trains_and_validation_loss_falls(flux):
    _, entry, _ = flux
    ui = train_ui(entry)
    assert ui["step"] == FLUX_STEPS
    assert any("flux_shift: shift" in n for n in ui["notes"]), ui["notes"]
    val = ui["history"]["val_loss"]  # one held-out image at fixed noise levels and noise
    assert len(val) >= 3 and val[-1] < 0.97 * val[0], val


def test_flux_file_has_sd_scripts_names_and_loads_in_stock_loader(flux):
    srv, entry, before = flux
    path, modules, meta = lora_file(srv, entry)
    per_double = {"img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin",
                  "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin"}
    per_single = {"linear1", "linear2", "modulation_lin"}
    expected = {f"lora_unet_double_blocks_{i}_{n}" for i in range(2) for n in per_double}
    expected |= {f"lora_unet_single_blocks_{i}_{n}" for i in range(2) for n in per_single}
    assert modules == expected, modules ^ expected
    assert meta["ss_base_model_version"] == "flux1"
    check_stock_loader_applies_every_key(srv, "flux", path, before)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_gradient_checkpointing_gives_the_same_training(server, family):
    # The recomputation must see the LoRA's hooks, and Flux blocks update their inputs in place:
    # either mistake changes the gradients (or stops training).
    runs = [train_ui(server.run(train_prompt(family, f"{family}_gc_{gc}", 3, 1e-2, gradient_checkpointing=gc), timeout=300))
            for gc in (False, True)]
    a, b = (r["history"]["loss"] for r in runs)
    assert np.allclose(a, b, rtol=1e-4, atol=1e-6), (a, b)
    assert all(any(n.startswith("Estimated peak memory") for n in r["notes"]) for r in runs), runs[0]["notes"]


def test_flux_rejects_min_snr_gamma_naming_the_input(server):
    entry = server.run(train_prompt("flux", "min_snr", 2, 1e-3, min_snr_gamma=5.0), timeout=300, check=False)
    err = execution_error(entry)
    assert err is not None and err["node_id"] == TRAIN
    assert err["exception_message"].startswith("min_snr_gamma:"), err["exception_message"]
    assert "flow models" in err["exception_message"]


# ---------------------------------------------------------------- memory estimate


@pytest.mark.parametrize("args", [["--family", "sdxl", "--res", "128", "--batch", "2", "--gc"],
                                  ["--family", "flux", "--res", "512", "--batch", "2"]])
def test_memory_estimate_within_20_percent_of_measured_peak(comfyui_path, args):
    # Peak resident memory of the training process above its baseline; glibc's heap is kept from
    # hoarding freed blocks so the number follows live memory, as a GPU allocator's statistics do.
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path), MALLOC_MMAP_THRESHOLD_="65536")
    r = subprocess.run([sys.executable, str(HERE.parents[1] / "bench" / "gpu_families.py"), "calibrate", "--cpu", *args],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.8 <= out["ratio"] <= 1.2, out

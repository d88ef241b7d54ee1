"""The example SD1.5 workflow, queued over HTTP against a real ComfyUI running on CPU."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from comfy_server import PromptRejected, cached_nodes, txt2img_prompt
from tiny_models import DATASET_DIR_NAME, TINY_CKPT_NAME

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from headless.workflow import DATASET, REPORT_SAVE, SAVE, TRAIN, TrainingOptions, training_prompt  # noqa: E402
from trainer.diagnosis import VERDICTS  # noqa: E402
from trainer.report import BASE, BLEED, VALIDATION  # noqa: E402

PACK_NODES = {
    "LoRALabDataset", "LoRALabNetwork", "LoRALabOptimizer", "LoRALabPrecision", "LoRALabTrain",
    "LoRALabApplyLoRA", "LoRALabStrengthSweep", "LoRALabPreview", "LoRALabSaveLoRA", "LoRALabTrainingReport", "LoRALabEvaluate",
}
STEPS = 30


def options(**kw):
    base = dict(
        checkpoint=TINY_CKPT_NAME, dataset=DATASET_DIR_NAME, output_name="sd15_test", resolution=64, steps=STEPS,
        mixed_precision="fp32", gradient_checkpointing=False, unet_lr=2e-3, scheduler="constant", warmup_ratio=0.0,
        validation_split=0.25, test_size=64, test_steps=4, test_cfg=2.0, test_prompt="a photo of sks object",
    )
    base.update(kw)
    return TrainingOptions(**base)


def image_of(srv, entry, node_id):
    info = entry["outputs"][node_id]["images"][0]
    return np.asarray(Image.open(srv.output_file(info)).convert("RGB"), dtype=np.float32)


def base_image(srv, prefix, extra_nodes=None, model_ref=("1", 0)):
    prompt = txt2img_prompt(TINY_CKPT_NAME, seed=7, filename_prefix=prefix, positive="a photo of sks object")
    prompt["5"]["inputs"]["model"] = list(model_ref)
    prompt.update(extra_nodes or {})
    return image_of(srv, srv.run(prompt, timeout=300), "7")


@pytest.fixture(scope="module")
def trained(comfy_server):
    srv = comfy_server
    srv.free()
    before = base_image(srv, "before")
    entry = srv.run(training_prompt(options()), timeout=900)
    return srv, entry, before


def train_ui(entry, node=TRAIN):
    return entry["outputs"][node]["lora_lab"][0]


def test_all_pack_nodes_register(comfy_server):
    assert comfy_server.pack_import_error() is None
    info = comfy_server.object_info()
    assert PACK_NODES <= set(info), PACK_NODES - set(info)
    train = info["LoRALabTrain"]["input"]
    for name, spec in {**train["required"], **train.get("optional", {})}.items():
        if isinstance(spec[0], str) and spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN"):
            assert "default" in spec[1] and "tooltip" in spec[1], name


def test_training_runs_and_validation_loss_falls(trained):
    _, entry, _ = trained
    ui = train_ui(entry)
    assert ui["step"] == STEPS
    h = ui["history"]
    assert len(h["val_loss"]) >= 3
    assert h["val_loss"][-1] < h["val_loss"][0], h["val_loss"]


def test_chart_data_and_report_carry_validation_and_the_base_model_reference(trained):
    srv, entry, _ = trained
    ui = train_ui(entry)
    h = ui["history"]
    # A fresh LoRA adds nothing at step 0, so there the base model and the first validation agree.
    assert h["base_val_loss"] > 0 and h["val_step"][0] == 0
    assert h["base_val_loss"] == pytest.approx(h["val_loss"][0], rel=1e-5)
    assert ui["diagnosis"]["verdict"] in VERDICTS, ui["diagnosis"]
    # Concept bleed (the Dataset node's default control set): measured with validation, from the
    # base model's own samples, and at step 0 equal to the base model's value.
    assert h["bleed_step"] == h["val_step"] and h["base_bleed_loss"] > 0
    assert h["base_bleed_loss"] == pytest.approx(h["bleed_loss"][0], rel=1e-5)
    assert any(n.startswith("Concept bleed: 2 control images drawn by the base model") for n in ui["notes"]), ui["notes"]
    report = image_of(srv, entry, REPORT_SAVE)
    for color in (BASE, VALIDATION, BLEED):
        assert np.all(report == np.array(color, dtype=np.float32), axis=-1).sum() > 50, color


def test_saved_file_is_kohya_format_and_loads_in_stock_loraloader(trained):
    srv, entry, before = trained
    path = Path(entry["outputs"][SAVE]["text"][0])
    assert path.parent.name == "loras" and path.suffix == ".safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        modules = {k.rsplit(".", 2)[0] for k in keys if k.endswith(".lora_down.weight")}
        assert modules and all(f"{m}.lora_up.weight" in keys and f"{m}.alpha" in keys for m in modules)
        assert all(m.startswith("lora_unet_") for m in modules)
        assert any("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in m for m in modules)  # diffusers path names
        assert f.get_tensor(next(iter(modules)) + ".alpha").ndim == 0
    assert meta["ss_network_dim"] == "16" and meta["ss_base_model_version"] == "sd_v1"
    log_before = srv.log_text()
    lora = {"20": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": path.name, "strength_model": 1.0, "strength_clip": 0.0}}}
    with_lora = base_image(srv, "stock_lora", lora, ("20", 0))
    new_log = srv.log_text()[len(log_before):]
    assert "lora key not loaded" not in new_log and "NOT LOADED" not in new_log
    assert np.abs(with_lora - before).mean() > 0.5  # the LoRA changes the image


def test_strength_zero_is_base_and_1_5_moves_further_than_1_0(trained):
    srv, entry, before = trained
    name = Path(entry["outputs"][SAVE]["text"][0]).name
    images = {}
    for s in (0.0, 1.0, 1.5):
        nodes = {"30": {"class_type": "LoRALabApplyLoRA", "inputs": {"model": ["1", 0], "strength": s, "lora_name": name}}}
        images[s] = base_image(srv, f"strength_{s}", nodes, ("30", 0))
    assert np.array_equal(images[0.0], before)
    d1, d15 = np.abs(images[1.0] - before).mean(), np.abs(images[1.5] - before).mean()
    assert d15 > d1 > 0.5, (d1, d15)


def renumbered(prompt, old, new):
    """The prompt with node `old` renamed `new`, links included (a separate node, its own session)."""
    text = json.dumps(prompt).replace(f'["{old}", ', f'["{new}", ')
    out = json.loads(text)
    out[new] = out.pop(old)
    return out


def test_start_from_saved_lora_begins_with_its_weights(trained):
    """start_from_lora: a new session (e.g. after ComfyUI restarted) starts from the file's weights."""
    srv, entry, _ = trained
    source = Path(entry["outputs"][SAVE]["text"][0])
    prompt = training_prompt(options(steps=1, unet_lr=1e-7, output_name="started", save_dtype="fp32"))
    prompt[TRAIN]["inputs"].update(mode="restart", start_from_lora=source.name)
    prompt = renumbered(prompt, TRAIN, "60")  # its own Train node: the module's session (node 6) is kept
    out = srv.run(prompt, timeout=900)
    started = Path(out["outputs"][SAVE]["text"][0])
    with safe_open(str(source), "pt") as a, safe_open(str(started), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        ups = [k for k in a.keys() if k.endswith(".lora_up.weight")]
        assert max(float(a.get_tensor(k).abs().max()) for k in ups) > 1e-3  # a trained LoRA, not zeros
        for k in a.keys():  # one step at lr 1e-7 moves each weight by ~1e-7: the file's weights, as saved
            assert torch.allclose(a.get_tensor(k).float(), b.get_tensor(k).float(), atol=1e-6), k


def test_original_model_unchanged_after_training(trained):
    srv, _, before = trained
    srv.free()
    assert np.array_equal(base_image(srv, "after"), before)


def test_requeue_continues_without_reencoding(trained):
    srv, first, _ = trained
    entry = srv.run(training_prompt(options()), timeout=900)
    ui = train_ui(entry)
    assert ui["step"] == 2 * STEPS, ui["notes"]
    assert ui["history"]["step"][:STEPS] == train_ui(first)["history"]["step"][:STEPS]
    # Other prompts ran in between, so ComfyUI's own cache may have dropped the dataset node's
    # output; if it ran again, every image came from the disk cache.
    if DATASET not in cached_nodes(entry):
        assert "encoded: 0, from cache: 8" in entry["outputs"][DATASET]["text"][0]


def test_cancel_keeps_progress_and_continue_matches_uninterrupted(comfy_server):
    srv = comfy_server
    steps = 150
    prompt = training_prompt(options(output_name="cancelled", steps=steps, validation_split=0.0))
    pid = srv.queue(prompt)
    while not any(item[1] == pid for item in srv.queue_state()["queue_running"]):
        time.sleep(0.1)
    time.sleep(3.0)  # inside the training (encoding is cached; 150 steps take well over 3 s on CPU)
    srv.interrupt()
    entry = srv.wait(pid, timeout=300)
    interrupted = [m for m in entry["status"]["messages"] if m[0] == "execution_interrupted"]
    assert interrupted and interrupted[0][1]["node_id"] == TRAIN, entry["status"]["messages"]
    resumed = train_ui(srv.run(prompt, timeout=900))
    assert resumed["step"] == steps
    # An uninterrupted twin (another Train node id => its own session) gives the same curve.
    twin = {("9" + k if k in (TRAIN, SAVE) else k): v for k, v in training_prompt(options(output_name="twin", steps=steps, validation_split=0.0)).items()}
    for node in twin.values():
        for key, value in node["inputs"].items():
            if isinstance(value, list) and value[0] in (TRAIN, SAVE):
                node["inputs"][key] = ["9" + value[0], value[1]]
    full = train_ui(srv.run(twin, timeout=900), node="9" + TRAIN)
    assert full["step"] == steps
    assert resumed["history"]["loss"] == full["history"]["loss"]


def test_empty_folder_is_a_clear_node_error_and_server_keeps_serving(comfy_server, tmp_path):
    srv = comfy_server
    empty = tmp_path / "empty_dataset"
    empty.mkdir()
    prompt = training_prompt(options(dataset=str(empty)))
    with pytest.raises(PromptRejected) as e:
        srv.queue(prompt)
    errors = e.value.node_errors["2"]["errors"]
    assert [err["extra_info"]["input_name"] for err in errors] == ["folder"]
    details = errors[0]["details"]
    assert "none of them an image" in details and ".png" in details and str(empty) in details, details
    assert "Traceback" not in details
    base_image(srv, "still_serving")  # the next prompt runs


def test_previews_while_training_match_the_test_graph(comfy_server):
    srv = comfy_server
    from headless.workflow import SWEEP_SAVE

    prompt = training_prompt(options(output_name="previewed", steps=20, validation_split=0.0, strengths="1.0", preview_every=10))
    prompt[TRAIN]["inputs"]["mode"] = "restart"
    entry = srv.run(prompt, timeout=900)
    previews = entry["outputs"][TRAIN]["images"]
    assert [p["filename"].rsplit("_", 1)[-1] for p in previews] == ["000010.png", "000020.png"]
    first, last = (image_of_ref(srv, p) for p in previews)
    assert np.abs(last - first).mean() > 0.5  # the LoRA learned between the two previews
    grid = image_of(srv, entry, SWEEP_SAVE)
    swept = grid[-last.shape[0]:, : last.shape[1]]  # the strength-1.0 cell, under its label strip
    assert np.abs(swept - last).mean() < 2.0, np.abs(swept - last).mean()


def image_of_ref(srv, ref):
    return np.asarray(Image.open(srv.output_file(ref)).convert("RGB"), dtype=np.float32)


def test_chained_train_nodes_continue_one_session(comfy_server):
    srv = comfy_server
    prompt = training_prompt(options(output_name="chained", steps=10, validation_split=0.0))
    prompt[TRAIN]["inputs"].update(mode="restart", save_every=5)
    second = dict(prompt[TRAIN], inputs=dict(prompt[TRAIN]["inputs"], continue_from=[TRAIN, 1], mode="continue"))
    prompt["50"] = second
    prompt[SAVE]["inputs"]["lora"] = ["50", 1]  # save what the second node trained
    entry = srv.run(prompt, timeout=900)
    first_ui, second_ui = train_ui(entry), train_ui(entry, node="50")
    assert first_ui["step"] == 10 and second_ui["step"] == 20
    assert second_ui["history"]["loss"][:10] == first_ui["history"]["loss"]
    with safe_open(entry["outputs"][SAVE]["text"][0], "pt") as f:
        assert f.metadata()["ss_steps"] == "20"
    # save_every=5 on both nodes: one kohya file per 5 steps, named by step, in the loras folder
    saved = [Path(p) for p in first_ui["saved"] + second_ui["saved"]]
    assert [p.name for p in saved] == [f"chained-step{n:06d}.safetensors" for n in (5, 10, 15, 20)]
    for n, path in zip((5, 10, 15, 20), saved):
        assert path.parent.name == "loras"
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["ss_steps"] == str(n)

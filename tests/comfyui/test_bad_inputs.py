"""Bad inputs through a real ComfyUI: each one gets a node error that names the input and the fix,
or is handled (training succeeds, with a warning where the user should know), and the server
keeps serving.

One server serves the whole module. It runs with `bitsandbytes` hidden (a package of that name
on PYTHONPATH that fails to import, as a missing install does), so the 8-bit optimizer case is the
real missing-library path. Every case uses its own dataset folder.

Prompts are the example SD1.5 graph (headless/workflow.py) at 64 px and 1 training step. They
are queued with `partial_execution_targets` (the API behind "run this output"): ComfyUI then
validates and runs only what the named output needs, so a case that fails in the strength sweep
doesn't train first. Without it ComfyUI runs the outputs that validate and reports the node
errors of the others in the same answer.
"""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from comfy_server import ComfyServer, PromptRejected, execution_error, status_str, txt2img_prompt
from tiny_models import TINY_CKPT_NAME, make_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from headless.workflow import (  # noqa: E402
    CKPT, DATASET, NETWORK, OPTIMIZER, SAVE, SWEEP_SAVE, SWEEP, TRAIN, TrainingOptions, training_prompt,
)

HERE = Path(__file__).resolve().parent
SD2_UNET_NAME = "lora_lab_tiny_sd2_unet.safetensors"
APPLY = "30"
SAMPLE_OUT = "7"  # SaveImage of txt2img_prompt
GOOD = "good"

# A tiny SD2.x UNet (1024-wide cross-attention, linear transformer projections): a family ComfyUI
# loads and LoRA Lab does not train. Built from ComfyUI's own UNet class, like the tiny SD1.5.
SD2_UNET_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import tiny_models as tm
import torch
from safetensors.torch import save_file
comfy = tm._import_comfy(sys.argv[2])
config = dict(tm.TINY_UNET_CONFIG, context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)
def unet(device):
    with torch.device(device):
        return comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel(**config, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
meta = {k: torch.empty(v.shape, device="meta") for k, v in unet("meta").state_dict().items()}
save_file(tm._seeded_state_dict(unet("cpu"), 0), sys.argv[3])
print(json.dumps({"detected": tm.detected_config_name(sys.argv[2], meta)}))
"""


# ---------------------------------------------------------------- files


def bilevel_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG of any size, written row by row (a few KB, never the pixels in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z, parts = zlib.compressobj(9), []
    for _ in range(height):
        parts.append(z.compress(row))
    parts.append(z.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


def noise_image(size=256, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def lora_file(path: Path, modules: dict, metadata: dict | None = None) -> None:
    """modules: kohya name -> (out, in) sizes; rank 4."""
    import torch

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out_dim, in_dim) in modules.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, in_dim, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_dim, 4, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path), metadata=metadata or {})


def write_loras(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lora_file(folder / "sdxl_keyed.safetensors", {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    }, {"ss_base_model_version": "sdxl_base_v1-0"})
    lora_file(folder / "random_keyed.safetensors", {"foo_bar_baz": (64, 64), "qux_layer_1": (32, 16)})
    # SD1.5 names on a wider model than this one (640 instead of 320 channels)
    lora_file(folder / "wrong_sizes.safetensors", {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (640, 640)})
    (folder / "corrupt.safetensors").write_bytes(b"\x07\x00garbage, not a safetensors header" * 10)
    # 3 of 4 modules are this SD1.5 model's layers; 1 of 4 (fewer than half)
    fits = {f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{p}": (320, 320) for p in ("q", "k", "v")}
    lora_file(folder / "partial_fit.safetensors", dict(fits, lora_unet_not_in_this_model_proj=(320, 320)))
    lora_file(folder / "mostly_foreign.safetensors", {**dict(list(fits.items())[:1]), **{f"lora_unet_foreign_{i}": (64, 64) for i in range(3)}})


# ---------------------------------------------------------------- server


@pytest.fixture(scope="module")
def srv(comfyui_path, tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_bad_inputs")
    (base / "models" / "checkpoints").mkdir(parents=True)
    os.symlink(tiny_checkpoint, base / "models" / "checkpoints" / TINY_CKPT_NAME)
    unets = base / "models" / "diffusion_models"
    unets.mkdir(parents=True)
    builder = subprocess.Popen(
        [sys.executable, "-c", SD2_UNET_SCRIPT, str(HERE), str(comfyui_path), str(unets / SD2_UNET_NAME)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    write_loras(base / "models" / "loras")
    make_dataset(base / "input" / GOOD, n=3, size=64, seed=1)
    hidden = base / "no_bitsandbytes" / "bitsandbytes"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'bitsandbytes'\", name='bitsandbytes')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(hidden.parent), os.environ.get("PYTHONPATH")])))
    server = ComfyServer(comfyui_path, base, env=env)
    server.start()
    try:
        out, err = builder.communicate(timeout=600)
        if builder.returncode != 0 or json.loads(out.strip().splitlines()[-1])["detected"] != "SD20":
            pytest.fail(f"building the tiny SD2 UNet failed\n{out}\n{err}")
        yield server
    finally:
        if builder.poll() is None:
            builder.kill()
        server.stop()
        sys.stderr.write(f"\n[comfyui] server log: {server.log_path}\n")


def options(**kw) -> TrainingOptions:
    base = dict(
        checkpoint=TINY_CKPT_NAME, dataset=GOOD, output_name="bad_inputs", resolution=64, steps=1,
        mixed_precision="fp32", gradient_checkpointing=False, unet_lr=1e-4, scheduler="constant", warmup_ratio=0.0,
        rank=4, alpha=4.0, test_size=64, test_steps=1, test_cfg=1.0, strengths="1.0",
    )
    base.update(kw)
    return TrainingOptions(**base)


def graph(node=None, field=None, value=None, **kw) -> dict:
    """The example graph with `options(**kw)`, and node's input `field` set to `value` (None: removed)."""
    prompt = training_prompt(options(**kw))
    if node is not None:
        if value is None:
            del prompt[node]["inputs"][field]
        else:
            prompt[node]["inputs"][field] = value
    prompt[TRAIN]["inputs"]["mode"] = "restart"
    return prompt


def apply_graph(**apply_inputs) -> dict:
    """Stock txt2img sampling the MODEL from LoRA Lab Apply LoRA."""
    prompt = txt2img_prompt(TINY_CKPT_NAME, steps=1)
    prompt[APPLY] = {"class_type": "LoRALabApplyLoRA", "inputs": {"model": [CKPT, 0], "strength": 1.0, **apply_inputs}}
    prompt["5"]["inputs"]["model"] = [APPLY, 0]
    return prompt


def submit(srv, prompt, targets) -> tuple[int, dict]:
    body = {"prompt": prompt, "client_id": srv.client_id, "partial_execution_targets": list(targets)}
    return srv.request("POST", "/prompt", body)


def assert_user_message(text: str, field: str, *expected: str) -> None:
    assert "Traceback" not in text and 'File "' not in text, text
    assert field in text, text
    for part in expected:
        assert part in text, (part, text)


def assert_serving(srv) -> None:
    assert srv.alive(), srv.log_tail()
    state = srv.queue_state()
    assert state["queue_running"] == [] and state["queue_pending"] == [], state


def rejected(srv, prompt, targets, node, field, *expected) -> str:
    """The prompt is refused before anything runs, with one error on `node` naming `field`."""
    status, body = submit(srv, prompt, targets)
    assert status == 400, (status, body)
    errors = PromptRejected(status, body).node_errors[node]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == [field], errors
    text = f"{errors[0]['message']}: {errors[0]['details']}"
    assert_user_message(text, field, *expected)
    assert_serving(srv)
    return text


def run(srv, prompt, targets, timeout=600) -> dict:
    status, body = submit(srv, prompt, targets)
    assert status == 200 and not body.get("node_errors"), (status, body)
    return srv.wait(body["prompt_id"], timeout=timeout)


def failed(srv, prompt, targets, node, field, *expected) -> str:
    """The prompt runs and `node` stops with a message that starts with `field`."""
    entry = run(srv, prompt, targets)
    assert status_str(entry) == "error", entry["status"]
    error = execution_error(entry)
    assert error["node_id"] == node, error
    message = error["exception_message"]
    assert message.startswith(f"{field}:"), message
    assert_user_message(message, field, *expected)
    assert_serving(srv)
    return message


def folder(srv, name, files: dict) -> str:
    """A dataset folder under the input directory; files: name -> bytes, str, a PIL image, or a writer(path)."""
    d = srv.input_dir / name
    d.mkdir(parents=True, exist_ok=True)
    for fname, content in files.items():
        if isinstance(content, Image.Image):
            content.save(d / fname)
        elif isinstance(content, str):
            (d / fname).write_text(content, encoding="utf-8")
        elif callable(content):
            content(d / fname)
        else:
            (d / fname).write_bytes(content)
    return str(d)


# ---------------------------------------------------------------- refused before anything runs

# name -> (how to break the graph, targets, node with the error, input named, words the message must have)
REFUSED = {
    "rank_0": (lambda s: graph(NETWORK, "rank", 0), [TRAIN], NETWORK, "rank", ["smaller than min of 1"]),
    "alpha_0": (lambda s: graph(NETWORK, "alpha", 0.0), [TRAIN], NETWORK, "alpha", ["smaller than min of 0.01"]),
    "alpha_negative": (lambda s: graph(NETWORK, "alpha", -8.0), [TRAIN], NETWORK, "alpha", ["smaller than min"]),
    "unet_lr_0": (lambda s: graph(OPTIMIZER, "unet_lr", 0.0), [TRAIN], OPTIMIZER, "unet_lr", ["smaller than min"]),
    "unet_lr_negative": (lambda s: graph(OPTIMIZER, "unet_lr", -1e-4), [TRAIN], OPTIMIZER, "unet_lr", ["smaller than min"]),
    "steps_0": (lambda s: graph(TRAIN, "steps", 0), [TRAIN], TRAIN, "steps", ["smaller than min of 1"]),
    "warmup_ratio_above_1": (lambda s: graph(OPTIMIZER, "warmup_ratio", 1.5), [TRAIN], OPTIMIZER, "warmup_ratio", ["bigger than max of 0.5"]),
    "validation_split_above_max": (lambda s: graph(TRAIN, "validation_split", 0.8), [TRAIN], TRAIN, "validation_split", ["bigger than max"]),
    "unknown_optimizer": (lambda s: graph(OPTIMIZER, "optimizer", "AdamW9000"), [TRAIN], OPTIMIZER, "optimizer",
                          ["unknown optimizer 'AdamW9000'", "choose one of", "AdamW"]),
    # bitsandbytes is hidden in this server: the real missing-library path
    "8bit_optimizer_without_bitsandbytes": (lambda s: graph(optimizer="AdamW8bit"), [TRAIN], OPTIMIZER, "optimizer",
                                            ["AdamW8bit needs the 'bitsandbytes' library", "pip install bitsandbytes", "choose AdamW"]),
    "missing_vae": (lambda s: graph(DATASET, "vae", None), [DATASET], DATASET, "vae", ["Required input is missing"]),
    "missing_clip": (lambda s: graph(DATASET, "clip", None), [DATASET], DATASET, "clip", ["Required input is missing"]),
    "empty_folder": (lambda s: graph(dataset=folder(s, "empty", {})), [DATASET], DATASET, "folder",
                     ["none of them an image", "Accepted images: .png"]),
    "folder_of_non_images": (lambda s: graph(dataset=folder(s, "non_images", {"notes.md": "x", "clip.mp4": b"\0" * 64, "data.csv": "a,b"})),
                             [DATASET], DATASET, "folder", ["found 3 file(s), none of them an image", ".jpg"]),
    "captions_without_images": (lambda s: graph(dataset=folder(s, "captions_only", {"a.txt": "a cat", "b.txt": "a dog"})),
                                [DATASET], DATASET, "folder", ["found 2 caption file(s) (.txt) but no images"]),
    "folder_that_does_not_exist": (lambda s: graph(dataset=str(s.input_dir / "no_such_folder")), [DATASET], DATASET, "folder",
                                   ["no folder at", "no_such_folder", "Check the spelling"]),
    "blank_folder_name": (lambda s: graph(dataset="  "), [DATASET], DATASET, "folder", ["is empty", "input directory"]),
    "strengths_not_numbers": (lambda s: graph(strengths="0, abc, 1"), [SWEEP_SAVE], SWEEP, "strengths",
                              ["'abc'", "not a number", "0, 0.5, 1.0"]),
    "strengths_out_of_range": (lambda s: graph(strengths="-20, 1"), [SWEEP_SAVE], SWEEP, "strengths", ["'-20'", "-10 to 10"]),
    "strengths_nan": (lambda s: graph(strengths="0, nan"), [SWEEP_SAVE], SWEEP, "strengths", ["'nan'", "-10 to 10"]),
    "strengths_empty": (lambda s: graph(strengths=" , ;"), [SWEEP_SAVE], SWEEP, "strengths", ["give 1 to 16", "got 0"]),
    "save_filename_leaves_folder": (lambda s: graph(SAVE, "filename", "../../escaped"), [SAVE], SAVE, "filename", ["'..'", "stay inside the folder"]),
    "output_name_leaves_folder": (lambda s: graph(TRAIN, "output_name", "../outside"), [TRAIN], TRAIN, "output_name", ["'..'", "stay inside the folder"]),
    # Names whose longest file (with _N, .safetensors, the temp name, save_every's -stepN) exceeds 255 bytes
    "save_filename_300_ascii_bytes": (lambda s: graph(SAVE, "filename", "a" * 300), [SAVE], SAVE, "filename", ["300 bytes long", "255-byte limit", "Use at most"]),
    "save_filename_300_utf8_bytes": (lambda s: graph(SAVE, "filename", "猫" * 100), [SAVE], SAVE, "filename", ["300 bytes long", "255-byte limit"]),
    "save_filename_240_bytes": (lambda s: graph(SAVE, "filename", "b" * 240), [SAVE], SAVE, "filename", ["240 bytes long", "temp file name"]),
    "output_name_243_bytes": (lambda s: graph(TRAIN, "output_name", "é" * 120 + "abc"), [TRAIN], TRAIN, "output_name", ["243 bytes long", "-step99999999"]),
    "save_filename_reserved_con": (lambda s: graph(SAVE, "filename", "CON"), [SAVE], SAVE, "filename", ["'CON'", "Windows reserves"]),
    "save_filename_reserved_nul_in_folder": (lambda s: graph(SAVE, "filename", "nul/my_lora"), [SAVE], SAVE, "filename", ["'nul'", "Windows reserves"]),
    "output_name_reserved_com1": (lambda s: graph(TRAIN, "output_name", "COM1"), [TRAIN], TRAIN, "output_name", ["'COM1'", "Windows reserves"]),
    "save_filename_trailing_dot": (lambda s: graph(SAVE, "filename", "my_lora."), [SAVE], SAVE, "filename", ["'my_lora.'", "ends with a dot or a space"]),
    "apply_strength_nan": (lambda s: apply_graph(strength=float("nan"), lora_name="random_keyed.safetensors"), [SAMPLE_OUT], APPLY,
                           "strength", ["from -10 to 10", "got nan"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_before_running(srv, case):
    build, targets, node, field, expected = REFUSED[case]
    log_before = len(srv.log_text())
    rejected(srv, build(srv), targets, node, field, *expected)
    assert "Traceback" not in srv.log_text()[log_before:], srv.log_text()[log_before:]


# ---------------------------------------------------------------- stopped by the node, with the field


def truncated_png(path: Path) -> None:
    noise_image(128, 3).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


STOPPED = {
    "truncated_image": (lambda s: graph(dataset=folder(s, "truncated", {"ok.png": noise_image(), "cut.png": truncated_png})),
                        [DATASET], DATASET, "folder", ["cut.png", "truncated or corrupt", "Re-save it", "or remove it"]),
    "not_an_image_named_png": (lambda s: graph(dataset=folder(s, "fake", {"ok.png": noise_image(), "fake.png": os.urandom(2048)})),
                               [DATASET], DATASET, "folder", ["fake.png", "not an image file", "remove it"]),
    # Pillow refuses this one from the header (its decompression-bomb guard); nothing is decoded.
    "image_20000x20000": (lambda s: graph(dataset=folder(s, "huge", {"ok.png": noise_image(), "huge.png": lambda p: bilevel_png(p, 20000, 20000)})),
                          [DATASET], DATASET, "folder", ["huge.png", "limit of 67,108,864 pixels", "scale it down", "remove it"]),
    # Under Pillow's guard, over LoRA Lab's own limit: refused from the header, before decoding.
    "image_9000x9000": (lambda s: graph(dataset=folder(s, "large", {"ok.png": noise_image(), "large.png": lambda p: bilevel_png(p, 9000, 9000)})),
                        [DATASET], DATASET, "folder", ["large.png", "9000x9000", "scale it down"]),
    # folder comes from a String node: unknown before running, so it is checked when the Dataset runs
    "empty_folder_linked_from_a_string_node": (lambda s: linked_folder_graph(folder(s, "empty_linked", {})), [DATASET], DATASET, "folder",
                                               ["none of them an image", "empty_linked"]),
    "resolution_not_multiple_of_64": (lambda s: graph(resolution=96), [DATASET], DATASET, "resolution", ["multiple of 64", "nearest is 128"]),
    "rank_larger_than_layer_width": (lambda s: graph(rank=512, alpha=512.0), [TRAIN], TRAIN, "rank", ["512", "use rank <= 320"]),
    # every step would repeat images to fill the batch: refused, with the largest batch that fits
    "batch_larger_than_dataset": (lambda s: graph(batch_size=8), [TRAIN], TRAIN, "batch_size",
                                  ["8 is larger than the dataset (3 images", "use batch_size <= 3"]),
    "alpha_nan": (lambda s: graph(NETWORK, "alpha", float("nan")), [TRAIN], NETWORK, "alpha", ["must be > 0", "alpha = rank"]),
    "unet_lr_nan": (lambda s: graph(OPTIMIZER, "unet_lr", float("nan")), [TRAIN], OPTIMIZER, "unet_lr", ["> 0", "1e-4 for AdamW"]),
    "validation_split_with_one_image": (
        lambda s: graph(validation_split=0.25, dataset=folder(s, "single", {"only.png": noise_image(), "only.txt": "a photo"})),
        [TRAIN], TRAIN, "validation_split", ["1 image(s)", "at least 2", "set validation_split to 0"]),
    # An SD2 UNet with the dataset encoded by the SD1.5 checkpoint's CLIP (768 wide, SD2 reads 1024).
    "dataset_encoded_for_another_model": (lambda s: unet_graph(SD2_UNET_NAME), [TRAIN], TRAIN, "dataset", ["don't fit this SD2.x MODEL", "text encoder of the model you train"]),
    "apply_sdxl_lora_to_sd15": (lambda s: apply_graph(lora_name="sdxl_keyed.safetensors"), [SAMPLE_OUT], APPLY, "lora_name",
                                ["sdxl_base_v1-0", "none of its layer names exist in this SD1.5 MODEL", "Pick a LoRA trained for SD1.5"]),
    "apply_random_keyed_lora": (lambda s: apply_graph(lora_name="random_keyed.safetensors"), [SAMPLE_OUT], APPLY, "lora_name",
                                ["none of its layer names exist", "Pick a LoRA"]),
    "apply_lora_of_other_sizes": (lambda s: apply_graph(lora_name="wrong_sizes.safetensors"), [SAMPLE_OUT], APPLY, "lora_name",
                                  ["1 of its 1 layers have other sizes", "Pick a LoRA"]),
    "apply_mostly_foreign_lora": (lambda s: apply_graph(lora_name="mostly_foreign.safetensors"), [SAMPLE_OUT], APPLY, "lora_name",
                                  ["3 of its 4 layer names don't exist in this SD1.5 MODEL", "1 of its 4 modules fit", "Pick a LoRA"]),
    "apply_corrupt_lora_file": (lambda s: apply_graph(lora_name="corrupt.safetensors"), [SAMPLE_OUT], APPLY, "lora_name",
                                ["corrupt.safetensors", "not a readable safetensors file", "Pick another file"]),
    "apply_without_any_lora": (lambda s: apply_graph(), [SAMPLE_OUT], APPLY, "lora", ["connect a trained LoRA or pick a file in lora_name"]),
    # A saved LoRA of another family, or of other targets/sizes, to start training from
    "start_from_sdxl_lora": (lambda s: graph(TRAIN, "start_from_lora", "sdxl_keyed.safetensors"), [TRAIN], TRAIN, "start_from_lora",
                             ["sdxl_keyed.safetensors", "does not fit the SD1.5 model", "Pick a LoRA trained for SD1.5"]),
    "start_from_lora_of_other_targets": (lambda s: graph(TRAIN, "start_from_lora", "wrong_sizes.safetensors"), [TRAIN], TRAIN, "start_from_lora",
                                         ["wrong_sizes.safetensors", "lacks", "Use the same network settings"]),
    "start_from_corrupt_lora": (lambda s: graph(TRAIN, "start_from_lora", "corrupt.safetensors"), [TRAIN], TRAIN, "start_from_lora",
                                ["corrupt.safetensors", "not a readable safetensors file"]),
}


def linked_folder_graph(path) -> dict:
    prompt = graph()
    prompt["41"] = {"class_type": "PrimitiveString", "inputs": {"value": path}}
    prompt[DATASET]["inputs"]["folder"] = ["41", 0]
    return prompt


def unet_graph(unet_name) -> dict:
    """The example graph training a MODEL from UNETLoader (VAE and CLIP still from the checkpoint)."""
    prompt = graph()
    prompt["40"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}}
    prompt[TRAIN]["inputs"]["model"] = ["40", 0]
    return prompt


@pytest.mark.parametrize("case", list(STOPPED))
def test_stopped_with_a_message_naming_the_input(srv, case):
    build, targets, node, field, expected = STOPPED[case]
    failed(srv, build(srv), targets, node, field, *expected)


# ---------------------------------------------------------------- handled: training succeeds


def cmyk_jpeg(path: Path) -> None:
    Image.new("CMYK", (256, 256), (0, 200, 200, 0)).save(path.with_suffix(".jpg"))


def sixteen_bit_png(path: Path) -> None:
    ramp = (np.linspace(0, 65535, 256)[None, :] * np.ones((256, 1))).astype(np.uint16)
    img = Image.fromarray(ramp)
    assert img.mode.startswith("I;16")
    img.save(path)


HANDLED_FILES = {
    "cmyk.jpg": cmyk_jpeg,
    "cmyk.txt": "a photo of sks object, cyan",
    "gray16.png": sixteen_bit_png,
    "gray16.txt": "a photo of sks object, gray ramp",
    "palette.png": noise_image(256, 4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
    "palette.txt": "a photo of sks object, few colours",
    "alpha.png": Image.new("RGBA", (256, 256), (200, 30, 30, 96)),
    "alpha.txt": "a photo of sks object, café, see-through red".encode("cp1252"),  # not UTF-8
    "one_pixel.png": Image.new("RGB", (1, 1), (10, 200, 10)),
    "one_pixel.txt": "a photo of sks object, one pixel",
    "ghost.txt": "a caption whose image was deleted",
}


@pytest.fixture(scope="module")
def handled(srv):
    path = folder(srv, "handled", HANDLED_FILES)
    prompt = graph(dataset=path, output_name="handled")
    entry = run(srv, prompt, [TRAIN, SAVE])
    return entry, Path(path)


def dataset_text(entry) -> str:
    return entry["outputs"][DATASET]["text"][0]


def test_cmyk_16bit_palette_alpha_and_1x1_images_train(handled):
    entry, _ = handled
    assert status_str(entry) == "success", execution_error(entry)
    assert dataset_text(entry).startswith("5 images"), dataset_text(entry)
    ui = entry["outputs"][TRAIN]["lora_lab"][0]
    assert ui["step"] == 1 and np.isfinite(ui["history"]["loss"]).all(), ui
    assert Path(entry["outputs"][SAVE]["text"][0]).is_file()


def test_1x1_image_is_trained_with_a_warning_naming_it(handled):
    entry, _ = handled
    text = dataset_text(entry)
    warning = next(line for line in text.splitlines() if "smaller than" in line)
    assert "one_pixel.png (1x1)" in warning and "1 image(s)" in warning, text


def test_non_utf8_caption_is_read_with_a_warning_naming_it(handled):
    entry, path = handled
    text = dataset_text(entry)
    assert f"caption {path / 'alpha.txt'} is not UTF-8; read it as Windows-1252" in text, text
    assert "re-save it as UTF-8" in text


def test_more_captions_than_images_warns_naming_the_orphans(handled):
    entry, path = handled
    text = dataset_text(entry)
    assert f"1 caption file(s) have no image next to them: {path / 'ghost.txt'}" in text, text


def test_a_quoted_absolute_path_trains(srv):
    """Windows' "Copy as path" puts quotes around the path; spaces around it come with pasting."""
    make_dataset(srv.input_dir / "quoted dir", n=2, size=64, seed=3)
    entry = run(srv, graph(dataset=f'  "{srv.input_dir / "quoted dir"}"  ', output_name="quoted"), [TRAIN])
    assert status_str(entry) == "success", execution_error(entry)
    assert dataset_text(entry).startswith("2 images"), dataset_text(entry)


def test_a_partly_fitting_lora_is_applied_with_a_warning_counting_its_modules(srv):
    entry = run(srv, apply_graph(lora_name="partial_fit.safetensors"), [SAMPLE_OUT])
    assert status_str(entry) == "success", execution_error(entry)
    [warning] = entry["outputs"][APPLY]["text"]
    assert "only 3 of this LoRA's 4 modules fit this SD1.5 MODEL" in warning, warning
    assert "1 of its 4 layer names don't exist" in warning and "skips the rest" in warning, warning


# ---------------------------------------------------------------- and the server still serves


def test_server_still_serves_the_example_workflow(srv):
    assert_serving(srv)
    info = srv.object_info("LoRALabTrain")
    assert "steps" in info["input"]["required"]
    entry = srv.run(graph(strengths="0, 1", output_name="after_bad_inputs"), timeout=600)
    grid = entry["outputs"][SWEEP_SAVE]["images"][0]
    assert srv.output_file(grid).is_file()
    assert entry["outputs"][TRAIN]["lora_lab"][0]["step"] == 1

"""The integration harness itself, proven against real ComfyUI with stock nodes only."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from comfy_server import PromptRejected, cached_nodes, status_str, txt2img_prompt
from tiny_models import DATASET_DIR_NAME, TINY_CKPT_NAME

pytestmark = pytest.mark.comfyui


def _saved_images(server, entry, node_id="7"):
    images = entry["outputs"][node_id]["images"]
    return [server.output_file(info) for info in images]


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def test_server_layout(comfy_server):
    pack = comfy_server.custom_nodes_dir / "lora_lab"
    assert pack.is_dir() and (pack / "pyproject.toml").is_file()
    # ComfyUI scanned the pack (loaded or not: the pack's own tests check that it loads)
    assert comfy_server.pack_import_status() in ("ok", "failed"), comfy_server.log_tail(120)
    info = comfy_server.object_info("CheckpointLoaderSimple")
    assert TINY_CKPT_NAME in info["input"]["required"]["ckpt_name"][0]
    ds = comfy_server.input_dir / DATASET_DIR_NAME
    assert len(sorted(ds.glob("*.png"))) == 8 and len(sorted(ds.glob("*.txt"))) == 8


def test_txt2img_success_and_determinism(comfy_server):
    prompt = txt2img_prompt(TINY_CKPT_NAME, seed=1234, filename_prefix="harness_a")
    t0 = time.perf_counter()
    first = comfy_server.run(prompt, timeout=120)
    t_first = time.perf_counter() - t0
    assert status_str(first) == "success"
    (path_a,) = _saved_images(comfy_server, first)
    assert path_a.is_file()
    a = _pixels(path_a)
    assert a.shape == (64, 64, 3)
    assert np.isfinite(a).all()
    assert a.std() > 1.0, "decoded image is (nearly) constant"

    # Same graph again, through a second name of the same checkpoint file: the loader, the sampler
    # and the decoder get other inputs, so none of them can be served from ComfyUI's cache (POST /free is applied by the worker
    # when it gets to it, which a test must not depend on).
    alias = comfy_server.models_dir / "checkpoints" / ("alias_" + TINY_CKPT_NAME)
    if not alias.exists():
        os.link(comfy_server.models_dir / "checkpoints" / TINY_CKPT_NAME, alias)
    prompt_b = txt2img_prompt(alias.name, seed=1234, filename_prefix="harness_b")
    t0 = time.perf_counter()
    second = comfy_server.run(prompt_b, timeout=120)
    t_second = time.perf_counter() - t0
    cached = cached_nodes(second)
    assert not {"1", "5", "6"} & set(cached), f"{cached} were served from cache; determinism not exercised"
    (path_b,) = _saved_images(comfy_server, second)
    assert path_b != path_a
    b = _pixels(path_b)
    assert np.array_equal(a, b), f"same seed gave different pixels (max diff {np.abs(a.astype(int) - b).max()})"
    print(f"\n[comfyui] txt2img 64x64/4 steps: {t_first:.1f}s first run (incl. load), {t_second:.1f}s with the checkpoint loaded again")

    # A different seed must give a different image (the sampler is not ignoring its noise).
    third = comfy_server.run(txt2img_prompt(TINY_CKPT_NAME, seed=4321, filename_prefix="harness_c"), timeout=120)
    c = _pixels(_saved_images(comfy_server, third)[0])
    assert not np.array_equal(a, c)


def test_invalid_prompt_is_rejected_and_server_keeps_serving(comfy_server):
    bad = txt2img_prompt("no_such_checkpoint.safetensors", seed=7, filename_prefix="harness_bad")
    with pytest.raises(PromptRejected) as ei:
        comfy_server.queue(bad)
    rej = ei.value
    assert rej.status == 400
    assert "1" in rej.node_errors, rej.node_errors
    assert rej.node_errors["1"]["class_type"] == "CheckpointLoaderSimple"
    errs = rej.node_errors["1"]["errors"]
    assert any(e.get("type") == "value_not_in_list" for e in errs), errs

    entry = comfy_server.run(txt2img_prompt(TINY_CKPT_NAME, seed=99, filename_prefix="harness_after_bad"), timeout=120)
    assert status_str(entry) == "success"
    assert all(p.is_file() for p in _saved_images(comfy_server, entry))
    assert comfy_server.alive()
    assert os.path.isdir(comfy_server.output_dir)

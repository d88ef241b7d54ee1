"""Fixtures for the real-ComfyUI integration tests (everything under tests/comfyui/).

Set COMFYUI_PATH to a ComfyUI checkout to run them; otherwise they are skipped.
The server runs in its own process on CPU; this test process never imports ComfyUI.

Session fixtures:
    comfyui_path     Path of the checkout (skips when COMFYUI_PATH is unset / not a checkout)
    tiny_checkpoint  Path of a tiny seeded SD1.5 .safetensors, generated once per session
    comfy_server     running ComfyServer: tiny checkpoint in models/checkpoints as TINY_CKPT_NAME,
                     8-image captioned dataset in input/DATASET_DIR_NAME, this pack in custom_nodes/lora_lab
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # tests run with --import-mode=importlib: make the helpers importable
    sys.path.insert(0, str(HERE))

from comfy_server import ComfyServer, looks_like_comfyui  # noqa: E402
from tiny_models import DATASET_DIR_NAME, SIZED_DIR, TINY_CKPT_NAME, TINY_SDXL_UNET_NAME, install_test_nodes, make_dataset  # noqa: E402
SKIP_REASON = ("COMFYUI_PATH is not set: real-ComfyUI integration tests skipped "
               "(point it at a ComfyUI checkout to run them)")


def pytest_collection_modifyitems(config, items):
    marker = pytest.mark.comfyui
    for item in items:
        try:
            inside = Path(str(item.path)).resolve().is_relative_to(HERE)
        except (AttributeError, ValueError):
            inside = False
        if inside:
            item.add_marker(marker)


@pytest.fixture(scope="session")
def comfyui_path():
    raw = os.environ.get("COMFYUI_PATH", "").strip()
    if not raw:
        pytest.skip(SKIP_REASON)
    p = Path(raw).expanduser().resolve()
    if not looks_like_comfyui(p):
        pytest.skip(f"COMFYUI_PATH={raw!r} does not look like a ComfyUI checkout (no main.py / comfy/): "
                    "real-ComfyUI integration tests skipped")
    return p


@pytest.fixture(scope="session")
def tiny_checkpoint(comfyui_path, tmp_path_factory):
    """Tiny seeded SD1.5 checkpoint, built in a subprocess with ComfyUI's own model classes."""
    out = tmp_path_factory.mktemp("tiny_models") / TINY_CKPT_NAME
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path))
    r = subprocess.run([sys.executable, str(HERE / "tiny_models.py"), str(out), "--seed", "0"],
                       env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not out.is_file():
        pytest.fail(f"building the tiny checkpoint failed (rc={r.returncode})\n{r.stdout}\n{r.stderr}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return out


def _place(src: Path, dest: Path):
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() or dest.is_symlink():
        return
    try:
        os.link(src, dest)
    except OSError:
        try:
            os.symlink(src, dest)
        except OSError:
            shutil.copy2(src, dest)


def _serving(srv):
    """Runs the server for the fixture's lifetime; its log path is printed when it stops."""
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        sys.stderr.write(f"\n[comfyui] server log: {srv.log_path}\n")


@pytest.fixture(scope="session")
def comfy_server(comfyui_path, tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    _place(tiny_checkpoint, base / "models" / "checkpoints" / TINY_CKPT_NAME)
    make_dataset(base / "input" / DATASET_DIR_NAME, n=8, size=64, seed=0)
    yield from _serving(ComfyServer(comfyui_path, base))



@pytest.fixture(scope="session")
def family_server(comfyui_path, tmp_path_factory):
    """A second server for SDXL and Flux: the tiny SDXL UNet in models/diffusion_models (detected
    as SDXL by the stock UNETLoader), the test-only node pack (stand-in encoders, tiny Flux, a
    few-layer real SDXL CLIP), the 8-image dataset and SIZED_DIR."""
    from PIL import Image

    base = tmp_path_factory.mktemp("comfy_families")
    unet = base / "models" / "diffusion_models" / TINY_SDXL_UNET_NAME
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path))
    r = subprocess.run([sys.executable, str(HERE / "tiny_models.py"), str(unet), "--family", "sdxl"],
                       env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"building the tiny SDXL UNet failed\n{r.stdout}\n{r.stderr}")
    assert json.loads(r.stdout.strip().splitlines()[-1])["detected"] == "SDXL"
    make_dataset(base / "input" / DATASET_DIR_NAME, n=8, size=64, seed=0)
    sized = base / "input" / SIZED_DIR
    sized.mkdir(parents=True)
    for name, size in (("wide", (96, 80)), ("tall", (64, 128))):
        Image.new("RGB", size, (200, 40, 40)).save(sized / f"{name}.png")
        (sized / f"{name}.txt").write_text("a photo of sks object")
    install_test_nodes(base / "custom_nodes")
    yield from _serving(ComfyServer(comfyui_path, base))

"""The SDXL, Flux and Qwen-Image example graphs (headless/workflow.py) run in a real ComfyUI on CPU.

Real SDXL and Flux weights are gigabytes, so only the loaders are swapped for the tiny stand-ins of
test_sdxl_flux.py: SDXL's CheckpointLoaderSimple becomes UNETLoader (the tiny SDXL UNet) plus the
stand-in CLIP / VAE node; Flux's UNETLoader becomes the narrow in-process Flux (ComfyUI detects any
Flux file as 3072 wide), its DualCLIPLoader and VAELoader the stand-in CLIP / VAE node. Every other
node, link and input is the example's own: Dataset, Network, Optimizer, Precision (fp8 base weights and
gradient checkpointing for Flux), Train (flux_shift timesteps and guidance for Flux), Save, Report,
Preview, the test prompt (FluxGuidance, zeroed negative and EmptySD3LatentImage for Flux) and the
strength sweep. Qwen-Image's UNETLoader, CLIPLoader and VAELoader become the tiny Qwen-Image and its
stand-in encoders (tiny_families.py). Options make sizes and steps small; the graph is not changed.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from tiny_models import DATASET_DIR_NAME, TINY_SDXL_UNET_NAME

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from headless.workflow import (  # noqa: E402
    CKPT, CLIP_LOADER, PREVIEW, REPORT_SAVE, SAVE, SWEEP, SWEEP_SAVE, TRAIN, VAE_LOADER, TrainingOptions, training_prompt,
)

HERE = Path(__file__).resolve().parent
ENCODERS = "90"
STRENGTHS = [0, 0.5, 1.0, 1.5, 1.8]
SIZE = 64


@pytest.fixture(scope="module")
def server(family_server):
    return family_server


def small_options(family, steps):
    """The family's example options, at test sizes; everything else (fp8 base, checkpointing,
    flux_shift, guidance, cfg, scheduler, strengths) stays the family's default."""
    return TrainingOptions(
        family=family, checkpoint="replaced_by_a_stand_in", dataset=DATASET_DIR_NAME, output_name=f"{family}_example",
        resolution=SIZE, test_size=SIZE, test_steps=1, steps=steps, mixed_precision="fp32", unet_lr=1e-2,
        scheduler="constant", warmup_ratio=0.0, preview_every=steps // 2, test_prompt="a photo of sks object")


def with_stand_in_loaders(prompt, family):
    """The example graph with its loaders replaced by the tiny stand-ins; links re-pointed to them."""
    p = json.loads(json.dumps(prompt))
    if family == "sdxl":
        assert p[CKPT]["class_type"] == "CheckpointLoaderSimple"
        p[CKPT] = {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_SDXL_UNET_NAME, "weight_dtype": "default"}}
        p[ENCODERS] = {"class_type": "LoRALabTestEncoders", "inputs": {"family": "sdxl"}}
        moves = {(CKPT, 1): [ENCODERS, 0], (CKPT, 2): [ENCODERS, 1]}
    elif family in ("qwen_image", "wan"):
        assert [p[k]["class_type"] for k in (CKPT, CLIP_LOADER, VAE_LOADER)] == ["UNETLoader", "CLIPLoader", "VAELoader"]
        assert p[CLIP_LOADER]["inputs"]["type"] == family
        tiny = {"qwen_image": "qwen_image", "wan": "wan21"}[family]
        p[CKPT] = {"class_type": "LoRALabTestTinyFamily", "inputs": {"family": tiny, "seed": 0}}
        p[CLIP_LOADER] = {"class_type": "LoRALabTestFamilyEncoders", "inputs": {"family": tiny}}
        del p[VAE_LOADER]
        moves = {(VAE_LOADER, 0): [CLIP_LOADER, 1]}
    else:
        assert [p[k]["class_type"] for k in (CKPT, CLIP_LOADER, VAE_LOADER)] == ["UNETLoader", "DualCLIPLoader", "VAELoader"]
        p[CKPT] = {"class_type": "LoRALabTestTinyFlux", "inputs": {"seed": 0}}
        p[CLIP_LOADER] = {"class_type": "LoRALabTestEncoders", "inputs": {"family": "flux"}}  # CLIP stays output 0
        del p[VAE_LOADER]
        moves = {(VAE_LOADER, 0): [CLIP_LOADER, 1]}
    for node in p.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and tuple(value) in moves:
                node["inputs"][name] = moves[tuple(value)]
    return p


def sweep_cells(srv, entry, row=-1):
    """The sweep grid cut into one float RGB array per strength (below each label strip); a video
    family's cell is three frames high (first, middle, last): `row` picks one."""
    info = entry["outputs"][SWEEP_SAVE]["images"][0]
    grid = np.asarray(Image.open(srv.output_file(info)).convert("RGB"), dtype=np.float32)
    assert grid.shape[1] == SIZE * len(STRENGTHS), grid.shape
    rows = (grid.shape[0] - 28) // SIZE
    top = 28 + (row % rows) * SIZE
    return [grid[top:top + SIZE, i * SIZE:(i + 1) * SIZE] for i in range(len(STRENGTHS))]


@pytest.fixture(scope="module", params=["sdxl", "flux", "qwen_image", "wan"])
def run(request, server):
    family = request.param
    steps = 2 if family == "sdxl" else 10  # the SDXL UNet is 140 M parameters, the narrow Flux / Qwen-Image ~2 M
    example = training_prompt(small_options(family, steps))
    entry = server.run(with_stand_in_loaders(example, family), timeout=1800)
    return family, steps, example, entry, server


def test_example_graph_trains_saves_reports_previews_and_sweeps(run):
    family, steps, example, entry, srv = run
    ui = entry["outputs"][TRAIN]["lora_lab"][0]
    assert ui["step"] == steps
    if family == "flux":
        assert any("flux_shift: shift" in n for n in ui["notes"]), ui["notes"]
    path = Path(entry["outputs"][SAVE]["text"][0])
    assert path.name == f"{family}_example.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if k.endswith("lora_down.weight")}
    assert meta["ss_base_model_version"].startswith({"flux": "flux1", "sdxl": "sdxl_", "qwen_image": "qwen_image", "wan": "wan"}[family]), meta["ss_base_model_version"]
    assert meta["ss_steps"] == str(steps)
    assert {str(d) for d in dtypes} == {"torch.float16" if family == "sdxl" else "torch.bfloat16"}  # the family's save_dtype
    assert entry["outputs"][REPORT_SAVE]["images"]


def test_sweep_changes_with_strength_and_starts_at_the_base_model(run):
    family, _, _, entry, srv = run
    cells = sweep_cells(srv, entry)
    change = [float(np.abs(c - cells[0]).mean()) for c in cells]
    assert change[1] > 0 and change[-1] > change[1], change  # more strength, further from the base image


def test_last_preview_is_the_sweeps_strength_1_cell(run):
    # Preview and sweep share prompt (FluxGuidance for Flux), negative, latent, seed, sampler and cfg
    family, steps, _, entry, srv = run
    previews = entry["outputs"][TRAIN]["images"]
    assert [p["filename"].rsplit("_", 1)[-1] for p in previews] == [f"{steps // 2:06d}.png", f"{steps:06d}.png"]
    last = np.asarray(Image.open(srv.output_file(previews[-1])).convert("RGB"), dtype=np.float32)
    cell = sweep_cells(srv, entry, row=1 if family == "wan" else -1)[STRENGTHS.index(1.0)]  # a clip's preview: its middle frame
    assert np.abs(cell - last).mean() < 2.0, np.abs(cell - last).mean()


def test_a_video_sweep_shows_three_frames_per_strength(run):
    family, _, _, entry, srv = run
    if family != "wan":
        pytest.skip("image families: one image per strength")
    info = entry["outputs"][SWEEP_SAVE]["images"][0]
    grid = np.asarray(Image.open(srv.output_file(info)).convert("RGB"))
    assert grid.shape[0] == 28 + 3 * SIZE, grid.shape


def test_only_the_loaders_were_swapped(run):
    family, _, example, _, _ = run
    swapped = with_stand_in_loaders(example, family)
    loaders = {CKPT, CLIP_LOADER, VAE_LOADER, ENCODERS}
    kept = {k for k in example if k not in loaders}
    assert kept == {k for k in swapped if k not in loaders}
    for k in kept:
        assert swapped[k]["class_type"] == example[k]["class_type"]
        for name, value in example[k]["inputs"].items():
            if isinstance(value, list) and value[0] in loaders:
                continue
            assert swapped[k]["inputs"][name] == value, (k, name)
    assert PREVIEW in kept and SWEEP in kept

"""README's main command: `python <pack> train ...` runs the example workflow through real ComfyUI."""

import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open
from tiny_models import make_dataset

REPO = Path(__file__).resolve().parents[2]


def test_headless_train_writes_lora_report_and_sweep(comfyui_path, tiny_checkpoint, tmp_path):
    make_dataset(tmp_path / "data" / "5_thing", n=4, size=64, seed=3)  # kohya folder: 5 repeats
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(REPO), "train", "--comfyui", str(comfyui_path), "--checkpoint", str(tiny_checkpoint),
        "--dataset", str(tmp_path / "data"), "--resolution", "64", "--steps", "8", "--rank", "4", "--alpha", "2",
        "--test-size", "64", "--test-steps", "2", "--output", str(out), "--output-name", "cli_lora", "--device", "cpu",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "trained 8 steps" in run.stdout
    with safe_open(str(out / "cli_lora.safetensors"), "pt") as f:
        meta = f.metadata()
        assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0" and meta["ss_steps"] == "8"
    assert list(out.glob("cli_lora_report_*.png")) and list(out.glob("cli_lora_sweep_*.png"))


def test_headless_reports_bad_input_without_traceback(comfyui_path, tiny_checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    cmd = [sys.executable, str(REPO), "train", "--comfyui", str(comfyui_path), "--checkpoint", str(tiny_checkpoint), "--dataset", str(tmp_path / "empty"), "--device", "cpu", "--output", str(tmp_path / "o")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2
    assert "LoRALabDataset" in run.stderr and "none of them an image" in run.stderr
    assert "Traceback" not in run.stderr


def test_family_flux_links_its_files_into_their_folders_and_takes_flux_defaults(tmp_path):
    sys.path.insert(0, str(REPO))
    from headless.cli import _prepare, build_parser
    from headless.workflow import TrainingOptions, training_prompt

    files = {name: tmp_path / "models_elsewhere" / f"{name}.safetensors" for name in ("flux", "clip", "t5", "ae")}
    for f in files.values():
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"x")
    (tmp_path / "data").mkdir()
    args = build_parser().parse_args([
        "train", "--comfyui", str(tmp_path), "--family", "flux", "--checkpoint", str(files["flux"]),
        "--clip-l", str(files["clip"]), "--t5xxl", str(files["t5"]), "--vae", str(files["ae"]),
        "--dataset", str(tmp_path / "data"), "--test-size", "768"])
    base = tmp_path / "base"
    options = TrainingOptions(**_prepare(args, base))
    for folder, key in (("diffusion_models", "flux"), ("text_encoders", "clip"), ("text_encoders", "t5"), ("vae", "ae")):
        assert (base / "models" / folder / files[key].name).resolve() == files[key].resolve()
    assert (options.checkpoint, options.clip_l, options.t5xxl, options.vae) == tuple(f.name for f in files.values())
    # the family's defaults where no flag was given, the flag where one was
    assert (options.resolution, options.fp8_base, options.timestep_sampling, options.test_cfg) == (1024, True, "flux_shift", 1.0)
    assert options.test_size == 768
    prompt = training_prompt(options)
    assert prompt["1"]["class_type"] == "UNETLoader" and prompt["1"]["inputs"]["unet_name"] == "flux.safetensors"


def test_family_flux_names_a_missing_model_file(comfyui_path, tmp_path):
    make_dataset(tmp_path / "data", n=2, size=64, seed=3)
    cmd = [sys.executable, str(REPO), "train", "--comfyui", str(comfyui_path), "--family", "flux",
           "--checkpoint", "no_such_flux.safetensors", "--dataset", str(tmp_path / "data"), "--device", "cpu",
           "--output", str(tmp_path / "o")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "UNETLoader" in run.stderr and "no_such_flux.safetensors" in run.stderr
    assert "Traceback" not in run.stderr

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

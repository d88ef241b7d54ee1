"""The multi-process headless command (`train --processes N`) against real ComfyUI, on CPU (gloo).

Two processes with batch_size 2 against one process with batch_size 4 (the same global batch and
seed) on the tiny SD1.5 checkpoint, dropout 0: every process writes its LoRA weights and the
slice it trained at every step (the command's hidden --rank-dump), and rank 0 writes the file.
Then ComfyUI's stock LoraLoader loads that file (this module run as a script, ComfyUI imported as
a library), and one process is killed mid-run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from tiny_models import DATASET_DIR_NAME, make_dataset  # noqa: E402

STEPS = 3
TOLERANCE = 1e-5  # |w2 - w1| / |w1| over all LoRA tensors; measured 8e-8
FAULT_EXIT_S = 60  # the launcher must be gone this long after a process is killed


def _command(comfyui, checkpoint, dataset, out: Path, processes: int, batch_size: int, steps: int = STEPS) -> list[str]:
    return [sys.executable, str(REPO_ROOT), "train", "--comfyui", str(comfyui), "--checkpoint", str(checkpoint),
            "--dataset", str(dataset), "--steps", str(steps), "--batch-size", str(batch_size), "--resolution", "64",
            "--mixed-precision", "fp32", "--save-dtype", "fp32", "--seed", "5", "--device", "cpu",
            "--processes", str(processes), "--cache-dir", str(out / "cache"), "--output", str(out / "lora"),
            "--rank-dump", str(out / "dump")]


def _run(cmd, timeout=600):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO_ROOT))
    if r.returncode != 0:
        pytest.fail(f"{' '.join(cmd[-24:])} failed (rc={r.returncode})\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


@pytest.fixture(scope="module")
def runs(comfyui_path, tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("multiprocess")
    dataset = base / DATASET_DIR_NAME
    make_dataset(dataset, n=8, size=64, seed=0)
    out = {}
    for processes, batch in ((1, 4), (2, 2)):
        folder = base / f"p{processes}"
        r = _run(_command(comfyui_path, tiny_checkpoint, dataset, folder, processes, batch))
        out[processes] = {"folder": folder, "stdout": r.stdout, "stderr": r.stderr}
    return out


def _weights(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def test_both_ranks_hold_the_same_weights_equal_to_one_process(runs):
    import torch

    dump = runs[2]["folder"] / "dump"
    r0, r1 = _weights(dump / "rank0.safetensors"), _weights(dump / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "the ranks' weights differ"
    one = _weights(runs[1]["folder"] / "dump" / "rank0.safetensors")
    num = sum(float((r0[k] - v).pow(2).sum()) for k, v in one.items()) ** 0.5
    den = sum(float(v.pow(2).sum()) for v in one.values()) ** 0.5
    assert den > 0 and num / den < TOLERANCE, num / den
    # The file rank 0 wrote is those weights.
    saved = _weights(runs[2]["folder"] / "lora" / "my_lora.safetensors")
    assert all(torch.equal(saved[k], r0[k]) for k in r0)


def test_each_steps_slices_are_disjoint_and_cover_the_global_batch(runs):
    dump = runs[2]["folder"] / "dump"
    s0, s1 = (json.loads((dump / f"rank{k}.json").read_text())["slices"] for k in (0, 1))
    single = json.loads((runs[1]["folder"] / "dump" / "rank0.json").read_text())["slices"]
    assert len(s0) == len(s1) == len(single) == STEPS
    for (idx0, a0, b0), (idx1, a1, b1), (whole, _, _) in zip(s0, s1, single):
        assert idx0 == idx1 == whole and len(whole) == 4  # the same global batch as one process
        assert set(range(a0, b0)).isdisjoint(range(a1, b1)) and sorted([*range(a0, b0), *range(a1, b1)]) == list(range(4))


def test_losses_match_and_the_dataset_is_encoded_once_per_machine(runs):
    dump = runs[2]["folder"] / "dump"
    r0, r1 = (json.loads((dump / f"rank{k}.json").read_text()) for k in (0, 1))
    one = json.loads((runs[1]["folder"] / "dump" / "rank0.json").read_text())
    assert r0["loss"] == r1["loss"] and r0["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert "encoded: 8, from cache: 0" in r0["dataset"], r0["dataset"]
    assert "encoded: 0, from cache: 8" in r1["dataset"], r1["dataset"]


def test_file_metadata_is_the_single_process_one_plus_processes_and_global_batch(runs):
    m1 = _metadata(runs[1]["folder"] / "lora" / "my_lora.safetensors")
    m2 = _metadata(runs[2]["folder"] / "lora" / "my_lora.safetensors")
    assert (m1["lora_lab_processes"], m1["lora_lab_global_batch"]) == ("1", "4")
    assert (m2["lora_lab_processes"], m2["lora_lab_global_batch"]) == ("2", "4")
    differ = {k for k in set(m1) | set(m2) if m1.get(k) != m2.get(k)}
    assert differ <= {"lora_lab_processes", "sshs_model_hash", "ss_training_started_at", "modelspec.date"}, differ
    assert m2["ss_steps"] == str(STEPS) and m2["ss_base_model_version"] == "sd_v1"
    assert (runs[2]["folder"] / "lora" / "my_lora_report.png").is_file()


def test_stock_lora_loader_applies_every_key(runs, comfyui_path, tiny_checkpoint):
    lora = runs[2]["folder"] / "lora" / "my_lora.safetensors"
    r = subprocess.run([sys.executable, __file__, str(comfyui_path), str(tiny_checkpoint), str(lora)],
                       capture_output=True, text=True, timeout=600, cwd=str(HERE))
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["not_loaded"] == [], result["not_loaded"][:5]
    assert result["patched"] == result["modules"] > 0, result


def test_a_killed_process_stops_the_run_naming_its_rank(comfyui_path, tiny_checkpoint, tmp_path):
    dataset = tmp_path / DATASET_DIR_NAME
    make_dataset(dataset, n=8, size=64, seed=0)
    dump = tmp_path / "run" / "dump"
    proc = subprocess.Popen(_command(comfyui_path, tiny_checkpoint, dataset, tmp_path / "run", 2, 2, steps=100000),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO_ROOT))
    try:
        deadline = time.monotonic() + 300
        while not (dump / "rank1.step").is_file():  # training has started on rank 1
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-4000:] if proc.poll() is not None else "no step in time"
            time.sleep(0.2)
        os.kill(int((dump / "rank1.pid").read_text()), signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = proc.communicate(timeout=FAULT_EXIT_S)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"launcher exited {took:.1f} s after rank 1 was killed")
    assert proc.returncode != 0
    assert took < FAULT_EXIT_S
    assert "training stopped: process rank 1 was killed by SIGKILL" in stderr, stderr[-3000:]


def _load_with_stock_loader(comfyui: str, checkpoint: str, lora: str) -> None:
    sys.path.insert(0, comfyui)
    import utils  # noqa: F401  ComfyUI's own package first
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.sd
    import comfy.utils
    import folder_paths
    import nodes as comfy_nodes

    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.getLogger().addHandler(Capture(level=logging.WARNING))
    folder_paths.add_model_folder_path("loras", str(Path(lora).parent), is_default=True)
    model, clip = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=True)[:2]
    patched_model, _ = comfy_nodes.LoraLoader().load_lora(model, clip, Path(lora).name, 1.0, 1.0)
    weights = comfy.utils.load_torch_file(lora)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in weights}
    patched = len(set(patched_model.patches) - set(model.patches))
    print(json.dumps({"not_loaded": [l for l in lines if "not loaded" in l.lower()], "modules": len(modules), "patched": patched}))


if __name__ == "__main__":
    _load_with_stock_loader(*sys.argv[1:4])

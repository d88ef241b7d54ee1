"""What the CPU benchmarks share: the tiny model and datasets, fresh ComfyUI servers, the two
training graphs (LoRA Lab's and ComfyUI's built-in TrainLoraNode), and the statistics.

Everything here talks to a real ComfyUI over HTTP through headless/server.py (this process never
imports ComfyUI), except `import_comfy_cpu`, which the in-process benchmarks (overhead, profile)
call first.

Timing a queued prompt: ComfyUI records `execution_start` and `execution_success` with a
millisecond timestamp in the history entry, so `execution_seconds` is the server's own time for the
prompt (no HTTP polling in it). Steady-state seconds per step come from two prompts that differ
only in `steps` (N and 2N) queued in the same server after a warm-up prompt:
(T(2N) - T(N)) / N. Everything that does not depend on the step count (graph validation, model
load, dataset encoding, session setup, saving) appears in both and cancels.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests" / "comfyui"
for p in (str(REPO), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from headless.server import ComfyServer, ExecutionFailed, cached_nodes, looks_like_comfyui, status_str  # noqa: E402
from tiny_models import TINY_CKPT_NAME, install_test_nodes, make_dataset  # noqa: E402

RESOLUTION = 64  # the generated images' size; latents are 8x8
DATASET_SEED = 0
# Compute threads per benchmark process (OMP_NUM_THREADS for the servers, torch.set_num_threads
# in-process); run_all.py --threads sets it. One by default: on a small shared machine, OpenMP
# threads that wait on each other while other processes hold the cores make timings erratic.
THREADS = [1]


def comfyui_path() -> Path:
    raw = os.environ.get("COMFYUI_PATH", "").strip()
    if not raw or not looks_like_comfyui(raw):
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (the folder with main.py and comfy/), e.g. COMFYUI_PATH=/root/ComfyUI")
    return Path(raw).expanduser().resolve()


def dataset_name(n: int) -> str:
    return f"bench_{n:03d}"


class Assets:
    """The tiny seeded SD1.5 checkpoint and the generated datasets, built once per run in `root`."""

    def __init__(self, root: Path, comfyui: Path):
        self.root, self.comfyui = Path(root), comfyui
        self.checkpoint = self.root / TINY_CKPT_NAME
        self.datasets: dict[int, Path] = {}

    def build_checkpoint(self) -> dict:
        if self.checkpoint.is_file():
            return {"path": str(self.checkpoint)}
        self.root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, COMFYUI_PATH=str(self.comfyui))
        r = subprocess.run([sys.executable, str(TESTS / "tiny_models.py"), str(self.checkpoint), "--seed", "0"],
                           env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0 or not self.checkpoint.is_file():
            raise RuntimeError(f"building the tiny checkpoint failed (rc={r.returncode})\n{r.stdout}\n{r.stderr}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def dataset(self, n: int) -> Path:
        if n not in self.datasets:
            folder = self.root / "datasets" / dataset_name(n)
            make_dataset(folder, n=n, size=RESOLUTION, seed=DATASET_SEED)
            self.datasets[n] = folder
        return self.datasets[n]

    def server(self, base: Path, datasets=(8,), fresh=True, test_nodes=False) -> ComfyServer:
        """A (not yet started) server in a base folder: checkpoint linked, datasets copied in.
        fresh=False keeps what an earlier server left there (its user/ folder: the dataset cache).
        test_nodes: also the tests' stand-in nodes (the tiny models of other families, see `for_family`)."""
        if fresh and base.exists():
            shutil.rmtree(base)
        if test_nodes:
            install_test_nodes(base / "custom_nodes")
        if not (base / "models" / "checkpoints" / TINY_CKPT_NAME).exists():
            link(self.checkpoint, base / "models" / "checkpoints" / TINY_CKPT_NAME)
        for n in datasets:
            if not (base / "input" / dataset_name(n)).exists():
                shutil.copytree(self.dataset(n), base / "input" / dataset_name(n))
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS[0]), MKL_NUM_THREADS=str(THREADS[0]))
        return ComfyServer(self.comfyui, base, startup_timeout=600.0, env=env)


def link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


# ---------------------------------------------------------------- measuring


def execution_seconds(entry) -> float:
    """Server-side seconds from execution_start to execution_success of a history entry."""
    stamps = {ev: data.get("timestamp") for ev, data in entry["status"]["messages"]}
    if "execution_start" not in stamps or "execution_success" not in stamps:
        raise RuntimeError(f"no start/success timestamps in the history entry: {entry['status']}")
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def run_timed(srv: ComfyServer, prompt: dict, timeout=1800.0) -> tuple[float, dict]:
    entry = srv.run(prompt, timeout=timeout)
    return execution_seconds(entry), entry


def proc_status_bytes(pid: int, field: str) -> int:
    """VmHWM (peak resident set) or VmRSS of a process, in bytes, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs). False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def summary(values) -> dict:
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values), "values": values}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def now() -> float:
    return time.monotonic()


# ---------------------------------------------------------------- graphs


def widget_defaults(info: dict) -> dict:
    """Default value of every widget input (INT/FLOAT/STRING/BOOLEAN/combo) of one node class, from
    its /object_info entry; link inputs (MODEL, LATENT, ...) are left out."""
    out = {}
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list):  # a combo: its default, or the first choice
                out[name] = opts.get("default", kind[0] if kind else None)
            elif kind in ("INT", "FLOAT", "STRING", "BOOLEAN") and "default" in opts:
                out[name] = opts["default"]
    return out


class Defaults:
    """Node defaults as the running ComfyUI reports them (so the bench follows the nodes' code)."""

    CLASSES = ("LoRALabDataset", "LoRALabNetwork", "LoRALabOptimizer", "LoRALabPrecision", "LoRALabTrain",
               "TrainLoraNode", "LoadImageTextSetFromFolderNode")

    def __init__(self, srv: ComfyServer):
        self.by_class = {c: widget_defaults(srv.object_info(c)) for c in self.CLASSES}

    def __getitem__(self, cls: str) -> dict:
        return dict(self.by_class[cls])


def lab_prompt(d: Defaults, dataset: str, steps: int, network=None, precision=None, train=None, optimizer=None) -> dict:
    """LoRA Lab's training graph: Dataset + Network + Optimizer + Precision -> Train, every widget at
    its default unless overridden. The dataset is encoded at RESOLUTION (the images' own size)."""
    ds = d["LoRALabDataset"]
    ds.update(folder=dataset, resolution=RESOLUTION)
    ds = {k: v for k, v in ds.items() if k in ("folder", "resolution", "bucket", "repeats", "trigger_word")}
    tr = d["LoRALabTrain"]
    tr = {k: v for k, v in tr.items() if k in ("steps", "batch_size", "gradient_accumulation", "seed", "mode", "output_name")}
    tr.update(train or {}, steps=steps)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CKPT_NAME}},
        "2": {"class_type": "LoRALabDataset", "inputs": {**ds, "vae": ["1", 2], "clip": ["1", 1]}},
        "3": {"class_type": "LoRALabNetwork", "inputs": {**d["LoRALabNetwork"], **(network or {})}},
        "4": {"class_type": "LoRALabOptimizer", "inputs": {**d["LoRALabOptimizer"], **(optimizer or {})}},
        "5": {"class_type": "LoRALabPrecision", "inputs": {**d["LoRALabPrecision"], **(precision or {})}},
        "6": {"class_type": "LoRALabTrain", "inputs": {
            **tr, "model": ["1", 0], "dataset": ["2", 0], "network": ["3", 0], "optimizer": ["4", 0], "precision": ["5", 0]}},
    }


def builtin_prompt(d: Defaults, dataset: str, steps: int, overrides=None, save_prefix="bench_builtin") -> dict:
    """ComfyUI's own trainer: images + captions from the folder (LoadImageTextSetFromFolderNode,
    CLIPTextEncode inside), VAEEncode, TrainLoraNode at its defaults unless overridden, SaveLoRANode
    as the output that makes it run."""
    tr = d["TrainLoraNode"]
    tr.update(overrides or {}, steps=steps)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CKPT_NAME}},
        "2": {"class_type": "LoadImageTextSetFromFolderNode", "inputs": {"folder": dataset, "clip": ["1", 1], "resize_method": "None"}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "TrainLoraNode", "inputs": {**tr, "model": ["1", 0], "latents": ["3", 0], "positive": ["2", 1]}},
        "5": {"class_type": "SaveLoRANode", "inputs": {"lora": ["4", 1], "prefix": f"loras/{save_prefix}", "steps": ["4", 3]}},
    }


def for_family(prompt: dict, family: str) -> dict:
    """A benchmark graph on another family's tiny model: the checkpoint loader (node "1") becomes the
    tests' tiny seeded model of `family` and its stand-in CLIP / VAE (tests/comfyui/tiny_families.py)."""
    if family == "sd15":
        return prompt
    p = json.loads(json.dumps(prompt))
    p["1"] = {"class_type": "LoRALabTestTinyFamily", "inputs": {"family": family, "seed": 0}}
    p["1e"] = {"class_type": "LoRALabTestFamilyEncoders", "inputs": {"family": family}}
    moves = {("1", 1): ["1e", 0], ("1", 2): ["1e", 1]}
    for node in p.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and tuple(value) in moves:
                node["inputs"][name] = moves[tuple(value)]
    return p


def import_comfy_cpu(comfyui: Path):
    """Imports ComfyUI in this process, forced to CPU (for the in-process benchmarks)."""
    root = str(comfyui)
    if root not in sys.path:
        sys.path.insert(0, root)
    import utils  # noqa: F401  ComfyUI's top-level package first
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import torch

    torch.set_num_threads(THREADS[0])
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    return comfy


def failure_text(e: Exception) -> str:
    if isinstance(e, ExecutionFailed):
        err = e.error or {}
        return f"{err.get('node_type')}: {err.get('exception_type')}: {err.get('exception_message')}"
    return f"{type(e).__name__}: {e}"[:2000]


__all__ = ["Assets", "ComfyServer", "Defaults", "cached_nodes", "RESOLUTION", "builtin_prompt", "comfyui_path", "dataset_name",
           "execution_seconds", "failure_text", "import_comfy_cpu", "lab_prompt", "loadavg", "proc_status_bytes",
           "reset_peak_rss", "run_timed", "status_str", "summary"]

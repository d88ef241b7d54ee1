"""ComfyUI (CPU) and this pack in the current process, loaded as ComfyUI's executor loads them.

The in-process tests (test_algorithms, test_faults, test_families, test_wan_video) run as a
subprocess of pytest (the test file itself, as a script) so that one process can call the pack's
node functions and ComfyUI's own nodes directly, much faster than through a server:

    pack = load(comfyui_path, base_dir)      # folders under base_dir, this pack as module `lora_lab`
    warnings = capture_warnings()            # every WARNING (ComfyUI's "lora key not loaded" ...)
    result, not_loaded = parity(...)         # ComfyUI's patched model against our training forward
    check_parity(result, min_effect)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def load(comfyui: str, base: str, model_folders=("checkpoints", "loras")):
    """Imports ComfyUI for CPU (PyTorch attention: deterministic), points its input/output/temp/user
    folders and `model_folders` into `base`, and loads this pack as ComfyUI would. Returns the pack."""
    sys.path.insert(0, comfyui)
    import utils  # noqa: F401  ComfyUI's own package, before anything can shadow it
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import folder_paths

    base_dir = Path(base)
    for name, setter in (("input", folder_paths.set_input_directory), ("output", folder_paths.set_output_directory),
                         ("temp", folder_paths.set_temp_directory), ("user", folder_paths.set_user_directory)):
        (base_dir / name).mkdir(parents=True, exist_ok=True)
        setter(str(base_dir / name))
    for kind in model_folders:
        (base_dir / kind).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(kind, str(base_dir / kind), is_default=True)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from headless.direct import load_pack

    return load_pack()


def capture_warnings() -> list[str]:
    """A list that every WARNING (and worse) logged from now on is appended to, as its message."""
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.getLogger().addHandler(Capture(level=logging.WARNING))
    return lines


TOLERANCE = 1e-4  # of the LoRA's effect: the files are saved in fp32, only float32 rounding separates the forms


def parity(den, net, model, lora_name: str, example, log_lines: list[str], u: float = 0.4, seed: int = 11, strengths=(1.0, 1.5)):
    """Our training forward (the LoRA's hooks on `den`) against the model ComfyUI's stock
    LoraLoaderModelOnly patches from the saved file `lora_name`, on one noisy latent of `example`.
    Returns ({strength: {max_diff, lora_effect, shape}}, the "not loaded" lines ComfyUI logged)."""
    import comfy.model_management
    import nodes as comfy_nodes
    import torch

    x0 = example.latents[0][None].float()
    sigma = den.sigma_from_u(torch.tensor([u]))
    x = den.noise_input(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)), sigma)
    conds = [example.conds[0]]
    comfy.model_management.load_models_gpu([den.patcher], force_full_load=True)
    with torch.no_grad():
        base_out = den.denoise(x, sigma, conds)
        ours = {}
        for s in strengths:
            net.strength = s
            with net.applied():
                ours[s] = den.denoise(x, sigma, conds)
        net.strength = 1.0
    result, not_loaded = {}, []
    for s in strengths:
        before = len(log_lines)
        with torch.inference_mode():
            patched = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, s)[0]
        comfy.model_management.load_models_gpu([patched], force_full_load=True)
        with torch.no_grad():
            theirs = patched.model.apply_model(x, sigma, **den.model_conds(conds, x))
        not_loaded += [line for line in log_lines[before:] if "not loaded" in line.lower()]
        result[str(s)] = {"max_diff": float((theirs - ours[s]).abs().max()), "lora_effect": float((ours[s] - base_out).abs().max()), "shape": list(x.shape)}
    return result, not_loaded


def check_parity(p: dict, min_effect: float) -> None:
    """The trained LoRA changes the output (> min_effect), and ComfyUI's patched model computes
    what our forward does within TOLERANCE of that change (+ 1e-5 absolute)."""
    assert p["lora_effect"] > min_effect, p
    assert p["max_diff"] <= TOLERANCE * p["lora_effect"] + 1e-5, p

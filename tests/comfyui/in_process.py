"""ComfyUI (CPU) and this pack in the current process, loaded as ComfyUI's executor loads them.

The in-process tests (test_algorithms, test_faults, test_families, test_wan_video) run as a
subprocess of pytest (the test file itself, as a script) so that one process can call the pack's
node functions and ComfyUI's own nodes directly, much faster than through a server:

    pack = load(comfyui_path, base_dir)      # folders under base_dir, this pack as module `lora_lab`
    warnings = capture_warnings()            # every WARNING (ComfyUI's "lora key not loaded" ...)
"""

from __future__ import annotations

import importlib.util
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
    spec = importlib.util.spec_from_file_location("lora_lab", REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["lora_lab"] = pack
    spec.loader.exec_module(pack)
    return pack


def capture_warnings() -> list[str]:
    """A list that every WARNING (and worse) logged from now on is appended to, as its message."""
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.getLogger().addHandler(Capture(level=logging.WARNING))
    return lines

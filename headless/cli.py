"""`python <lora-lab folder> train ...`: the example workflow, run by ComfyUI's own executor, no browser.

It starts ComfyUI headless in a throw-away base directory (this pack installed, your ComfyUI's
models visible), queues exactly the graph of example_workflows/train_<family>_lora.json built from
the options, shows progress, and copies the LoRA, the training report and the strength sweep into
--output. Options mirror the nodes' inputs and defaults. The family (loaders, test graph and the
defaults that depend on it, from its profile) is read from the model file's tensor names; --family
overrides it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from .server import REPO_ROOT, ComfyServer, ExecutionFailed, PromptRejected, ServerError, execution_error, looks_like_comfyui, status_str
from .workflow import FAMILIES, FAMILY_DEFAULTS, REPORT_SAVE, SAVE, SWEEP_SAVE, TRAIN, TrainingOptions, option_default, training_prompt
from trainer.distributed import launched
from trainer.profiles import detect_file, profile_for

HELP = {
    "checkpoint": "the model file (path) or a name in your ComfyUI's models/checkpoints (SD1.5, SD2, SDXL, SD3.5) "
                  "or models/diffusion_models (Flux, Chroma, Qwen-Image, Wan)",
    "dataset": "folder of images with .txt captions (kohya 10_name sub-folders for repeats)",
    "family": f"the base model: {', '.join(FAMILIES)} (default: read from the model file)",
    "mixed_precision": "auto, bf16, fp16 or fp32 (default auto: bf16 on recent GPUs, fp16 on older ones, fp32 on CPU; flow models: bf16)",
    "clip_l": "flux, sd3: CLIP-L file (path) or a name in models/text_encoders (default clip_l.safetensors)",
    "clip_g": "sd3: CLIP-G file (path) or a name in models/text_encoders (default clip_g.safetensors)",
    "t5xxl": "flux, chroma, sd3: T5-XXL file (path) or a name in models/text_encoders (default t5xxl_fp16.safetensors)",
    "text_encoder": "qwen_image: Qwen2.5-VL (default qwen_2.5_vl_7b_fp8_scaled.safetensors); wan: umT5 (default umt5_xxl_fp8_e4m3fn_scaled.safetensors); a path or a name in models/text_encoders",
    "frames": "wan: frames per training clip and test clip, 4k+1 (default 17); videos in --dataset train as clips",
    "fps": "wan: the rate clips are read at (default 16)",
    "vae": "flux, chroma: ae.safetensors; qwen_image: qwen_image_vae.safetensors; wan: wan_2.1_vae.safetensors (path or a name in models/vae)",
    "weight_dtype": "UNETLoader families: weight_dtype, default fp8_e4m3fn for flux/chroma (held in fp8 from the start), default otherwise",
    "guidance": "flux: the guidance Flux-dev is conditioned on while training (default 1.0)",
    "test_guidance": "flux: FluxGuidance of the test prompt and sweep (default 3.5)",
}


def model_folders(family: str) -> dict[str, str]:
    """Options that name a model file for this family -> the models folder it lives in."""
    w = profile_for(family).workflow
    folders = {"checkpoint": "diffusion_models" if w.model_loader == "UNETLoader" else "checkpoints"}
    folders.update({name: "text_encoders" for name in w.text_encoders})
    if w.vae_file:
        folders["vae"] = "vae"
    return folders


def family_of(checkpoint: str, comfyui: str | None) -> str:
    """The family of the model file, from its tensor names; a clear exit when it can't be told."""
    path = Path(checkpoint).expanduser()
    if not path.is_file() and comfyui:
        found = [Path(comfyui) / "models" / d / checkpoint for d in ("checkpoints", "diffusion_models", "unet")]
        path = next((p for p in found if p.is_file()), path)
    if not path.is_file():
        raise SystemExit(f"--checkpoint: {checkpoint} is not a file here or in your ComfyUI's models folders; give its path, or say --family.")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            profile = detect_file(f.keys())
    except Exception as e:  # noqa: BLE001 - not a safetensors file: the user picks the family
        raise SystemExit(f"--checkpoint: {path.name} could not be read as a .safetensors model ({e}); say --family.") from None
    if profile is None:
        raise SystemExit(f"--checkpoint: {path.name} is not a model of a known family ({', '.join(FAMILIES)}); say --family, "
                         "or load it in a workflow (the Train node trains other image models by its generic path).")
    return profile.key


def _help(name: str, default) -> str:
    if name in HELP:
        return HELP[name]
    if name in FAMILY_DEFAULTS["sd15"]:
        return "default " + ", ".join(f"{FAMILY_DEFAULTS[f][name]} ({f})" for f in FAMILIES if FAMILY_DEFAULTS[f][name] is not None)
    return f"default {default}"


def _processes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1 (one process per GPU)")
    return value


def _flag_value(text: str):
    return text.lower() in ("1", "true", "yes", "on")


def _guess_comfyui() -> str | None:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return env
    parent = REPO_ROOT.parent.parent  # ComfyUI/custom_nodes/<this pack>
    return str(parent) if looks_like_comfyui(parent) else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python {REPO_ROOT.name}", description="LoRA Lab: train a LoRA with ComfyUI, headless.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a LoRA (the example workflow) and write the LoRA, report and strength sweep")
    train.add_argument("--comfyui", default=_guess_comfyui(), help="ComfyUI folder (default: $COMFYUI_PATH, or the ComfyUI this pack is installed in)")
    train.add_argument("--output", default="lora_lab_output", help="where the LoRA, report and sweep are copied (default: ./lora_lab_output)")
    train.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="auto: the GPU when torch sees one")
    train.add_argument("--timeout", type=float, default=24 * 3600, help="give up after this many seconds")
    train.add_argument("--processes", type=_processes, default=None,
                       help="train data-parallel in N processes on this machine (one per GPU), without ComfyUI's server: "
                            "--batch-size is per process; writes the LoRA and the report, no strength sweep. "
                            "Under accelerate launch / torchrun the launcher sets the count")
    train.add_argument("--cache-dir", default=None, help="with --processes: the folder of the dataset's encoding cache "
                       "(default: your ComfyUI's user folder, the cache the Dataset node uses)")
    train.add_argument("--save-every", type=int, default=0, help="with --processes: also save the LoRA and a resumable state every N steps")
    train.add_argument("--rank-dump", default=None, help=argparse.SUPPRESS)  # tests: every process writes its weights and slices here
    for f in dataclasses.fields(TrainingOptions):
        flag = "--" + f.name.replace("_", "-")
        if f.default is dataclasses.MISSING:
            train.add_argument(flag, dest=f.name, required=True, help=HELP.get(f.name))
            continue
        example = option_default(f.name)  # None below: the family's default (TrainingOptions fills it in)
        default = None if f.default is None or f.name == "family" else f.default
        if f.name == "family":
            train.add_argument(flag, dest=f.name, choices=FAMILIES, default=default, help=HELP["family"])
        elif isinstance(example, bool):
            train.add_argument(flag, dest=f.name, type=_flag_value, default=default, metavar="true|false", help=_help(f.name, default))
        else:
            train.add_argument(flag, dest=f.name, type=type(example), default=default, help=_help(f.name, default))
    return parser


def _use_gpu(device: str) -> bool:
    if device != "auto":
        return device == "gpu"
    import torch

    return torch.cuda.is_available()


def _options(args) -> dict:
    """The options of the training graph, the family read from the model file, the dataset resolved."""
    opts = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingOptions)}
    opts["family"] = args.family or family_of(args.checkpoint, args.comfyui)
    dataset = Path(args.dataset).expanduser()
    if not dataset.is_dir():
        raise SystemExit(f"--dataset: {dataset} is not a folder; point it at your images (with .txt captions).")
    opts["dataset"] = str(dataset.resolve())
    return opts


def _prepare(args, base: Path) -> dict:
    """Base directory for ComfyUI: your models visible, model files given as paths linked in, the dataset resolved."""
    opts = _options(args)
    for name, folder in model_folders(opts["family"]).items():
        path = Path(opts[name] or FAMILY_DEFAULTS[opts["family"]].get(name) or "").expanduser()
        if opts[name] and path.is_file():
            (base / "models" / folder).mkdir(parents=True, exist_ok=True)
            os.symlink(path.resolve(), base / "models" / folder / path.name)
            opts[name] = path.name
    models = Path(args.comfyui) / "models"
    config = base / "extra_model_paths.yaml"
    config.write_text(
        "comfyui:\n"
        f"    base_path: {json.dumps(str(models))}\n"
        "    checkpoints: checkpoints\n    loras: loras\n    vae: vae\n    diffusion_models: |\n        diffusion_models\n        unet\n"
        "    text_encoders: |\n        text_encoders\n        clip\n"
    )
    return opts


class _Progress:
    """Prints training progress from the server's websocket messages (when aiohttp is there)."""

    def __init__(self, server: ComfyServer):
        self.server, self.stop = server, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            import asyncio

            import aiohttp
        except ImportError:
            return

        async def listen():
            url = f"ws://{self.server.host}:{self.server.port}/ws?clientId={self.server.client_id}"
            async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
                while not self.stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.5)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    data = json.loads(msg.data)
                    if data.get("type") == "lora_lab.progress":
                        d = data["data"]
                        eta = int(d.get("eta_s") or 0)
                        loss = d.get("smoothed") if d.get("smoothed") is not None else d.get("loss")
                        sys.stderr.write(f"\rtrain {d['step']}/{d['total']}  loss {loss:.4f}  lr {d['lr']:.2e}  eta {eta // 60}m{eta % 60:02d}s   ")
                        sys.stderr.flush()

        try:
            asyncio.run(listen())
        except Exception:  # progress is a nicety: the run itself is followed over HTTP
            return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=2)
        sys.stderr.write("\n")


def _report_rejection(e: PromptRejected) -> str:
    lines = ["ComfyUI refused the workflow:"]
    for node_id, info in e.node_errors.items():
        for err in info.get("errors", []):
            lines.append(f"  {info.get('class_type', node_id)}: {err.get('details') or err.get('message')}")
    if len(lines) == 1:
        lines.append(f"  {e}")
    return "\n".join(lines)


def train(args, argv: list[str]) -> int:
    if not args.comfyui or not looks_like_comfyui(args.comfyui):
        print(f"--comfyui: {args.comfyui!r} is not a ComfyUI folder (needs main.py and comfy/). Set --comfyui or COMFYUI_PATH.", file=sys.stderr)
        return 2
    if args.processes or launched():
        from . import direct

        return direct.main(args, argv, _options(args))
    gpu = _use_gpu(args.device)
    out = Path(args.output).expanduser().resolve()
    with tempfile.TemporaryDirectory(prefix="lora_lab_") as tmp:
        base = Path(tmp)
        options = TrainingOptions(**_prepare(args, base))
        server = ComfyServer(args.comfyui, base, cpu=not gpu, extra_args=["--extra-model-paths-config", str(base / "extra_model_paths.yaml")], startup_timeout=600)
        try:
            with server:
                print(f"ComfyUI is up ({'GPU' if gpu else 'CPU'}); training {options.output_name} ({options.family}): {options.steps} steps, rank {options.rank}, alpha {options.alpha:g}", file=sys.stderr)
                with _Progress(server):
                    entry = server.wait(server.queue(training_prompt(options)), timeout=args.timeout)
                if status_str(entry) != "success":
                    print(f"training failed: {execution_error(entry) or status_str(entry)}", file=sys.stderr)
                    print(f"(ComfyUI log: {server.log_path}; last lines)\n{server.log_tail(30)}", file=sys.stderr)
                    return 1
                return _collect(entry, server, out)
        except PromptRejected as e:
            print(_report_rejection(e), file=sys.stderr)
            return 2
        except (ServerError, ExecutionFailed, TimeoutError) as e:
            print(f"ComfyUI problem: {e}", file=sys.stderr)
            return 1


def _collect(entry: dict, server: ComfyServer, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    outputs = entry["outputs"]
    written = []
    lora = Path(outputs[SAVE]["text"][0])
    written.append(shutil.copy2(lora, out / lora.name))
    for node in (REPORT_SAVE, SWEEP_SAVE):
        for image in outputs.get(node, {}).get("images", []):
            written.append(shutil.copy2(server.output_file(image), out / image["filename"]))
    ui = outputs[TRAIN]["lora_lab"][0]
    diagnosis = ui["diagnosis"]
    print(f"trained {ui['step']} steps. {diagnosis['headline']}")
    for advice in diagnosis.get("advice", [])[:3]:
        print(f"  - {advice}")
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return train(args, argv)
    return 2

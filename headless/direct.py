"""`python <pack folder> train ... --processes N`: the Train node's training, in N processes, without
ComfyUI's server.

Every process imports ComfyUI as a library (no HTTP server, no executor), loads the model with
ComfyUI's own loader nodes on its device, builds the same spec the Train node builds from the
same graph (headless/workflow.py's training prompt, `nodes.train.training_spec`) and runs the
engine's recipe (trainer/recipe.py) data-parallel (trainer/distributed.py): `batch_size` is per
process, the global batch is batch_size x processes, and the result does not depend on the
process count. Progress and Ctrl-C are the launcher's job.

Starting the processes: `--processes N` (N > 1) starts N on this machine with torch's elastic
launcher (torchrun); under `accelerate launch` or torchrun the launcher's environment (RANK,
WORLD_SIZE, LOCAL_RANK, ...) says how many there are, on how many machines. `--processes 1`
runs this path in this process.

The dataset is encoded once per machine: local rank 0 runs the Dataset node into its verified
disk cache (`--cache-dir`, by default your ComfyUI's user folder, the cache the Dataset node uses
in the UI) while the others wait; they then read it from the cache.

Rank 0 alone prints progress and writes into --output: the LoRA (as Save LoRA writes it; its
metadata also records lora_lab_processes and lora_lab_global_batch), the training report (PNG)
and, with --save-every, a LoRA and a resumable state (lora_lab_states/) every that many steps.
The strength sweep samples through ComfyUI's executor and is left out of this path: run the
single-process command, or load the LoRA in the test graph.

When a process dies, the launcher stops the others on this machine (torchrun watches them every
second; a collective with a dead peer fails) and exits non-zero naming each rank and its reason.
On other machines a process stops when its next collective fails, at the latest after
COLLECTIVE_TIMEOUT_S. Every file
is written whole or not at all (temp file + rename), so the last saved file stays intact.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import signal
import sys
import time
from pathlib import Path

from .server import REPO_ROOT
from .workflow import DATASET, TRAIN, TrainingOptions, training_prompt

# Joining and every collective: local rank 0 may encode a large dataset while the others wait.
COLLECTIVE_TIMEOUT_S = 3600
MONITOR_INTERVAL_S = 1  # how often the launcher checks that every process is alive


def main(args, argv: list[str], options: dict) -> int:
    from trainer.distributed import launched

    if launched():
        return _worker(args, options)
    if args.processes > 1:
        return launch(args.processes, argv, args.output)
    return _worker(args, options)


def launch(processes: int, argv: list[str], output: str) -> int:
    """N processes of this same command on this machine (torchrun, standalone rendezvous)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launcher = get_args_parser().parse_args([
        "--standalone", "--nproc-per-node", str(processes), "--max-restarts", "0",
        "--monitor-interval", str(MONITOR_INTERVAL_S), str(REPO_ROOT / "__main__.py"), *argv,
    ])
    try:
        run(launcher)
    except ChildFailedError as e:
        print(failure_message(e.failures, output), file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SignalException):  # the launcher turns Ctrl-C into a SignalException
        print(f"\nstopped (Ctrl-C): every process was stopped; the files in {output} are the last ones written whole.", file=sys.stderr)
        return 130
    return 0


def failure_message(failures: dict, output: str) -> str:
    """Which process failed and why, the ones that died first (by a signal) first."""
    def reason(f) -> str:
        if f.exitcode < 0 or not f.message or f.message == "<N/A>":
            name = f.signal_name() if f.exitcode < 0 else ""
            if name == "SIGTERM":
                return "was stopped by the launcher (SIGTERM)"
            return f"was killed by {name}" if name and name != "<N/A>" else f"exited with code {f.exitcode}"
        message = f.message.get("message", f.message) if isinstance(f.message, dict) else f.message
        lines = [line for line in str(message).splitlines() if line.strip()]
        return "stopped: " + (lines[-1] if lines else f"exit code {f.exitcode}")

    # The cause first: a process killed from outside, then one that failed; last, the ones the launcher stopped.
    ordered = sorted(failures.items(), key=lambda kv: (kv[1].exitcode == -signal.SIGTERM, kv[1].exitcode >= 0, kv[0]))
    parts = [f"rank {rank} {reason(f)}" for rank, f in ordered]
    return (f"training stopped: process {'; '.join(parts)}. The other processes were stopped; the files in {output} "
            "are the last ones written whole.")


def load_pack():
    """This pack imported as the package `lora_lab`, as ComfyUI loads a custom-node folder (its
    relative imports work; ComfyUI must be importable first)."""
    spec = importlib.util.spec_from_file_location("lora_lab", REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["lora_lab"] = pack
    spec.loader.exec_module(pack)
    return pack


def _import_comfyui(comfyui: str, gpu: bool):
    """ComfyUI as a library (its folder first on the path: its `nodes` module, not this pack's
    package), and this pack as the package `lora_lab`, as ComfyUI itself would load it."""
    for name in [m for m in sys.modules if m == "nodes" or m.startswith("nodes.")]:
        del sys.modules[name]
    sys.path.insert(0, comfyui)
    import utils  # noqa: F401  ComfyUI's own package, before anything can shadow it
    import comfy.cli_args

    comfy.cli_args.args.cpu = not gpu
    pack = load_pack()
    import nodes as comfy_nodes

    classes = dict(comfy_nodes.NODE_CLASS_MAPPINGS)
    try:
        from comfy_extras import nodes_sd3  # TripleCLIPLoader (SD3.5)

        classes.update(getattr(nodes_sd3, "NODE_CLASS_MAPPINGS", {}))
    except ImportError:
        pass
    classes.update(pack.NODE_CLASS_MAPPINGS)
    return classes


def _folders(args, options: dict, out: Path) -> None:
    """ComfyUI's folders for this run: model files given as paths, the cache, the output."""
    import folder_paths

    from .cli import model_folders

    for name, kind in model_folders(options["family"]).items():
        path = Path(options.get(name) or "").expanduser()
        if path.is_file():
            folder_paths.add_model_folder_path(kind, str(path.resolve().parent), is_default=True)
            options[name] = path.name
    if args.cache_dir:
        Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
        folder_paths.set_user_directory(str(Path(args.cache_dir).resolve()))
    out.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(out), is_default=True)
    folder_paths.set_output_directory(str(out))


def _evaluate(prompt: dict, node_id: str, classes: dict, done: dict):
    """The outputs of one node of the training prompt, its inputs first (loaders, dataset, settings)."""
    if node_id not in done:
        node = prompt[node_id]
        cls = classes.get(node["class_type"])
        if cls is None or not hasattr(cls, "FUNCTION"):
            raise SystemExit(f"--family: the multi-process command cannot run ComfyUI's {node['class_type']} node; use the single-process command (without --processes).")
        inputs = {k: _input(prompt, v, classes, done) for k, v in node["inputs"].items()}
        out = getattr(cls(), cls.FUNCTION)(**inputs)
        done[node_id] = out["result"] if isinstance(out, dict) else out
    return done[node_id]


def _input(prompt, value, classes, done):
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] in prompt:
        return _evaluate(prompt, value[0], classes, done)[value[1]]
    return value


def _worker(args, options: dict) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_train)(args, options)


def _train(args, options: dict) -> int:
    import torch

    gpu = args.device == "gpu" or (args.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if gpu:
        torch.cuda.set_device(local_rank)  # ComfyUI trains on the current device
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    from trainer.distributed import DataParallel, join, launched

    dp_place = join(device, COLLECTIVE_TIMEOUT_S, keep_slices=bool(args.rank_dump)) if launched() else DataParallel(keep_slices=bool(args.rank_dump))
    if args.processes and args.processes != dp_place.world_size:
        raise SystemExit(f"--processes: {args.processes}, but the launcher started {dp_place.world_size} processes; leave --processes out under a launcher.")
    classes = _import_comfyui(args.comfyui, gpu)
    from lora_lab.trainer.distributed import DataParallel as PackDataParallel

    # The pack's own engine module (loaded as lora_lab) holds the place from now on.
    dp = PackDataParallel(dp_place.rank, dp_place.world_size, dp_place.local_rank, keep_slices=bool(args.rank_dump))
    out = Path(args.output).expanduser().resolve()
    _folders(args, options, out)
    dump = Path(args.rank_dump) if args.rank_dump else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"rank{dp.rank}.pid").write_text(str(os.getpid()))
    prompt = training_prompt(TrainingOptions(**options))
    done: dict = {}
    with torch.inference_mode():  # as ComfyUI's executor runs loaders and the Dataset node
        if not dp.is_local_main:
            _barrier(dp)  # local rank 0 encodes into the cache first
        dataset = _evaluate(prompt, DATASET, classes, done)[0]
        if dp.is_local_main:
            _barrier(dp)
        train_inputs = {k: _input(prompt, v, classes, done) for k, v in prompt[TRAIN]["inputs"].items()}
    return _run(args, dp, train_inputs, dataset, out, dump)


def _barrier(dp) -> None:
    import torch

    with torch.inference_mode(False):
        dp.barrier()


def _run(args, dp, inputs: dict, dataset, out: Path, dump: Path | None) -> int:
    import torch
    from lora_lab.nodes.common import save_into_loras
    from lora_lab.nodes.train import NO_START, LoRALabTrain, training_spec
    from lora_lab.trainer import comfy_adapter, recipe
    from lora_lab.trainer.report import render_report
    from lora_lab.trainer.resume import STATE_SUFFIX, save_state

    model, name = inputs["model"], inputs["output_name"]
    accepted = inspect.signature(training_spec).parameters
    with torch.inference_mode(False):
        spec, notes = training_spec(**{k: v for k, v in inputs.items() if k in accepted})
        denoiser, targets = comfy_adapter.training_targets(model, spec.network, spec.guidance, None)
        session = recipe.start_session(denoiser, targets, recipe.model_examples(denoiser, dataset.examples), spec, data_parallel=dp)
        until = session.total_steps
        fingerprint = LoRALabTrain._fingerprint(model, dataset, spec, None, NO_START) if args.save_every else {}
        if dp.is_main:
            print(f"training {name} in {dp.world_size} process(es) on {denoiser.device}: {until} steps, global batch "
                  f"{session.global_batch} ({spec.train.batch_size} per process)", file=sys.stderr, flush=True)

        def on_step(info):
            if dump:
                (dump / f"rank{dp.rank}.step").write_text(str(info.step))
            if not dp.is_main:
                return
            eta = int(info.eta_seconds)
            sys.stderr.write(f"\rtrain {info.step}/{info.total_steps}  loss {info.loss:.4f}  lr {info.lr:.2e}  eta {eta // 60}m{eta % 60:02d}s   ")
            sys.stderr.flush()
            if args.save_every and info.step % args.save_every == 0:
                weights, metadata = recipe.lora_file(session, name)
                path = save_into_loras(f"{name}-step{info.step:06d}", weights, metadata, spec.precision.save_dtype, field="output_name", overwrite=True)
                save_state(out / "lora_lab_states" / (path.stem + STATE_SUFFIX), session, fingerprint, until)

        started = time.perf_counter()
        try:
            notes += recipe.train(session, until, on_step)
        except KeyboardInterrupt:
            if dp.is_main:
                print(f"\nstopped (Ctrl-C) at step {session.step}; the files in {out} are the last ones written whole.", file=sys.stderr)
            return 130
        seconds = time.perf_counter() - started
        weights, metadata = recipe.lora_file(session, name)
    if dump:
        import json

        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(dump / f"rank{dp.rank}.safetensors"))
        (dump / f"rank{dp.rank}.json").write_text(json.dumps({"slices": dp.slices, "loss": session.history.loss, "seconds": seconds, "steps": until, "global_batch": session.global_batch, "dataset": dataset.summary}))
    if not dp.is_main:
        return 0
    sys.stderr.write("\n")
    path = save_into_loras(name, weights, metadata, spec.precision.save_dtype, field="output_name")
    diagnosis = session.diagnosis()
    title = f"{name} ({denoiser.profile.label}, rank {spec.network.rank}, alpha {spec.network.alpha:g})"
    image = render_report(session.history, diagnosis, title, 1024, 640, lr_plan=session.lr_plan(until))
    report = out / f"{name}_report.png"
    from PIL import Image

    Image.fromarray(image).save(report)
    for note in notes:
        print(note)
    print(f"trained {session.step} steps in {seconds:.1f} s ({session.step * session.global_batch / seconds:.2f} images/s). {diagnosis.headline}")
    print(f"wrote {path}\nwrote {report}")
    return 0

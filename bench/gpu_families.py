"""Speed and peak memory of LoRA training per model family, on seeded-random models.

    COMFYUI_PATH=/path/to/ComfyUI python bench/gpu_families.py            # the table (CUDA)
    COMFYUI_PATH=... python bench/gpu_families.py calibrate --family sdxl --size tiny --res 128 --batch 2

The table trains full-size SD1.5, SDXL and Flux(-dev) architectures with random weights (no download:
the architecture, not the weights, decides speed and memory) through LoRA Lab's engine and ComfyUI's
own model classes: fp8 base weights, gradient checkpointing, cached text-encoder outputs and latents
(the text encoders and VAE are never loaded), rank 16, batch 1, bf16, at 512 px (SD1.5) and 1024 px
(SDXL, Flux). It prints seconds per step, the measured peak (torch.cuda.max_memory_allocated) and
LoRA Lab's estimate (trainer.memory) next to it. Without a CUDA device it says so and exits 0.

`calibrate` runs one configuration and prints one JSON line: on CUDA the peak is
max_memory_allocated; on CPU it is the process's peak resident memory above what it used before the
model was built (run it with MALLOC_MMAP_THRESHOLD_=65536 so glibc returns freed blocks and the
number tracks live memory, as the GPU allocator's does). The integration tests use it on the tiny
models to check the estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SD15_FULL = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
    "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False, "num_heads": 8, "num_head_channels": -1,
}
SDXL_FULL = dict(SD15_FULL, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 channel_mult=[1, 2, 4], transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048,
                 num_heads=-1, num_head_channels=64)
# Per family: text tokens, text width, pooled width, latent channels.
COND_DIMS = {"sd15": (77, 768, None, 4), "sdxl": (77, 2048, 1280, 4), "flux": (512, 4096, 768, 16)}
TABLE = [("sd15", 512), ("sdxl", 1024), ("flux", 1024)]


def import_comfy(force_cpu: bool):
    root = os.environ.get("COMFYUI_PATH")
    if not root or not (Path(root) / "comfy").is_dir():
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, str(Path(root).resolve()))
    import utils  # noqa: F401  ComfyUI's top-level package first
    import comfy.cli_args

    comfy.cli_args.args.cpu = force_cpu
    comfy.cli_args.args.use_pytorch_cross_attention = True
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests" / "comfyui"))


def unet_config(family: str, size: str) -> dict:
    import tiny_models

    if family == "flux":
        return dict(tiny_models.TINY_FLUX_CONFIG) if size == "tiny" else dict(
            tiny_models.TINY_FLUX_CONFIG, hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56], depth=19, depth_single_blocks=38)
    if size == "tiny":
        return dict(tiny_models.TINY_SDXL_UNET_CONFIG if family == "sdxl" else tiny_models.TINY_UNET_CONFIG)
    return dict(SDXL_FULL if family == "sdxl" else SD15_FULL)


def build_model(family: str, size: str, device, dtype, seed: int = 0):
    """A ModelPatcher of the family's architecture with seeded random weights, built in place."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = {"sd15": sm.SD15, "sdxl": sm.SDXL, "flux": sm.Flux}[family](unet_config(family, size))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, "", device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.diffusion_model.named_parameters()):
            if name.endswith(".bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    def __init__(self):
        self.peak, self._stop = _rss(), False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def _warm_up_optimizer(device) -> None:
    import torch

    p = torch.nn.Parameter(torch.zeros(4, device=device))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones_like(p)
    opt.step()


def run(family, size, res, batch, steps, gc, fp8, optimizer="AdamW", rank=16, mixed_precision=None, warmup=1, seed=0) -> dict:
    import torch
    import comfy.model_management as mm
    from trainer import comfy_adapter, recipe
    from trainer.data import Example
    from trainer.network import NetworkConfig
    from trainer.objective import ObjectiveConfig
    from trainer.optimizers import OptimizerConfig
    from trainer.precision import PrecisionConfig
    from trainer.schedule import ScheduleConfig
    from trainer.spec import TrainConfig, TrainingSpec

    device = mm.get_torch_device()
    cuda = device.type == "cuda"
    mixed_precision = mixed_precision or ("bf16" if cuda else "fp32")
    _warm_up_optimizer(device)  # torch.optim's first use imports large modules: not training memory
    base_rss = _rss()
    with torch.inference_mode(False):
        patcher = build_model(family, size, device, torch.bfloat16 if cuda else torch.float32, seed)
        denoiser = comfy_adapter.ComfyDenoiser(patcher)
        denoiser.load()
        dm = denoiser.model.diffusion_model
        tokens, width, pooled, channels = COND_DIMS[family]
        g = torch.Generator().manual_seed(seed)
        examples = [Example([torch.randn(channels, res // 8, res // 8, generator=g)],
                            [{"cross_attn": torch.randn(tokens, width, generator=g),
                              "pooled_output": torch.randn(pooled, generator=g) if pooled else None, "extra": {}}], 1, f"img{i}")
                    for i in range(max(4, batch))]
        spec = TrainingSpec(network=NetworkConfig(rank=rank, alpha=float(rank)), optimizer=OptimizerConfig(name=optimizer, unet_lr=1e-4),
                            schedule=ScheduleConfig(name="constant"), precision=PrecisionConfig(mixed_precision=mixed_precision, fp8_base=fp8, gradient_checkpointing=gc),
                            objective=ObjectiveConfig(timestep_sampling="sigmoid" if family == "flux" else "uniform"),
                            train=TrainConfig(steps=warmup + steps, batch_size=batch, seed=seed))
        session = recipe.start_session(denoiser, comfy_adapter.unet_targets(denoiser.model, spec.network), examples, spec)
        network = session.network
        # The recipe's training contexts (fp8 base, then checkpointing), held open across both timed runs.
        with denoiser.training_context(session.precision):
            estimate = comfy_adapter.estimate_memory(denoiser, network, examples, optimizer, batch, session.precision)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            sampler = _PeakRSS() if not cuda else nullcontext()
            with denoiser.recompute_context(session.precision), sampler:
                session.run(until_step=warmup)
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                session.run(until_step=warmup + steps)
                if cuda:
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - t0) / steps
        measured = torch.cuda.max_memory_allocated() if cuda else sampler.peak - base_rss
    return {
        "family": family, "size": size, "device": str(device), "res": res, "batch": batch, "gc": gc, "fp8": fp8,
        "optimizer": optimizer, "rank": rank, "precision": mixed_precision,
        "params_M": round(sum(p.numel() for p in dm.parameters()) / 1e6, 1), "lora_modules": len(network.loras),
        "s_per_step": round(seconds, 3), "measured_bytes": int(measured), "estimate_bytes": int(estimate.total),
        "ratio": round(estimate.total / measured, 3), "estimate_parts": estimate.parts,
        "loss": session.history.loss[-1],
    }


def table() -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_families.py: no CUDA device here; the full-size table needs one "
              "(use `calibrate --size tiny` on CPU).")
        return 0
    import_comfy(force_cpu=False)
    print(f"device: {torch.cuda.get_device_name()}; fp8 base + gradient checkpointing + cached text encoder, rank 16, batch 1, bf16")
    print(f"{'family':<6} {'params':>8} {'px':>5} {'s/step':>8} {'peak GiB':>9} {'estimate':>9} {'ratio':>6}")
    for family, res in TABLE:
        try:
            r = run(family, "full", res, 1, steps=5, gc=True, fp8=True, warmup=2)
        except torch.cuda.OutOfMemoryError as e:
            print(f"{family:<6} out of memory: {str(e).splitlines()[0]}")
            continue
        finally:
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        print(f"{family:<6} {r['params_M']:>7.0f}M {res:>5} {r['s_per_step']:>8.3f} {r['measured_bytes'] / 2**30:>9.2f} "
              f"{r['estimate_bytes'] / 2**30:>9.2f} {r['ratio']:>6.2f}", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("calibrate", help="one configuration, one JSON line")
    c.add_argument("--family", choices=["sd15", "sdxl", "flux"], required=True)
    c.add_argument("--size", choices=["tiny", "full"], default="tiny")
    c.add_argument("--res", type=int, default=64)
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--steps", type=int, default=2)
    c.add_argument("--gc", action="store_true", help="gradient checkpointing")
    c.add_argument("--fp8", action="store_true", help="fp8 base weights")
    c.add_argument("--optimizer", default="AdamW")
    c.add_argument("--rank", type=int, default=16)
    c.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    a = ap.parse_args(argv)
    if a.cmd != "calibrate":
        return table()
    import torch

    import_comfy(force_cpu=a.cpu or not torch.cuda.is_available())
    print(json.dumps(run(a.family, a.size, a.res, a.batch, a.steps, a.gc, a.fp8, a.optimizer, a.rank)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

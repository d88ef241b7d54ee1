"""Test-side access to the ComfyUI server harness (headless/server.py), plus stock-node prompts."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from headless.server import *  # noqa: E402,F401,F403
from headless.server import (  # noqa: E402,F401
    PACK_NAME,
    REPO_ROOT,
    ComfyServer,
    ExecutionFailed,
    PromptRejected,
    ServerError,
    cached_nodes,
    execution_error,
    free_port,
    install_pack,
    looks_like_comfyui,
    messages,
    status_str,
)


def txt2img_prompt(ckpt_name, seed=0, steps=4, cfg=2.0, width=64, height=64, batch_size=1,
                   positive="a photo of sks object, red circle", negative="blurry",
                   sampler_name="euler", scheduler="normal", filename_prefix="lora_lab_test"):
    """API-format txt2img graph with stock nodes only. Node ids: 1 ckpt, 2/3 clip text, 4 latent,
    5 KSampler, 6 VAEDecode, 7 SaveImage."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch_size}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler,
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": filename_prefix}},
    }

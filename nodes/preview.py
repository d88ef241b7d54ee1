"""Previews while training: the Preview node holds what to sample, the Train node samples it every N steps.

The preview is drawn by ComfyUI's own sampler from the workflow's MODEL with the LoRA being trained
applied through the same hooks the training uses, so it shows what the test graph will produce at
strength 1.0 — without a second copy of the model and without duplicating nodes.

The control images concept bleed is measured on are drawn here too (`control_examples`): the base
MODEL, without the LoRA, sampling each control prompt once per training session.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from PIL import Image

import comfy.sample
import comfy.samplers
import folder_paths

from ..trainer.data import Example, most_common_bucket
from .common import CATEGORY

PREVIEW = "LORALAB_PREVIEW"
# Control images are the base model's own samples at cfg 1 (its conditional distribution, the one
# it predicts best; one model call per step) with a few Euler steps: they only need to be images
# this model draws, not good ones, and they are made once per training session.
CONTROL_STEPS = 8


class PreviewSettings:
    def __init__(self, positive, negative, vae, latent, seed, steps, cfg, sampler_name, scheduler):
        self.positive, self.negative, self.vae, self.latent = positive, negative, vae, latent
        self.seed, self.steps, self.cfg, self.sampler_name, self.scheduler = seed, steps, cfg, sampler_name, scheduler


class LoRALabPreview:
    DESCRIPTION = "What the Train node samples every preview_every steps: prompt, size, seed and sampler (use the test graph's values so the previews match it)."
    CATEGORY = CATEGORY
    RETURN_TYPES = (PREVIEW,)
    RETURN_NAMES = ("preview",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "Preview prompt, usually with the trigger word."}),
                "negative": ("CONDITIONING",),
                "vae": ("VAE",),
                "latent": ("LATENT", {"tooltip": "An Empty Latent Image of the preview size (the first image of the batch is used)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Fixed, so previews differ only because the LoRA learned."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 200}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 30.0, "step": 0.1}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler"}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "normal"}),
            }
        }

    def build(self, positive, negative, vae, latent, seed, steps, cfg, sampler_name, scheduler):
        return (PreviewSettings(positive, negative, vae, latent, seed, steps, cfg, sampler_name, scheduler),)


def render_preview(settings: PreviewSettings, model, network) -> torch.Tensor:
    """One image [H, W, 3] in [0, 1]: the base MODEL sampled with the LoRA hooks active."""
    latent = comfy.sample.fix_empty_latent_channels(model, settings.latent["samples"][:1])
    noise = comfy.sample.prepare_noise(latent, settings.seed, None)
    was_training = network.training
    network.eval()  # no LoRA dropout in a preview
    try:
        with torch.inference_mode(), network.applied():
            samples = comfy.sample.sample(
                model, noise, settings.steps, settings.cfg, settings.sampler_name, settings.scheduler,
                settings.positive, settings.negative, latent, seed=settings.seed, disable_pbar=True,
            )
            image = settings.vae.decode(samples)[0]
            if image.ndim == 4:  # a video model's clip [T, H, W, 3]: its middle frame
                image = image[image.shape[0] // 2]
    finally:
        network.train(was_training)
    return image.float().cpu()


def save_temp_image(image: torch.Tensor, name: str) -> dict:
    """Writes a preview into ComfyUI's temp folder; returns the UI reference to show it on the node."""
    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    filename = f"{name}.png"
    to_pil(image).save(os.path.join(folder, filename))
    return {"filename": filename, "subfolder": "", "type": "temp"}


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def control_examples(model, dataset, seed: int) -> tuple[list[Example], str]:
    """The base MODEL's samples of the dataset's control prompts, as raw-latent Examples at the
    dataset's most common bucket size (seeded: seed + image index), and a line for the notes."""
    started = time.perf_counter()
    concept = [ex for ex in dataset.examples if not ex.regularisation]
    shape = concept[most_common_bucket(concept)].latents[0].shape
    out = []
    with torch.inference_mode():
        for i, (prompt, cond) in enumerate(zip(dataset.control_prompts, dataset.control_conds)):
            latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, *shape))
            noise = comfy.sample.prepare_noise(latent, seed + i, None)
            pooled = cond["pooled_output"]
            positive = [[cond["cross_attn"][None], {**cond["extra"], "pooled_output": None if pooled is None else pooled[None]}]]
            samples = comfy.sample.sample(model, noise, CONTROL_STEPS, 1.0, "euler", "simple", positive, positive, latent, seed=seed + i, disable_pbar=True)
            out.append(Example([samples[0].float().cpu()], [cond], name=f"control {i + 1}: {prompt}"))
    note = f"Concept bleed: {len(out)} control images drawn by the base model in {time.perf_counter() - started:.1f} s."
    return out, note

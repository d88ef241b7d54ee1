"""Previews while training: the Preview node holds what to sample, the Train node samples it every N steps.

The preview is drawn by ComfyUI's own sampler from the workflow's MODEL with the LoRA being trained
applied through the same hooks the training uses, so it shows what the test graph will produce at
strength 1.0 — without a second copy of the model and without duplicating nodes.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

import comfy.sample
import comfy.samplers
import folder_paths

from .common import CATEGORY

PREVIEW = "LORALAB_PREVIEW"


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

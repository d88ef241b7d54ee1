"""Using the trained LoRA: apply it, sweep strengths side by side, save it for every other tool."""

from __future__ import annotations

import numpy as np
import torch

import comfy.samplers
import comfy.sample
import comfy.utils
import folder_paths

from ..trainer import comfy_adapter
from ..trainer.errors import ConfigError
from ..trainer.io import load_lora, save_lora
from ..trainer.paths import next_free, safe_child_path
from .common import CATEGORY, LORA, SAVE_DTYPES, LoRALabNodeError, user_errors

NO_FILE = "(use the lora input)"


def parse_strengths(text: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ConfigError("strengths", f"{text!r} is not a comma-separated list of numbers, e.g. 0, 0.5, 1.0, 1.5, 1.8.") from None
    if not 1 <= len(values) <= 16:
        raise ConfigError("strengths", f"give 1 to 16 strengths, got {len(values)}.")
    bad = [v for v in values if not -10.0 <= v <= 10.0]
    if bad:
        raise ConfigError("strengths", f"{bad} outside -10..10.")
    return values


def _weights(lora, lora_name):
    if lora is not None:
        return lora.weights
    if not lora_name or lora_name == NO_FILE:
        raise LoRALabNodeError("lora: connect a trained LoRA or pick a file in lora_name.")
    path = folder_paths.get_full_path("loras", lora_name)
    if path is None:
        raise LoRALabNodeError(f"lora_name: {lora_name!r} is not in the loras folder any more; refresh the page and pick again.")
    return load_lora(path)[0]


class LoRALabApplyLoRA:
    DESCRIPTION = "MODEL with a LoRA at any strength (-10..10). Strength multiplies the file's own alpha/rank scale, exactly like LoraLoader."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model (the same one the LoRA was trained on)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05, "tooltip": "User factor on top of alpha/rank; 1.5 or 1.8 push the LoRA further, 0 is the base model."}),
            },
            "optional": {
                "lora": (LORA, {"tooltip": "A LoRA from the Train node."}),
                "lora_name": ([NO_FILE] + folder_paths.get_filename_list("loras"), {"tooltip": "Or a saved .safetensors LoRA."}),
            },
        }

    @user_errors
    def apply(self, model, strength, lora=None, lora_name=NO_FILE):
        return (comfy_adapter.apply_lora(model, None, _weights(lora, lora_name), strength)[0],)


class LoRALabStrengthSweep:
    DESCRIPTION = "One labelled grid of the same prompt and seed at several LoRA strengths, e.g. 0, 0.5, 1.0, 1.5, 1.8."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("grid", "images")
    FUNCTION = "sweep"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model the LoRA was trained on."}),
                "lora": (LORA, {"tooltip": "The trained LoRA."}),
                "positive": ("CONDITIONING", {"tooltip": "Prompt to test, usually with the trigger word."}),
                "negative": ("CONDITIONING",),
                "vae": ("VAE",),
                "latent": ("LATENT", {"tooltip": "An Empty Latent Image of the size to test."}),
                "strengths": ("STRING", {"default": "0, 0.5, 1.0, 1.5, 1.8", "tooltip": "Comma-separated strengths (-10..10)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "The same seed for every strength, so only the LoRA differs."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 200}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 30.0, "step": 0.1}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler"}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "normal"}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, strengths):
        try:
            parse_strengths(strengths)
        except ConfigError as e:
            return str(e)
        return True

    @user_errors
    def sweep(self, model, lora, positive, negative, vae, latent, strengths, seed, steps, cfg, sampler_name, scheduler):
        values = parse_strengths(strengths)
        latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy.sample.prepare_noise(latent_image, seed, None)
        images = []
        for s in values:
            patched = comfy_adapter.apply_lora(model, None, lora.weights, s)[0] if s != 0 else model
            samples = comfy.sample.sample(patched, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, seed=seed, disable_pbar=True)
            images.append(vae.decode(samples)[:1])
        batch = torch.cat(images)
        label = "strength {:g}" if batch.shape[2] >= 160 else "{:g}"
        grid = torch.cat([self._labelled(img, label.format(s)) for img, s in zip(batch, values)], dim=1)
        return (grid[None], batch)

    @staticmethod
    def _labelled(image: torch.Tensor, text: str) -> torch.Tensor:
        strip = torch.from_numpy(_label_strip(text, image.shape[1])).float() / 255.0
        return torch.cat([strip, image.cpu().float()], dim=0)


class LoRALabSaveLoRA:
    DESCRIPTION = "Saves the LoRA into ComfyUI's loras folder in the kohya format (ComfyUI, A1111/Forge and diffusers read it). Never overwrites silently."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (LORA,),
                "filename": ("STRING", {"default": "my_lora", "tooltip": "Name inside the loras folder; sub-folders allowed (chars/alice). An existing file gets _2, _3... unless overwrite is on."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace a file of the same name (atomically: the old file stays intact until the new one is complete)."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename):
        try:
            safe_child_path(folder_paths.get_folder_paths("loras")[0], filename)
        except ConfigError as e:
            return str(e)
        return True

    @user_errors
    def save(self, lora, filename, overwrite):
        path = safe_child_path(folder_paths.get_folder_paths("loras")[0], filename)
        if not overwrite:
            path = next_free(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = dict(lora.metadata, ss_output_name=path.stem)
        save_lora(path, lora.weights, metadata, dtype=SAVE_DTYPES[lora.save_dtype])
        return {"ui": {"text": [str(path)]}, "result": (str(path),)}


def _label_strip(text: str, width: int, height: int = 28) -> np.ndarray:
    """A white strip with the label centred, [height, width, 3] uint8, to stack above an image."""
    from PIL import Image, ImageDraw, ImageFont

    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    for size in range(height - 10, 5, -1):  # the largest font that fits the image's width
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one fixed small font
            font = ImageFont.load_default()
            break
        if draw.textlength(text, font=font) <= width - 4:
            break
    w = draw.textlength(text, font=font)
    draw.text(((width - w) / 2, 4), text, fill="black", font=font)
    return np.array(strip)  # a writable copy for torch.from_numpy

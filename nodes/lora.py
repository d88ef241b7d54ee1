"""Using the trained LoRA: apply it, sweep strengths side by side, save it for every other tool."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

import comfy.samplers
import comfy.sample
import comfy.utils
import folder_paths

from ..trainer import comfy_adapter
from ..trainer.errors import ConfigError, LoRALabError
from ..trainer.io import load_lora
from ..trainer.paths import safe_child_path
from .common import CATEGORY, LORA, LoRALabNodeError, loras_file, save_into_loras, user_errors, validation_message

log = logging.getLogger("lora_lab")

NO_FILE = "(use the lora input)"


STRENGTHS_EXAMPLE = "0, 0.5, 1.0, 1.5, 1.8"


def parse_strengths(text: str) -> list[float]:
    words = [v.strip() for v in str(text).replace(";", ",").split(",") if v.strip()]
    if not 1 <= len(words) <= 16:
        raise ConfigError("strengths", f"give 1 to 16 comma-separated strengths, got {len(words)}; e.g. {STRENGTHS_EXAMPLE}.")
    values = []
    for word in words:
        try:
            value = float(word)
        except ValueError:
            raise ConfigError("strengths", f"{word!r} in {text!r} is not a number; write a comma-separated list such as {STRENGTHS_EXAMPLE}.") from None
        if not math.isfinite(value) or not -10.0 <= value <= 10.0:
            raise ConfigError("strengths", f"{word!r} is outside -10..10; use strengths from -10 to 10, e.g. {STRENGTHS_EXAMPLE}.")
        values.append(value)
    return values


def check_strength(strength) -> float:
    if not isinstance(strength, (int, float)) or not math.isfinite(strength) or not -10.0 <= strength <= 10.0:
        raise ConfigError("strength", f"expected a number from -10 to 10, got {strength!r}; 1.0 applies the LoRA as trained, 0 is the base model.")
    return float(strength)


def _weights(lora, lora_name) -> tuple[dict, dict, str]:
    """(weights, metadata, the input they came from) of the connected LoRA or the picked file."""
    if lora is not None:
        return lora.weights, lora.metadata, "lora"
    if not lora_name or lora_name == NO_FILE:
        raise LoRALabNodeError("lora: connect a trained LoRA or pick a file in lora_name.")
    path = loras_file(lora_name, "lora_name")
    try:
        weights, metadata = load_lora(path)
    except LoRALabError as e:
        raise ConfigError("lora_name", f"{e} Pick another file.") from None
    return weights, metadata, "lora_name"


def check_fits(model, clip, weights: dict, metadata: dict, field: str) -> str | None:
    """How much of the LoRA this MODEL (and CLIP) can take: ComfyUI skips every module whose name
    or size doesn't fit (with a log line only). Refuses, with the counts, a LoRA of which fewer
    than half fit (made for another model); returns a warning with the counts when some don't
    fit, else None."""
    counts = comfy_adapter.lora_fit(model, clip, weights)
    if counts.modules and counts.fit == counts.modules:
        return None
    made_for = metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture")
    source = f" (its metadata says {made_for})" if made_for else ""
    family = comfy_adapter.family_name(model.model)
    problems = []
    if counts.modules > counts.matched:
        problems.append(f"{counts.modules - counts.matched} of its {counts.modules} layer names don't exist in this {family} MODEL"
                        if counts.matched else f"none of its layer names exist in this {family} MODEL")
    if counts.matched > counts.fit:
        problems.append(f"{counts.matched - counts.fit} of its {counts.modules} layers have other sizes than this {family} MODEL's")
    problem = " and ".join(problems)
    if 2 * counts.fit < counts.modules or not counts.modules:
        raise ConfigError(field, f"this LoRA is for another model{source}: {problem}, so ComfyUI would skip them "
                                 f"({counts.fit} of its {counts.modules} modules fit). Pick a LoRA trained for {family}, "
                                 "or load the checkpoint the LoRA was trained on.")
    hint = "" if clip is not None else " (connect the CLIP if the LoRA has a text-encoder part)"
    warning = (f"{field}: only {counts.fit} of this LoRA's {counts.modules} modules fit this {family} MODEL{source}: {problem}; "
               f"ComfyUI applies the {counts.fit} that fit and skips the rest{hint}. If it looks weaker than expected, "
               f"check that it was trained on this model.")
    log.warning("LoRA Lab: %s", warning)
    return warning


class LoRALabApplyLoRA:
    DESCRIPTION = "MODEL (and CLIP, for a LoRA with a text-encoder part) with a LoRA at any strength (-10..10). Strength multiplies the file's own alpha/rank scale, exactly like LoraLoader."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("The model with the LoRA.", "The CLIP with the LoRA's text-encoder part (connect a CLIP to the clip input); encode your prompts with it.")
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
                "clip": ("CLIP", {"tooltip": "Connect for a LoRA trained with train_text_encoder: its text-encoder part is applied to this CLIP at the same strength."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, strength):
        return validation_message(lambda: check_strength(strength), strength)

    @user_errors
    def apply(self, model, strength, lora=None, lora_name=NO_FILE, clip=None):
        weights, metadata, field = _weights(lora, lora_name)
        warning = check_fits(model, clip, weights, metadata, field)
        result = comfy_adapter.apply_lora(model, clip, weights, check_strength(strength), strength)
        return {"ui": {"text": [warning]}, "result": result} if warning else result


class LoRALabStrengthSweep:
    DESCRIPTION = ("One labelled grid of the same prompt and seed at several LoRA strengths, e.g. 0, 0.5, 1.0, 1.5, 1.8. "
                   "With a video model (an empty video latent) each cell shows the clip's first, middle and last frame; "
                   "the images output holds every frame, strength after strength.")
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
                "vae": ("VAE",),
                "latent": ("LATENT", {"tooltip": "An Empty Latent Image of the size to test."}),
                "strengths": ("STRING", {"default": "0, 0.5, 1.0, 1.5, 1.8", "tooltip": "Comma-separated strengths (-10..10)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "The same seed for every strength, so only the LoRA differs."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 200}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 30.0, "step": 0.1}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler"}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "normal"}),
            },
            "optional": {
                "positive": ("CONDITIONING", {"tooltip": "Prompt to test, usually with the trigger word (from CLIP Text Encode). For a LoRA with a text-encoder part, connect clip and type the prompt below instead."}),
                "negative": ("CONDITIONING",),
                "clip": ("CLIP", {"tooltip": "For a LoRA trained with train_text_encoder: the prompt is encoded with the LoRA applied to this CLIP at each strength (positive/negative are then not used)."}),
                "prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "Used with clip: the prompt to test, usually with the trigger word."}),
                "negative_prompt": ("STRING", {"default": "blurry, low quality", "multiline": True, "tooltip": "Used with clip: the negative prompt."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, strengths):
        return validation_message(lambda: parse_strengths(strengths), strengths)

    @user_errors
    def sweep(self, model, lora, vae, latent, strengths, seed, steps, cfg, sampler_name, scheduler, positive=None, negative=None, clip=None, prompt="", negative_prompt=""):
        values = parse_strengths(strengths)
        warning = check_fits(model, clip, lora.weights, lora.metadata, "lora")
        if clip is not None and not str(prompt).strip():
            raise ConfigError("prompt", "clip is connected, so the sweep encodes the prompt itself: type the prompt to test (with the trigger word).")
        if clip is None and (positive is None or negative is None):
            raise ConfigError("positive", "connect positive and negative conditioning (CLIP Text Encode), or connect clip and type a prompt.")
        latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy.sample.prepare_noise(latent_image, seed, None)
        images = []
        for s in values:
            patched, patched_clip = comfy_adapter.apply_lora(model, clip, lora.weights, s, s) if s != 0 else (model, clip)
            if clip is not None:
                positive, negative = (patched_clip.encode_from_tokens_scheduled(patched_clip.tokenize(t)) for t in (prompt, negative_prompt))
            samples = comfy.sample.sample(patched, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, seed=seed, disable_pbar=True)
            images.append(first_sample(vae.decode(samples)))
        batch = torch.cat(images)  # one image per strength; a video model's: its frames, strength after strength
        label = "strength {:g}" if images[0].shape[2] >= 160 else "{:g}"
        grid = torch.cat([self._labelled(key_frames(frames), label.format(s)) for frames, s in zip(images, values)], dim=1)
        return {"ui": {"text": [warning]}, "result": (grid[None], batch)} if warning else (grid[None], batch)

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
        return validation_message(lambda: safe_child_path(folder_paths.get_folder_paths("loras")[0], filename), filename)

    @user_errors
    def save(self, lora, filename, overwrite):
        path = save_into_loras(filename, lora.weights, lora.metadata, lora.save_dtype, field="filename", overwrite=overwrite)
        return {"ui": {"text": [str(path)]}, "result": (str(path),)}


def first_sample(decoded: torch.Tensor) -> torch.Tensor:
    """The frames of the first sample a VAE decoded: [1, H, W, 3] for an image, [T, H, W, 3] for a
    video VAE's clip ([B, T, H, W, 3])."""
    return decoded[0] if decoded.ndim == 5 else decoded[:1]


def key_frames(frames: torch.Tensor) -> torch.Tensor:
    """A sweep cell: the image itself, or a clip's first, middle and last frame stacked top to bottom."""
    if frames.shape[0] == 1:
        return frames[0]
    picks = sorted({0, frames.shape[0] // 2, frames.shape[0] - 1})
    return torch.cat([frames[i] for i in picks], dim=0)


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

"""Reading the run: the training report image, and PSNR/SSIM of images against references."""

from __future__ import annotations

import torch

from ..trainer.metrics import SSIM_WINDOW, psnr_batch, ssim_batch
from ..trainer.report import render_report
from .common import CATEGORY, HISTORY, LoRALabNodeError, user_errors


class LoRALabTrainingReport:
    DESCRIPTION = "An image of the run: loss per step and smoothed, validation loss, LR, and what the curve means in plain words."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("report",)
    FUNCTION = "render"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "history": (HISTORY, {"tooltip": "The history output of the Train node."}),
                "width": ("INT", {"default": 1024, "min": 320, "max": 4096, "step": 8}),
                "height": ("INT", {"default": 640, "min": 200, "max": 4096, "step": 8}),
            }
        }

    @user_errors
    def render(self, history, width, height):
        image = render_report(history.history, history.diagnosis, history.title, width, height, lr_plan=history.lr_plan)
        return (torch.from_numpy(image).float()[None] / 255.0,)


class LoRALabEvaluate:
    DESCRIPTION = "PSNR (dB, higher = closer) and SSIM (0..1, 1 = identical structure) of images against reference images."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "FLOAT", "FLOAT")
    RETURN_NAMES = ("summary", "mean_psnr", "mean_ssim")
    FUNCTION = "evaluate"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Generated images."}),
                "reference": ("IMAGE", {"tooltip": "Reference images of the same size: one for all, or one per image."}),
            }
        }

    @user_errors
    def evaluate(self, images, reference):
        if reference.shape[0] not in (1, images.shape[0]):
            raise LoRALabNodeError(f"reference: give 1 image or {images.shape[0]} (one per image), got {reference.shape[0]}.")
        if reference.shape[1:] != images.shape[1:]:
            raise LoRALabNodeError(f"reference: size {tuple(reference.shape[1:3])} differs from the images' {tuple(images.shape[1:3])}; resize one of them first.")
        if min(images.shape[1:3]) < SSIM_WINDOW:
            raise LoRALabNodeError(f"images: SSIM compares {SSIM_WINDOW}x{SSIM_WINDOW} pixel windows, so images must be at least {SSIM_WINDOW} px on each side, got {tuple(images.shape[1:3])}; "
                                   "scale both images up (e.g. with Upscale Image) before comparing.")
        ref = reference.expand_as(images) if reference.shape[0] == 1 else reference
        p, s = psnr_batch(images, ref), ssim_batch(images, ref)
        finite = [v for v in p if v != float("inf")]
        mean_p = sum(finite) / len(finite) if finite else float("inf")
        mean_s = sum(s) / len(s)
        lines = [f"image {i}: PSNR {pi:.2f} dB, SSIM {si:.4f}" for i, (pi, si) in enumerate(zip(p, s))]
        summary = "\n".join(lines + [f"mean: PSNR {mean_p:.2f} dB, SSIM {mean_s:.4f}"])
        return {"ui": {"text": [summary]}, "result": (summary, float(mean_p), float(mean_s))}

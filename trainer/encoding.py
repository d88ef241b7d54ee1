"""Prepared images and clips -> training examples, through the on-disk cache.

The Dataset node hands each `PreparedItem` (trainer.dataset) to a `CachedEncoder` as soon as it is
ready: the item's latents and text conditioning come from the verified cache (trainer.cache) when
they were encoded before with the same encoders and settings, else from the workflow's VAE and
CLIP, and are stored for next time. The encoders are passed in as two functions, so this module
knows nothing of ComfyUI:

    encoder = CachedEncoder(cache_dir, encoders_key, encode_pixels, encode_text)
    example = encoder.example(item, sizes)          # sizes: per variant, size/crop conditioning
    encoder.hits, encoder.problems                   # for the node's summary

encode_pixels(pixels) -> latent: an image [1, h, w, 3] or a clip [frames, h, w, 3] -> [1, C, ...]
encode_text(caption) -> conditioning: a CLIP's [[cross_attn, {extras}]] (trainer.cache layout)
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .cache import cache_key, load_entry, pack_conditioning, save_entry, unpack_conditioning
from .data import Example


def plain_size(size: tuple[int, int]) -> dict:
    """Size conditioning of an uncropped image of the bucket's size (w, h)."""
    w, h = size
    return {"width": w, "height": h, "crop_w": 0, "crop_h": 0, "target_width": w, "target_height": h}


class CachedEncoder:
    def __init__(self, cache_dir: str, encoders_key: str, encode_pixels: Callable[[torch.Tensor], torch.Tensor], encode_text: Callable[[str], Any]):
        self.cache_dir, self.encoders_key = cache_dir, encoders_key
        self.encode_pixels, self.encode_text = encode_pixels, encode_text
        self.hits = 0
        self.problems: list[str] = []  # said once: the cache folder can't be written
        self._texts: dict[str, Any] = {}

    def text(self, caption: str):
        """A caption's conditioning, encoded once per caption for the whole dataset."""
        if caption not in self._texts:
            self._texts[caption] = self.encode_text(caption)
        return self._texts[caption]

    def tensors(self, item) -> dict[str, torch.Tensor]:
        """The item's latents and conditioning per variant, from the cache or encoded now."""
        key = cache_key(item.content_hash, self.encoders_key)
        tensors = load_entry(self.cache_dir, key)
        if tensors is not None:
            self.hits += 1
            return tensors
        tensors = {}
        for v, (pixels, caption) in enumerate(zip(item.images, item.captions)):
            # An image is a batch of one; a clip [frames, h, w, 3] is what a video VAE takes as one video.
            tensors[f"latent.{v}"] = self.encode_pixels(pixels if pixels.ndim == 4 else pixels[None])[0].float().cpu()
            tensors.update(pack_conditioning(self.text(caption), v))
        try:
            save_entry(self.cache_dir, key, tensors)
        except OSError as e:  # training does not need the cache: say so once and go on
            if not self.problems:
                self.problems.append(f"the encoding cache folder {self.cache_dir} is not writable ({e.strerror or e}); "
                                     "training goes on, but the images are encoded again on every run. Fix or remove that path.")
        return tensors

    def example(self, item, sizes: list[dict] | None = None) -> Example:
        """The training example of `item`; sizes: per variant, the size/crop conditioning (default:
        the bucket, uncropped). The caption travels with its cached encoding: a text-encoder LoRA
        re-encodes it every step."""
        tensors = self.tensors(item)
        latents, conds = [], []
        for v in range(len(item.images)):
            latents.append(tensors[f"latent.{v}"])
            cross_attn, pooled, extra = unpack_conditioning(tensors, v)
            extra.update(sizes[v] if sizes else plain_size(item.size))
            conds.append({"cross_attn": cross_attn, "pooled_output": pooled, "extra": extra, "caption": item.captions[v]})
        return Example(latents, conds, item.repeats, item.name)

    def prompt_conds(self, prompts: list[str], size: tuple[int, int]) -> list[dict]:
        """Prompts encoded like captions, with the size conditioning of an uncropped image of `size`."""
        conds = []
        for prompt in prompts:
            cross_attn, pooled, extra = unpack_conditioning(pack_conditioning(self.text(prompt), 0), 0)
            conds.append({"cross_attn": cross_attn, "pooled_output": pooled, "extra": {**extra, **plain_size(size)}, "caption": prompt})
        return conds

"""Prepared items -> examples through the disk cache (trainer/encoding.py), with counting fake encoders."""

import torch

from trainer.dataset import PreparedItem
from trainer.encoding import CachedEncoder


class Encoders:
    def __init__(self):
        self.pixels, self.texts = [], []

    def encode_pixels(self, pixels):
        self.pixels.append(tuple(pixels.shape))
        return pixels.mean(-1)[None] * 2  # [1, frames, h, w]

    def encode_text(self, caption):
        self.texts.append(caption)
        return [[torch.full((1, 3, 4), float(len(caption))), {"pooled_output": torch.ones(1, 2), "attention_mask": torch.ones(1, 3)}]]


def item(name="a", frames=None, captions=("a photo", "a photo")):
    shape = (frames, 8, 8, 3) if frames else (8, 8, 3)
    return PreparedItem(name, 2, (8, 8), [torch.rand(shape) for _ in captions], list(captions), content_hash=name * 8)


def test_encoded_once_then_read_from_the_cache(tmp_path):
    first = Encoders()
    enc = CachedEncoder(str(tmp_path), "vae:clip", first.encode_pixels, first.encode_text)
    ex = enc.example(item())
    assert first.pixels == [(1, 8, 8, 3), (1, 8, 8, 3)] and first.texts == ["a photo"]  # one text encode per caption
    assert enc.hits == 0 and ex.repeats == 2 and len(ex.latents) == 2
    cond = ex.conds[0]
    assert cond["caption"] == "a photo" and cond["pooled_output"].shape == (2,) and cond["cross_attn"].shape == (3, 4)
    assert torch.equal(cond["extra"]["attention_mask"], torch.ones(1, 3)) and cond["extra"]["target_width"] == 8

    again = Encoders()
    enc2 = CachedEncoder(str(tmp_path), "vae:clip", again.encode_pixels, again.encode_text)
    ex2 = enc2.example(item())
    assert again.pixels == [] and again.texts == [] and enc2.hits == 1
    assert all(torch.equal(a, b) for a, b in zip(ex.latents, ex2.latents))
    other = CachedEncoder(str(tmp_path), "other-vae:clip", again.encode_pixels, again.encode_text)
    other.example(item())
    assert other.hits == 0 and len(again.pixels) == 2  # other encoders: encoded again


def test_a_clip_goes_to_the_vae_whole(tmp_path):
    enc = Encoders()
    ex = CachedEncoder(str(tmp_path), "k", enc.encode_pixels, enc.encode_text).example(item("c", frames=5, captions=("walk",)))
    assert enc.pixels == [(5, 8, 8, 3)] and ex.latents[0].shape == (5, 8, 8)


def test_an_unwritable_cache_is_said_once_and_training_goes_on(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    enc = Encoders()
    cached = CachedEncoder(str(blocked), "k", enc.encode_pixels, enc.encode_text)
    cached.example(item("a"))
    cached.example(item("b"))
    assert len(cached.problems) == 1 and "not writable" in cached.problems[0]


def test_prompts_are_encoded_like_captions_at_a_size(tmp_path):
    enc = Encoders()
    cached = CachedEncoder(str(tmp_path), "k", enc.encode_pixels, enc.encode_text)
    conds = cached.prompt_conds(["a dog", "a dog", "a cat"], (64, 32))
    assert enc.texts == ["a dog", "a cat"] and [c["caption"] for c in conds] == ["a dog", "a dog", "a cat"]
    assert conds[0]["extra"]["width"] == 64 and conds[0]["extra"]["target_height"] == 32

"""What a LoRA should leave alone: the control prompts concept bleed is measured on, and the
regularisation images (kohya's `reg` folder) that keep a LoRA from bleeding.

Concept bleed: the base model predicts its own samples well, at any noise level. A handful of
control images — samples the base model itself draws for prompts unrelated to the concept — are
generated once per training session, and their fixed-noise loss is measured like validation
(`Session.bleed_loss`). A LoRA that raises it changes images it should leave alone.

Regularisation images are class images (kohya: "prior preservation") trained alongside the concept,
each step's loss weighted by `prior_loss_weight` for them (kohya's default 1.0): they pull the LoRA
back towards what the base model did, so the bleed line falls.

Public API:
    ControlConfig(control_images=2, control_prompts="", reg_folder="", prior_loss_weight=1.0)
        Frozen, validated on construction (ConfigError naming the input).
    GENERIC_PROMPTS                 the control prompts when captions can't give any
    control_prompts(config, captions, trigger_word) -> list[str]
        `control_images` prompts: the user's (one a line) when typed; else the dataset's captions
        with the trigger word's words removed (what the model draws for the rest of the caption),
        distinct, in order; else (no trigger word: the captions describe the concept itself)
        GENERIC_PROMPTS. Fewer prompts than images are cycled (each image has its own seed).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from numbers import Integral, Real

from .errors import ConfigError

MAX_CONTROL_IMAGES = 16
MAX_PRIOR_LOSS_WEIGHT = 100.0
GENERIC_PROMPTS = (
    "a photo of a city street",
    "a bowl of fruit on a wooden table",
    "a mountain landscape with a lake",
    "a portrait of an old man",
    "a red car parked by a house",
    "a cat sleeping on a sofa",
    "a forest path in autumn",
    "a plate of pasta",
)


@dataclass(frozen=True)
class ControlConfig:
    control_images: int = 2  # 0 = no bleed measurement (each image costs 4 forward passes per validation)
    control_prompts: str = ""  # one prompt a line; empty = from the captions (see control_prompts)
    reg_folder: str = ""  # regularisation (class) images with captions; empty = none
    prior_loss_weight: float = 1.0  # the loss weight of a regularisation image (kohya's default)

    def __post_init__(self):
        n = self.control_images
        if not isinstance(n, Integral) or isinstance(n, bool) or not 0 <= n <= MAX_CONTROL_IMAGES:
            raise ConfigError("control_images", f"must be a whole number from 0 to {MAX_CONTROL_IMAGES}, got {n!r}; 2 is enough to see bleed, 0 turns it off.")
        if not isinstance(self.control_prompts, str):
            raise ConfigError("control_prompts", f"must be text (one prompt a line), got {type(self.control_prompts).__name__}.")
        if not isinstance(self.reg_folder, str):
            raise ConfigError("reg_folder", f"must be a folder name, got {type(self.reg_folder).__name__}.")
        w = self.prior_loss_weight
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w) or not 0.0 < w <= MAX_PRIOR_LOSS_WEIGHT:
            raise ConfigError("prior_loss_weight", f"must be a number above 0 and at most {MAX_PRIOR_LOSS_WEIGHT:g}, got {w!r}; 1.0 is kohya's default.")


def _without(caption: str, words: list[str]) -> str:
    for word in words:
        caption = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", " ", caption, flags=re.IGNORECASE)
    tags = [" ".join(t.split()) for t in caption.split(",")]
    return ", ".join(t for t in tags if t)


def control_prompts(config: ControlConfig, captions: list[str], trigger_word: str) -> list[str]:
    """The prompts of the control images (see the module docstring)."""
    if config.control_images == 0:
        return []
    prompts = [line.strip() for line in config.control_prompts.splitlines() if line.strip()]
    words = trigger_word.split()
    if not prompts and words:
        prompts = list(dict.fromkeys(p for p in (_without(c, words) for c in captions) if p))
    if not prompts:
        prompts = list(GENERIC_PROMPTS)
    return [prompts[i % len(prompts)] for i in range(config.control_images)]

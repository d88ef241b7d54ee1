"""From a folder of images and captions to what gets encoded: RGB tensors and caption strings.

The VAE / CLIP encoding is done elsewhere (by ComfyUI's own models); this module only decides which
files are training images, how often each is seen, what size it is trained at, and which augmented
pixel / caption variants are precomputed for it.

Public API
----------
DatasetConfig(resolution=512, bucket=True, min_bucket=0, max_bucket=0, default_repeats=1,
              trigger_word="", caption_extension=".txt", shuffle_captions=False, keep_tokens=0,
              caption_dropout=0.0, flip=False, random_crop=False, rotation_degrees=0.0,
              color_jitter=0.0, variants=1, seed=0)
    Frozen, validated on construction (raises ConfigError naming the input).
    min_bucket / max_bucket = 0 mean "automatic": resolution // 2 and resolution * 2 (256 and 1024
    at resolution 512, kohya's defaults); `min_bucket_side` / `max_bucket_side` give the values used.
    Augmentations (flip, random_crop, rotation, color jitter, caption shuffle / dropout) need
    variants >= 2: latents are cached per variant and variant 0 is always the plain image.
ImageEntry, scan_folder, load_image, read_caption, IMAGE_EXTENSIONS: see trainer/images.py (re-exported here).
bucket_size(width, height, config) -> (w, h)
    kohya's aspect-ratio buckets: sides are multiples of 64 within [min_bucket_side,
    max_bucket_side], area <= resolution**2, and the bucket whose aspect ratio is nearest (in log
    ratio, so portrait and landscape are treated alike) is chosen. (resolution, resolution) when
    bucket=False.
prepare_image(img, size, config, rng=None, flip=None) -> torch.Tensor [h, w, 3] float32 in [0, 1]
    Resizes to cover `size` (Lanczos) and crops: centered, or at a random place when random_crop.
    With an `rng` (random.Random) it also applies a small rotation and colour jitter as configured;
    the image is enlarged just enough that rotation never shows empty corners. `flip` mirrors the
    result (None: drawn from rng with p = 0.5 when config.flip). rng=None gives the plain image.
caption_variant(caption, config, rng=None) -> str
    Puts the trigger word first (prepended unless the caption already contains it as a word; the
    tag containing it is moved to the front). Comma-separated tags after the first keep_tokens are
    shuffled when shuffle_captions; the trigger word is always kept in place and counts as one of
    the keep_tokens (keep_tokens=1 keeps just the trigger). With probability caption_dropout the
    result is "" (the whole caption is dropped, as kohya does). rng=None gives the plain caption.
build_items(entries, config, each=None) -> (list[PreparedItem], DatasetStats)
    each(entry, item): called as each item is ready (the node encodes it there, one at a time)
PreparedItem(name, repeats, size, images, captions, content_hash)
    images / captions: one per variant; variant 0 is always the un-augmented image with the plain
    caption (trigger word added, no shuffle, no dropout). Variants alternate unflipped / flipped
    when flip is on, so even variants=2 trains both directions. Random draws are seeded by
    (seed, file contents, variant): renaming or reordering files changes nothing.
    content_hash: sha256 of the file bytes, every caption variant and the settings that change the
    pixels; the cache key for latents and conditioning (repeats and file names are not in it).
Clips (frames > 1, Wan): videos and animated images are read as `frames` frames at `fps`
    (trainer/clips.py), every frame sized and augmented alike; images in the same folder train as
    1-frame clips. A clip too short, or not decodable, is skipped and named in the warnings.
DatasetStats(count, total_with_repeats, buckets, warnings); `.to_text()` is a short summary for the
    node UI. Warnings (one line per kind, naming the files): tiny images, images upscaled > 2x,
    identical files, missing or empty captions, caption files without an image, non-UTF-8 captions,
    animated images (their first frame is trained).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch
from PIL import Image, ImageOps

from .clips import MAX_CLIP_FRAMES, ClipProblem, is_clip, read_frames
from .errors import ConfigError
from .images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, ImageEntry, _decode, _hidden, load_image, read_caption, scan_folder  # noqa: F401 (re-exported)

TINY_SIDE = 256  # below this on a side an image carries little detail at any SD resolution
MAX_UPSCALE = 2.0
_MAX_VARIANTS = 16
_MAX_ROTATION = 15.0
_MAX_JITTER = 0.3
# Part of every content_hash: bump it when the preprocessing changes so stale caches are not reused.
_PREPROCESS_VERSION = 2  # 2: extreme aspect ratios scale only the cropped part
_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS
_BICUBIC = getattr(Image, "Resampling", Image).BICUBIC
_AFFINE = getattr(Image, "Transform", Image).AFFINE
_LISTED = 5  # file names shown per warning line
_MAX_SPARE = 4  # an image scaled to more than this many times the crop's area is cropped first


# --- configuration ------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_flag(field: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(field, f"expected true or false, got {value!r}.")


def _check_range(field: str, value, lo, hi, what: str, whole: bool = False) -> None:
    ok = _is_int(value) if whole else _is_number(value)
    if not ok or not lo <= value <= hi:
        kind = "a whole number" if whole else "a number"
        raise ConfigError(field, f"expected {kind} from {lo} to {hi} ({what}), got {value!r}.")


@dataclass(frozen=True)
class DatasetConfig:
    """How a folder becomes training images; see the module docstring."""

    resolution: int = 512
    bucket: bool = True
    min_bucket: int = 0
    max_bucket: int = 0
    default_repeats: int = 1
    trigger_word: str = ""
    caption_extension: str = ".txt"
    shuffle_captions: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    flip: bool = False
    random_crop: bool = False
    rotation_degrees: float = 0.0
    color_jitter: float = 0.0
    variants: int = 1
    seed: int = 0
    frames: int = 1  # > 1: videos (and animated images) train as clips of this many frames (4k+1, Wan)
    fps: float = 16.0  # the rate clip frames are taken at (Wan: 16)

    def __post_init__(self):
        _check_range("resolution", self.resolution, 64, 4096, "training size in pixels, e.g. 512 or 1024", True)
        if self.resolution % 64:
            raise ConfigError(
                "resolution",
                f"must be a multiple of 64 (512, 768, 1024, ...), got {self.resolution}; "
                f"the nearest is {max(64, round(self.resolution / 64) * 64)}.",
            )
        for name in ("bucket", "shuffle_captions", "flip", "random_crop"):
            _check_flag(name, getattr(self, name))
        self._check_buckets()
        _check_range(
            "default_repeats", self.default_repeats, 1, 10000,
            "visits per epoch of images not in a '10_name' style folder", True,
        )
        self._normalise_text()
        _check_range("keep_tokens", self.keep_tokens, 0, 1000, "leading caption tags never shuffled", True)
        _check_range("caption_dropout", self.caption_dropout, 0.0, 1.0, "probability of an empty caption")
        _check_range("rotation_degrees", self.rotation_degrees, 0.0, _MAX_ROTATION, "largest random tilt")
        _check_range("color_jitter", self.color_jitter, 0.0, _MAX_JITTER,
                     "largest relative change of brightness, contrast and saturation")
        _check_range("variants", self.variants, 1, _MAX_VARIANTS, "precomputed versions of each image", True)
        if not _is_int(self.seed):
            raise ConfigError("seed", f"expected a whole number, got {self.seed!r}.")
        _check_range("frames", self.frames, 1, MAX_CLIP_FRAMES, "frames per clip (1: images only)", True)
        if (self.frames - 1) % 4:
            near = 1 + round((self.frames - 1) / 4) * 4
            raise ConfigError("frames", f"Wan's VAE needs 4k+1 frames per clip (1, 5, 9, ... 81), got {self.frames}; the nearest is {near}.")
        _check_range("fps", self.fps, 1.0, 120.0, "frames per second clips are read at (16 for Wan)")
        augmentations = self.augmentations()
        if augmentations and self.variants < 2:
            raise ConfigError(
                "variants",
                f"{', '.join(augmentations)} need variants of 2 or more: each image is encoded once per "
                "variant and variant 0 is always the plain image, so with variants=1 the augmentation "
                "would never be trained. Raise variants (4 is a good start) or turn the augmentation off.",
            )

    def _check_buckets(self) -> None:
        res = self.resolution
        for name, value, lo, hi in (
            ("min_bucket", self.min_bucket, 64, res),
            ("max_bucket", self.max_bucket, res, 2 * 4096),
        ):
            if value == 0:
                continue
            if not _is_int(value) or not lo <= value <= hi or value % 64:
                raise ConfigError(
                    name,
                    f"expected 0 (automatic) or a multiple of 64 from {lo} to {hi} for resolution {res}, "
                    f"got {value!r}.",
                )

    def _normalise_text(self) -> None:
        if not isinstance(self.trigger_word, str):
            raise ConfigError("trigger_word", f"expected text, got {self.trigger_word!r}.")
        trigger = " ".join(self.trigger_word.split())
        if "," in trigger:
            raise ConfigError(
                "trigger_word",
                f"{trigger!r} contains a comma; the trigger word is one caption tag (e.g. 'ohwx' or "
                "'ohwx woman'). Put other tags in the caption files.",
            )
        ext = self.caption_extension
        if not isinstance(ext, str) or not ext.strip().lstrip(".") or any(c in ext for c in "/\\"):
            raise ConfigError(
                "caption_extension", f"expected a file extension such as '.txt' or '.caption', got {ext!r}."
            )
        ext = "." + ext.strip().lstrip(".")
        if ext.lower() in IMAGE_EXTENSIONS:
            raise ConfigError(
                "caption_extension", f"{ext!r} is an image extension; captions are text files, e.g. '.txt'."
            )
        # Frozen dataclass: normalised values are stored the one way it allows.
        object.__setattr__(self, "trigger_word", trigger)
        object.__setattr__(self, "caption_extension", ext)

    @property
    def min_bucket_side(self) -> int:
        return self.min_bucket or max(64, self.resolution // 2 // 64 * 64)

    @property
    def max_bucket_side(self) -> int:
        return self.max_bucket or self.resolution * 2

    def augmentations(self) -> list[str]:
        """Names of the augmentations that are on (they need variants >= 2)."""
        on = {
            "flip": self.flip,
            "random_crop": self.random_crop,
            "rotation_degrees": self.rotation_degrees > 0,
            "color_jitter": self.color_jitter > 0,
            "shuffle_captions": self.shuffle_captions,
            "caption_dropout": self.caption_dropout > 0,
        }
        return [name for name, active in on.items() if active]


# --- sizes and pixels ---------------------------------------------------------------------------


def _bucket_candidates(resolution: int, lo: int, hi: int) -> list[tuple[int, int]]:
    # kohya's make_bucket_resolutions: for every width, the tallest height keeping area <= res^2.
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for w in range(lo, hi + 1, 64):
        h = min(hi, area // w // 64 * 64)
        if h >= lo:
            sizes.update({(w, h), (h, w)})
    return sorted(sizes)


def bucket_size(width: int, height: int, config: DatasetConfig) -> tuple[int, int]:
    """Training size (w, h) for an image of `width` x `height`."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not config.bucket:
        return config.resolution, config.resolution
    target = math.log(width / height)
    candidates = _bucket_candidates(config.resolution, config.min_bucket_side, config.max_bucket_side)
    # Nearest aspect ratio; among equals the larger area keeps more detail.
    return min(candidates, key=lambda s: (round(abs(math.log(s[0] / s[1]) - target), 9), -s[0] * s[1]))


def _cover_scale(width: int, height: int, size: tuple[int, int]) -> float:
    return max(size[0] / width, size[1] / height)


@dataclass(frozen=True)
class _Draws:
    flip: bool
    angle: float
    crop_x: float  # 0..1 position in the spare room, 0.5 = centred
    crop_y: float
    brightness: float
    contrast: float
    saturation: float


def _draws(config: DatasetConfig, rng: random.Random | None) -> _Draws:
    if rng is None:
        return _Draws(False, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0)
    # Always the same number of draws in the same order, so turning one augmentation on or off
    # does not change what the others do for a given seed.
    u = [rng.random() for _ in range(7)]
    j = config.color_jitter
    return _Draws(
        flip=config.flip and u[0] < 0.5,
        angle=(2 * u[1] - 1) * config.rotation_degrees,
        crop_x=u[2] if config.random_crop else 0.5,
        crop_y=u[3] if config.random_crop else 0.5,
        brightness=1 + (2 * u[4] - 1) * j,
        contrast=1 + (2 * u[5] - 1) * j,
        saturation=1 + (2 * u[6] - 1) * j,
    )


def _crop(img: Image.Image, size: tuple[int, int], d: _Draws) -> Image.Image:
    bw, bh = size
    rad = math.radians(d.angle)
    c, s = abs(math.cos(rad)), abs(math.sin(rad))
    # Extent the (possibly rotated) crop covers in the source: the image is scaled so it fits
    # entirely, hence no empty corners. +2 px keeps bicubic sampling off the border.
    margin = 2 if d.angle else 0
    ew, eh = bw * c + bh * s + margin, bw * s + bh * c + margin
    scale = _cover_scale(img.width, img.height, (ew, eh))
    W = max(math.ceil(ew), round(img.width * scale))
    H = max(math.ceil(eh), round(img.height * scale))
    left, top = (W - ew) * d.crop_x, (H - eh) * d.crop_y
    if not d.angle:
        left, top = round(left), round(top)
    if W * H > _MAX_SPARE * math.ceil(ew) * math.ceil(eh):
        # Most of the scaled image would be cropped away (an 8192x1 strip scaled to cover 256 px
        # rows is gigabytes): scale only the part the crop takes.
        sx, sy = W / img.width, H / img.height
        cw, ch = math.ceil(ew), math.ceil(eh)
        box = (left / sx, top / sy, min(img.width, (left + cw) / sx), min(img.height, (top + ch) / sy))
        img = img.resize((cw, ch), _LANCZOS, box=box)
        left = top = 0
    elif (W, H) != img.size:
        img = img.resize((W, H), _LANCZOS)
    if not d.angle:
        return img.crop((left, top, left + bw, top + bh))
    cx, cy = left + ew / 2, top + eh / 2
    cos, sin = math.cos(rad), math.sin(rad)
    # Output pixel (x, y) samples the source at the crop centre + the rotated offset.
    coeffs = (cos, -sin, cx - cos * bw / 2 + sin * bh / 2, sin, cos, cy - sin * bw / 2 - cos * bh / 2)
    return img.transform((bw, bh), _AFFINE, coeffs, resample=_BICUBIC)


def _jitter(x: torch.Tensor, d: _Draws) -> torch.Tensor:
    if d.brightness == d.contrast == d.saturation == 1.0:
        return x
    x = x * d.brightness
    gray = (x * torch.tensor([0.299, 0.587, 0.114])).sum(-1, keepdim=True)
    x = gray.mean() + (x - gray.mean()) * d.contrast
    gray = (x * torch.tensor([0.299, 0.587, 0.114])).sum(-1, keepdim=True)
    x = gray + (x - gray) * d.saturation
    return x.clamp(0.0, 1.0)


def prepare_image(
    img: Image.Image,
    size: tuple[int, int],
    config: DatasetConfig,
    rng: random.Random | None = None,
    flip: bool | None = None,
) -> torch.Tensor:
    """`img` resized and cropped to `size` (w, h) as a [h, w, 3] float32 tensor in [0, 1]."""
    d = _draws(config, rng)
    img = _crop(img.convert("RGB"), size, d)
    if (d.flip if flip is None else flip):
        img = ImageOps.mirror(img)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return _jitter(x, d).contiguous()


# --- captions -----------------------------------------------------------------------------------


def _contains_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def caption_variant(caption: str, config: DatasetConfig, rng: random.Random | None = None) -> str:
    """One caption variant; see the module docstring for the trigger word and keep_tokens rules."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    keep = config.keep_tokens
    trigger = config.trigger_word
    if trigger:
        at = next((i for i, t in enumerate(tags) if _contains_word(t, trigger)), None)
        tags = [trigger] + tags if at is None else [tags[at]] + tags[:at] + tags[at + 1 :]
        keep = max(keep, 1)
    if rng is None:
        return ", ".join(tags)
    dropped = rng.random() < config.caption_dropout  # drawn first and always: stable streams
    if config.shuffle_captions:
        rest = tags[keep:]
        rng.shuffle(rest)
        tags = tags[:keep] + rest
    return "" if dropped else ", ".join(tags)


# --- building -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedItem:
    name: str
    repeats: int
    size: tuple[int, int]  # (w, h)
    images: list[torch.Tensor]  # per variant, [h, w, 3] float32 in [0, 1]; a clip [frames, h, w, 3]
    captions: list[str]  # per variant
    content_hash: str


@dataclass
class DatasetStats:
    count: int
    total_with_repeats: int
    buckets: dict[str, int]
    warnings: list[str]
    clips: int = 0  # of `count`, the video clips

    def to_text(self) -> str:
        buckets = ", ".join(f"{k} x{n}" for k, n in sorted(self.buckets.items(), key=lambda kv: -kv[1]))
        clips = f"{self.clips} clips, " if self.clips else ""
        lines = [
            f"{self.count - self.clips} images, {clips}{self.total_with_repeats} with repeats",
            f"{len(self.buckets)} bucket(s): {buckets}",
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _variant_rng(seed: int, file_hash: str, variant: int) -> random.Random:
    key = hashlib.sha256(f"{seed}:{file_hash}:{variant}".encode()).digest()
    return random.Random(int.from_bytes(key[:8], "big"))


def _content_hash(file_hash: str, captions: list[str], size: tuple[int, int], config: DatasetConfig) -> str:
    pixels = {"version": _PREPROCESS_VERSION, "resolution": config.resolution, "size": list(size)}
    if config.frames > 1:  # clips are read at this length and rate (images are unaffected, but cheap to re-key)
        pixels.update(frames=config.frames, fps=config.fps)
    if config.variants > 1:  # with one variant nothing is random, so these cannot change the tensors
        pixels.update(
            variants=config.variants, seed=config.seed, flip=config.flip, random_crop=config.random_crop,
            rotation=config.rotation_degrees, jitter=config.color_jitter,
        )
    h = hashlib.sha256(file_hash.encode())
    h.update(json.dumps({"pixels": pixels, "captions": captions}, sort_keys=True).encode())
    return h.hexdigest()


def _orphan_captions(entries: list[ImageEntry], ext: str) -> list[str]:
    used = {os.path.normcase(os.path.abspath(e.caption_path)) for e in entries if e.caption_path}
    orphans = []
    for folder in sorted({os.path.dirname(os.path.abspath(e.path)) for e in entries}):
        for f in sorted(os.listdir(folder)):
            p = os.path.join(folder, f)
            if not _hidden(f) and f.lower().endswith(ext.lower()) and os.path.normcase(p) not in used:
                orphans.append(p)
    return orphans


def _prepare_one(entry: ImageEntry, config: DatasetConfig, caption_warnings: list[str], animated: list[str]):
    with open(entry.path, "rb") as f:
        data = f.read()
    file_hash = hashlib.sha256(data).hexdigest()
    clip = read_frames(data, entry.path, config.frames, config.fps) if config.frames > 1 and is_clip(entry.path, data) else None
    img = clip[0] if clip else _decode(data, entry.path, animated)
    size = bucket_size(img.width, img.height, config)
    caption = read_caption(entry.caption_path, caption_warnings)
    images, captions = [], []
    for v in range(config.variants):
        rng = None if v == 0 else _variant_rng(config.seed, file_hash, v)
        flip = config.flip and v % 2 == 1
        if clip:  # every frame with the same draws (a fresh generator per frame): one crop, one tilt
            fresh = (lambda: None) if v == 0 else (lambda: _variant_rng(config.seed, file_hash, v))
            images.append(torch.stack([prepare_image(f, size, config, fresh(), flip=flip) for f in clip]))
        else:
            images.append(prepare_image(img, size, config, rng, flip=flip))
        captions.append(caption_variant(caption, config, rng))
    item = PreparedItem(
        name=entry.name,
        repeats=entry.repeats or config.default_repeats,
        size=size,
        images=images,
        captions=captions,
        content_hash=_content_hash(file_hash, captions, size, config),
    )
    return item, file_hash, img.size, caption


def build_items(entries: list[ImageEntry], config: DatasetConfig, each=None) -> tuple[list[PreparedItem], DatasetStats]:
    """Loads, sizes and augments every entry; returns the items and a report for the user.

    each(entry, item), when given, is called as soon as an item is ready (before the next file is
    read): the caller encodes it there, and whatever `each` raises (a Cancel) stops here.
    """
    items: list[PreparedItem] = []
    caption_warnings: list[str] = []
    seen: dict[str, str] = {}
    duplicates, tiny, upscaled, uncaptioned, animated, unusable = [], [], [], [], [], {"short": [], "broken": []}
    for entry in entries:
        try:
            item, file_hash, (w, h), caption = _prepare_one(entry, config, caption_warnings, animated)
        except ClipProblem as e:  # skipped, named in the warnings; the other files still train
            unusable[e.kind].append(f"{entry.name} ({e.reason})")
            continue
        items.append(item)
        if each is not None:
            each(entry, item)
        if file_hash in seen:
            duplicates.append(f"{seen[file_hash]} = {entry.name}")
        seen.setdefault(file_hash, entry.name)
        if min(w, h) < TINY_SIDE:
            tiny.append(f"{entry.name} ({w}x{h})")
        elif _cover_scale(w, h, item.size) > MAX_UPSCALE:
            upscaled.append(f"{entry.name} ({w}x{h} -> {item.size[0]}x{item.size[1]})")
        if not caption:
            uncaptioned.append(entry.name)

    if not items:
        problems = "; ".join(unusable["short"] + unusable["broken"])
        raise ConfigError("folder", f"no file could be trained: {problems}. Lower frames or fps, or add images.")
    warnings: list[str] = []
    if unusable["short"]:
        warnings.append(f"{len(unusable['short'])} clip(s) are shorter than {config.frames} frames at {config.fps:g} fps and are skipped: "
                        f"{_names(unusable['short'])}. Lower frames or fps, or use longer clips.")
    if unusable["broken"]:
        warnings.append(f"{len(unusable['broken'])} video(s) could not be decoded and are skipped: {_names(unusable['broken'])}. "
                        "Re-export them (e.g. H.264 MP4) or remove them.")
    if tiny:
        warnings.append(f"{len(tiny)} image(s) smaller than {TINY_SIDE} px on a side will look blurry to the "
                        f"model: {_names(tiny)}. Use larger originals if you have them.")
    if upscaled:
        warnings.append(f"{len(upscaled)} image(s) are enlarged more than {MAX_UPSCALE:g}x to fit their bucket: "
                        f"{_names(upscaled)}. Use larger originals or a lower resolution.")
    if animated:
        warnings.append(f"{len(animated)} animated image(s) are trained on their first frame only: {_names(animated)}. "
                        "To train another frame, export it as a PNG.")
    if duplicates:
        warnings.append(f"{len(duplicates)} identical file(s), trained twice as often: {_names(duplicates)}. "
                        "Remove the copies unless that is intended.")
    if uncaptioned:
        what = f"the trigger word {config.trigger_word!r}" if config.trigger_word else "an empty caption"
        warnings.append(f"{len(uncaptioned)} image(s) have no caption (no {config.caption_extension} file, or "
                        f"an empty one) and train on {what} only: {_names(uncaptioned)}.")
    orphans = _orphan_captions(entries, config.caption_extension)
    if orphans:
        warnings.append(f"{len(orphans)} caption file(s) have no image next to them: {_names(orphans)}. "
                        "Check for renamed or missing images.")
    warnings += caption_warnings

    buckets: dict[str, int] = {}
    for item in items:
        key = f"{item.size[0]}x{item.size[1]}" + (f"x{item.images[0].shape[0]}f" if item.images[0].ndim == 4 else "")
        buckets[key] = buckets.get(key, 0) + 1
    stats = DatasetStats(
        count=len(items),
        total_with_repeats=sum(i.repeats for i in items),
        buckets=buckets,
        warnings=warnings,
        clips=sum(1 for i in items if i.images[0].ndim == 4),
    )
    return items, stats

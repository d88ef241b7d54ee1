"""The Dataset node: a folder of images + captions, encoded once with the workflow's VAE and CLIP."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

import comfy.utils
import folder_paths

from ..trainer.clips import MAX_CLIP_FRAMES
from ..trainer.control import MAX_CONTROL_IMAGES, ControlConfig
from ..trainer.control import control_prompts as pick_control_prompts
from ..trainer.data import EncodedDataset, Example, most_common_bucket
from ..trainer.dataset import DatasetConfig, build_items, scan_folder
from ..trainer.encoding import CachedEncoder
from ..trainer.images import skipped_summary
from ..trainer.errors import ConfigError
from ..trainer.fingerprint import encoder_fingerprint
from .common import CATEGORY, DATASET, default_of, user_errors, validation_message

log = logging.getLogger("lora_lab")

CACHE_DIR_NAME = os.path.join("lora_lab", "cache")


def resolve_folder(folder: str, field: str = "folder") -> str:
    """An absolute path as given; anything else relative to ComfyUI's input directory."""
    # Quotes and spaces come with paths pasted from Windows' "Copy as path": gone before joining.
    folder = os.path.expanduser(str(folder).strip().strip('"').strip("'").strip())
    if not folder:
        raise ConfigError(field, "is empty: type a folder name inside ComfyUI's input directory, or an absolute path.")
    return folder if os.path.isabs(folder) else os.path.join(folder_paths.get_input_directory(), folder)


def original_size(path: str) -> tuple[int, int]:
    """(w, h) of the image file as it is displayed (EXIF rotation applied), from its header only."""
    from PIL import Image

    with Image.open(path) as img:
        w, h = img.size
        try:
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
                w, h = h, w
        except Exception:  # noqa: BLE001 - a broken EXIF block: orientation as stored, like the loader
            pass
    return w, h


def _crop_position(config: DatasetConfig, path: str, variant: int) -> tuple[float, float]:
    """Where the crop sits in the spare room of the resized image (0.5 = centred), per variant.

    Variant 0 is always centred; other variants are centred unless random_crop is on, then the
    position is the one the dataset preparation drew for that variant.
    """
    if variant == 0 or not config.random_crop:
        return 0.5, 0.5
    from ..trainer import dataset as prep

    with open(path, "rb") as f:
        file_hash = hashlib.sha256(f.read()).hexdigest()
    draws = prep._draws(config, prep._variant_rng(config.seed, file_hash, variant))
    return draws.crop_x, draws.crop_y


def size_conditioning(original: tuple[int, int], bucket: tuple[int, int], crop_at: tuple[float, float] = (0.5, 0.5)) -> dict:
    """SDXL's size and crop conditioning for one training image, as sd-scripts computes it.

    original: the file's (w, h); bucket: the training size (w, h); crop_at: the crop's place in
    the spare room of the resized image (0.5, 0.5 = centred). The image is scaled to cover the
    bucket, then cropped: crop_w / crop_h are the crop's top-left corner in that resized image.
    Models without size conditioning (SD1.5, Flux) ignore these values.
    """
    (w, h), (bw, bh) = original, bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    return {
        "width": w, "height": h,
        "crop_w": round((rw - bw) * crop_at[0]), "crop_h": round((rh - bh) * crop_at[1]),
        "target_width": bw, "target_height": bh,
    }


def _folder_state(folder: str) -> str:
    """Changes whenever a file in the folder is added, removed or edited (for re-execution)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            st = os.stat(os.path.join(root, f))
            h.update(f"{os.path.relpath(os.path.join(root, f), folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


class LoRALabDataset:
    DESCRIPTION = (
        "A folder of images with .txt captions (kohya layout: a sub-folder 10_name repeats its images 10x per epoch), "
        "encoded once with your VAE and CLIP and cached on disk, so re-queues and restarts don't re-encode."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET,)
    RETURN_NAMES = ("dataset",)
    FUNCTION = "load"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        c = default_of(ControlConfig)
        return {
            "required": {
                "folder": ("STRING", {"default": "lora_dataset", "tooltip": "Folder inside ComfyUI's input directory, or an absolute path. Images: png/jpg/webp/bmp/gif (avif when Pillow reads it); captions: same name + .txt."}),
                "vae": ("VAE", {"tooltip": "The VAE of the model you train on (from the checkpoint loader)."}),
                "clip": ("CLIP", {"tooltip": "The text encoder of the model you train on."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64, "tooltip": "Training resolution: 512 for SD1.5, 1024 for SDXL/Flux. Images are fitted into aspect-ratio buckets of about this area."}),
                "bucket": ("BOOLEAN", {"default": True, "tooltip": "Aspect-ratio buckets (keep each image's shape). Off: center-crop everything to a square."}),
                "repeats": ("INT", {"default": 1, "min": 1, "max": 1000, "tooltip": "Repeats per epoch for images not in a 'N_name' sub-folder."}),
                "trigger_word": ("STRING", {"default": "", "tooltip": "Put first in every caption (e.g. 'sks person'); use it in your prompts later."}),
            },
            "optional": {
                "shuffle_captions": ("BOOLEAN", {"default": False, "tooltip": "Shuffle comma-separated tags (needs variants >= 2)."}),
                "keep_tokens": ("INT", {"default": 1, "min": 0, "max": 32, "tooltip": "Leading tags never shuffled (the trigger word counts as one)."}),
                "caption_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "Chance of training a variant with an empty caption (needs variants >= 2)."}),
                "flip": ("BOOLEAN", {"default": False, "tooltip": "Also train the mirrored image (not for asymmetric subjects or text)."}),
                "random_crop": ("BOOLEAN", {"default": False, "tooltip": "Random instead of centred crops (needs variants >= 2)."}),
                "rotation_degrees": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 15.0, "step": 0.5, "tooltip": "Small random rotation (needs variants >= 2)."}),
                "color_jitter": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.3, "step": 0.01, "tooltip": "Random brightness/contrast/saturation change (needs variants >= 2)."}),
                "variants": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": "Augmented copies encoded per image (each costs one VAE encode, once). 1 = no augmentation."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Seed of the augmentations."}),
                "frames": ("INT", {"default": 1, "min": 1, "max": MAX_CLIP_FRAMES, "step": 4, "tooltip": "Video models (Wan): > 1 trains videos (mp4, webm, mov, animated gif/webp) as clips of this many frames, 4k+1 (e.g. 17, 33, 81); images in the folder train as 1-frame clips. Use the model's own VAE (Wan VAE). 1 = images only."}),
                "fps": ("FLOAT", {"default": 16.0, "min": 1.0, "max": 120.0, "step": 1.0, "tooltip": "Frame rate clips are read at (Wan: 16). A clip must last frames/fps seconds; shorter ones are skipped and named."}),
                "control_images": ("INT", {"default": c["control_images"], "min": 0, "max": MAX_CONTROL_IMAGES, "tooltip": "Concept bleed: the Train node has the base model draw this many control images once per training, and measures how much the LoRA changes them (the bleed line). 0 = off."}),
                "control_prompts": ("STRING", {"default": c["control_prompts"], "multiline": True, "tooltip": "Prompts the LoRA should leave alone, one a line. Empty: your captions without the trigger word (or a few generic prompts when there is no trigger word)."}),
                "reg_folder": ("STRING", {"default": c["reg_folder"], "tooltip": "Regularisation images (kohya's reg folder): class images with captions, e.g. photos of other dogs for a dog LoRA, trained alongside at prior_loss_weight. They keep the LoRA from bleeding. Empty = none."}),
                "prior_loss_weight": ("FLOAT", {"default": c["prior_loss_weight"], "min": 0.01, "max": 100.0, "step": 0.05, "tooltip": "Loss weight of each regularisation image (kohya's default 1.0)."}),
            },
        }

    @staticmethod
    def _config(resolution, bucket, repeats, trigger_word, shuffle_captions=False, keep_tokens=1, caption_dropout=0.0, flip=False, random_crop=False, rotation_degrees=0.0, color_jitter=0.0, variants=1, seed=0, frames=1, fps=16.0) -> DatasetConfig:
        return DatasetConfig(
            resolution=resolution, bucket=bucket, default_repeats=repeats, trigger_word=trigger_word,
            shuffle_captions=shuffle_captions, keep_tokens=keep_tokens if shuffle_captions else 0, caption_dropout=caption_dropout,
            flip=flip, random_crop=random_crop, rotation_degrees=rotation_degrees, color_jitter=color_jitter, variants=variants, seed=seed,
            frames=frames, fps=fps,
        )

    @classmethod
    def VALIDATE_INPUTS(cls, folder, frames=1):
        # Only `folder` (and `frames`, which decides whether videos count) are named: ComfyUI
        # attributes the message to every input named here, and still range-checks the others
        # itself. Cross-field settings are checked when it runs.
        return validation_message(lambda: scan_folder(resolve_folder(folder), videos=frames > 1), folder)

    @classmethod
    def IS_CHANGED(cls, folder, reg_folder="", **kw):
        try:  # an edit in either folder (images, captions) re-runs the node
            reg = _folder_state(resolve_folder(reg_folder, "reg_folder")) if str(reg_folder).strip() else ""
            return _folder_state(resolve_folder(folder)) + reg
        except (ConfigError, OSError):
            return float("nan")

    @user_errors
    def load(self, folder, vae, clip, resolution, bucket, repeats, trigger_word, control_images=ControlConfig.control_images, control_prompts=ControlConfig.control_prompts,
             reg_folder=ControlConfig.reg_folder, prior_loss_weight=ControlConfig.prior_loss_weight, **options):
        config = self._config(resolution, bucket, repeats, trigger_word, **options)
        control = ControlConfig(control_images, control_prompts, reg_folder, prior_loss_weight)
        skipped: list[str] = []
        entries = scan_folder(resolve_folder(folder), config.caption_extension, skipped, videos=config.frames > 1)
        reg_entries, reg_config = self._reg_entries(control, config, skipped)
        encoders = f"{encoder_fingerprint(vae, 'first_stage_model')}:{encoder_fingerprint(clip, 'cond_stage_model')}"
        encoder = CachedEncoder(os.path.join(folder_paths.get_user_directory(), CACHE_DIR_NAME), encoders, vae.encode,
                                lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text)))
        examples: list[Example] = []
        pbar = comfy.utils.ProgressBar(len(entries) + len(reg_entries))

        def encode(entry, item, config=config, reg=False):
            original = item.size if item.images[0].ndim == 4 else original_size(entry.path)  # a clip: its frames' bucket
            example = encoder.example(item, [size_conditioning(original, item.size, _crop_position(config, entry.path, v)) for v in range(len(item.images))])
            examples.append(dataclasses.replace(example, loss_weight=control.prior_loss_weight, regularisation=True) if reg else example)
            pbar.update(1)  # Cancel stops here, after this image: what is encoded stays in the cache

        items, stats = build_items(entries, config, each=encode)
        reg_items = build_items(reg_entries, reg_config, each=lambda e, i: encode(e, i, reg_config, True))[0] if reg_entries else []
        prompts = pick_control_prompts(control, [i.captions[0] for i in items], config.trigger_word)
        control_conds = self._control_conds(prompts, examples, encoder)
        keys = [f"{i.content_hash}:{i.repeats}" for i in items] + [f"reg:{i.content_hash}:{i.repeats}:{control.prior_loss_weight!r}" for i in reg_items]
        fingerprint = hashlib.sha256("|".join([encoders] + keys + [f"control:{p}" for p in prompts]).encode()).hexdigest()[:16]
        stats.warnings.extend([w for w in [skipped_summary(skipped)] if w] + encoder.problems)
        extra = [f"regularisation: {len(reg_items)} images at prior_loss_weight {control.prior_loss_weight:g}"] if reg_items else []
        extra += [f"control (bleed): {len(prompts)} images of {len(set(prompts))} prompts, e.g. {prompts[0]!r}"] if prompts else []
        summary = "\n".join([stats.to_text()] + extra) + f"\nencoded: {len(items) + len(reg_items) - encoder.hits}, from cache: {encoder.hits}"
        log.info("LoRA Lab dataset %s: %d images, encoders %s, fingerprint %s", folder, len(items), encoders, fingerprint)
        dataset = EncodedDataset(examples, fingerprint, summary, list(stats.warnings), prompts, control_conds)
        return {"ui": {"text": [summary]}, "result": (dataset,)}

    @staticmethod
    def _reg_entries(control: ControlConfig, config: DatasetConfig, skipped: list[str]):
        """The regularisation images' entries and settings: as the dataset's, without its trigger
        word (class images are captioned as the class: that is what they keep in place)."""
        if not control.reg_folder.strip():
            return [], config
        reg_config = dataclasses.replace(config, trigger_word="")
        try:
            return scan_folder(resolve_folder(control.reg_folder, "reg_folder"), config.caption_extension, skipped, videos=config.frames > 1), reg_config
        except ConfigError as e:
            raise ConfigError("reg_folder", e.message) from None

    @staticmethod
    def _control_conds(prompts: list[str], examples: list[Example], encoder: CachedEncoder) -> list[dict]:
        """Each control prompt encoded like a caption, with the size conditioning of the dataset's
        most common bucket (the size the Train node samples it at)."""
        if not prompts:
            return []
        concept = [ex for ex in examples if not ex.regularisation]
        extra = concept[most_common_bucket(concept)].conds[0]["extra"]
        return encoder.prompt_conds(prompts, (extra.get("target_width"), extra.get("target_height")))

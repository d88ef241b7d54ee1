"""Which files in a folder are training images, and reading them: image files to 8-bit RGB, captions to text.

Public API
----------
ImageEntry(path, caption_path, repeats, subfolder); `.name` is "subfolder/file.png"
scan_folder(folder, caption_extension=".txt") -> list[ImageEntry]
    kohya layout: images under a sub-folder named `10_name` get repeats=10 (the nearest such folder
    counts); other images get repeats=None, meaning config.default_repeats. Accepted extensions are
    IMAGE_EXTENSIONS (any case); hidden files and folders (".name") are skipped. Sorted by the path
    relative to `folder`, so the order never depends on the filesystem.
load_image(path) -> PIL.Image.Image, mode RGB, 8-bit
    EXIF orientation applied. Transparent pixels (RGBA, LA, P with transparency) are composited
    on WHITE: the model never sees the arbitrary colours hidden under alpha = 0. 16-bit images are
    scaled to 8 bits (65535 -> 255), not clipped. CMYK, palette, grayscale and 1-bit become RGB.
    Images above MAX_IMAGE_PIXELS (8192 x 8192) and unreadable / truncated files raise ConfigError
    (field "folder") naming the file.
read_caption(path, warnings=None) -> str
    UTF-8 (a BOM is dropped; UTF-16 with a BOM is read too); other bytes are read as Windows-1252
    (Latin-1 as the last resort) and a warning is appended to `warnings`. Whitespace, newlines
    included, is collapsed to single spaces. A missing file or path None gives "".
"""

from __future__ import annotations

import io
import os
import re
import warnings as _py_warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from .errors import ConfigError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
OPTIONAL_EXTENSIONS = (".avif",)  # read when this Pillow can (see _readable_extensions)
MAX_IMAGE_PIXELS = 8192 * 8192
_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")


# --- scanning -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageEntry:
    path: str
    caption_path: str | None
    repeats: int | None  # None: use DatasetConfig.default_repeats
    subfolder: str  # relative to the scanned folder, "/"-separated; "" for the folder itself

    @property
    def name(self) -> str:
        base = os.path.basename(self.path)
        return f"{self.subfolder}/{base}" if self.subfolder else base


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _resolve_folder(folder) -> str:
    if not isinstance(folder, str) or not folder.strip():
        raise ConfigError("folder", "is empty; enter the path of the folder that holds your training images.")
    # Quotes come with paths pasted from "Copy as path" on Windows.
    raw = folder.strip().strip('"').strip("'")
    path = os.path.abspath(os.path.expanduser(raw))
    if not os.path.exists(path):
        hint = "" if os.path.isabs(os.path.expanduser(raw)) else (
            f" (a relative path is looked up from ComfyUI's working folder {os.getcwd()}; use a full path)"
        )
        raise ConfigError("folder", f"no folder at {path}{hint}. Check the spelling and that the drive is mounted.")
    if not os.path.isdir(path):
        raise ConfigError("folder", f"{path} is a file, not a folder; give the folder that contains the images.")
    return path


def _repeats_for(parts: list[str], root: str) -> int | None:
    for part in reversed(parts):  # the nearest '10_name' folder wins
        m = _REPEATS_FOLDER.match(part)
        if m:
            repeats = int(m.group(1))
            if repeats < 1:
                raise ConfigError(
                    "folder",
                    f"sub-folder {part!r} in {root} asks for 0 repeats; rename it to '1_{m.group(2)}' or "
                    "more, or move it out of the dataset folder.",
                )
            return repeats
    return None


def _readable_extensions() -> tuple[str, ...]:
    """IMAGE_EXTENSIONS plus the optional formats this Pillow build reads (AVIF: Pillow >= 11.2
    built with libavif, or pillow-avif-plugin)."""
    Image.init()
    return IMAGE_EXTENSIONS + tuple(e for e in OPTIONAL_EXTENSIONS if e in Image.registered_extensions())


def scan_folder(folder: str, caption_extension: str = ".txt", skipped: list[str] | None = None, videos: bool = False) -> list[ImageEntry]:
    """Training images under `folder` (recursively, linked sub-folders followed once), with their
    caption file and kohya repeats; with `videos`, video files too (clips, trainer/clips.py). Every
    other file that is not a caption is appended to `skipped` as "path (why)"; hidden files are
    left out silently."""
    from .clips import VIDEO_EXTENSIONS

    root = _resolve_folder(folder)
    ext = caption_extension.lower()
    readable = _readable_extensions() + (VIDEO_EXTENSIONS if videos else ())
    entries: list[ImageEntry] = []
    skipped = [] if skipped is None else skipped
    visited: set[str] = set()
    n_files = n_captions = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a link back to a folder already scanned (a loop, or a second way in)
            dirnames[:] = []
            skipped.append(f"{dirpath} (a link to {real}, which is scanned already)")
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))  # one order, so one way in wins
        files = [f for f in filenames if not _hidden(f)]
        n_files += len(files)
        captions = {f.lower(): f for f in files if f.lower().endswith(ext)}
        n_captions += len(captions)
        rel = os.path.relpath(dirpath, root)
        parts = [] if rel == "." else rel.split(os.sep)
        repeats = _repeats_for(parts, root)
        for f in sorted(files):
            stem, suffix = os.path.splitext(f)
            path = os.path.join(dirpath, f)
            if f.lower() in captions:
                continue
            if not os.path.exists(path):
                skipped.append(f"{path} (a link to a file that does not exist)")
                continue
            if suffix.lower() not in readable:
                why = (f"{suffix.lower()[1:].upper()}: this Pillow cannot read it; pip install pillow-avif-plugin, or convert it to PNG"
                       if suffix.lower() in OPTIONAL_EXTENSIONS else
                       "a video: set the Dataset node's frames above 1 to train clips (video models such as Wan)"
                       if suffix.lower() in VIDEO_EXTENSIONS else "not an image type LoRA Lab reads")
                skipped.append(f"{path} ({why})")
                continue
            caption = captions.get((stem + ext).lower())
            entries.append(
                ImageEntry(
                    path=path,
                    caption_path=os.path.join(dirpath, caption) if caption else None,
                    repeats=repeats,
                    subfolder="/".join(parts),
                )
            )
    if not entries:
        accepted = ", ".join(readable)
        if n_captions:
            found = f"found {n_captions} caption file(s) ({caption_extension}) but no images"
        else:
            found = f"found {n_files} file(s), none of them an image"
        raise ConfigError("folder", f"{found} in {root} (sub-folders and linked folders included). Accepted images: {accepted}.")
    entries.sort(key=lambda e: e.name)
    return entries


def skipped_summary(skipped: list[str]) -> str | None:
    """The dataset summary's line for the files scan_folder skipped (every one, with why)."""
    if not skipped:
        return None
    return f"{len(skipped)} file(s) or link(s) skipped: " + "; ".join(skipped)


# --- loading ------------------------------------------------------------------------------------


def _file_error(path: str, problem: str) -> ConfigError:
    return ConfigError(
        "folder",
        f"{path}: {problem}. Re-save it with an image editor, or remove it from the dataset folder.",
    )


def _sixteen_bit_to_8(img: Image.Image) -> Image.Image:
    a = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        lo, hi = (0.0, 1.0) if a.min() >= 0 and a.max() <= 1 else (float(a.min()), float(a.max()))
    elif a.min() >= 0 and a.max() <= 65535:
        lo, hi = 0.0, 65535.0  # 16-bit data (a 16-bit PNG opens as I;16 or I): scale, don't clip
    else:
        lo, hi = float(a.min()), float(a.max())  # 32-bit data has no standard white: use its range
    scaled = (a - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return _sixteen_bit_to_8(img).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _on_white(img)
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _decode(data: bytes, path: str, animated: list[str] | None = None) -> Image.Image:
    """8-bit RGB; an animated file (GIF, WebP, APNG) gives its first frame and its path is
    appended to `animated`."""
    try:
        with _py_warnings.catch_warnings():
            # Our own, lower limit is checked below; Pillow's warning would only repeat it.
            _py_warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ConfigError(
            "folder",
            f"{path} declares a size far above the limit of {MAX_IMAGE_PIXELS:,} pixels (8192x8192), too large "
            "to open safely; scale it down (training uses 512-2048 px anyway) or remove it.",
        ) from None
    except Image.UnidentifiedImageError:
        raise _file_error(path, "not an image file Pillow can read (empty, or another format renamed)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _file_error(path, f"the header is corrupt ({e})") from None
    w, h = img.size  # known from the header: checked before decoding the pixels
    if w * h > MAX_IMAGE_PIXELS:
        raise ConfigError(
            "folder",
            f"{path} is {w}x{h} pixels, above the limit of {MAX_IMAGE_PIXELS:,} pixels; "
            "scale it down (training uses 512-2048 px anyway) or remove it.",
        )
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _file_error(path, f"the image is truncated or corrupt ({e})") from None
    if getattr(img, "n_frames", 1) > 1 and animated is not None:
        animated.append(path)  # the frame loaded is the first
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not stop training; orientation is then as stored
        pass
    return _to_rgb(img)


def load_image(path: str) -> Image.Image:
    """The image at `path` as 8-bit RGB, oriented as EXIF says; see the module docstring."""
    with open(path, "rb") as f:
        return _decode(f.read(), path)


def _decode_text(data: bytes) -> tuple[str, str | None]:
    """(text, encoding used when it was not UTF-8)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16"), None  # Notepad's "Unicode"
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "Windows-1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "Latin-1"  # every byte is valid Latin-1


def read_caption(path: str | None, warnings: list[str] | None = None) -> str:
    """The caption text, whitespace collapsed; "" when `path` is None or missing."""
    if path is None or not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        text, fallback = _decode_text(f.read())
    if fallback and warnings is not None:
        warnings.append(
            f"caption {path} is not UTF-8; read it as {fallback}. If characters look wrong, re-save it as UTF-8."
        )
    return " ".join(text.split())

"""Short video clips as training data (Wan): which files are clips, and their frames.

A clip trains as `frames` frames taken at `fps` from its start (Wan's VAE compresses time 4x and
needs 4k+1 frames: 1, 5, 9, ... 81). Videos are decoded with PyAV (which ComfyUI ships); an
animated GIF / WebP / APNG is a clip too when clips are being trained, read with Pillow. Frames are
taken at the file's own timestamps, so a 30 fps file read at 16 fps keeps about every other frame.

Public API
----------
VIDEO_EXTENSIONS
is_clip(path, data) -> bool                  a video file, or an image file with several frames
read_frames(data, path, frames, fps) -> list[PIL.Image]   RGB; ClipProblem when it can't give them
ClipProblem(path, reason, kind)              kind "short" (fewer frames than asked) or "broken"
"""

from __future__ import annotations

import io
import os

from PIL import Image

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
MAX_CLIP_FRAMES = 257


class ClipProblem(Exception):
    """A clip that can't be trained: too short for the frame count, or not decodable."""

    def __init__(self, path: str, reason: str, kind: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.kind = path, reason, kind


def is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def is_clip(path: str, data: bytes) -> bool:
    if is_video(path):
        return True
    try:
        with Image.open(io.BytesIO(data)) as img:
            return getattr(img, "n_frames", 1) > 1
    except Exception:  # noqa: BLE001 - not an image Pillow reads: the image path reports it
        return False


def _pick(timestamps: list[float], frames: int, fps: float) -> list[int] | None:
    """Indices of the frames nearest to start + k/fps, k = 0..frames-1; None when the clip ends first."""
    if not timestamps:
        return None
    start, picked, i = timestamps[0], [], 0
    for k in range(frames):
        t = start + k / fps
        while i + 1 < len(timestamps) and abs(timestamps[i + 1] - t) <= abs(timestamps[i] - t):
            i += 1
        if t > timestamps[-1] + 0.5 / fps or (picked and i == picked[-1]):
            return None  # past the end, or the file is slower than fps: no new frame for this time
        picked.append(i)
    return picked


def _animated_frames(data: bytes) -> tuple[list[Image.Image], list[float]]:
    frames, times, t = [], [], 0.0
    with Image.open(io.BytesIO(data)) as img:
        for n in range(img.n_frames):
            img.seek(n)
            frames.append(img.convert("RGB"))
            times.append(t)
            t += max(float(img.info.get("duration", 100) or 100), 1.0) / 1000.0
    return frames, times


def _video_frames(data: bytes, limit_s: float) -> tuple[list[Image.Image], list[float]]:
    import av

    frames, times = [], []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            t = float(frame.pts * stream.time_base) if frame.pts is not None else len(frames) / float(stream.average_rate or 25)
            frames.append(frame.to_image().convert("RGB"))
            times.append(t)
            if t - times[0] > limit_s:
                break
    return frames, times


def read_frames(data: bytes, path: str, frames: int, fps: float) -> list[Image.Image]:
    """`frames` RGB frames at `fps` from the start of the clip in `data`."""
    try:
        if is_video(path):
            decoded, times = _video_frames(data, limit_s=frames / fps + 1.0)
        else:
            decoded, times = _animated_frames(data)
    except Exception as e:  # noqa: BLE001 - PyAV / Pillow raise many kinds for a damaged file
        raise ClipProblem(path, f"{type(e).__name__}: {e}", "broken") from None
    if not decoded:
        raise ClipProblem(path, "has no video frames", "broken")
    picked = _pick(times, frames, fps)
    if picked is None:
        duration = times[-1] - times[0]
        raise ClipProblem(path, f"{len(decoded)} frame(s) over {duration:.2f} s, fewer than {frames} at {fps:g} fps", "short")
    return [decoded[i] for i in picked]

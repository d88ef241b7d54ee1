"""Video clips as training data: frames at a rate, short and broken clips, clips beside images."""

import io

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av")

from trainer.clips import ClipProblem, _pick, is_clip, read_frames  # noqa: E402
from trainer.dataset import DatasetConfig, build_items, scan_folder  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402


def mp4(n_frames: int, rate: int = 24, size=(80, 64)) -> bytes:
    """A video whose frame i is a flat grey of level 10 * i (so a frame tells its index)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=rate)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n_frames):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 10 * i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def level(img) -> float:
    return float(np.asarray(img, dtype=np.float32).mean())


def test_frames_are_taken_at_the_asked_rate_from_the_start():
    frames = read_frames(mp4(24, rate=24), "a.mp4", frames=5, fps=12)  # every other frame of a 24 fps file
    assert len(frames) == 5 and frames[0].size == (80, 64)
    assert [round(level(f) / 10) for f in frames] == [0, 2, 4, 6, 8]


def test_pick_refuses_a_clip_that_ends_early_or_is_slower_than_asked():
    assert _pick([0.0, 0.1, 0.2], 3, 10) == [0, 1, 2]
    assert _pick([0.0, 0.1, 0.2], 4, 10) is None  # 4 frames at 10 fps need 0.3 s
    assert _pick([0.0, 0.5, 1.0], 3, 10) is None  # a 2 fps file has no frame for 0.1 s


def test_short_and_broken_clips_say_why():
    with pytest.raises(ClipProblem) as e:
        read_frames(mp4(3), "short.mp4", frames=9, fps=16)
    assert e.value.kind == "short" and "fewer than 9 at 16 fps" in e.value.reason
    with pytest.raises(ClipProblem) as e:
        read_frames(b"\x00not a video" * 50, "broken.mp4", frames=5, fps=16)
    assert e.value.kind == "broken" and "Error" in e.value.reason


def test_an_animated_gif_is_a_clip():
    frames = [Image.new("RGB", (64, 64), (30 * i,) * 3) for i in range(6)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=62, loop=0)
    assert is_clip("a.gif", buf.getvalue()) and not is_clip("a.png", _png())
    got = read_frames(buf.getvalue(), "a.gif", frames=5, fps=16)
    assert [round(level(f) / 30) for f in got] == [0, 1, 2, 3, 4]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    return buf.getvalue()


def test_frames_must_be_4k_plus_1():
    assert DatasetConfig(frames=17).frames == 17
    with pytest.raises(ConfigError, match="nearest is 17") as e:
        DatasetConfig(frames=16)
    assert e.value.field == "frames"


def test_a_folder_mixing_images_and_clips(tmp_path):
    (tmp_path / "still.png").write_bytes(_png())
    (tmp_path / "still.txt").write_text("a still")
    (tmp_path / "walk.mp4").write_bytes(mp4(20, rate=16))
    (tmp_path / "walk.txt").write_text("walking")
    (tmp_path / "blink.mp4").write_bytes(mp4(3, rate=16))
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 4000)
    skipped: list[str] = []
    assert [e.name for e in scan_folder(str(tmp_path), skipped=skipped)] == ["still.png"]  # frames 1: images only
    assert any("walk.mp4 (a video: set the Dataset node's frames above 1" in s for s in skipped)
    config = DatasetConfig(resolution=64, frames=9, fps=16)
    items, stats = build_items(scan_folder(str(tmp_path), videos=True), config)
    shapes = {i.name: tuple(i.images[0].shape) for i in items}
    assert shapes == {"still.png": (64, 64, 3), "walk.mp4": (9, 64, 64, 3)}
    assert stats.buckets == {"64x64": 1, "64x64x9f": 1}
    assert stats.to_text().startswith("1 images, 1 clips, 2 with repeats")
    text = " ".join(stats.warnings)
    assert "blink.mp4" in text and "shorter than 9 frames at 16 fps" in text
    assert "broken.mp4" in text and "could not be decoded" in text
    frames = items[1].images[0]
    assert frames[0].mean() < frames[-1].mean()  # in time order: the frames get brighter


def test_a_folder_of_only_unusable_clips_is_refused_naming_them(tmp_path):
    (tmp_path / "blink.mp4").write_bytes(mp4(3, rate=16))
    with pytest.raises(ConfigError, match="blink.mp4") as e:
        build_items(scan_folder(str(tmp_path), videos=True), DatasetConfig(resolution=64, frames=9))
    assert e.value.field == "folder"

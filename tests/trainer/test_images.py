"""trainer/images.py and the image side of trainer/dataset.py: links, skipped files, GIF/AVIF,
animated files, and extreme aspect ratios decoded within bounded memory."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from trainer.dataset import DatasetConfig, build_items, prepare_image
from trainer.errors import ConfigError
from trainer.images import load_image, scan_folder, skipped_summary


def save(path, size=(64, 48), color=(200, 30, 60), fmt=None, caption=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def test_linked_sub_folders_are_followed_once_and_loops_are_skipped(tmp_path):
    outside = tmp_path / "outside"
    save(outside / "a.png", caption="a")
    root = tmp_path / "dataset"
    save(root / "b.png")
    os.symlink(outside, root / "5_linked")
    os.symlink(root, outside / "back")  # a loop: outside/back -> dataset -> 5_linked -> outside
    skipped = []
    entries = scan_folder(str(root), skipped=skipped)
    assert [(e.name, e.repeats) for e in entries] == [("5_linked/a.png", 5), ("b.png", None)]
    assert entries[0].caption_path.endswith("a.txt")
    assert len(skipped) == 1 and "scanned already" in skipped[0] and "back" in skipped[0], skipped


def test_a_folder_holding_only_a_link_finds_the_images_behind_it(tmp_path):
    save(tmp_path / "real" / "x.png")
    (tmp_path / "only_link").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "only_link" / "sub")
    assert [e.name for e in scan_folder(str(tmp_path / "only_link"))] == ["sub/x.png"]


def test_every_skipped_file_is_listed_with_why(tmp_path):
    save(tmp_path / "ok.png")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    os.symlink(tmp_path / "gone.png", tmp_path / "broken.png")
    skipped = []
    scan_folder(str(tmp_path), skipped=skipped)
    assert sorted(skipped) == sorted([f"{tmp_path / 'broken.png'} (a link to a file that does not exist)",
                                      f"{tmp_path / 'notes.pdf'} (not an image type LoRA Lab reads)"])
    text = skipped_summary(skipped)
    assert text.startswith("2 file(s) or link(s) skipped: ") and "notes.pdf" in text and "broken.png" in text
    assert skipped_summary([]) is None
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "a.psd").write_bytes(b"8BPS")
    with pytest.raises(ConfigError, match="found 1 file"):
        scan_folder(str(tmp_path / "no_images"))


def test_gif_and_avif_are_read(tmp_path):
    save(tmp_path / "a.gif", fmt="GIF")
    Image.init()
    avif = ".avif" in Image.registered_extensions()
    if avif:
        save(tmp_path / "b.avif", fmt="AVIF")
    names = [e.name for e in scan_folder(str(tmp_path))]
    assert names == (["a.gif", "b.avif"] if avif else ["a.gif"])
    assert load_image(str(tmp_path / "a.gif")).mode == "RGB"


def test_animated_files_train_their_first_frame_with_a_warning(tmp_path):
    frames = [Image.new("RGB", (64, 64), c) for c in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], duration=100)
    save(tmp_path / "still.png")
    items, stats = build_items(scan_folder(str(tmp_path)), DatasetConfig(resolution=64))
    for item in items[:2]:
        red, blue = item.images[0][..., 0].mean(), item.images[0][..., 2].mean()
        assert red > 0.8 and blue < 0.2, item.name  # the first frame, red
    [line] = [w for w in stats.warnings if "animated" in w]
    assert line.startswith("2 animated image(s) are trained on their first frame only") and "anim.gif" in line and "anim.webp" in line


def test_an_extreme_strip_is_cropped_before_it_is_scaled(monkeypatch):
    resized = []
    original = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        resized.append(size)
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    config = DatasetConfig(resolution=512)
    strip = Image.new("RGB", (8192, 1), (10, 120, 200))
    x = prepare_image(strip, (1024, 256), config)
    assert x.shape == (256, 1024, 3) and abs(float(x[..., 2].mean()) - 200 / 255) < 0.01
    assert max(w * h for w, h in resized) <= 4 * 1024 * 256, resized  # not 2,097,152 x 256

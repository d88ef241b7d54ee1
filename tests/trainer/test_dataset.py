import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import dataset, images
from trainer.dataset import (
    DatasetConfig,
    bucket_size,
    build_items,
    caption_variant,
    load_image,
    prepare_image,
    read_caption,
    scan_folder,
)
from trainer.errors import ConfigError, LoRALabError


def save(path, size=(64, 48), color=(200, 30, 60), mode="RGB", caption=None, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, fmt)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def pattern(w, h, seed=0):
    """A non-symmetric image, so crops, flips and rotations are visible."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"resolution": 500}, "resolution"),
        ({"resolution": 8192}, "resolution"),
        ({"min_bucket": 100}, "min_bucket"),
        ({"max_bucket": 256}, "max_bucket"),
        ({"default_repeats": 0}, "default_repeats"),
        ({"rotation_degrees": 30.0}, "rotation_degrees"),
        ({"color_jitter": 0.5}, "color_jitter"),
        ({"variants": 17}, "variants"),
        ({"caption_dropout": 1.5}, "caption_dropout"),
        ({"trigger_word": "a, b"}, "trigger_word"),
        ({"caption_extension": ".png"}, "caption_extension"),
        ({"flip": 1}, "flip"),
    ],
)
def test_invalid_config_names_the_input(kw, field):
    with pytest.raises(ConfigError) as e:
        DatasetConfig(**kw)
    assert e.value.field == field


@pytest.mark.parametrize("kw", [{"flip": True}, {"rotation_degrees": 5.0}, {"shuffle_captions": True},
                                {"caption_dropout": 0.1}, {"color_jitter": 0.1}, {"random_crop": True}])
def test_augmentation_with_one_variant_asks_for_more_variants(kw):
    with pytest.raises(ConfigError) as e:
        DatasetConfig(**kw)
    assert e.value.field == "variants" and "variants" in e.value.message
    DatasetConfig(variants=2, **kw)


def test_automatic_bucket_bounds_follow_resolution_and_text_is_normalised():
    c = DatasetConfig()
    assert (c.min_bucket_side, c.max_bucket_side) == (256, 1024)
    c = DatasetConfig(resolution=1024, caption_extension="caption", trigger_word="  ohwx   man ")
    assert (c.min_bucket_side, c.max_bucket_side) == (512, 2048)
    assert c.caption_extension == ".caption" and c.trigger_word == "ohwx man"


# --- scanning -----------------------------------------------------------------------------------


def test_kohya_repeats_sorted_order_and_extension_filter(tmp_path):
    save(tmp_path / "10_cat" / "b.png", caption="cat")
    save(tmp_path / "10_cat" / "a.JPG", fmt="JPEG")
    save(tmp_path / "3_dog" / "deep" / "c.webp", fmt="WEBP")
    save(tmp_path / "plain.bmp", fmt="BMP")
    save(tmp_path / "misc" / "d.jpeg", fmt="JPEG")
    save(tmp_path / "10_cat" / ".hidden.png")
    save(tmp_path / ".thumbs" / "e.png")
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "10_cat" / "clip.mp4").write_bytes(b"\0" * 16)

    skipped = []
    entries = scan_folder(str(tmp_path), skipped=skipped)
    assert skipped == [f"{tmp_path / 'notes.md'} (not an image type LoRA Lab reads)",
                       f"{tmp_path / '10_cat' / 'clip.mp4'} (a video: set the Dataset node's frames above 1 to train clips (video models such as Wan))"]
    assert [e.name for e in entries] == ["10_cat/a.JPG", "10_cat/b.png", "3_dog/deep/c.webp", "misc/d.jpeg", "plain.bmp"]
    assert [e.repeats for e in entries] == [10, 10, 3, None, None]
    assert entries[1].caption_path == str(tmp_path / "10_cat" / "b.txt")
    assert entries[0].caption_path is None
    assert scan_folder(str(tmp_path)) == entries  # deterministic


def test_caption_extension_is_matched_case_insensitively(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "a.CAPTION").write_text("hello")
    [e] = scan_folder(str(tmp_path), caption_extension=".caption")
    assert e.caption_path == str(tmp_path / "a.CAPTION")


def test_missing_folder_file_and_empty_folder_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        scan_folder(str(tmp_path / "nope"))
    assert e.value.field == "folder" and str(tmp_path / "nope") in e.value.message

    f = save(tmp_path / "x.png")
    with pytest.raises(ConfigError, match="not a folder"):
        scan_folder(str(f))

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(ConfigError) as e:
        scan_folder(str(empty))
    assert e.value.field == "folder" and "1 file" in e.value.message and ".png" in e.value.message

    (empty / "a.txt").write_text("caption")
    with pytest.raises(ConfigError, match="caption file.*but no images"):
        scan_folder(str(empty))


def test_zero_repeats_folder_is_an_error(tmp_path):
    save(tmp_path / "0_cat" / "a.png")
    with pytest.raises(ConfigError, match="0_cat"):
        scan_folder(str(tmp_path))


# --- loading ------------------------------------------------------------------------------------


def pixel(img, xy=(0, 0)):
    assert img.mode == "RGB"
    return img.getpixel(xy)


@pytest.mark.parametrize(
    "mode, color, expected",
    [
        ("L", 100, (100, 100, 100)),
        ("1", 1, (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", (255, 0, 0, 0), (0, 255, 255)),
        ("LA", (100, 255), (100, 100, 100)),
        ("LA", (100, 0), (255, 255, 255)),
        ("RGBA", (0, 0, 0, 0), (255, 255, 255)),  # transparent -> white, not black
        ("RGBA", (200, 0, 0, 255), (200, 0, 0)),
    ],
)
def test_modes_load_as_rgb_with_correct_values(tmp_path, mode, color, expected):
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    p = tmp_path / f"img.{fmt.lower()}"
    Image.new(mode, (40, 40), color).save(p, fmt)
    assert pixel(load_image(str(p))) == expected


def test_half_transparent_rgba_is_blended_on_white(tmp_path):
    p = save(tmp_path / "a.png", mode="RGBA", color=(0, 0, 0, 128))
    r, g, b = pixel(load_image(str(p)))
    assert abs(r - 127) <= 1 and r == g == b


def test_palette_with_and_without_transparency(tmp_path):
    img = Image.new("P", (40, 40), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.save(tmp_path / "p.png")
    assert pixel(load_image(str(tmp_path / "p.png"))) == (10, 200, 30)
    img.info["transparency"] = 1
    img.save(tmp_path / "pt.png", transparency=1)
    assert pixel(load_image(str(tmp_path / "pt.png"))) == (255, 255, 255)


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I", "TIFF")])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path, mode, fmt):
    a = np.array([[0, 32768, 65535]]).repeat(4, 0)
    img = Image.fromarray(a.astype(np.uint16)) if mode == "I;16" else Image.fromarray(a.astype(np.int32), "I")
    p = tmp_path / f"deep.{fmt.lower()}"
    img.save(p, fmt)
    assert Image.open(p).mode == mode
    out = load_image(str(p))
    assert [pixel(out, (x, 0))[0] for x in range(3)] == [0, 128, 255]
    x = prepare_image(out, (3, 4), DatasetConfig())
    assert abs(x[0, 1, 0].item() - 0.5) < 0.01


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise
    img.save(tmp_path / "o.jpg", exif=exif.tobytes())
    assert load_image(str(tmp_path / "o.jpg")).size == (20, 60)


def test_truncated_and_fake_images_name_the_file(tmp_path):
    p = tmp_path / "broken.png"
    pattern(128, 128).save(p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(LoRALabError) as e:
        load_image(str(p))
    assert "broken.png" in str(e.value) and "re-save" in str(e.value).lower()

    fake = tmp_path / "fake.jpg"
    fake.write_text("not an image")
    with pytest.raises(LoRALabError, match="fake.jpg"):
        load_image(str(fake))


def test_huge_images_are_refused_before_decoding(tmp_path, monkeypatch):
    p = save(tmp_path / "big.png", size=(300, 200))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(LoRALabError, match=r"big\.png is 300x200"):
        load_image(str(p))


# --- captions -----------------------------------------------------------------------------------


def test_caption_utf8_bom_and_whitespace(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("\ufeffcafé,  red\n  hat \r\n".encode("utf-8"))
    warnings = []
    assert read_caption(str(p), warnings) == "café, red hat"
    assert warnings == []


def test_caption_cp1252_fallback_warns(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("caf\u00e9 \u201cquoted\u201d".encode("cp1252"))
    warnings = []
    assert read_caption(str(p), warnings) == "caf\u00e9 \u201cquoted\u201d"
    assert len(warnings) == 1 and "a.txt" in warnings[0] and "UTF-8" in warnings[0]


def test_missing_caption_is_empty(tmp_path):
    assert read_caption(None) == "" and read_caption(str(tmp_path / "none.txt")) == ""


def test_trigger_word_is_added_once_and_first():
    c = DatasetConfig(trigger_word="ohwx")
    assert caption_variant("a dog, grass", c) == "ohwx, a dog, grass"
    assert caption_variant("a dog, OHWX, grass", c) == "OHWX, a dog, grass"
    assert caption_variant("photo of ohwx dog, grass", c) == "photo of ohwx dog, grass"
    assert caption_variant("", c) == "ohwx"
    assert caption_variant("ohwxy, grass", c) == "ohwx, ohwxy, grass"  # a longer word is not the trigger


def test_shuffle_respects_keep_tokens_and_trigger_word():
    tags = [f"t{i}" for i in range(8)]
    c = DatasetConfig(shuffle_captions=True, keep_tokens=2, variants=2)
    orders = set()
    for s in range(200):
        out = caption_variant(", ".join(tags), c, random.Random(s)).split(", ")
        assert out[:2] == tags[:2] and sorted(out) == sorted(tags)
        orders.add(tuple(out))
    assert len(orders) > 50

    c = DatasetConfig(shuffle_captions=True, keep_tokens=0, trigger_word="ohwx", variants=2)
    firsts = {caption_variant("a, b, c, d", c, random.Random(s)).split(", ")[0] for s in range(100)}
    assert firsts == {"ohwx"}
    c = DatasetConfig(shuffle_captions=True, keep_tokens=1, trigger_word="ohwx", variants=2)
    seconds = {caption_variant("a, b, c, d", c, random.Random(s)).split(", ")[1] for s in range(100)}
    assert seconds == {"a", "b", "c", "d"}  # the trigger word is the one kept tag


def test_caption_dropout_rate_and_determinism():
    c = DatasetConfig(caption_dropout=0.2, shuffle_captions=True, variants=2)
    outs = [caption_variant("a, b, c", c, random.Random(s)) for s in range(4000)]
    rate = outs.count("") / len(outs)
    assert 0.17 < rate < 0.23, rate
    again = [caption_variant("a, b, c", c, random.Random(s)) for s in range(4000)]
    assert outs == again
    assert caption_variant("a, b, c", c) == "a, b, c"  # no rng: the plain caption


# --- buckets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("res", [512, 768, 1024])
@pytest.mark.parametrize("w, h", [(1024, 512), (512, 1024), (1920, 1080), (3000, 4000), (777, 701), (5000, 1000)])
def test_bucket_properties(res, w, h):
    c = DatasetConfig(resolution=res)
    bw, bh = bucket_size(w, h, c)
    assert bw % 64 == 0 and bh % 64 == 0
    assert c.min_bucket_side <= min(bw, bh) and max(bw, bh) <= c.max_bucket_side
    assert bw * bh <= res * res
    assert bw * bh >= 0.8 * res * res
    if 0.5 <= w / h <= 2:
        assert abs(math.log((bw / bh) / (w / h))) < 0.15
    assert (bw - bh) * (w - h) >= 0  # never turns landscape into portrait
    assert bucket_size(h, w, c) == (bh, bw)  # portrait and landscape are mirror images


def test_square_images_and_square_mode():
    assert bucket_size(900, 900, DatasetConfig(resolution=768)) == (768, 768)
    assert bucket_size(1920, 1080, DatasetConfig(resolution=768, bucket=False)) == (768, 768)


def test_bucket_bounds_are_honoured():
    c = DatasetConfig(resolution=512, min_bucket=448, max_bucket=576)
    bw, bh = bucket_size(4000, 1000, c)
    assert 448 <= min(bw, bh) and max(bw, bh) <= 576


# --- pixels -------------------------------------------------------------------------------------


def test_prepare_image_shape_range_and_centre_crop():
    img = pattern(300, 200)
    x = prepare_image(img, (128, 128), DatasetConfig())
    assert x.shape == (128, 128, 3) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # Already the right height: a centre crop is an exact copy of the middle.
    y = prepare_image(pattern(300, 128), (128, 128), DatasetConfig())
    ref = torch.from_numpy(np.asarray(pattern(300, 128))[:, 86:214].astype(np.float32) / 255)
    assert torch.equal(y, ref)


def test_flip_is_an_exact_mirror():
    img = pattern(200, 150)
    c = DatasetConfig(flip=True, variants=2)
    plain = prepare_image(img, (128, 64), c)
    flipped = prepare_image(img, (128, 64), c, random.Random(0), flip=True)
    assert torch.equal(flipped, plain.flip(1))
    drawn = [prepare_image(img, (128, 64), c, random.Random(s)) for s in range(20)]
    n_flipped = sum(torch.equal(d, plain.flip(1)) for d in drawn)
    assert sum(torch.equal(d, plain) for d in drawn) + n_flipped == 20 and 0 < n_flipped < 20


def test_random_crop_rotation_and_jitter_stay_in_range_and_vary():
    img = pattern(400, 260)
    c = DatasetConfig(random_crop=True, rotation_degrees=10.0, color_jitter=0.2, variants=4)
    plain = prepare_image(img, (192, 128), c)
    outs = [prepare_image(img, (192, 128), c, random.Random(s)) for s in range(3)]
    for x in outs:
        assert x.shape == (128, 192, 3) and 0 <= x.min() and x.max() <= 1
        assert not torch.equal(x, plain)
    assert torch.equal(prepare_image(img, (192, 128), c, random.Random(1)), outs[1])


def test_rotation_never_shows_empty_corners():
    img = Image.new("RGB", (300, 200), (200, 40, 90))
    c = DatasetConfig(rotation_degrees=15.0, variants=2)
    for s in range(10):
        x = prepare_image(img, (256, 128), c, random.Random(s))
        assert (x - torch.tensor([200, 40, 90]) / 255).abs().max() < 2 / 255


# --- building -----------------------------------------------------------------------------------


def test_build_items_variants_repeats_and_stats(tmp_path):
    pattern(600, 300, 1).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a cat, sofa")
    (tmp_path / "3_set").mkdir()
    pattern(300, 300, 2).save(tmp_path / "3_set" / "sq.png")
    c = DatasetConfig(resolution=256, trigger_word="ohwx", flip=True, shuffle_captions=True, variants=3,
                      default_repeats=2)
    items, stats = build_items(scan_folder(str(tmp_path)), c)
    sq, wide = items
    assert sq.name == "3_set/sq.png" and sq.repeats == 3 and wide.repeats == 2
    assert sq.size == (256, 256) and wide.size[0] > wide.size[1]
    assert all(x.shape == (wide.size[1], wide.size[0], 3) for x in wide.images) and len(wide.images) == 3
    assert wide.captions[0] == "ohwx, a cat, sofa"
    assert torch.equal(wide.images[0], prepare_image(load_image(str(tmp_path / "wide.png")), wide.size, c))
    assert torch.equal(wide.images[1], wide.images[0].flip(1))  # variant 1 is the mirrored one
    assert stats.count == 2 and stats.total_with_repeats == 5
    assert stats.buckets == {"256x256": 1, f"{wide.size[0]}x{wide.size[1]}": 1}
    assert any("no caption" in w and "3_set/sq.png" in w for w in stats.warnings)
    text = stats.to_text()
    assert "2 images" in text and "5 with repeats" in text and "256x256" in text

    again, _ = build_items(scan_folder(str(tmp_path)), c)
    assert all(torch.equal(a, b) for i, j in zip(items, again) for a, b in zip(i.images, j.images))
    assert [i.captions for i in items] == [i.captions for i in again]


def test_warnings_duplicates_orphans_tiny_upscaled_and_encoding(tmp_path):
    pattern(300, 300, 1).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes())
    pattern(100, 120, 3).save(tmp_path / "tiny.png")
    pattern(300, 260, 4).save(tmp_path / "small.png")
    for name in ("a", "b", "tiny", "small"):
        (tmp_path / f"{name}.txt").write_text("x")
    (tmp_path / "ghost.txt").write_text("no image")
    (tmp_path / "small.txt").write_bytes("na\u00efve".encode("cp1252"))
    _, stats = build_items(scan_folder(str(tmp_path)), DatasetConfig(resolution=1024))
    text = "\n".join(stats.warnings)
    assert "identical" in text and "a.png = b.png" in text
    assert "ghost.txt" in text
    assert "tiny.png (100x120)" in text
    assert "small.png (300x260" in text and "enlarged" in text
    assert "small.txt is not UTF-8" in text
    assert "no caption" not in text

    clean = tmp_path / "clean"
    clean.mkdir()
    pattern(300, 300, 9).save(clean / "a.png")
    (clean / "a.txt").write_text("x")
    _, stats = build_items(scan_folder(str(clean)), DatasetConfig(resolution=256))
    assert stats.warnings == []


def test_content_hash_tracks_what_is_encoded(tmp_path):
    pattern(200, 200, 1).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a cat")

    def key(config=DatasetConfig(resolution=128), folder=tmp_path):
        [item], _ = build_items(scan_folder(str(folder)), config)
        return item.content_hash

    base = key()
    assert key() == base
    assert key(DatasetConfig(resolution=128, default_repeats=5)) == base
    assert key(DatasetConfig(resolution=128, seed=7)) == base  # nothing random with one variant
    moved = tmp_path / "4_elsewhere"
    moved.mkdir()
    os.replace(tmp_path / "a.png", moved / "renamed.png")
    os.replace(tmp_path / "a.txt", moved / "renamed.txt")
    assert key(folder=moved) == base  # names and repeats are not part of the content
    assert key(DatasetConfig(resolution=192), moved) != base
    assert key(DatasetConfig(resolution=128, trigger_word="ohwx"), moved) != base
    flipped = key(DatasetConfig(resolution=128, flip=True, variants=2), moved)
    assert flipped != base
    assert key(DatasetConfig(resolution=128, rotation_degrees=5.0, variants=2), moved) != flipped
    assert key(DatasetConfig(resolution=128, flip=True, variants=2, seed=1), moved) != flipped
    (moved / "renamed.txt").write_text("a dog")
    assert key(folder=moved) != base

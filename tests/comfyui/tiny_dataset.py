"""The tiny training dataset the real-ComfyUI tests use: seeded coloured shapes with captions."""

from __future__ import annotations

from pathlib import Path

_COLORS = [
    ("red", (220, 40, 40)), ("green", (40, 180, 60)), ("blue", (40, 80, 220)), ("yellow", (230, 210, 40)),
    ("purple", (150, 50, 190)), ("orange", (240, 140, 30)), ("cyan", (40, 200, 210)), ("white", (245, 245, 245)),
]
_SHAPES = ["circle", "square", "triangle", "diamond", "ring", "cross", "stripes", "ellipse"]


def make_dataset(folder, n=8, size=64, seed=0) -> list:
    """Write ``n`` seeded PNG images (distinct coloured shapes on gradients) with .txt captions.

    Returns the list of image paths. Captions look like "a photo of sks object, red circle".
    """
    import random
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        cname, color = _COLORS[i % len(_COLORS)]
        shape = _SHAPES[(i + (i // len(_COLORS))) % len(_SHAPES)]
        bg_a = tuple(rng.randrange(0, 120) for _ in range(3))
        bg_b = tuple(rng.randrange(60, 200) for _ in range(3))
        img = Image.new("RGB", (size, size))
        px = img.load()
        horizontal = rng.random() < 0.5
        for y in range(size):
            for x in range(size):
                t = (x if horizontal else y) / max(1, size - 1)
                px[x, y] = tuple(int(a + (b - a) * t) for a, b in zip(bg_a, bg_b))
        d = ImageDraw.Draw(img)
        m = size // 8
        j = rng.randrange(-m // 2, m // 2 + 1)
        box = (m + j, m - j, size - m + j, size - m - j)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        r = (box[2] - box[0]) / 2
        if shape == "circle":
            d.ellipse(box, fill=color)
        elif shape == "square":
            d.rectangle(box, fill=color)
        elif shape == "triangle":
            d.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=color)
        elif shape == "diamond":
            d.polygon([(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)], fill=color)
        elif shape == "ring":
            d.ellipse(box, outline=color, width=max(2, size // 10))
        elif shape == "cross":
            w = max(2, size // 8)
            d.rectangle((cx - w, box[1], cx + w, box[3]), fill=color)
            d.rectangle((box[0], cy - w, box[2], cy + w), fill=color)
        elif shape == "stripes":
            w = max(2, size // 16)
            for k in range(0, size, 2 * w):
                d.rectangle((k, 0, k + w - 1, size), fill=color)
        else:  # ellipse
            d.ellipse((box[0], cy - r / 2, box[2], cy + r / 2), fill=color)
        name = f"img_{i:03d}"
        p = folder / f"{name}.png"
        img.save(p)
        (folder / f"{name}.txt").write_text(f"a photo of sks object, {cname} {shape}\n", encoding="utf-8")
        paths.append(p)
    return paths

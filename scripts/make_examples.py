"""Draw the example reference images in data/examples (run once; the PNGs are committed).

A consistent look: flat pastel "paper-cut" shapes with soft drop shadows, on a paper-grain
texture. Each scene holds several distinct concepts (objects, a background, a texture).
Deterministic: the same script always draws the same pixels.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

PALETTE = {
    "sky": (196, 222, 232),
    "sea": (120, 170, 196),
    "sun": (247, 196, 110),
    "grass": (156, 196, 140),
    "tree": (92, 150, 112),
    "trunk": (150, 110, 84),
    "red": (222, 116, 104),
    "cream": (246, 236, 214),
    "navy": (64, 84, 122),
    "pink": (236, 170, 178),
    "hill": (128, 176, 128),
    "sand": (232, 208, 160),
    "grey": (150, 150, 160),
    "yellow": (244, 220, 120),
}


def paper(size: tuple[int, int], color: tuple[int, int, int], seed: int) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", size, color)
    px = img.load()
    for y in range(size[1]):
        for x in range(size[0]):
            n = rng.randint(-7, 7)
            r, g, b = px[x, y]
            px[x, y] = (r + n, g + n, b + n)
    return img


def cut(base: Image.Image, draw_fn, color, shadow: int = 4) -> None:
    """Paste a flat shape with a blurred drop shadow: the paper-cut look."""
    mask = Image.new("L", base.size, 0)
    draw_fn(ImageDraw.Draw(mask))
    sh = mask.filter(ImageFilter.GaussianBlur(3)).point(lambda v: v * 0.35)
    base.paste((40, 40, 60), (shadow, shadow), sh)
    base.paste(color, (0, 0), mask)


def boat_lake() -> Image.Image:
    im = paper((384, 320), PALETTE["sky"], 1)
    cut(im, lambda d: d.ellipse((270, 30, 340, 100), fill=255), PALETTE["sun"])
    cut(im, lambda d: d.polygon([(0, 200), (90, 120), (190, 200)], fill=255), PALETTE["hill"])
    cut(im, lambda d: d.rectangle((0, 200, 384, 320), fill=255), PALETTE["sea"])
    for x in range(10, 384, 48):
        cut(im, lambda d, x=x: d.arc((x, 240, x + 30, 256), 180, 360, fill=255, width=3), PALETTE["cream"], 1)
    cut(im, lambda d: d.polygon([(140, 230), (260, 230), (240, 262), (160, 262)], fill=255), PALETTE["red"])
    cut(im, lambda d: d.polygon([(200, 140), (200, 225), (250, 225)], fill=255), PALETTE["cream"])
    cut(im, lambda d: d.rectangle((197, 135, 201, 230), fill=255), PALETTE["trunk"], 2)
    return im


def house_trees() -> Image.Image:
    im = paper((384, 384), PALETTE["cream"], 2)
    cut(im, lambda d: d.rectangle((0, 260, 384, 384), fill=255), PALETTE["grass"])
    cut(im, lambda d: d.rectangle((130, 170, 250, 270), fill=255), PALETTE["pink"])
    cut(im, lambda d: d.polygon([(115, 175), (190, 110), (265, 175)], fill=255), PALETTE["red"])
    cut(im, lambda d: d.rectangle((176, 220, 204, 270), fill=255), PALETTE["navy"], 2)
    cut(im, lambda d: d.rectangle((145, 190, 168, 212), fill=255), PALETTE["yellow"], 2)
    for cx in (50, 330):
        cut(im, lambda d, cx=cx: d.rectangle((cx - 6, 220, cx + 6, 275), fill=255), PALETTE["trunk"], 2)
        cut(im, lambda d, cx=cx: d.ellipse((cx - 40, 140, cx + 40, 235), fill=255), PALETTE["tree"])
    for x in range(20, 380, 60):
        cut(im, lambda d, x=x: d.ellipse((x, 330, x + 22, 352), fill=255), PALETTE["yellow"], 2)
    cut(im, lambda d: d.ellipse((40, 40, 140, 80), fill=255), (255, 255, 255))
    return im


def cat_flowers() -> Image.Image:
    im = paper((320, 384), PALETTE["sky"], 3)
    cut(im, lambda d: d.rectangle((0, 280, 320, 384), fill=255), PALETTE["sand"])
    cut(im, lambda d: d.ellipse((90, 170, 230, 300), fill=255), PALETTE["navy"])
    cut(im, lambda d: d.ellipse((115, 105, 205, 190), fill=255), PALETTE["navy"])
    cut(im, lambda d: d.polygon([(120, 130), (128, 80), (155, 112)], fill=255), PALETTE["navy"], 2)
    cut(im, lambda d: d.polygon([(200, 130), (192, 80), (165, 112)], fill=255), PALETTE["navy"], 2)
    cut(im, lambda d: d.ellipse((140, 135, 152, 147), fill=255), PALETTE["yellow"], 1)
    cut(im, lambda d: d.ellipse((168, 135, 180, 147), fill=255), PALETTE["yellow"], 1)
    for i, x in enumerate((30, 250, 280)):
        cut(im, lambda d, x=x: d.rectangle((x + 8, 250, x + 11, 330), fill=255), PALETTE["tree"], 1)
        col = PALETTE["red"] if i % 2 == 0 else PALETTE["pink"]
        cut(im, lambda d, x=x: d.ellipse((x - 4, 225, x + 24, 253), fill=255), col)
    return im


def lighthouse() -> Image.Image:
    im = paper((384, 320), PALETTE["navy"], 4)
    for sx, sy in ((40, 40), (120, 70), (300, 30), (350, 90), (200, 20)):
        cut(im, lambda d, sx=sx, sy=sy: d.ellipse((sx, sy, sx + 5, sy + 5), fill=255), PALETTE["cream"], 1)
    cut(im, lambda d: d.ellipse((60, 30, 110, 80), fill=255), PALETTE["yellow"])
    cut(im, lambda d: d.polygon([(220, 320), (260, 210), (384, 200), (384, 320)], fill=255), PALETTE["grey"])
    cut(im, lambda d: d.polygon([(290, 215), (300, 100), (330, 100), (340, 215)], fill=255), PALETTE["cream"])
    cut(im, lambda d: d.rectangle((296, 140, 336, 160), fill=255), PALETTE["red"], 2)
    cut(im, lambda d: d.polygon([(292, 100), (315, 75), (338, 100)], fill=255), PALETTE["red"], 2)
    cut(im, lambda d: d.rectangle((0, 250, 240, 320), fill=255), PALETTE["sea"])
    cut(im, lambda d: d.polygon([(60, 262), (140, 262), (125, 282), (75, 282)], fill=255), PALETTE["sun"])
    return im


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "data" / "examples"
    out.mkdir(parents=True, exist_ok=True)
    for name, fn in [
        ("boat_lake", boat_lake),
        ("house_trees", house_trees),
        ("cat_flowers", cat_flowers),
        ("lighthouse", lighthouse),
    ]:
        fn().save(out / f"{name}.png", optimize=True)


if __name__ == "__main__":
    main()

"""A procedural picture world whose truth is known: objects, colours, backgrounds and styles.

Every scene is drawn from a seed, deterministically, at any size. It comes with its content caption
("a red boat and a yellow sun over the sea"), one box per object (xyxy, in the drawn image's
pixels), its background label and its style label. Style textures are laid out on a period that is a
fixed fraction of the image side (1/16, at least 6 px: 6 px at the models' 64 px), so a concept cropped
from a 256 px reference and resized to 64 px still shows the texture, as a crop of a real reference does.

One style, `HELDOUT_STYLE`, is never shown to the world's base models: it is the style a user
teaches FineStyle from a few references. It is `duotone`: every colour moved onto one ink-to-paper
ramp by its lightness, object edges in the ink. Its signature is colour, not a texture, so it survives
the world VAE's round trip (a texture period of one latent pixel does not) and any crop's zoom
(`duotone_share` reads it analytically).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OBJECTS = (
    "boat", "house", "tree", "cat", "fish", "car", "flower", "lighthouse", "cup", "bird", "sun", "moon",
)  # fmt: skip
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "purple": (135, 50, 190),
    "pink": (245, 125, 190),
    "white": (248, 248, 248),
}
# name -> (phrase in captions, sky colour, ground colour, horizon as a fraction of the height)
BACKGROUNDS: dict[str, tuple[str, tuple[int, int, int], tuple[int, int, int], float]] = {
    "sea": ("over the sea", (160, 205, 240), (25, 70, 140), 0.45),
    "grass": ("on the grass", (185, 220, 245), (80, 150, 55), 0.45),
    "night sky": ("under the night sky", (18, 22, 60), (35, 35, 45), 0.8),
    "desert": ("in the desert", (250, 225, 175), (215, 170, 95), 0.5),
}
STYLES = ("flat", "outline", "mosaic", "halftone", "hatching", "watercolour", "duotone")
HELDOUT_STYLE = "duotone"
TRAINED_STYLES = tuple(s for s in STYLES if s != HELDOUT_STYLE)

# Fixed colours of the parts that are not the object's own colour.
_DARK = (35, 28, 28)
_BROWN = (110, 70, 40)
_LIGHT = (236, 232, 220)
_ROOF = (125, 40, 30)
_STEM = (30, 110, 40)
# width / height of each object's box
_ASPECT = {
    "boat": 1.3, "house": 1.0, "tree": 0.8, "cat": 0.9, "fish": 1.5, "car": 1.6, "flower": 0.7,
    "lighthouse": 0.5, "cup": 1.1, "bird": 1.3, "sun": 1.0, "moon": 1.0,
}  # fmt: skip


@dataclass(frozen=True)
class WorldObject:
    """One object of a scene: its kind, its colour and its box (fractions of the image side)."""

    name: str
    colour: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Scene:
    """What a picture shows, independent of its size: objects, background and style."""

    objects: tuple[WorldObject, ...]
    background: str
    style: str

    @property
    def caption(self) -> str:
        """The content caption, without the style: "a red boat and a yellow sun over the sea"."""
        return content_caption([(o.colour, o.name) for o in self.objects], self.background)

    def prompt(self, style: str | None = None) -> str:
        """The training text: "CONTENT, in STYLE style" (STYLE defaults to the scene's own)."""
        return f"{self.caption}, in {style or self.style} style"


def content_caption(objects: list[tuple[str, str]], background: str | None = None) -> str:
    """ "a red boat, a blue cat and a yellow sun over the sea" from (colour, name) pairs."""
    parts = [f"a {colour} {name}" for colour, name in objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if background:
        text += " " + BACKGROUNDS[background][0]
    return text


def world_words() -> list[str]:
    """Every word the world's captions and prompts use, in a fixed order."""
    words = ["a", "and", "in", "style", ","]
    words += list(OBJECTS) + list(COLOURS) + list(STYLES)
    for phrase, *_ in BACKGROUNDS.values():
        words += phrase.split()
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


def sample_scene(
    rng: random.Random,
    style: str | None = None,
    *,
    n_objects: int | None = None,
    objects: tuple[str, ...] = OBJECTS,
    styles: tuple[str, ...] = TRAINED_STYLES,
) -> Scene:
    """Draw 1-3 distinct objects with colours, boxes that barely overlap, a background and a style."""
    n = n_objects or rng.randint(1, 3)
    kinds = rng.sample(list(objects), n)
    placed: list[WorldObject] = []
    for kind in kinds:
        for _ in range(60):
            box = _sample_box(rng, kind)
            if all(_overlap(box, o.box) < 0.08 for o in placed):
                break
        placed.append(WorldObject(kind, rng.choice(list(COLOURS)), box))
    return Scene(tuple(placed), rng.choice(list(BACKGROUNDS)), style or rng.choice(list(styles)))


def sample_hard_scene(rng: random.Random, style: str) -> Scene:
    """What generated images show and clean scenes rarely do, for training the judge: one object filling
    70-90% of the frame (half the draws), or the same object drawn twice (the other half)."""
    kind, background = rng.choice(OBJECTS), rng.choice(list(BACKGROUNDS))
    if rng.random() < 0.5:
        box = _sample_box(rng, kind, (0.7, 0.9))
        return Scene((WorldObject(kind, rng.choice(list(COLOURS)), box),), background, style)
    placed: list[WorldObject] = []
    for _ in range(2):
        for _ in range(60):
            box = _sample_box(rng, kind, (0.3, 0.45))
            if all(_overlap(box, o.box) < 0.08 for o in placed):
                break
        placed.append(WorldObject(kind, rng.choice(list(COLOURS)), box))
    return Scene(tuple(placed), background, style)


def _sample_box(
    rng: random.Random, kind: str, sides: tuple[float, float] = (0.36, 0.6)
) -> tuple[float, float, float, float]:
    side = rng.uniform(*sides)
    aspect = _ASPECT[kind]
    w, h = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    x0, y0 = rng.uniform(0.02, 0.98 - w), rng.uniform(0.02, 0.98 - h)
    return (x0, y0, x0 + w, y0 + h)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over the smaller box's area."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / small


# --------------------------------------------------------------------------------------------
# drawing: each object is a list of parts in its unit box; a part is (shape, points, colour role)


def _parts(kind: str, main: tuple[int, int, int]) -> list[tuple[str, list[float], tuple[int, int, int]]]:
    accent = _DARK if main != COLOURS["yellow"] else _BROWN
    if kind == "boat":
        return [("poly", [0.48, 0.02, 0.53, 0.02, 0.53, 0.66, 0.48, 0.66], _DARK),
                ("poly", [0.53, 0.08, 0.53, 0.6, 0.92, 0.6], _LIGHT if main != COLOURS["white"] else _DARK),
                ("poly", [0.0, 0.62, 1.0, 0.62, 0.8, 1.0, 0.2, 1.0], main)]  # fmt: skip
    if kind == "house":
        return [("rect", [0.14, 0.44, 0.86, 1.0], main), ("poly", [0.02, 0.48, 0.5, 0.02, 0.98, 0.48], _ROOF),
                ("rect", [0.42, 0.68, 0.58, 1.0], _DARK), ("rect", [0.22, 0.56, 0.36, 0.7], _LIGHT)]  # fmt: skip
    if kind == "tree":
        return [("rect", [0.4, 0.55, 0.6, 1.0], _BROWN), ("ellipse", [0.05, 0.0, 0.95, 0.68], main)]
    if kind == "cat":
        return [("ellipse", [0.12, 0.45, 0.88, 1.0], main), ("poly", [0.28, 0.3, 0.33, 0.0, 0.5, 0.18], main),
                ("poly", [0.72, 0.3, 0.67, 0.0, 0.5, 0.18], main), ("ellipse", [0.26, 0.1, 0.74, 0.56], main),
                ("ellipse", [0.36, 0.26, 0.44, 0.34], accent), ("ellipse", [0.56, 0.26, 0.64, 0.34], accent)]  # fmt: skip
    if kind == "fish":
        return [("poly", [0.62, 0.5, 1.0, 0.1, 1.0, 0.9], main), ("ellipse", [0.0, 0.18, 0.74, 0.82], main),
                ("ellipse", [0.12, 0.36, 0.22, 0.48], accent)]  # fmt: skip
    if kind == "car":
        return [("poly", [0.2, 0.42, 0.3, 0.08, 0.7, 0.08, 0.8, 0.42], main), ("rect", [0.0, 0.4, 1.0, 0.8], main),
                ("rect", [0.34, 0.16, 0.66, 0.38], _LIGHT), ("ellipse", [0.1, 0.64, 0.38, 1.0], _DARK),
                ("ellipse", [0.62, 0.64, 0.9, 1.0], _DARK)]  # fmt: skip
    if kind == "flower":
        petals = []
        for k in range(5):
            a = 2 * math.pi * k / 5 - math.pi / 2
            cx, cy = 0.5 + 0.27 * math.cos(a), 0.3 + 0.19 * math.sin(a)
            petals.append(("ellipse", [cx - 0.22, cy - 0.15, cx + 0.22, cy + 0.15], main))
        centre = COLOURS["yellow"] if main != COLOURS["yellow"] else _BROWN
        return [
            ("rect", [0.45, 0.45, 0.55, 1.0], _STEM),
            *petals,
            ("ellipse", [0.36, 0.2, 0.64, 0.4], centre),
        ]
    if kind == "lighthouse":
        return [("poly", [0.22, 1.0, 0.34, 0.22, 0.66, 0.22, 0.78, 1.0], main),
                ("poly", [0.28, 0.6, 0.72, 0.6, 0.74, 0.74, 0.26, 0.74], _LIGHT if main != COLOURS["white"] else _ROOF),
                ("rect", [0.34, 0.08, 0.66, 0.22], (250, 235, 120)), ("poly", [0.28, 0.1, 0.5, 0.0, 0.72, 0.1], _DARK)]  # fmt: skip
    if kind == "cup":
        return [("ring", [0.56, 0.28, 1.0, 0.74], main), ("poly", [0.06, 0.12, 0.76, 0.12, 0.68, 1.0, 0.14, 1.0], main),
                ("rect", [0.06, 0.12, 0.76, 0.2], accent)]  # fmt: skip
    if kind == "bird":
        return [("ellipse", [0.16, 0.38, 0.8, 0.82], main), ("poly", [0.78, 0.5, 1.0, 0.58, 0.78, 0.66], (235, 130, 20)),
                ("poly", [0.3, 0.55, 0.46, 0.0, 0.62, 0.55], main), ("poly", [0.0, 0.5, 0.22, 0.58, 0.0, 0.7], main),
                ("ellipse", [0.62, 0.48, 0.7, 0.56], accent)]  # fmt: skip
    if kind == "sun":
        rays = []
        for k in range(8):
            a = 2 * math.pi * k / 8
            c, s = math.cos(a), math.sin(a)
            tip = (0.5 + 0.5 * c, 0.5 + 0.5 * s)
            lft = (0.5 + 0.3 * c - 0.1 * s, 0.5 + 0.3 * s + 0.1 * c)
            r = (0.5 + 0.3 * c + 0.1 * s, 0.5 + 0.3 * s - 0.1 * c)
            rays.append(("poly", [*lft, *tip, *r], main))
        return [*rays, ("ellipse", [0.2, 0.2, 0.8, 0.8], main)]
    if kind == "moon":
        return [("crescent", [0.08, 0.08, 0.92, 0.92], main)]
    raise ValueError(f"unknown object {kind!r}")


def _draw_part(
    draw: ImageDraw.ImageDraw, shape: str, pts: list[float], box: tuple[float, ...], fill: int
) -> None:
    x0, y0, x1, y1 = box
    xy = [(x0 + pts[i] * (x1 - x0), y0 + pts[i + 1] * (y1 - y0)) for i in range(0, len(pts), 2)]
    if shape == "poly":
        draw.polygon(xy, fill=fill)
    elif shape == "rect":
        draw.rectangle(xy, fill=fill)
    elif shape == "ellipse":
        draw.ellipse(xy, fill=fill)
    elif shape == "ring":
        draw.ellipse(xy, outline=fill, width=max(2, round(0.12 * (x1 - x0))))
    elif shape == "crescent":
        draw.ellipse(xy, fill=fill)
        (a, b), (c, d) = xy
        dx, dy = 0.32 * (c - a), -0.14 * (d - b)
        draw.ellipse([(a + dx, b + dy), (c + dx, d + dy)], fill=0)


def _layout(scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int]]]:
    """Flat colours, a region id per pixel (0 sky, 1 ground, 2.. object parts) and exact object boxes."""
    _, sky, ground, horizon = BACKGROUNDS[scene.background]
    regions = np.zeros((size, size), np.int32)
    regions[int(round(horizon * size)) :, :] = 1
    palette: list[tuple[int, int, int]] = [sky, ground]
    boxes = []
    for obj in scene.objects:
        box = tuple(v * size for v in obj.box)
        obj_mask = np.zeros((size, size), bool)
        for shape, pts, colour in _parts(obj.name, COLOURS[obj.colour]):
            layer = Image.new("L", (size, size), 0)
            _draw_part(ImageDraw.Draw(layer), shape, pts, box, 255)
            m = np.asarray(layer) > 127
            regions[m] = len(palette)
            palette.append(colour)
            obj_mask |= m
        ys, xs = np.nonzero(obj_mask)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    rgb = np.asarray(palette, np.float32)[regions]
    return rgb, regions, boxes


# --------------------------------------------------------------------------------------------
# styles: each maps flat colours + regions to the styled picture; periods scale with the image side


def _period(size: int) -> int:
    return max(6, round(size / 16))


def _edges(regions: np.ndarray) -> np.ndarray:
    """One-pixel boundaries of the object regions, drawn on the object's side."""
    obj = regions >= 2
    e = np.zeros(regions.shape, bool)
    e[:, 1:] |= regions[:, 1:] != regions[:, :-1]
    e[:, :-1] |= regions[:, :-1] != regions[:, 1:]
    e[1:, :] |= regions[1:, :] != regions[:-1, :]
    e[:-1, :] |= regions[:-1, :] != regions[1:, :]
    return e & obj


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    if r <= 0:
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * r + 1))
    return np.asarray(img) > 127


def _style_outline(rgb: np.ndarray, regions: np.ndarray) -> np.ndarray:
    size = rgb.shape[0]
    line = _dilate(_edges(regions), max(0, round((size / 64 - 1) / 2)))
    out = rgb.copy()
    out[line] = (15, 15, 15)
    return out


def _style_mosaic(rgb: np.ndarray, regions: np.ndarray) -> np.ndarray:
    size, p = rgb.shape[0], _period(rgb.shape[0])
    n = -(-size // p)
    out = np.empty_like(rgb)
    jitter = np.random.default_rng(7).uniform(0.85, 1.12, (n, n))
    grout = max(1, round(p / 4))
    for i in range(n):
        for j in range(n):
            cell = rgb[i * p : (i + 1) * p, j * p : (j + 1) * p]
            colour = np.clip(
                cell[p // 2 : p // 2 + 1, p // 2 : p // 2 + 1].reshape(-1, 3)[0] * jitter[i, j], 0, 255
            )
            out[i * p : (i + 1) * p, j * p : (j + 1) * p] = colour
    yy, xx = np.mgrid[0:size, 0:size]
    joint = ((yy % p) < grout) | ((xx % p) < grout)
    out[joint] *= 0.5  # dark grout in the tile's own hue keeps the colours readable
    return out


def _style_halftone(rgb: np.ndarray, regions: np.ndarray) -> np.ndarray:
    size, p = rgb.shape[0], _period(rgb.shape[0])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = (yy // p) * p + p / 2, (xx // p) * p + p / 2
    centre = rgb[np.clip(cy.astype(int), 0, size - 1), np.clip(cx.astype(int), 0, size - 1)]
    lum = centre @ np.array([0.299, 0.587, 0.114], np.float32) / 255
    radius = p * (0.4 + 0.15 * (1 - lum))
    dot = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= radius**2
    out = np.empty_like(rgb)
    out[:] = (250, 246, 232)
    out[dot] = centre[dot]
    return out


def _style_hatching(rgb: np.ndarray, regions: np.ndarray) -> np.ndarray:
    size = rgb.shape[0]
    p = round(_period(size) * 1.5)  # diagonal: the stripes' spacing across them is p / sqrt(2)
    yy, xx = np.mgrid[0:size, 0:size]
    stripe = ((xx + yy) % p) < (p / 2)
    light = rgb * 0.55 + 255 * 0.45
    return np.where(stripe[..., None], rgb * 0.6, light)


def _style_watercolour(rgb: np.ndarray, regions: np.ndarray) -> np.ndarray:
    size = rgb.shape[0]
    r = size / 64
    soft = np.asarray(
        Image.fromarray(rgb.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0 * r)), np.float32
    )
    grain_rng = np.random.default_rng(11)
    low = grain_rng.uniform(0.88, 1.07, (9, 9)).astype(np.float32)
    low = np.asarray(Image.fromarray(low, mode="F").resize((size, size), Image.BICUBIC))
    wash = soft * 0.7 + 255 * 0.3  # pigment thinned on white paper
    wash *= low[..., None]
    rim = _dilate(_edges(regions), max(1, round(0.8 * r)))
    rim = (
        np.asarray(
            Image.fromarray(rim.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(r)), np.float32
        )
        / 255
    )
    return wash * (1 - 0.35 * rim[..., None])


DUOTONE_INK = (46, 28, 120)
"""The duotone ramp's dark end (indigo ink)."""
DUOTONE_PAPER = (255, 196, 150)
"""The duotone ramp's light end (peach paper)."""


def _style_duotone(rgb: np.ndarray, regions: np.ndarray) -> np.ndarray:
    size = rgb.shape[0]
    lum = rgb @ np.array([0.299, 0.587, 0.114], np.float32) / 255
    t = np.clip((lum - 0.08) / 0.84, 0, 1)[..., None]  # stretched: the darkest parts print as ink
    ink, paper = np.array(DUOTONE_INK, np.float32), np.array(DUOTONE_PAPER, np.float32)
    out = ink + t * (paper - ink)
    out[_dilate(_edges(regions), max(0, round((size / 64 - 1) / 2)))] = ink
    return out


def duotone_share(images: np.ndarray, tolerance: float = 30.0) -> np.ndarray:
    """Per image (uint8 (n, h, w, 3)): the share of pixels within `tolerance` (0-255 RGB distance) of
    the duotone ramp. The held-out style reads near 1, every other style far below (`world check`
    gates both, on VAE round trips and on base generations)."""
    x = np.asarray(images, np.float32).reshape(len(images), -1, 3)
    ink, paper = np.array(DUOTONE_INK, np.float32), np.array(DUOTONE_PAPER, np.float32)
    d = paper - ink
    t = np.clip(((x - ink) @ d) / float(d @ d), 0, 1)
    dist = np.linalg.norm(x - (ink + t[..., None] * d), axis=-1)
    return (dist <= tolerance).mean(axis=1)


_STYLE_FN = {
    "flat": lambda rgb, regions: rgb,
    "outline": _style_outline,
    "mosaic": _style_mosaic,
    "halftone": _style_halftone,
    "hatching": _style_hatching,
    "watercolour": _style_watercolour,
    "duotone": _style_duotone,
}


@dataclass
class Render:
    """A drawn scene: the picture and its truth, in that picture's pixels."""

    image: Image.Image
    scene: Scene
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)

    def labels(self, file_name: str) -> dict:
        """One `labels.jsonl` line: file_name, caption, objects (name, colour, bbox), background, style."""
        return {
            "file_name": file_name,
            "caption": self.scene.caption,
            "objects": [
                {"name": o.name, "colour": o.colour, "bbox": list(b)}
                for o, b in zip(self.scene.objects, self.boxes, strict=False)
            ],
            "background": self.scene.background,
            "style": self.scene.style,
        }


def render(scene: Scene, size: int = 64) -> Render:
    """Draw `scene` at `size`×`size` pixels in its style."""
    if size < 32:
        raise ValueError(f"size: {size} is too small; the world draws at 32 px or more")
    rgb, regions, boxes = _layout(scene, size)
    styled = _STYLE_FN[scene.style](rgb, regions)
    image = Image.fromarray(np.clip(styled, 0, 255).round().astype(np.uint8), "RGB")
    return Render(image, scene, boxes)


def render_seed(seed: int, size: int = 64, style: str | None = None, **kw) -> Render:
    """The scene of one seed, drawn: the same seed always gives the same pixels and labels."""
    return render(sample_scene(random.Random(seed), style, **kw), size)

"""Sizes and boxes shared by the stages."""

from __future__ import annotations

import math

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1/y1 exclusive), pixels

# Aspect buckets: sides in multiples of the VAE factor (8 px for SD 1.x/2.x and SDXL), area within
# these bounds of resolution², aspect at most this far from square.
BUCKET_AREA = (0.6, 1.25)
BUCKET_MAX_ASPECT = 4.0


def fit_size(size: tuple[int, int], resolution: int, multiple: int = 64) -> tuple[int, int]:
    """Width/height with area ≈ resolution² keeping the aspect ratio, in multiples of `multiple`."""
    w, h = size
    scale = math.sqrt(resolution * resolution / (w * h))
    return (
        max(multiple, int(round(w * scale / multiple)) * multiple),
        max(multiple, int(round(h * scale / multiple)) * multiple),
    )


def bucket_size(size: tuple[int, int], resolution: int, step: int = 8) -> tuple[int, int]:
    """The training bucket of an image: (w, h) in multiples of `step` (the VAE factor) whose aspect is
    nearest the image's, among sizes with area within BUCKET_AREA of resolution².

    Nearest aspect, not nearest area: a centre crop to the bucket then cuts as little of the image as
    the step allows (a 64 px run in 64 px steps turned every crop under 2.25:1 square).
    """
    w, h = size
    aspect = min(max(w / h, 1 / BUCKET_MAX_ASPECT), BUCKET_MAX_ASPECT)
    area = resolution * resolution
    cands = []
    for bw in range(step, int(resolution * math.sqrt(BUCKET_MAX_ASPECT * BUCKET_AREA[1])) + step, step):
        ideal = bw / aspect / step  # the height of this width's exact aspect, in steps
        for bh in {max(1, math.floor(ideal)) * step, max(1, math.ceil(ideal)) * step}:
            if BUCKET_AREA[0] * area <= bw * bh <= BUCKET_AREA[1] * area:
                cands.append((abs(math.log(bw / bh / aspect)), abs(bw * bh - area), (bw, bh)))
    if not cands:
        return fit_size(size, resolution, step)
    # the nearest aspect, and among sizes within 1% of it, the area nearest resolution²
    best = min(c[0] for c in cands)
    return min((c[1], c[2]) for c in cands if c[0] <= best + 0.01)[1]


def centre_crop_share(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[float, float]:
    """The share of an image's width and height that a cover-resize and centre crop to `bucket` keeps."""
    w, h = size
    scale = max(bucket[0] / w, bucket[1] / h)
    return min(1.0, bucket[0] / (w * scale)), min(1.0, bucket[1] / (h * scale))


def box_kept_share(row_size: tuple[int, int], box: Box, bucket: tuple[int, int]) -> float:
    """The share of a box (in the row image's pixels) inside the centre crop to `bucket`."""
    w, h = row_size
    kw, kh = centre_crop_share(row_size, bucket)
    cx0, cx1 = w * (1 - kw) / 2, w * (1 + kw) / 2
    cy0, cy1 = h * (1 - kh) / 2, h * (1 + kh) / 2
    x0, y0, x1, y1 = box
    inter = max(0.0, min(x1, cx1) - max(x0, cx0)) * max(0.0, min(y1, cy1) - max(y0, cy0))
    return inter / max(1e-9, (x1 - x0) * (y1 - y0))


def context_crop(
    box: Box,
    image_size: tuple[int, int],
    *,
    margin: float = 0.0,
    share: float = 1.0,
    min_side: float = 0.0,
) -> Box:
    """The region to cut around a concept's box, inside the image.

    Each side is the box's plus `margin` (a fraction of the box) on both ends, at least the box's
    side / `share` (the concept fills at most that share of the crop's side), and at least
    `min_side`; the region is centred on the box and shifted, not shrunk, to stay inside the image
    (only an image smaller than the region clips it).
    """
    w, h = image_size
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    sw = max(bw * (1 + 2 * margin), bw / share, min_side)
    sh = max(bh * (1 + 2 * margin), bh / share, min_side)
    sw, sh = min(sw, w), min(sh, h)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    nx0 = min(max(0.0, cx - sw / 2), w - sw)
    ny0 = min(max(0.0, cy - sh / 2), h - sh)
    return (
        int(math.floor(nx0)),
        int(math.floor(ny0)),
        min(w, int(math.ceil(nx0 + sw))),
        min(h, int(math.ceil(ny0 + sh))),
    )

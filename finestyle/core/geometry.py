"""Sizes and boxes shared by the stages."""

from __future__ import annotations

import math


def fit_size(size: tuple[int, int], resolution: int, multiple: int = 64) -> tuple[int, int]:
    """Width/height with area ≈ resolution² keeping the aspect ratio, in multiples of `multiple`."""
    w, h = size
    scale = math.sqrt(resolution * resolution / (w * h))
    return (
        max(multiple, int(round(w * scale / multiple)) * multiple),
        max(multiple, int(round(h * scale / multiple)) * multiple),
    )

"""Safe ingestion of user images: discovery, decoding limits, orientation, mode normalisation.

A real folder of user images holds debris, broken files and odd modes. Each problem becomes one
`Rejected` entry (path, reason, exception class); nothing is half-loaded and nothing is silently
dropped.

Policies (documented here and in the README):
- Pixel limit: the header's width×height is checked against `max_pixels` *before* decoding, and
  Pillow's DecompressionBombWarning is raised as an error.
- Truncated files are rejected (Pillow's LOAD_TRUNCATED_IMAGES is never turned on).
- EXIF orientation is applied.
- Alpha (RGBA, LA, PA, palette transparency) is composited on white, not dropped.
- 16-bit and 32-bit integer images are scaled by their bit depth, not clipped; float images are
  scaled from [0, 1].
- CMYK, YCbCr, LAB, palette and 1-bit images are converted to RGB.
- Animated files (GIF, WebP, APNG): `first` frame only (default) or `skip` the file.
- Identical images (same decoded pixels) are used once; later copies are reported as duplicates.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEBRIS_NAMES = {"thumbs.db", "desktop.ini", ".ds_store", "icon\r"}
DEBRIS_SUFFIXES = ("~", ".swp", ".swo", ".tmp", ".part", ".crdownload", ".bak")
DEBRIS_DIRS = {"__macosx", ".git", ".svn", "@eadir", ".thumbnails", "__pycache__"}


@dataclass
class Rejected:
    """One input that was not used, and why."""

    path: str
    reason: str
    error: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"path": self.path, "reason": self.reason, "error": self.error}


@dataclass
class LoadedImage:
    """A decoded, normalised RGB reference image."""

    path: str
    image: Image.Image
    sha256: str
    """sha256 of the decoded RGB pixels (plus size): identical pictures share it."""
    notes: list[str] = field(default_factory=list)


class ImageRejected(Exception):
    """Raised by `load_image`; carries a user-facing reason."""

    def __init__(self, reason: str, error: BaseException | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = type(error).__name__ if error is not None else "ImageRejected"


def _is_debris(p: Path) -> str | None:
    low = p.name.lower()
    if any(part.lower() in DEBRIS_DIRS for part in p.parts[:-1]):
        return "inside an OS/VCS metadata folder"
    if p.name.startswith("._"):
        return "macOS resource-fork file"
    if p.name.startswith("."):
        return "hidden file"
    if low in DEBRIS_NAMES or low.endswith(DEBRIS_SUFFIXES):
        return "editor or OS debris"
    return None


def discover(inputs: list[str]) -> tuple[list[Path], list[Rejected]]:
    """Expand files, folders (recursive) and globs into candidate image paths.

    Returns (candidates in a stable sorted order, skipped entries with reasons). A file given
    explicitly is a candidate whatever its extension (decoding decides); inside folders only known
    image extensions are candidates, the rest is reported as skipped.
    """
    candidates: list[Path] = []
    skipped: list[Rejected] = []
    seen: set[Path] = set()

    def add(p: Path, explicit: bool) -> None:
        rp = p.resolve()
        if rp in seen:
            return
        seen.add(rp)
        why = None if explicit else _is_debris(p)
        if why:
            skipped.append(Rejected(str(p), why, "NotACandidate"))
        elif not explicit and p.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(
                Rejected(str(p), f"not an image file extension ({p.suffix or 'none'})", "NotACandidate")
            )
        else:
            candidates.append(p)

    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file():
                    add(f, explicit=False)
        elif p.is_file():
            add(p, explicit=True)
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not matches:
                skipped.append(Rejected(item, "glob matched no files", "FileNotFoundError"))
            for m in matches:
                if Path(m).is_file():
                    add(Path(m), explicit=False)
        else:
            skipped.append(Rejected(item, "no such file or folder", "FileNotFoundError"))
    return candidates, skipped


def _to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Normalise any Pillow mode to 8-bit RGB without clipping high bit depths or dropping alpha."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.float64)
        depth_max = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "I" and arr.max(initial=0) > 65535:
            depth_max = float(2**31 - 1)
        arr = np.clip(np.round(arr / depth_max * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im).astype(np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode == "RGB":
        return im
    return im.convert("RGB")  # CMYK, YCbCr, LAB, P, L, 1, HSV


def pixel_hash(im: Image.Image) -> str:
    h = hashlib.sha256(f"{im.size}".encode())
    h.update(im.tobytes())
    return h.hexdigest()


def load_image(
    path: str | os.PathLike, max_pixels: int = 40_000_000, min_side: int = 64, animated: str = "first"
) -> LoadedImage:
    """Decode one image safely into RGB, or raise ImageRejected with the reason."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImageRejected(f"cannot read file: {exc.strerror or exc}", exc) from exc
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise ImageRejected("not an image Pillow can decode", exc) from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected(f"decompression bomb: {exc}", exc) from exc
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-file rejection
            raise ImageRejected(f"cannot open image: {exc}", exc) from exc
        w, h = im.size
        if w * h > max_pixels:
            raise ImageRejected(
                f"too many pixels: {w}x{h} = {w * h:,} > limit {max_pixels:,} "
                "(raise prepare.max_pixels if you trust this file)"
            )
        n_frames = getattr(im, "n_frames", 1)
        if getattr(im, "is_animated", False) and n_frames > 1:
            if animated == "skip":
                raise ImageRejected(f"animated image ({n_frames} frames) and prepare.animated=skip")
            im.seek(0)
            notes.append(f"animated ({n_frames} frames): first frame used")
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected(f"decompression bomb: {exc}", exc) from exc
        except OSError as exc:
            raise ImageRejected(f"truncated or corrupt image data: {exc}", exc) from exc
        except Exception as exc:  # noqa: BLE001
            raise ImageRejected(f"cannot decode image: {exc}", exc) from exc
        try:
            orientation = im.getexif().get(0x0112, 1)
            oriented = ImageOps.exif_transpose(im)
            if orientation not in (1, None):
                notes.append(f"EXIF orientation {orientation} applied")
            im = oriented if oriented is not None else im
        except Exception as exc:  # noqa: BLE001 - broken EXIF: keep pixels, note it
            notes.append(f"EXIF orientation unreadable ({type(exc).__name__}); used as stored")
        if im.mode != "RGB":
            notes.append(f"mode {im.mode} converted to RGB")
        rgb = _to_rgb(im)
    if min(rgb.size) < min_side:
        raise ImageRejected(
            f"too small: {rgb.size[0]}x{rgb.size[1]}; the shorter side must be at least "
            f"{min_side} px to crop concepts from (prepare.min_image_side)"
        )
    return LoadedImage(path=str(p), image=rgb, sha256=pixel_hash(rgb), notes=notes)


def load_all(
    paths: list[Path], max_pixels: int, min_side: int, animated: str, log=print
) -> tuple[list[LoadedImage], list[Rejected]]:
    """Load every candidate; reject bad ones and duplicates, each with one console line."""
    good: list[LoadedImage] = []
    bad: list[Rejected] = []
    by_hash: dict[str, str] = {}
    for p in paths:
        try:
            li = load_image(p, max_pixels=max_pixels, min_side=min_side, animated=animated)
        except ImageRejected as exc:
            bad.append(Rejected(str(p), exc.reason, exc.error))
            log(f"skipped {p}: {exc.reason}")
            continue
        if li.sha256 in by_hash:
            bad.append(
                Rejected(
                    str(p), f"duplicate of {by_hash[li.sha256]} (same pixels); used once", "DuplicateImage"
                )
            )
            log(f"skipped {p}: duplicate of {by_hash[li.sha256]}")
            continue
        by_hash[li.sha256] = str(p)
        good.append(li)
    return good, bad

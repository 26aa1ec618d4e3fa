"""Batches of world renders as arrays, cached on disk so training runs do not redraw them."""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from finestyle.core.errors import UserError

from .scene import (
    BACKGROUNDS,
    HELDOUT_STYLE,
    OBJECTS,
    STYLES,
    Render,
    render,
    render_seed,
    sample_hard_scene,
    sample_scene,
)

# Label vector of the judge: object presence, then background, then style.
JUDGE_LABELS = (
    [f"object:{o}" for o in OBJECTS]
    + [f"background:{b}" for b in BACKGROUNDS]
    + [f"style:{s}" for s in STYLES]
)
OBJECT_SLICE = slice(0, len(OBJECTS))
BACKGROUND_SLICE = slice(len(OBJECTS), len(OBJECTS) + len(BACKGROUNDS))
STYLE_SLICE = slice(len(OBJECTS) + len(BACKGROUNDS), len(JUDGE_LABELS))


def label_vector(r: Render) -> np.ndarray:
    """Multi-hot judge targets of one render."""
    y = np.zeros(len(JUDGE_LABELS), np.float32)
    for o in r.scene.objects:
        y[OBJECTS.index(o.name)] = 1
    y[BACKGROUND_SLICE.start + list(BACKGROUNDS).index(r.scene.background)] = 1
    y[STYLE_SLICE.start + STYLES.index(r.scene.style)] = 1
    return y


def render_set(
    first_seed: int,
    n: int,
    size: int = 64,
    styles: tuple[str, ...] = STYLES,
    cache: Path | None = None,
    hard: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`n` renders from consecutive seeds: uint8 images (n, size, size, 3), judge labels, prompts.

    Seed k draws its style as `styles[k % len(styles)]`, so every style has the same share. `hard`:
    scenes of `sample_hard_scene` (one object filling the frame, or one object drawn twice).
    """
    key = f"world{'-hard' if hard else ''}-{first_seed}-{n}-{size}-{'_'.join(styles)}.npz"
    if cache is not None and (cache / key).exists():
        z = np.load(cache / key, allow_pickle=False)
        return z["images"], z["labels"], [str(t) for t in z["prompts"]]
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n, len(JUDGE_LABELS)), np.float32)
    prompts = []
    for i in range(n):
        seed = first_seed + i
        style = styles[seed % len(styles)]
        r = (
            render(sample_hard_scene(random.Random(seed), style), size)
            if hard
            else render_seed(seed, size, style)
        )
        images[i] = np.asarray(r.image)
        labels[i] = label_vector(r)
        prompts.append(r.scene.prompt())
    if cache is not None:
        save_npz(cache / key, images=images, labels=labels, prompts=np.array(prompts))
    return images, labels, prompts


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write arrays to `path` atomically (a temp file beside it, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def render_folder(out: str | Path, n: int, size: int = 64, style: str | None = None, seed: int = 0) -> Path:
    """Write `n` scenes as PNGs plus `labels.jsonl` (one truth line per image) into `out`, atomically.

    `style` is a style name, `heldout` for the held-out style, or None for each seed's own style.
    """
    if style == "heldout":
        style = HELDOUT_STYLE
    if style is not None and style not in STYLES:
        raise UserError(f"--style: {style!r} is not a world style; use one of {', '.join(STYLES)} or heldout")
    if n < 1:
        raise UserError("--n: must be at least 1")
    if size < 32:
        raise UserError(f"--size: {size} is too small; the world draws at 32 px or more")
    return _write_renders(
        out, [(f"world-{seed + i:07d}.png", render_seed(seed + i, size, style)) for i in range(n)]
    )


def _write_renders(out: str | Path, renders: list[tuple[str, Render]]) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Drawn into a hidden folder beside the output, then each file renamed into place: other files in
    # `out` are kept, and an interrupted run leaves no half-written image or labels.
    with tempfile.TemporaryDirectory(prefix=".world-render-", dir=out) as d:
        tmp, lines = Path(d), []
        for name, r in renders:
            r.image.save(tmp / name)
            lines.append(json.dumps(r.labels(name)))
        (tmp / "labels.jsonl").write_text("\n".join(lines) + "\n")
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    return out


def render_reference_set(out: str | Path, seed: int, size: int = 256, style: str = HELDOUT_STYLE) -> Path:
    """One reference set of the verdict protocol, drawn from `seed`: 1-3 scenes in `style`, all on one
    background (the set's distinctive background), each with 2-3 objects; PNGs plus `labels.jsonl`."""
    rng = random.Random(seed)
    n, background = rng.randint(1, 3), rng.choice(list(BACKGROUNDS))
    renders = []
    for i in range(n):
        scene = sample_scene(random.Random(f"{seed}-{i}"), style, n_objects=rng.randint(2, 3))
        renders.append((f"set-{seed}-{i}.png", render(replace(scene, background=background), size)))
    return _write_renders(out, renders)

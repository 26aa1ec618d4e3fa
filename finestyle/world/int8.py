"""The int8 guard on the world builtins: does quantizing the UNet change what the picture shows?

The image guard (`finestyle.export.quantize`) bounds the pixel difference on 4 seeds; on an export of
`builtin:world-sd` the world's judge can also say whether the int8 UNet still draws the object asked
for and in the style asked for. The same JUDGED_IMAGES prompts and seeds are generated with the int8
UNet and at the export's own float precision (bf16 where the CPU has bf16 units and the export's bf16
check passed, else fp32); prompt fidelity (the judge finds the object) and style fidelity (the judge's
style is the one asked for) must each be within JUDGED_ATOL of the float figures.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from finestyle.core.builtins import builtin_folder
from finestyle.core.errors import ModelLoadError
from finestyle.core.loading import load_judge
from finestyle.runtime.generate import GenerationRequest, generate_batch
from finestyle.runtime.onnx_backends import openvino_backend
from finestyle.runtime.openvino import hardware_precision, ov_checks

from .judge import judge_probs, read
from .scene import COLOURS, OBJECTS, STYLES, TRAINED_STYLES

WORLD_BASE = "builtin:world-sd"
JUDGED_IMAGES = 64
JUDGED_ATOL = 0.03
FIRST_SEED = 20_000_000  # far from the world's training seeds and from `world check`'s
CALIBRATION_SEED = 21_000_000  # calibration prompts: drawn apart from the judged ones
BATCH = 16


def applies(manifest: dict[str, Any]) -> bool:
    """An export of the world's SD model, with the world's judge installed."""
    if manifest.get("base_model") != WORLD_BASE:
        return False
    try:
        builtin_folder("builtin:world-judge")
    except ModelLoadError:
        return False
    return True


def float_precision(manifest: dict[str, Any]) -> str:
    """The precision `--dtype auto` runs without int8: the CPU's bf16 where its check passed."""
    hw = hardware_precision()
    return hw if hw != "fp32" and (ov_checks(manifest).get(hw) or {}).get("pass") else "fp32"


def judged_prompts(manifest: dict[str, Any], n: int, seed: int = FIRST_SEED) -> list[tuple[str, str, str]]:
    """(colour, object, style) per image: the export's style where the world knows it, else the
    trained styles in turn; colours and objects drawn from `seed`."""
    style = manifest.get("style")
    styles = (style,) if style in STYLES else TRAINED_STYLES
    rng = random.Random(seed)
    return [(rng.choice(list(COLOURS)), rng.choice(OBJECTS), styles[i % len(styles)]) for i in range(n)]


def calibration_prompts(manifest: dict[str, Any], n: int) -> list[str]:
    """int8 calibration on a world export: the world's own prompts (its tokenizer knows only world
    words), drawn apart from the judged ones."""
    return [f"a {c} {o}, in {s} style" for c, o, s in judged_prompts(manifest, n, CALIBRATION_SEED)]


def fidelity(images: list[Any], asked: list[tuple[str, str, str]], judge: Any) -> dict[str, float]:
    readings = read(judge_probs(judge, images))
    return {
        "prompt": float(np.mean([o in r.objects for (_, o, _), r in zip(asked, readings, strict=True)])),
        "style": float(np.mean([s == r.style for (_, _, s), r in zip(asked, readings, strict=True)])),
    }


def judged_guard(
    export_dir: Path, manifest: dict[str, Any], files: dict[str, str], steps: int, n: int = JUDGED_IMAGES
) -> dict[str, Any]:
    """The judge's prompt and style fidelity with the int8 UNet and at the float precision."""
    asked = judged_prompts(manifest, n)
    reqs = [
        GenerationRequest(f"a {c} {o}, in {s} style", steps=steps, seed=FIRST_SEED + i)
        for i, (c, o, s) in enumerate(asked)
    ]
    judge = load_judge("builtin:world-judge")
    ref = float_precision(manifest)
    figures = {}
    for precision in (ref, "int8"):
        be = openvino_backend(export_dir, precision, manifest={"files": files}, files=files)
        images = [
            im for i in range(0, n, BATCH) for ims in generate_batch(be, reqs[i : i + BATCH]) for im in ims
        ]
        figures[precision] = fidelity(images, asked, judge)
    delta = {k: figures["int8"][k] - figures[ref][k] for k in ("prompt", "style")}
    return {
        "images": n,
        "steps": steps,
        "reference": ref,
        "int8": figures["int8"],
        ref: figures[ref],
        "delta": delta,
        "atol": JUDGED_ATOL,
        "pass": bool(all(abs(d) <= JUDGED_ATOL + 1e-9 for d in delta.values())),
        "judge": "builtin:world-judge",
    }

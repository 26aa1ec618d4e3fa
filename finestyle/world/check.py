"""`finestyle world check`: the world models' quality gates, measured on fresh seeds.

Every gate is measured the same way whether it passes or not; goals are fixed here and never
adjusted to the figures. Fresh seeds start at FRESH_SEED, far from the training seeds (0..n_train).
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finestyle.artifacts.adapter import ADAPTER_WEIGHTS, adapter_info
from finestyle.config import PrepareConfig, TrainConfig
from finestyle.core.env import cpu_name
from finestyle.core.models import load_captioner, load_judge, load_sd_pipeline
from finestyle.prepare.captioning import Captioner
from finestyle.prepare.concepts import iou
from finestyle.prepare.stage import run_prepare
from finestyle.train.loop import run_train

from .data import render_folder, render_set
from .judge import generate, judge_probs, read
from .scene import COLOURS, HELDOUT_STYLE, OBJECTS, STYLES, TRAINED_STYLES, duotone_share, render_seed

FRESH_SEED = 10_000_000


@dataclass
class Gate:
    """One measured gate: `value` against `goal` (at least, or at most when `at_most`)."""

    name: str
    value: float
    goal: float
    at_most: bool = False
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.value <= self.goal if self.at_most else self.value >= self.goal


@dataclass
class CheckSettings:
    """Sizes of the measurements (the defaults are the published gates' sizes)."""

    sd: str = "builtin:world-sd"
    blip: str = "builtin:world-blip"
    judge: str = "builtin:world-judge"
    n_judge: int = 1000
    n_sd: int = 200
    n_heldout: int = 100
    n_blip: int = 200
    n_localise: int = 50
    n_adapter: int = 60
    adapter_steps: int = 300
    adapter_lr: float = 1e-3
    """The world's 64 px models train at 1e-3 (the train stage's 1e-4 default is for SD-scale models)."""
    steps: int = 20
    vae: str = ""
    """The VAE of the `vae` gates (a diffusers AutoencoderKL folder); default: world-sd's own."""
    n_vae: int = 200
    only: list[str] = field(default_factory=list)


GROUPS = ("judge", "sd", "blip", "localise", "adapter", "vae")
DUOTONE_MIN_SHARE = 0.9
"""An image reads as the held-out duotone style when this share of its pixels lies on the ramp."""


def _log(msg: str) -> None:
    print(msg, flush=True)


def gate_judge(judge: Any, n: int) -> list[Gate]:
    """Object F1 and style accuracy of the judge on fresh renders of every style."""
    images, labels, _ = render_set(FRESH_SEED, n, 64, STYLES)
    probs = judge_probs(judge, images)
    obj_pred, obj_true = probs[:, : len(OBJECTS)] >= 0.5, labels[:, : len(OBJECTS)] > 0.5
    tp = float((obj_pred & obj_true).sum())
    f1 = 2 * tp / max(1.0, float(obj_pred.sum() + obj_true.sum()))
    style_true = np.argmax(labels[:, -len(STYLES) :], axis=1)
    acc = float((np.argmax(probs[:, -len(STYLES) :], axis=1) == style_true).mean())
    return [
        Gate("judge_objects_f1", f1, 0.95, detail=f"{n} renders"),
        Gate("judge_style_accuracy", acc, 0.95, detail=f"{n} renders"),
    ]


def object_prompts(n: int, styles: tuple[str, ...], seed: int) -> list[tuple[str, str, str]]:
    """(colour, object, style) triples drawn from `seed`: the prompts "a COLOUR OBJECT, in STYLE style"."""
    rng = random.Random(seed)
    return [(rng.choice(list(COLOURS)), rng.choice(OBJECTS), styles[i % len(styles)]) for i in range(n)]


def gate_sd(pipe: Any, judge: Any, s: CheckSettings) -> list[Gate]:
    """Prompt and style fidelity on trained styles; the held-out word stays unknown; judge false positives."""
    asked = object_prompts(s.n_sd, TRAINED_STYLES, FRESH_SEED)
    prompts = [f"a {c} {o}, in {st} style" for c, o, st in asked]
    seeds = list(range(FRESH_SEED, FRESH_SEED + len(prompts)))
    generated = generate(pipe, prompts, seeds, s.steps)
    readings = read(judge_probs(judge, generated))
    as_duotone = float(
        (duotone_share(np.stack([np.asarray(im) for im in generated])) >= DUOTONE_MIN_SHARE).mean()
    )
    found = np.mean([o in r.objects for (_, o, _), r in zip(asked, readings, strict=True)])
    styled = np.mean([st == r.style for (_, _, st), r in zip(asked, readings, strict=True)])
    extra = np.mean([bool(r.objects - {o}) for (_, o, _), r in zip(asked, readings, strict=True)])
    held = object_prompts(s.n_heldout, (HELDOUT_STYLE,), FRESH_SEED + 1)
    hp = [f"a {c} {o}, in {st} style" for c, o, st in held]
    hr = read(judge_probs(judge, generate(pipe, hp, seeds[: len(hp)], s.steps)))
    held_rate = np.mean([r.style == HELDOUT_STYLE for r in hr])
    return [
        Gate("sd_prompt_fidelity", float(found), 0.80, detail=f"{len(prompts)} images, {s.steps} DDIM steps"),
        Gate("sd_style_fidelity", float(styled), 0.80, detail=f"{len(prompts)} images"),
        Gate("sd_heldout_unknown", float(held_rate), 0.20, at_most=True, detail=f"{len(hp)} images"),
        Gate(
            "heldout_false_positives_generated",
            as_duotone,
            0.02,
            at_most=True,
            detail=f"{len(prompts)} base generations in trained styles read as the held-out style",
        ),
        Gate(
            "judge_false_positives_on_generated",
            float(extra),
            0.05,
            at_most=True,
            detail="images where the judge reports an object that was not asked for",
        ),
    ]


def reference_views(first_seed: int, n: int, style: str | None) -> np.ndarray:
    """What training sees of references drawn at 256 px: every other view the whole picture resized to
    64 px, the others one object cropped with a margin and resized (the crops' zoom)."""
    from PIL import Image

    out = []
    for i in range(n):
        r = render_seed(first_seed + i, 256, style or STYLES[i % len(STYLES)])
        im = r.image
        if i % 2:
            x0, y0, x1, y1 = r.boxes[i // 2 % len(r.boxes)]
            m = max(8, round(0.15 * max(x1 - x0, y1 - y0)))
            im = im.crop((max(0, x0 - m), max(0, y0 - m), min(256, x1 + m), min(256, y1 + m)))
        out.append(np.asarray(im.resize((64, 64), Image.BICUBIC)))
    return np.stack(out)


@torch.no_grad()
def vae_round_trip(vae: Any, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """uint8 images through the VAE (posterior mean) and back, as uint8."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        y = vae.decode(vae.encode(x.to(vae.device)).latent_dist.mean).sample.float().cpu()
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def gate_vae(vae: Any, n: int) -> list[Gate]:
    """The held-out style survives the VAE round trip and the crops' zoom; no other style reads as it."""
    held = duotone_share(vae_round_trip(vae, reference_views(FRESH_SEED + 9000, n, HELDOUT_STYLE)))
    others = [s for s in STYLES if s != HELDOUT_STYLE]
    views = np.concatenate([reference_views(FRESH_SEED + 9500 + 100 * k, max(1, n // len(others)), s) for k, s in enumerate(others)])  # fmt: skip
    other = duotone_share(vae_round_trip(vae, views))
    return [
        Gate(
            "heldout_survives_vae",
            float((held >= DUOTONE_MIN_SHARE).mean()),
            0.95,
            detail=f"{n} held-out views of 256 px references (whole and object crops) after a VAE round trip",
        ),
        Gate(
            "heldout_false_positives_renders",
            float((other >= DUOTONE_MIN_SHARE).mean()),
            0.02,
            at_most=True,
            detail=f"{len(views)} views of the other styles after a VAE round trip",
        ),
    ]


def caption_objects(caption: str) -> set[str]:
    words = caption.lower().replace(",", " ").split()
    return {o for o in OBJECTS if o in words}


def gate_blip(model: Any, processor: Any, n: int) -> list[Gate]:
    """Object recall and precision of the captioner's captions on fresh renders."""
    renders = [render_seed(FRESH_SEED + i, 64, STYLES[i % len(STYLES)]) for i in range(n)]
    captions = Captioner(model, processor).caption([r.image for r in renders])
    tp = pred = true = 0
    for r, cap in zip(renders, captions, strict=True):
        got, want = caption_objects(cap), {o.name for o in r.scene.objects}
        tp, pred, true = tp + len(got & want), pred + len(got), true + len(want)
    return [
        Gate("blip_object_recall", tp / max(1, true), 0.80, detail=f"{n} renders"),
        Gate("blip_object_precision", tp / max(1, pred), 0.80, detail=f"{n} renders"),
    ]


def _render_truth(folder: Path, first_seed: int, n: int, size: int, style: str | None) -> dict[str, dict]:
    """`world render` into `folder`; its labels.jsonl lines by file name (the truth prepare is scored on)."""
    render_folder(folder, n, size, style, first_seed)
    lines = (json.loads(x) for x in (folder / "labels.jsonl").read_text().splitlines() if x.strip())
    return {line["file_name"]: line for line in lines}


def gate_localisation(s: CheckSettings, work: Path) -> list[Gate]:
    """`prepare --concepts attention` on fresh 256 px renders: share of true objects found with IoU >= 0.5."""
    truth = _render_truth(work / "localise", FRESH_SEED + 5000, s.n_localise, 256, None)
    cfg = PrepareConfig(
        images=[str(work / "localise")],
        style="world",
        out=str(work / "localise-ds"),
        captioner=s.blip,
        base=s.sd,
        concepts="attention",
        resolution=64,
    )
    run_prepare(cfg, log=lambda m: None)
    report = json.loads((work / "localise-ds" / "report.json").read_text())
    hit = total = 0
    for item in report.get("images", []):
        for obj in truth.get(Path(item["source"]).name, {}).get("objects", []):
            total += 1
            found = [b for concept, b in item.get("boxes", {}).items() if obj["name"] in concept.split()]
            hit += any(iou(tuple(b), tuple(obj["bbox"])) >= 0.5 for b in found)
    return [
        Gate(
            "concept_localisation", hit / max(1, total), 0.60, detail=f"{total} objects, {len(truth)} renders"
        )
    ]


def gate_adapter(s: CheckSettings, judge: Any, work: Path) -> list[Gate]:
    """`finestyle train` (default K/V targets) on 3 held-out-style references; new objects in that style."""
    truth = _render_truth(work / "refs", FRESH_SEED + 7000, 3, 256, HELDOUT_STYLE)
    ref_objects = {o["name"] for line in truth.values() for o in line["objects"]}
    prep = PrepareConfig(
        images=[str(work / "refs")],
        style=HELDOUT_STYLE,
        out=str(work / "refs-ds"),
        captioner=s.blip,
        base=s.sd,
        concepts="attention",
        resolution=64,
    )
    run_prepare(prep, log=lambda m: None)
    train = TrainConfig(
        dataset=str(work / "refs-ds"),
        base=s.sd,
        out=str(work / "adapter"),
        resolution=64,
        steps=s.adapter_steps,
    )
    result = run_train(train, log=lambda m: None)
    pipe = load_sd_pipeline(s.sd, device="cpu", dtype="fp32")
    adapter = result.adapter
    weights = adapter_info(adapter).get("weight_name", ADAPTER_WEIGHTS)
    pipe.load_lora_weights(adapter, weight_name=weights, adapter_name="finestyle")
    new = [o for o in OBJECTS if o not in ref_objects]
    rng = random.Random(FRESH_SEED + 8000)
    asked = [(rng.choice(list(COLOURS)), new[i % len(new)]) for i in range(s.n_adapter)]
    prompts = [f"a {c} {o}, in {HELDOUT_STYLE} style" for c, o in asked]
    seeds_g = list(range(FRESH_SEED, FRESH_SEED + len(prompts)))
    readings = read(judge_probs(judge, generate(pipe, prompts, seeds_g, s.steps)))
    rate = float(np.mean([r.style == HELDOUT_STYLE for r in readings]))
    return [
        Gate(
            "adapter_learns_heldout_style",
            rate,
            0.70,
            detail=f"{len(prompts)} images of objects not in the 3 references, {s.adapter_steps} steps",
        )
    ]


def run_check(s: CheckSettings, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Measure every gate (or those named in `s.only`); the JSON report's dict."""
    want = set(s.only) or set(GROUPS)
    gates: list[Gate] = []
    t0 = time.time()
    loaded: dict[str, Any] = {}

    def judge() -> Any:  # loaded only for the groups that judge
        if "judge" not in loaded:
            loaded["judge"] = load_judge(s.judge, device="cpu")
        return loaded["judge"]

    with tempfile.TemporaryDirectory(prefix="finestyle-world-check-") as tmp:
        steps: list[tuple[str, Callable[[], list[Gate]]]] = [
            ("judge", lambda: gate_judge(judge(), s.n_judge)),
            ("sd", lambda: gate_sd(load_sd_pipeline(s.sd, device="cpu", dtype="fp32"), judge(), s)),
            ("blip", lambda: gate_blip(*load_captioner(s.blip, device="cpu", dtype="fp32"), s.n_blip)),
            ("localise", lambda: gate_localisation(s, Path(tmp))),
            ("adapter", lambda: gate_adapter(s, judge(), Path(tmp))),
            ("vae", lambda: gate_vae(load_world_vae(s), s.n_vae)),
        ]
        for name, fn in steps:
            if name in want:
                t = time.time()
                got = fn()
                gates += got
                log(
                    f"  measured {name} in {time.time() - t:.0f}s: "
                    + ", ".join(f"{g.name}={g.value:.3f}" for g in got)
                )
    return {
        "gates": {
            g.name: {
                "value": round(g.value, 4),
                "goal": g.goal,
                "pass": g.passed,
                "at_most": g.at_most,
                "detail": g.detail,
            }
            for g in gates
        },
        "passed": all(g.passed for g in gates),
        "cpu": cpu_name(),
        "seconds": round(time.time() - t0, 1),
        "models": {"sd": s.sd, "blip": s.blip, "judge": s.judge, "vae": s.vae or f"{s.sd} (its VAE)"},
    }


def load_world_vae(s: CheckSettings) -> Any:
    """`s.vae` (an AutoencoderKL folder, safetensors only), or the VAE of `s.sd`."""
    if not s.vae:
        return load_sd_pipeline(s.sd, device="cpu", dtype="fp32").vae
    from diffusers import AutoencoderKL

    from finestyle.core.errors import UserError

    if not (Path(s.vae) / "config.json").is_file():
        raise UserError(
            f"--vae {s.vae!r}: not a VAE folder (no config.json); pass RUN/model of `world train --model vae`"
        )
    return AutoencoderKL.from_pretrained(s.vae, use_safetensors=True).eval()


def format_table(report: dict[str, Any]) -> str:
    """The gate table as aligned text."""
    rows = [("gate", "value", "goal", "pass")]
    for name, g in report["gates"].items():
        rows.append(
            (
                name,
                f"{g['value']:.3f}",
                ("<= " if g["at_most"] else ">= ") + f"{g['goal']:.2f}",
                "yes" if g["pass"] else "NO",
            )
        )
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)

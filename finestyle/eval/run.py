"""`finestyle eval`: generate every prompt × seed, judge each image, and report the three axes.

- prompt fidelity: the judge finds what the prompt asks for;
- style fidelity: the judge sees the target style;
- leakage: with a CLIP judge, the share of images showing a concept of the references that the prompt
  does not name, with the adapter, MINUS the same share for the base model on the same prompts and
  seeds (0 when the adapter adds no reference content). With the world judge, per object and image:
  the rise of the references' objects shown unasked MINUS the rise of the control objects (world
  objects neither asked for nor in the references), so that an adapter drawing extra objects of every
  kind does not count as leaking the references. The raw rates are reported too.
- background leakage (world references with their `labels.jsonl` truth): prompts ask for another
  background; the share of images the judge reads as a reference background, tuned minus base.

The world judge's object thresholds are calibrated on base-model images at `calibration_seed`, seeds
apart from the test images'.

Images are cached under OUT/images by content key (model and adapter fingerprints, prompt, seed, steps,
guidance weights), so a re-run with the same inputs generates nothing again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from finestyle.artifacts.dataset import dataset_fingerprint, load_training_rows
from finestyle.config import EvalConfig
from finestyle.core.env import cpu_name, gpu_name, library_versions
from finestyle.core.errors import UserError
from finestyle.core.fs import hash_json, read_json, write_json
from finestyle.core.models import model_fingerprint, pick_device
from finestyle.core.tracking import parse_trackers
from finestyle.prepare.stage import common_root
from finestyle.runtime.generate import GenerationRequest, generate_batch, load_backend
from finestyle.world.scene import BACKGROUNDS, COLOURS, OBJECTS

from .judges import (
    ClipJudge,
    Scores,
    WorldJudge,
    background_leakage,
    check_judge_spec,
    leak_matrix,
    load_eval_judge,
    object_leakage,
)
from .prompts import Prompt, read_prompt_file, real_prompts, world_prompts
from .tracking import report_eval


def log_line(msg: str) -> None:
    """The eval stages' progress line (stdout, flushed)."""
    print(msg, flush=True)


def read_references(dataset: str | Path) -> dict[str, Any]:
    """The prepared dataset's style, concepts and images (what leakage is measured against)."""
    folder = Path(dataset)
    rep = folder / "report.json"
    if not rep.is_file():
        raise UserError(
            f"--references {str(folder)!r} holds no prepared dataset (no report.json); run "
            "`finestyle prepare IMAGES --out DIR` and pass DIR"
        )
    report = read_json(rep)
    concepts = sorted({c for img in report.get("images", []) for c in img.get("concepts", [])})
    rows = load_training_rows(folder)
    return {
        "style": report.get("config", {}).get("style", ""),
        "concepts": concepts,
        "images": [r["image"] for r in rows],
        "fingerprint": dataset_fingerprint(folder),
        "truth": read_truth(
            [
                str(Path(common_root(report.get("config", {}).get("images") or [])) / img.get("source", ""))
                for img in report.get("images", [])
            ]
        ),
    }


def read_truth(sources: list[str]) -> dict[str, list[str]] | None:
    """The references' true objects and backgrounds from the `labels.jsonl` that `finestyle world
    render` writes beside its images; None unless every source image has a line there."""
    objects, backgrounds, found = set(), set(), 0
    tables: dict[Path, dict[str, dict]] = {}
    for src in sources:
        path = Path(src)
        labels = path.parent / "labels.jsonl"
        if path.parent not in tables:
            lines = labels.read_text().splitlines() if labels.is_file() else []
            tables[path.parent] = {d["file_name"]: d for d in map(json.loads, filter(str.strip, lines))}
        line = tables[path.parent].get(path.name)
        if line:
            found += 1
            objects.update(o["name"] for o in line.get("objects", []))
            backgrounds.add(line.get("background", ""))
    if not sources or found < len(sources):
        return None
    return {"objects": sorted(objects), "backgrounds": sorted(b for b in backgrounds if b)}


def default_prompts(
    judge: Any, judged_concepts: list[str], n: int, seed: int, backgrounds: list[str] | None = None
) -> list[Prompt]:
    """The judge's prompt set; with the references' `backgrounds` known, world prompts ask for others."""
    if isinstance(judge, WorldJudge):
        other = [v[0] for b, v in BACKGROUNDS.items() if b not in backgrounds] if backgrounds else None
        return world_prompts(set(judged_concepts), OBJECTS, list(COLOURS), n, seed, other)
    return real_prompts(n)


class ImageCache:
    """Generated images by content key, in one folder; each image written once, atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.png"

    def get(self, key: str) -> Any:
        from PIL import Image

        p = self.path(key)
        if p.is_file():
            self.hits += 1
            with Image.open(p) as im:
                return im.convert("RGB")
        return None

    def put(self, key: str, image: Any) -> None:
        tmp = self.folder / f".{key}.tmp.png"
        image.save(tmp)
        tmp.replace(self.path(key))


def generate_all(
    backend_fn: Callable[[], Any],
    identity: dict[str, Any],
    texts: list[str],
    seeds: list[int],
    cfg: EvalConfig,
    style_guidance: float,
    cache: ImageCache,
    label: str,
    log: Callable[[str], None],
) -> list[Any]:
    """One image per (text, seed), from the cache when it holds it; the backend loads only if needed."""
    keys = [
        hash_json(
            {
                **identity,
                "prompt": t,
                "seed": s,
                "steps": cfg.steps,
                "guidance": cfg.guidance,
                "lam": style_guidance,
            }
        )[:20]
        for t, s in zip(texts, seeds, strict=True)
    ]
    images = [cache.get(k) for k in keys]
    todo = [i for i, im in enumerate(images) if im is None]
    if todo:
        backend = backend_fn()
        t0 = time.time()
        for b in range(0, len(todo), cfg.batch):
            idx = todo[b : b + cfg.batch]
            reqs = [
                GenerationRequest(
                    prompt=texts[i],
                    steps=cfg.steps,
                    guidance=cfg.guidance,
                    style_guidance=style_guidance,
                    seed=seeds[i],
                )
                for i in idx
            ]
            for i, out in zip(idx, generate_batch(backend, reqs), strict=True):
                images[i] = out[0]
                cache.put(keys[i], out[0])
            done, spent = min(b + cfg.batch, len(todo)), time.time() - t0
            log(
                f"eval: {label}: {done}/{len(todo)} images ({spent:.0f} s, "
                f"eta {spent / done * (len(todo) - done):.0f} s)"
            )
    else:
        log(f"eval: {label}: all {len(keys)} images reused")
    return images


def per_image_leakage(
    scores: Scores, leak: np.ndarray, base_leak: np.ndarray, judge: Any, base: Scores
) -> np.ndarray:
    """Per image, tuned minus base on the same prompt and seed: the world judge's excess of reference
    objects over the control (`object_leakage`), or whether any reference concept shows unasked."""
    if isinstance(judge, WorldJudge):
        return object_leakage(scores, base, leak, base_leak)["excess"]
    return leak.any(1).astype(float) - base_leak.any(1)


def summarize(
    scores: Scores,
    leak: np.ndarray,
    base_leak: np.ndarray,
    judge: Any,
    concepts: list[str],
    base: Scores,
    backgrounds: list[str] | None = None,
) -> dict[str, Any]:
    """The three axes; `leak` and `base_leak` are leak matrices (images × concepts, `leak_matrix`),
    `base` the base model's scores, `backgrounds` the references' true backgrounds (world judge)."""
    tuned_any, base_any = leak.any(1), base_leak.any(1)
    out = {
        "prompt_fidelity": float(scores.prompt.mean()),
        "style_fidelity": float(scores.style.mean()),
        "leakage": float(per_image_leakage(scores, leak, base_leak, judge, base).mean()),
        "leakage_raw": {"with_adapter": float(tuned_any.mean()), "base_model": float(base_any.mean())},
        # which reference concepts leak: the share of images showing each one unasked
        "leakage_by_concept": {
            c: {"with_adapter": float(leak[:, k].mean()), "base_model": float(base_leak[:, k].mean())}
            for k, c in enumerate(concepts)
        },
        "n_images": int(len(tuned_any)),
    }
    if isinstance(judge, ClipJudge):
        out["style_gram_similarity"] = float(scores.style_extra.mean())
    else:
        out["style_probability"] = float(scores.style_extra.mean())
        # per object and image: reference objects shown unasked, against the control of the other
        # world objects shown unasked; leakage is reference content only where the first rises more
        rows = object_leakage(scores, base, leak, base_leak)
        out["leakage_per_object"] = {
            "reference_objects": {
                "with_adapter": _mean(rows["reference_tuned"]),
                "base_model": _mean(rows["reference_base"]),
            },
            "other_objects": {
                "with_adapter": _mean(rows["control_tuned"]),
                "base_model": _mean(rows["control_base"]),
            },
        }
        out["leakage_definition"] = "per object and image: reference objects' rise minus the control's"
        out["leakage_any_concept"] = float(tuned_any.mean() - base_any.mean())
        if backgrounds:
            bt, bb = background_leakage(scores, backgrounds), background_leakage(base, backgrounds)
            out["background_leakage"] = float(bt.mean() - bb.mean())
            out["background_leakage_raw"] = {"with_adapter": float(bt.mean()), "base_model": float(bb.mean())}
    return out


def bootstrap_ci(
    per_image: dict[str, np.ndarray], groups: np.ndarray, n: int = 2000, seed: int = 0
) -> dict[str, list[float]]:
    """95% interval of each per-image mean, resampling whole prompts (a prompt's seeds together, as
    they are not independent draws); a fixed seed, so a report is reproducible."""
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    draws = np.random.default_rng(seed).integers(0, len(members), (n, len(members)))
    counts = np.array([len(m) for m in members], dtype=float)
    out = {}
    for key, v in per_image.items():
        sums = np.array([float(np.sum(v[m])) for m in members])
        means = sums[draws].sum(1) / counts[draws].sum(1)
        out[key] = [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]
    return out


def _object_thresholds(judge: WorldJudge) -> dict[str, float]:
    return {o: float(t) for o, t in zip(OBJECTS, judge.object_thresholds, strict=True)}


def _mean(a: np.ndarray) -> float:
    return float(a.mean()) if a.size else 0.0


def check_style_guidance(cfg: EvalConfig) -> None:
    """Refuse a λ1 > 0 sweep that the tuned model cannot run, before any image is generated: an export
    needs its base UNet (`--with-base-unet`) or the swappable format."""
    path = Path(cfg.model)
    if (
        cfg.adapter
        or not any(lam > 0 for lam in cfg.style_guidance)
        or not (path / "manifest.json").is_file()
    ):
        return
    m = read_json(path / "manifest.json")
    if m.get("kind") == "swappable" or m.get("has_base_unet"):
        return
    raise UserError(
        f"--style-guidance {','.join(f'{x:g}' for x in cfg.style_guidance)}: {cfg.model} has no base UNet; "
        "re-export with --with-base-unet, or evaluate the base model with --adapter RUN/adapter"
    )


def _backend_loaders(
    model: str, adapter: str | None, device: str, runtime: str = "auto", dtype: str = "auto"
) -> tuple[Callable[[], Any], Callable[[], Any], str]:
    """(tuned backend, base backend, base model name): the base is `model` without the adapter, or an
    export's base model."""
    path = Path(model)
    if adapter:
        base = model
    elif (path / "manifest.json").is_file():
        base = read_json(path / "manifest.json").get("base_model") or ""
        if not base:
            raise UserError(
                f"{model!r}: its manifest names no base model; pass the base with --adapter instead"
            )
    else:
        raise UserError(
            f"{model!r} is neither an export folder nor given with --adapter: eval needs the tuned model and "
            "its base to measure leakage"
        )

    if adapter and runtime not in ("auto", "torch"):
        raise UserError(f"--runtime {runtime} runs an export; a model with --adapter runs in torch")

    def tuned() -> Any:
        rt = "torch" if adapter else runtime
        return load_backend(model, adapter=adapter, device=device, runtime=rt, dtype=dtype)

    def base_backend() -> Any:
        return load_backend(base, runtime="torch", device=device)

    return tuned, base_backend, base


def run_eval(
    cfg: EvalConfig,
    log: Callable[[str], None] = log_line,
    variant: str | None = None,
    images_out: list[tuple[str, Any]] | None = None,
    cache_dir: str | Path | None = None,
    base_images_out: list[tuple[str, Any]] | None = None,
) -> dict[str, Any]:
    """Evaluate one model; write report.json, report.md, grid.png (and guidance.png) into cfg.out.
    `images_out`, when given, receives (caption, image) for every image at the first λ1;
    `base_images_out` the base model's on the same prompts and seeds."""
    t0 = time.time()
    device = str(pick_device(cfg.device))
    # cheap checks first: the prompt file, the judge's name, the references
    given = read_prompt_file(cfg.prompts) if cfg.prompts else None
    check_judge_spec(cfg.judge)
    refs = read_references(cfg.references)
    check_style_guidance(cfg)
    style = cfg.style or refs["style"]
    judge = load_eval_judge(cfg.judge, device)
    concepts, not_judged = judge.concepts(refs["concepts"])
    truth = refs["truth"] if isinstance(judge, WorldJudge) else None
    if truth:  # world references: the true objects, not the captioner's words
        concepts, not_judged = list(truth["objects"]), []
    backgrounds = truth["backgrounds"] if truth else None
    judge.target(style)  # a world judge refuses a style it does not know, before any generation
    prompts = given or default_prompts(judge, concepts, cfg.n_prompts, cfg.seed, backgrounds)
    pairs = [(p, cfg.seed + k) for p in prompts for k in range(cfg.seeds)]
    ps = [p for p, _ in pairs]
    texts, seeds = [p.full(style) for p, _ in pairs], [s for _, s in pairs]
    out = Path(cfg.out)
    cache = ImageCache(Path(cache_dir) if cache_dir else out / "images")
    tuned_fn, base_fn, base_name = _backend_loaders(cfg.model, cfg.adapter, device, cfg.runtime, cfg.dtype)
    ident = {"model": model_fingerprint(cfg.model), "adapter": model_fingerprint(cfg.adapter)}
    if (cfg.runtime, cfg.dtype) != ("auto", "auto"):  # other runtimes draw (slightly) other images
        ident.update(runtime=cfg.runtime, dtype=cfg.dtype)
    base_ident = {"model": model_fingerprint(base_name), "adapter": None}
    ref_feats = judge.references(refs["images"]) if isinstance(judge, ClipJudge) else None

    if isinstance(judge, WorldJudge):  # thresholds from base images on seeds of their own
        cal_seeds = [cfg.calibration_seed + s - cfg.seed for s in seeds]
        cal = generate_all(base_fn, base_ident, texts, cal_seeds, cfg, 0.0, cache, "calibration", log)
        judge.calibrate(judge.score(cal, ps, concepts, style, None), ps)
    base_images = generate_all(base_fn, base_ident, texts, seeds, cfg, 0.0, cache, "base model", log)
    base_scores = judge.score(base_images, ps, concepts, style, ref_feats)
    thresholds = judge.thresholds(base_scores, ps, concepts)

    loaded: dict[str, Any] = {}

    def tuned() -> Any:
        if "b" not in loaded:
            loaded["b"] = tuned_fn()
        return loaded["b"]

    sweep, first_images = [], None
    for lam in cfg.style_guidance:
        images = generate_all(tuned, ident, texts, seeds, cfg, lam, cache, variant or f"λ1={lam:g}", log)
        first_images = first_images or images
        sc = judge.score(images, ps, concepts, style, ref_feats)
        groups = np.repeat(np.arange(len(prompts)), cfg.seeds)
        sweep.append(
            {
                "style_guidance": lam,
                **sweep_point(sc, base_scores, thresholds, judge, ps, concepts, backgrounds, groups),
            }
        )
    report = {
        **{k: v for k, v in sweep[0].items() if k != "style_guidance"},
        "style_guidance": cfg.style_guidance[0],
        "base_model_scores": {
            "prompt_fidelity": float(base_scores.prompt.mean()),
            "style_fidelity": float(base_scores.style.mean()),
        },
        "sweep": sweep if len(sweep) > 1 else [],
        "judge": judge_info(cfg, judge, style, concepts, thresholds),
        "concepts": concepts,
        "concepts_from": "labels.jsonl (the references' truth)" if truth else "the dataset's concepts",
        "reference_backgrounds": backgrounds or [],
        "concepts_not_judged": not_judged,
        "provenance": provenance(cfg, refs, prompts, device),
        "images_reused": cache.hits,
        "tuned_runtime": loaded["b"].name if "b" in loaded else "none (every image reused)",
        "seconds": round(time.time() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(report_markdown({"model": report}, judge.kind))
    captioned = [(f"{p.content} #{s - cfg.seed}", im) for (p, s), im in zip(pairs, first_images, strict=True)]
    save_grid(out / "grid.png", captioned, cols=cfg.seeds)
    if images_out is not None:
        images_out.extend(captioned)
    if base_images_out is not None:
        base_images_out.extend((c, im) for (c, _), im in zip(captioned, base_images, strict=True))
    if len(sweep) > 1:
        save_guidance_plot(out / "guidance.png", sweep)
    log(f"eval: wrote {out / 'report.json'}")
    if parse_trackers(cfg.report_to):
        report_eval(cfg, report, log)
    return report


def sweep_point(
    sc: Scores,
    base: Scores,
    thresholds: np.ndarray,
    judge: Any,
    prompts: list[Prompt],
    concepts: list[str],
    backgrounds: list[str] | None,
    groups: np.ndarray,
) -> dict[str, Any]:
    """The axes of one λ1, with 95% intervals resampling whole prompts (`groups`: each image's prompt)."""
    leak = leak_matrix(sc, thresholds, prompts, concepts)
    base_leak = leak_matrix(base, thresholds, prompts, concepts)
    paired = per_image_leakage(sc, leak, base_leak, judge, base)  # tuned minus base, same seed
    per_image = {"prompt_fidelity": sc.prompt, "style_fidelity": sc.style, "leakage": paired}
    if backgrounds:
        tuned_bg, base_bg = background_leakage(sc, backgrounds), background_leakage(base, backgrounds)
        per_image["background_leakage"] = tuned_bg.astype(float) - base_bg
    return {
        **summarize(sc, leak, base_leak, judge, concepts, base, backgrounds),
        "ci95": bootstrap_ci(per_image, groups),
    }


def judge_info(
    cfg: EvalConfig, judge: Any, style: str, concepts: list[str], thresholds: np.ndarray
) -> dict[str, Any]:
    """What the report says of its judge: kind, metrics, target style and thresholds."""
    world = isinstance(judge, WorldJudge)
    return {
        "spec": cfg.judge,
        "kind": judge.kind,
        "prompt_fidelity": judge.prompt_metric,
        "style_fidelity": judge.style_metric,
        "leakage": "per object and image: the rise (tuned minus base) of the references' objects shown "
        "unasked, minus the rise of the control objects"
        if world
        else "share of images with a reference concept the prompt does not name, tuned minus base",
        "target_style": judge.target(style),
        "concept_thresholds": dict(zip(concepts, map(float, thresholds), strict=True)),
        **(
            {"calibration_seed": cfg.calibration_seed, "object_thresholds": _object_thresholds(judge)}
            if world
            else {}
        ),
    }


def provenance(cfg: EvalConfig, refs: dict[str, Any], prompts: list[Prompt], device: str) -> dict[str, Any]:
    return {
        "model": cfg.model,
        "adapter": cfg.adapter,
        "model_fingerprint": model_fingerprint(cfg.model),
        "adapter_fingerprint": model_fingerprint(cfg.adapter),
        "dataset": cfg.references,
        "dataset_fingerprint": refs["fingerprint"],
        "prompts": [[p.content, p.superclass] for p in prompts],
        "seeds": list(range(cfg.seed, cfg.seed + cfg.seeds)),
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "versions": library_versions(),
        "cpu": cpu_name(),
        "gpu": gpu_name(),
        "device": device,
    }


def report_markdown(variants: dict[str, dict[str, Any]], kind: str) -> str:
    unit = "fraction" if kind == "world" else "CLIP score"
    lines = [
        f"| variant | prompt fidelity ({unit}) | style fidelity ({unit}) | leakage (tuned − base) [95% interval, prompts resampled] | raw leakage tuned / base | trainable params | train s | images |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in variants.items():
        raw = r["leakage_raw"]
        lines.append(
            f"| {name} | {r['prompt_fidelity']:.3f} | {r['style_fidelity']:.3f} | {r['leakage']:+.3f}{_ci(r)} | "
            f"{raw['with_adapter']:.3f} / {raw['base_model']:.3f} | {r.get('trainable_params', '—')} | "
            f"{r.get('train_seconds', '—') if not isinstance(r.get('train_seconds'), float) else round(r['train_seconds'])} | {r['n_images']} |"
        )
    concepts = list(next(iter(variants.values())).get("leakage_by_concept", {}))
    if concepts:
        lines += [
            "",
            "Leakage by reference concept: share of images showing it unasked, tuned (base model).",
            "",
            "| variant | " + " | ".join(concepts) + " |",
            "|---|" + "---|" * len(concepts),
        ]
        for name, r in variants.items():
            by = r["leakage_by_concept"]
            cells = [f"{by[c]['with_adapter']:.3f} ({by[c]['base_model']:.3f})" for c in concepts]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "leakage_per_object" in next(iter(variants.values())):
        lines += [
            "",
            "Per object and image, tuned (base model): the references' objects shown unasked, and the "
            "control, the other world objects shown unasked.",
            "",
            "| variant | reference objects | other objects (control) |",
            "|---|---|---|",
        ]
        for name, r in variants.items():
            ref, oth = r["leakage_per_object"]["reference_objects"], r["leakage_per_object"]["other_objects"]
            lines.append(
                f"| {name} | {ref['with_adapter']:.3f} ({ref['base_model']:.3f}) | "
                f"{oth['with_adapter']:.3f} ({oth['base_model']:.3f}) |"
            )
    return "\n".join(lines) + "\n"


def _ci(r: dict[str, Any]) -> str:
    lo, hi = r.get("ci95", {}).get("leakage", (None, None))
    return "" if lo is None else f" [{lo:+.3f}, {hi:+.3f}]"


def save_grid(
    path: Path, items: list[tuple[str, Any]], cols: int, cell: int = 128, row_labels: list[str] | None = None
) -> None:
    """Images in rows of `cols`, each with its caption underneath (wrapped onto two lines); with
    `row_labels`, each row's label in a column on the left (compare: one row per variant)."""
    import textwrap

    from PIL import Image, ImageDraw

    per_line, line_h = max(8, cell // 6), 11
    label_w = 6 * max(map(len, row_labels)) + 8 if row_labels else 0
    rows = (len(items) + cols - 1) // cols
    row_h = cell + 2 * line_h + 4
    grid = Image.new("RGB", (label_w + cols * cell, rows * row_h), "white")
    draw = ImageDraw.Draw(grid)
    for r, label in enumerate((row_labels or [])[:rows]):
        draw.text((4, r * row_h + cell // 2 - 5), label, fill="black")
    for i, (caption, im) in enumerate(items):
        x, y = label_w + (i % cols) * cell, (i // cols) * row_h
        grid.paste(im.convert("RGB").resize((cell, cell)), (x, y))
        lines = textwrap.wrap(caption, per_line, max_lines=2, placeholder="...") or [""]
        for k, line in enumerate(lines):
            draw.text((x + 2, y + cell + 2 + k * line_h), line, fill="black")
    tmp = path.with_suffix(".tmp.png")
    grid.save(tmp)
    tmp.replace(path)


def save_guidance_plot(path: Path, sweep: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = [s["style_guidance"] for s in sweep]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in ("prompt_fidelity", "style_fidelity", "leakage"):
        ax.plot(lam, [s[key] for s in sweep], marker="o", label=key.replace("_", " "))
    ax.set_xlabel("style guidance λ1")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)

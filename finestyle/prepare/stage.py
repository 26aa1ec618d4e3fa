"""Stage 1, prepare: reference images -> concept crops -> BLIP captions -> published dataset.

The pieces are separate functions so the Prefect flow can wrap each as a task (discover, ingest,
extract+caption per chunk, publish), and `run_prepare` composes them for the CLI.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finestyle import __version__
from finestyle.artifacts.dataset import write_dataset
from finestyle.config import PrepareConfig, keyed_fields, to_dict
from finestyle.core.errors import UserError
from finestyle.core.fs import (
    clean_stale_temps,
    hash_json,
    sha256_file,
    staging_dir,
    write_json,
)
from finestyle.core.geometry import bucket_size
from finestyle.core.memory import check_fits
from finestyle.core.models import (
    load_captioner,
    load_sd_pipeline,
    load_tokenizers,
    model_fingerprint,
    pick_device,
)
from finestyle.core.stage import find_reusable
from finestyle.core.text import fits, phrase_in_window, trim_to_fit
from finestyle.prepare.captioning import Captioner, CaptionSettings, caption_dtype
from finestyle.prepare.concepts import (
    Region,
    attention_regions,
    grid_regions,
    load_boxes_file,
    phrases_from_caption,
    user_regions,
)
from finestyle.prepare.ingest import LoadedImage, Rejected, discover, load_all
from finestyle.prepare.recipe import background_text, concept_crops, join_concepts, named_concepts

# Models are loaded once per process and reused by every chunk/task (keyed by name/device/dtype).
_MODELS: dict[tuple[str, str, str], Any] = {}


@dataclass
class PrepareResult:
    """What `prepare` made: the dataset folder and its counts."""

    out: str
    rows: int
    images_used: int
    skipped: int
    cache_key: str
    reused: bool = False


@dataclass
class PreparePlan:
    """Step 1's answer: the candidate images, the entries skipped, the content key, and the
    finished dataset to reuse (None: build it)."""

    candidates: list[str]
    skipped: list[dict[str, Any]]
    cache_key: str
    reuse: PrepareResult | None = None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_key(cfg: PrepareConfig, candidates: list[Path]) -> str:
    """Content key: input file hashes + every option that changes the output + model identities."""
    conf = keyed_fields(cfg)
    inputs = sorted(sha256_file(p) for p in candidates)
    return hash_json(
        {
            "stage": "prepare",
            "v": 2,  # 2: rows record their crop; buckets follow the VAE factor
            "inputs": inputs,
            "config": conf,
            "captioner": model_fingerprint(cfg.captioner),
            "base": model_fingerprint(cfg.base),
        }
    )


def get_captioner(cfg: PrepareConfig) -> Captioner:
    dev = pick_device(cfg.device)
    dt = caption_dtype(dev, cfg.dtype)
    key = (cfg.captioner, str(dev), str(dt))
    if key not in _MODELS:
        _MODELS[key] = load_captioner(cfg.captioner, device=dev, dtype=dt)
    model, processor = _MODELS[key]
    return Captioner(
        model,
        processor,
        CaptionSettings(
            prefix=cfg.caption_prefix,
            num_beams=cfg.num_beams,
            min_length=cfg.min_length,
            max_length=cfg.max_length,
            repetition_penalty=cfg.repetition_penalty,
            no_repeat_ngram_size=cfg.no_repeat_ngram_size,
            batch_size=cfg.batch_size,
        ),
    )


def get_base(cfg: PrepareConfig) -> Any:
    dev = pick_device(cfg.device)
    key = (str(cfg.base), str(dev), "fp32" if dev.type == "cpu" else "fp16")
    if key not in _MODELS:
        check_fits(
            "prepare", str(cfg.base), "use --concepts grid (no base model) or a machine with more memory"
        )
        _MODELS[key] = load_sd_pipeline(str(cfg.base), device=dev)
    return _MODELS[key]


def render_text(template: str, concept: str, caption: str, style: str) -> str:
    return " ".join(template.format(concept=concept, caption=caption, style=style).split())


CAPTION_CONCEPTS = ("grid", "full", "background")
"""Methods whose concept text is the captioner's own words (trimmable), not a found or given phrase."""


def fit_row_text(
    cfg: PrepareConfig, names: list[str], caption: str, method: str, tokenizers: list[Any]
) -> tuple[str, int, str]:
    """A row's text, fitted to every encoder's window: (text, words dropped, the row's concept as the
    text names it).

    It keeps the style phrase and the row's own concept. What goes first: the `{caption}` slot's words,
    then the other concepts a crop names (`name_covered`), then, where the concept is itself the
    captioner's words (grid, whole image, background), that caption's last words. A text that still
    does not fit keeps its full form, and `train` refuses it (its style phrase is cut).
    """
    cap_words, extra, own = caption.split(), names[1:], names[0].split()

    def render(own_words: list[str], others: list[str], cap: list[str]) -> str:
        return render_text(
            cfg.template, join_concepts([" ".join(own_words), *others]), " ".join(cap), cfg.style
        )

    full = render(own, extra, cap_words)
    if not tokenizers or fits(tokenizers, full):
        return full, 0, names[0]
    if "{caption}" in cfg.template:
        cap_words = cap_words[: trim_to_fit(tokenizers, lambda w: render(own, extra, w), cap_words)]
    extra = extra[: trim_to_fit(tokenizers, lambda w: render(own, w, cap_words), extra)]
    if method in CAPTION_CONCEPTS:
        own = own[: trim_to_fit(tokenizers, lambda w: render(w, extra, cap_words), own, keep=1)]
    text = render(own, extra, cap_words)
    if not fits(tokenizers, text):
        return full, 0, names[0]
    return text, len(full.split()) - len(text.split()), " ".join(own)


_TOKENIZERS: dict[str, list[Any]] = {}


def base_tokenizers(cfg: PrepareConfig) -> list[Any]:
    """The base model's tokenizers (their windows are what training reads); none without a base."""
    if not cfg.base:
        return []
    key = str(cfg.base)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizers(key)
    return _TOKENIZERS[key]


def _row(
    li: LoadedImage,
    region: Region,
    caption: str,
    cfg: PrepareConfig,
    root: str,
    names: list[str] | None = None,
    tokenizers: list[Any] | None = None,
) -> dict[str, Any]:
    x0, y0, x1, y1 = region.bbox
    text, trimmed, concept = fit_row_text(
        cfg, names or [region.concept], caption, region.method, tokenizers or []
    )
    cut = region.crop or region.bbox
    crop = li.image.crop(cut)
    # Keep the aspect ratio; cap stored pixels at 2x the training resolution (area), never upscale.
    cap = 2 * cfg.resolution
    if max(crop.size) > cap:
        crop = crop.copy()
        crop.thumbnail((cap, cap), resample=3)
    return {
        "image": crop,
        "concept": concept,
        "caption": caption,
        "text": text,
        "text_trimmed": trimmed,
        "style_outside_window": not phrase_in_window(tokenizers or [], text, cfg.style),
        "source": _rel(li.path, root),
        "source_sha256": li.sha256,
        "bbox": [x0, y0, x1, y1],
        "crop": list(cut),
        "method": region.method,
        "width": crop.width,
        "height": crop.height,
        "bucket": list(bucket_size(crop.size, cfg.resolution, 8)),
        "resolution": cfg.resolution,
    }


def _name_background(
    li: LoadedImage,
    regions: list[Region],
    caption: str,
    captioner: Captioner,
    pipe: Any,
    problems: list[Rejected],
) -> list[Region]:
    """Give the background region the captioner's words for it, or drop it (reported) when no text for
    it is known to the model's tokenizer."""
    bg = [r for r in regions if r.concept == "background" and r.method != "boxes"]
    if not bg:
        return regions
    (crop_cap,) = captioner.caption([li.image.crop(bg[0].crop or bg[0].bbox)])
    concepts = [r.concept for r in regions if r.concept != "background"]
    text = background_text(crop_cap, caption, concepts, getattr(pipe, "tokenizer", None))
    if text is None:
        problems.append(Rejected(li.path, f"background row skipped: no known words for it ({crop_cap!r})"))
        return [r for r in regions if r.concept != "background"]
    for r in bg:
        r.concept, r.method = text, "background"
    return regions


def _rel(path: str, root: str) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).name


def extract_rows(
    images: list[LoadedImage],
    cfg: PrepareConfig,
    root: str = ".",
    boxes: dict[str, list[dict[str, Any]]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Rejected]]:
    """Concepts + captions for a chunk of images. Returns (rows, per-image summaries, problems).

    1. Caption every whole image (batched).
    2. Find regions with the chosen method.
    3. Caption grid proposals (batched) and drop duplicate captions.
    4. Render texts from the template.
    """
    method = cfg.method
    problems: list[Rejected] = []
    captioner = get_captioner(cfg)
    # 1. whole-image captions (every method uses them: the full-image pair and the `{caption}` slot)
    captions = captioner.caption([li.image for li in images])
    rows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    pipe = get_base(cfg) if method == "attention" else None
    for li, cap in zip(images, captions, strict=True):
        w, h = li.image.size
        regions: list[Region] = []
        # 2. regions
        if method == "attention":
            phrases = phrases_from_caption(cap, cfg.concept_words, limit=cfg.max_concepts + 2)
            regions = attention_regions(
                pipe,
                li.image,
                cap,
                phrases,
                timestep=cfg.attention_timestep,
                threshold=cfg.threshold,
                seed=cfg.seed,
                min_crop=cfg.min_crop,
                max_concepts=cfg.max_concepts,
                background=cfg.background,
            )
        elif method == "grid":
            props = grid_regions((w, h), cfg.grid_scales)
            props = [
                r
                for r in props
                if min(r.bbox[2] - r.bbox[0], r.bbox[3] - r.bbox[1]) >= min(cfg.min_crop, w, h)
            ]
            # 3. caption the proposals, dedupe by caption (and against the whole-image caption)
            crop_caps = captioner.caption([li.image.crop(r.bbox) for r in props])
            seen = {cap}
            for r, c in zip(props, crop_caps, strict=True):
                if c and c not in seen:
                    seen.add(c)
                    r.concept = c
                    regions.append(r)
                if len(regions) >= cfg.max_concepts:
                    break
        elif method == "boxes":
            entries = (boxes or {}).get(_rel(li.path, root)) or (boxes or {}).get(Path(li.path).name) or []
            regions, bad = user_regions(entries, (w, h), Path(li.path).name)
            problems.extend(Rejected(li.path, f"box skipped: {b}") for b in bad)
            regions = regions[: cfg.max_concepts] if cfg.max_concepts else regions
        # 4. rows: the crop cut around each concept, the concepts its text names, the background's words
        regions = concept_crops(regions, (w, h), cfg)
        regions = _name_background(li, regions, cap, captioner, pipe, problems)
        toks = base_tokenizers(cfg)
        if cfg.full_image:
            full = Region(cap or "the whole scene", (0, 0, w, h), "full")
            rows.append(_row(li, full, cap, cfg, root, tokenizers=toks))
        for r in regions:
            rows.append(_row(li, r, cap, cfg, root, named_concepts(r, regions, cfg.name_covered), toks))
        summaries.append(
            {
                "source": _rel(li.path, root),
                "sha256": li.sha256,
                "size": [w, h],
                "caption": cap,
                "concepts": list(dict.fromkeys(r.concept for r in regions if r.method != "background")),
                "background": next((r.concept for r in regions if r.method == "background"), None),
                "notes": li.notes,
                "boxes": {r.concept: list(r.bbox) for r in regions if r.method != "background"},
            }
        )
    return rows, summaries, problems


def plan_prepare(cfg: PrepareConfig, log=_log) -> PreparePlan:
    """1. Discover inputs and compute the content key; say whether an identical dataset exists."""
    out = Path(cfg.out)
    candidates, skipped = discover(cfg.images)
    for s in skipped:
        log(f"skipped {s.path}: {s.reason}")
    if not candidates:
        raise UserError(
            f"no candidate images in {', '.join(cfg.images)} "
            f"({len(skipped)} entries skipped, e.g. {skipped[0].path}: {skipped[0].reason})"
            if skipped
            else f"no candidate images in {', '.join(cfg.images)}"
        )
    if cfg.method == "boxes":
        load_boxes_file(cfg.boxes)  # fail early, before any work, on a bad boxes file
    key = cache_key(cfg, candidates)
    reuse = None
    old = find_reusable(
        out, "report.json", key, stage="prepare", same="inputs and configuration", force=cfg.force, log=log
    )
    if old is not None:
        c = old["counts"]
        reuse = PrepareResult(
            out=str(out),
            rows=c["rows"],
            images_used=c["images_used"],
            skipped=c["skipped"],
            cache_key=key,
            reused=True,
        )
    return PreparePlan(
        candidates=[str(c) for c in candidates],
        skipped=[s.as_dict() for s in skipped],
        cache_key=key,
        reuse=reuse,
    )


def scratch_dir(cfg: PrepareConfig, key: str) -> Path:
    """Where chunk results wait for publishing: a hidden sibling of `out`, named by the content key."""
    out = Path(cfg.out).absolute()
    return out.parent / f".{out.name}.work-{key[:16]}"


_MODEL_LOCK = threading.Lock()


def process_chunk(
    paths: list[str], cfg: PrepareConfig, scratch: str | Path, chunk_id: int, log=_log
) -> dict[str, Any]:
    """2-3. Decode a chunk of images, extract concepts and captions, write crops to `scratch`.

    Returns a small JSON-able manifest (rows file, per-image summaries, rejections, timings): this
    is the unit a Prefect task maps over, on threads or on a Dask cluster.
    """
    t0 = time.perf_counter()
    folder = Path(scratch) / f"chunk-{chunk_id:05d}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    images, rejected = load_all(
        [Path(p) for p in paths], cfg.max_pixels, cfg.min_image_side, cfg.animated, log=log
    )
    t1 = time.perf_counter()
    rows, summaries, problems = [], [], []
    if images:
        boxes = load_boxes_file(cfg.boxes) if cfg.method == "boxes" else None
        # Models are shared per process; attention capture swaps UNet processors, so one chunk at a time.
        with _MODEL_LOCK:
            rows, summaries, problems = extract_rows(images, cfg, root=common_root(cfg.images), boxes=boxes)
    with open(folder / "rows.jsonl", "w") as f:
        for i, r in enumerate(rows):
            name = f"{i:05d}.png"
            r["image"].save(folder / name)
            f.write(json.dumps({**{k: v for k, v in r.items() if k != "image"}, "file": name}) + "\n")
    return {
        "chunk": chunk_id,
        "rows_file": str(folder / "rows.jsonl"),
        "summaries": summaries,
        "rejected": [x.as_dict() for x in rejected + problems],
        "images": len(images),
        "timings": {"ingest_s": t1 - t0, "extract_caption_s": time.perf_counter() - t1},
    }


def publish_prepared(
    cfg: PrepareConfig,
    plan: PreparePlan,
    manifests: list[dict[str, Any]],
    log=_log,
    t0: float | None = None,
) -> PrepareResult:
    """4. Merge chunk results (in input order, dropping cross-chunk duplicates) and publish atomically."""
    from PIL import Image

    t_pub = time.perf_counter()
    out = Path(cfg.out)
    rows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    skipped = [Rejected(**s) for s in plan.skipped]
    seen: dict[str, str] = {}
    timings = {"ingest_s": 0.0, "extract_caption_s": 0.0}
    for m in sorted(manifests, key=lambda m: m["chunk"]):
        skipped += [Rejected(**r) for r in m["rejected"]]
        for k in timings:
            timings[k] += m["timings"][k]
        dup = set()
        for s in m["summaries"]:
            if s["sha256"] in seen:
                skipped.append(
                    Rejected(
                        s["source"],
                        f"duplicate of {seen[s['sha256']]} (same pixels); used once",
                        "DuplicateImage",
                    )
                )
                dup.add(s["sha256"])
            else:
                seen[s["sha256"]] = s["source"]
                summaries.append(s)
        folder = Path(m["rows_file"]).parent
        for line in Path(m["rows_file"]).read_text().splitlines():
            r = json.loads(line)
            if r["source_sha256"] in dup:
                continue
            with Image.open(folder / r.pop("file")) as im:
                r["image"] = im.convert("RGB")
            rows.append(r)
    n_images = len(summaries)
    if not n_images:
        first = skipped[0] if skipped else None
        raise UserError(
            f"none of the {len(plan.candidates)} input image(s) was usable"
            + (f"; e.g. {first.path}: {first.reason}" if first else "")
        )
    report = _report(cfg, plan.cache_key, plan.candidates, n_images, rows, summaries, skipped, timings)
    clean_stale_temps(out.parent, out.name)
    with staging_dir(out) as tmp:
        write_dataset(tmp, rows, report)
        report["timings"]["publish_s"] = time.perf_counter() - t_pub
        report["timings"]["total_s"] = time.perf_counter() - (t0 or t_pub)
        write_json(tmp / "report.json", report)
    shutil.rmtree(scratch_dir(cfg, plan.cache_key), ignore_errors=True)
    log(f"prepare: {len(rows)} rows from {n_images} image(s) -> {out} ({len(skipped)} skipped)")
    return PrepareResult(
        out=str(out), rows=len(rows), images_used=n_images, skipped=len(skipped), cache_key=plan.cache_key
    )


def run_prepare(cfg: PrepareConfig, log=_log, chunk_size: int = 0) -> PrepareResult:
    """Run the whole prepare stage in this process. Returns a small summary (paths and counts)."""
    t0 = time.perf_counter()
    plan = plan_prepare(cfg, log)
    if plan.reuse:
        return plan.reuse
    scratch = scratch_dir(cfg, plan.cache_key)
    cands = plan.candidates
    size = chunk_size or len(cands)
    manifests = [
        process_chunk(cands[i : i + size], cfg, scratch, k, log)
        for k, i in enumerate(range(0, len(cands), size))
    ]
    return publish_prepared(cfg, plan, manifests, log, t0)


def common_root(inputs: list[str]) -> str:
    """The folder that the report's and rows' `source` paths are relative to."""
    dirs = [Path(i) for i in inputs if Path(i).is_dir()]
    return str(dirs[0]) if len(dirs) == 1 else "."


def _report(
    cfg: PrepareConfig,
    key: str,
    candidates: list[str],
    n_images: int,
    rows: list[dict[str, Any]],
    summaries: list[dict[str, Any]],
    skipped: list[Rejected],
    timings: dict[str, float],
) -> dict[str, Any]:
    per_method: dict[str, int] = {}
    for r in rows:
        per_method[r["method"]] = per_method.get(r["method"], 0) + 1
    import datasets
    import transformers

    return {
        "stage": "prepare",
        "cache_key": key,
        "method": cfg.method,
        "config": to_dict(cfg),
        "counts": {
            "candidates": len(candidates),
            "images_used": n_images,
            "rows": len(rows),
            "rows_per_method": per_method,
            # rows whose text was trimmed to fit the base model's text windows (the style phrase kept)
            "rows_text_trimmed": sum(1 for r in rows if r.get("text_trimmed")),
            "rows_style_outside_window": sum(1 for r in rows if r.get("style_outside_window")),
            "skipped": len(skipped),
            "concepts": sorted({r["concept"] for r in rows if r["method"] != "full"}),
        },
        "skipped": [s.as_dict() for s in skipped],
        "images": summaries,
        "timings": timings,
        "versions": {
            "finestyle": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
        },
    }


def summary_table(report_path: str | Path) -> list[dict[str, Any]]:
    """Concepts per image, for flow artifacts."""
    rep = json.loads(Path(report_path).read_text())
    return [
        {"image": s["source"], "caption": s["caption"], "concepts": ", ".join(s["concepts"]) or "-"}
        for s in rep["images"]
    ]

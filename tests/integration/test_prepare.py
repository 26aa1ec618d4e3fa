"""Stage 1 end to end on the builtin tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from finestyle.config import PrepareConfig
from finestyle.core.errors import UserError
from finestyle.core.geometry import context_crop
from finestyle.prepare.concepts import (
    attention_heatmaps,
    background_region,
    box_from_heatmap,
    phrases_from_caption,
    token_spans,
)
from finestyle.prepare.stage import run_prepare
from tests.conftest import EXAMPLES
from tests.unit.test_images import make_messy_folder


def cfg(out, images, **kw) -> PrepareConfig:
    kw.setdefault("resolution", 64)
    kw.setdefault("num_beams", 1)
    return PrepareConfig(images=[str(i) for i in images], style="paper-cut", out=str(out), **kw)


def test_examples_attention_dataset_has_every_column(tmp_path):
    from datasets import load_from_disk

    r = run_prepare(cfg(tmp_path / "ds", [EXAMPLES], concept_words=["boat"]), log=lambda m: None)
    ds = load_from_disk(str(tmp_path / "ds"))
    n_images = len(list(EXAMPLES.glob("*.png")))
    assert len(ds) > n_images and r.rows == len(ds)
    for col in ("image", "text", "concept", "caption", "source", "bbox", "method"):
        assert col in ds.column_names
    methods = set(ds["method"])
    assert {"full", "attention"} <= methods
    assert all(t.endswith("in paper-cut style") for t in ds["text"])
    # the user's word was localised in every image, and cut at each default share (two scales)
    shares = PrepareConfig(images=["x"], style="x", out="x").concept_share
    assert sum(c == "boat" for c in ds["concept"]) == n_images * len(shares)
    # the background rows speak the captioner's words, which the text encoder knows: never the bare
    # word "background" (unknown to the world's tokenizer)
    from finestyle.core.models import load_sd_pipeline
    from finestyle.prepare.recipe import known_text

    tok = load_sd_pipeline("builtin:tiny-sd", device="cpu").tokenizer
    bgs = [r for r in ds if r["method"] == "background"]
    assert all(r["concept"] != "background" and known_text(tok, r["concept"]) for r in bgs)
    assert all(r["text"] == f"{r['concept']}, in paper-cut style" for r in bgs)
    # ImageFolder copy holds the same rows
    meta = [json.loads(x) for x in (tmp_path / "ds" / "train" / "metadata.jsonl").read_text().splitlines()]
    assert [m["text"] for m in meta] == ds["text"]
    assert all((tmp_path / "ds" / "train" / m["file_name"]).exists() for m in meta)
    card = (tmp_path / "ds" / "README.md").read_text()
    assert card.startswith("---\n") and "paper-cut" in card
    assert (tmp_path / "ds" / "preview.png").stat().st_size > 1000
    rep = json.loads((tmp_path / "ds" / "report.json").read_text())
    assert rep["counts"]["rows"] == len(ds) and rep["skipped"][0]["path"].endswith("README.md")


def test_crops_follow_their_boxes(tmp_path):
    from datasets import load_from_disk

    run_prepare(cfg(tmp_path / "ds", [EXAMPLES], concepts="grid", max_concepts=4), log=lambda m: None)
    ds = load_from_disk(str(tmp_path / "ds"))
    assert "grid" in set(ds["method"])
    for row in ds:
        x0, y0, x1, y1 = row["bbox"]
        w, h = row["image"].size
        assert abs(w / h - (x1 - x0) / (y1 - y0)) < 0.05  # crops keep their aspect ratio
        assert max(w, h) <= 2 * 64 and row["bucket"][0] % 8 == 0 and row["crop"] == row["bbox"]
    grid_caps = [c for c, m in zip(ds["concept"], ds["method"], strict=True) if m == "grid"]
    assert len(grid_caps) == len(set(zip(ds["source"], ds["concept"], strict=True))) or grid_caps


def test_boxes_and_none_methods(tmp_path, scene_dir):
    from datasets import load_from_disk

    boxes = tmp_path / "boxes.json"
    boxes.write_text(
        json.dumps(
            {
                "scene0.png": [
                    {"concept": "Sun", "bbox": [5, 5, 70, 70]},
                    {"concept": "bad", "bbox": [0, 0, 9999, 10]},
                ]
            }
        )
    )
    run_prepare(cfg(tmp_path / "b", [scene_dir], concepts="boxes", boxes=str(boxes)), log=lambda m: None)
    ds = load_from_disk(str(tmp_path / "b"))
    sun = [r for r in ds if r["method"] == "boxes"]
    # one crop per default share (two scales), each around the same box
    assert len(sun) == 2 and all(r["concept"] == "sun" and r["bbox"] == [5, 5, 70, 70] for r in sun)
    assert len({tuple(r["crop"]) for r in sun}) == 2  # the second, wider crop gives more context
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert any("outside" in s["reason"] for s in rep["skipped"])

    run_prepare(cfg(tmp_path / "n", [scene_dir], concepts="none"), log=lambda m: None)
    ds = load_from_disk(str(tmp_path / "n"))
    assert set(ds["method"]) == {"full"} and len(ds) == 3


def test_messy_folder_completes_and_reports(tmp_path):
    exp = make_messy_folder(tmp_path / "m")
    r = run_prepare(
        cfg(tmp_path / "ds", [tmp_path / "m"], concepts="none", max_pixels=200_000), log=lambda m: None
    )
    rep = json.loads((tmp_path / "ds" / "report.json").read_text())
    reported = {Path(s["path"]).name for s in rep["skipped"]}
    bad = {n for n, o in exp.items() if o != "ok"}
    assert bad <= reported
    assert r.images_used == sum(o == "ok" for o in exp.values())
    assert all({"path", "reason", "error"} <= set(s) for s in rep["skipped"])


def test_no_usable_image_is_a_user_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match="none of the 1 input image"):
        run_prepare(cfg(tmp_path / "ds", [tmp_path / "in"], concepts="none"), log=lambda m: None)
    assert not (tmp_path / "ds").exists()


def test_reuse_by_content_and_force(tmp_path, scene_dir):
    c = cfg(tmp_path / "ds", [scene_dir], concepts="none")
    assert run_prepare(c, log=lambda m: None).reused is False
    assert run_prepare(c, log=lambda m: None).reused is True
    # same folder, changed content -> rebuilt
    from tests.conftest import make_scene

    make_scene(seed=42).save(scene_dir / "scene0.png")
    assert run_prepare(c, log=lambda m: None).reused is False
    # changed option -> rebuilt; force -> rebuilt
    assert (
        run_prepare(
            cfg(tmp_path / "ds", [scene_dir], concepts="none", template="{concept} ({style})"),
            log=lambda m: None,
        ).reused
        is False
    )
    c.force = True
    assert run_prepare(c, log=lambda m: None).reused is False


def test_killed_publish_leaves_old_dataset(tmp_path, scene_dir, monkeypatch):
    from datasets import load_from_disk

    import finestyle.prepare.stage as prep

    c = cfg(tmp_path / "ds", [scene_dir], concepts="none")
    run_prepare(c, log=lambda m: None)
    before = load_from_disk(str(tmp_path / "ds"))["text"]

    def boom(tmp, rows, report):
        (tmp / "partial").write_text("half")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(prep, "write_dataset", boom)
    with pytest.raises(RuntimeError):
        run_prepare(
            cfg(tmp_path / "ds", [scene_dir], concepts="none", template="{concept}!"), log=lambda m: None
        )
    assert load_from_disk(str(tmp_path / "ds"))["text"] == before
    assert not (tmp_path / "ds" / "partial").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.")]


def test_sigkill_during_publish_leaves_no_mix(tmp_path, scene_dir):
    """A real SIGKILL while the dataset is being written: the folder is either absent or complete."""
    code = f"""
import os, signal
import finestyle.prepare.stage as prep
from finestyle.config import PrepareConfig
real = prep.write_dataset
def die(tmp, rows, report):
    real(tmp, rows, report)
    os.kill(os.getpid(), signal.SIGKILL)
prep.write_dataset = die
prep.run_prepare(PrepareConfig(images=[{str(scene_dir)!r}], style="s", out={str(tmp_path / "ds")!r},
                 concepts="none", resolution=64, num_beams=1))
"""
    r = subprocess.run([sys.executable, "-c", code], env=os.environ.copy(), capture_output=True)
    assert r.returncode == -9
    assert not (tmp_path / "ds").exists()
    # the next run cleans the stale temp folder and publishes
    run_prepare(cfg(tmp_path / "ds", [scene_dir], concepts="none"), log=lambda m: None)
    assert (tmp_path / "ds" / "report.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.")]


def test_cli_prepare_exit_codes(tmp_path, scene_dir):
    def cli(*a):
        return subprocess.run(
            [sys.executable, "-m", "finestyle.cli", "prepare", *a],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
        )

    r = cli(
        str(scene_dir),
        "--style",
        "ink",
        "--out",
        str(tmp_path / "o"),
        "--concepts",
        "none",
        "--resolution",
        "64",
    )
    assert r.returncode == 0, r.stderr
    assert "rows" in r.stdout
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_text("no")
    r = cli(str(tmp_path / "bad"), "--style", "ink", "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "none of the 1 input" in r.stderr


# ---------------------------------------------------------------------------- concept helpers


def test_phrases_and_token_spans(tiny_pipe):
    assert phrases_from_caption("a red boat on a lake with trees in the background") == [
        "red boat",
        "lake",
        "trees",
    ]
    assert phrases_from_caption("a cat", ["Boat", "boat"])[:2] == ["boat", "cat"]
    spans = token_spans(tiny_pipe.tokenizer, "a red boat on a lake", ["red boat", "lake", "zebra"])
    assert set(spans) == {"red boat", "lake"}
    ids = tiny_pipe.tokenizer("a red boat on a lake").input_ids
    sub = tiny_pipe.tokenizer("lake", add_special_tokens=False).input_ids
    assert [ids[i] for i in spans["lake"]] == sub


def test_attention_maps_follow_the_tokens(tiny_pipe):
    from PIL import Image

    im = Image.open(EXAMPLES / "boat_lake.png").convert("RGB")
    maps = attention_heatmaps(tiny_pipe, im, "a red boat on a lake", ["red boat", "lake"], timestep=400)
    assert set(maps) == {"red boat", "lake"}
    for m in maps.values():
        assert m.shape == (8, 8) or m.ndim == 2
        assert np.isclose(m.max(), 1.0) and m.min() >= 0
    assert not np.allclose(maps["red boat"], maps["lake"])  # different tokens, different maps
    # the attention processors were restored
    assert not any(
        type(p).__name__ == "_CaptureCrossAttention" for p in tiny_pipe.unet.attn_processors.values()
    )


def test_box_geometry():
    heat = np.zeros((8, 8))
    heat[2:4, 5:7] = 1.0
    heat[7, 0] = 0.9  # a smaller separate blob is ignored
    box, score = box_from_heatmap(heat, (80, 80), threshold=0.5)
    assert box == (50, 20, 70, 40) and score > 0.9
    assert context_crop((0, 0, 10, 10), (100, 50), margin=0.1, min_side=32) == (0, 0, 32, 32)
    bg = background_region((100, 100), [(0, 0, 100, 40)], min_crop=16)
    assert bg is not None and bg.bbox[1] >= 40 and bg.concept == "background"


def test_recipe_rows_keep_scale_name_what_they_show_and_fit_every_bucket(tmp_path):
    """Crops keep context (concept_share), are never enlarged past max_upscale, record where they were
    cut, name every concept they show, and lose at most 10% of their concept's box to the centre crop
    to a bucket at 64, 512 and 1024 px."""
    from datasets import load_from_disk

    from finestyle.core.geometry import box_kept_share, bucket_size
    from tests.conftest import make_scene, write_scene_boxes

    refs = tmp_path / "refs"
    refs.mkdir()
    scenes = {"s0.png": ((160, 128), 0), "s1.png": ((256, 160), 1)}
    for name, (size, seed) in scenes.items():
        make_scene(size, seed).save(refs / name)
    boxes = write_scene_boxes(tmp_path / "boxes.json", scenes)
    shares, upscale = [0.6, 0.3], 1.5
    c = cfg(
        tmp_path / "ds",
        [refs],
        concepts="boxes",
        boxes=boxes,
        concept_share=shares,
        max_upscale=upscale,
        name_covered=0.5,
        margin=0.0,
    )
    run_prepare(c, log=lambda m: None)
    ds = load_from_disk(str(tmp_path / "ds"))
    rows = [r for r in ds if r["method"] == "boxes"]
    assert len(rows) == 2 * 2 * len(shares)  # two concepts per scene, one crop per share
    for r in rows:
        (x0, y0, x1, y1), (cx0, cy0, cx1, cy1) = r["bbox"], r["crop"]
        iw, ih = scenes[r["source"]][0]
        assert cx0 <= x0 and cy0 <= y0 and x1 <= cx1 and y1 <= cy1  # the concept is inside its crop
        cw, ch = cx1 - cx0, cy1 - cy0
        # the concept fills at most its share of the crop's side, unless the image is too small
        assert any(
            ((x1 - x0) <= s * cw + 1 or cw == iw) and ((y1 - y0) <= s * ch + 1 or ch == ih) for s in shares
        ), r
        # never enlarged by more than max_upscale to reach the training resolution
        assert (cw * ch) ** 0.5 >= 64 / upscale - 1 or (cw == iw or ch == ih), r
        # the row image is the crop (stored at most 2x the resolution, aspect kept)
        w, h = r["image"].size
        assert abs(w / h - cw / ch) < 0.05
        scale = w / cw
        box = ((x0 - cx0) * scale, (y0 - cy0) * scale, (x1 - cx0) * scale, (y1 - cy0) * scale)
        for res in (64, 512, 1024):
            b = bucket_size((w, h), res, 8)
            assert b[0] % 8 == 0 and b[1] % 8 == 0
            assert box_kept_share((w, h), box, b) >= 0.9, (res, r["bbox"], r["crop"], b)
        # every concept with half its box in the crop is named in the text
        for other in (o for o in rows if o["source"] == r["source"] and o["concept"] != r["concept"]):
            ox0, oy0, ox1, oy1 = other["bbox"]
            inside = max(0, min(ox1, cx1) - max(ox0, cx0)) * max(0, min(oy1, cy1) - max(oy0, cy0))
            shown = inside >= 0.5 * (ox1 - ox0) * (oy1 - oy0)
            assert (other["concept"] in r["text"]) == shown, (r["text"], other["concept"])
    assert any(" and " in r["text"] for r in rows)  # the wide crops show both shapes
    card = (tmp_path / "ds" / "README.md").read_text()
    assert "crop" in card and "concept_share" in card

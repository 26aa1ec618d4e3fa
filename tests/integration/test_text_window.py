"""Every row's text fits its model's window: two styles stay two styles, from prepare to the server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from finestyle.config import PrepareConfig, ServeConfig, TrainConfig
from finestyle.core.models import load_tokenizers
from finestyle.core.text import phrase_in_window, token_count
from finestyle.export.swappable import run_swappable_export
from finestyle.prepare.stage import run_prepare
from finestyle.train.loop import run_train
from tests.integration.test_server import Server

EXAMPLES = Path(__file__).resolve().parents[2] / "data" / "examples"
STYLES = {"neon": "neon glow", "ink": "ink wash"}
Q = {"log": lambda m: None}


def _prepare(root: Path, style: str, base: str | None = "builtin:tiny-sd") -> Path:
    out = root / f"ds-{style.replace(' ', '-')}-{base is not None}"
    run_prepare(
        PrepareConfig(
            images=[str(root / "refs")],
            style=style,
            out=str(out),
            base=base,
            concepts="grid",
            max_concepts=2,
            grid_scales=[2],
            resolution=64,
            num_beams=1,
        ),
        **Q,
    )
    return out


@pytest.fixture(scope="module")
def two_styles(tmp_path_factory) -> dict[str, Path]:
    """data/examples' first two images prepared in two styles, each trained 6 steps from one seed."""
    root = tmp_path_factory.mktemp("window")
    (root / "refs").mkdir()
    for name in sorted(p.name for p in EXAMPLES.glob("*.png"))[:2]:
        shutil.copy(EXAMPLES / name, root / "refs" / name)
    runs = {}
    for key, style in STYLES.items():
        ds = _prepare(root, style)
        cfg = TrainConfig(
            dataset=str(ds), base="builtin:tiny-sd", out=str(root / key), steps=6, lr=5e-2, resolution=64
        )
        cfg.samples = False
        runs[key] = ds
        runs[f"{key}-adapter"] = Path(run_train(cfg, **Q).adapter)
    runs["root"] = root
    return runs


def test_texts_keep_the_style_inside_the_window_and_the_card_counts_the_trimmed(two_styles):
    (tok,) = load_tokenizers("builtin:tiny-sd")
    for key, style in STYLES.items():
        rows = [
            json.loads(x) for x in (two_styles[key] / "train" / "metadata.jsonl").read_text().splitlines()
        ]
        for r in rows:
            assert r["text"].endswith(f"in {style} style"), r["text"]
            assert token_count(tok, r["text"]) <= 77 and phrase_in_window([tok], r["text"], style)
        report = json.loads((two_styles[key] / "report.json").read_text())
        trimmed = report["counts"]["rows_text_trimmed"]
        # the tiny captioner's captions are longer than the window: the fitting really ran
        assert trimmed > 0 and report["counts"]["rows_style_outside_window"] == 0
        card = (two_styles[key] / "README.md").read_text()
        assert f"texts trimmed to fit the base model's text window: {trimmed} row(s)" in card


def test_two_styles_train_two_adapters_and_one_server_draws_two_images(two_styles, tmp_path):
    a, b = (load_file(str(two_styles[f"{k}-adapter"] / "pytorch_lora_weights.safetensors")) for k in STYLES)
    assert a.keys() == b.keys()
    assert any(not np.array_equal(a[k], b[k]) for k in a), "the two styles trained the same adapter"
    out = tmp_path / "swx"
    run_swappable_export(
        "builtin:tiny-sd", [str(two_styles[f"{k}-adapter"]) for k in STYLES], list(STYLES), str(out), **Q
    )
    with Server(ServeConfig(export=str(out), max_steps=4, max_size=128, max_prompt_tokens=1000)) as s:
        imgs = {}
        for k in STYLES:
            r = httpx.post(
                s.url + "/v1/generate",
                json={"prompt": f"a red boat, in {STYLES[k]} style", "steps": 2, "seed": 3, "style": k},
                timeout=60,
            )
            assert r.status_code == 200 and "X-FineStyle-Warning" not in r.headers
            imgs[k] = np.asarray(Image.open(__import__("io").BytesIO(r.content)), dtype=np.int16)
        assert np.abs(imgs["neon"] - imgs["ink"]).max() > 0, "one server gave the two styles the same image"
        # a prompt that names its style past the window is served, with a warning header
        long = "a red boat, " + "very " * 30 + "long, in neon glow style"
        r = httpx.post(s.url + "/v1/generate", json={"prompt": long, "steps": 1, "style": "neon"}, timeout=60)
        assert (
            r.status_code == 200
            and "past the text encoder's 77-token window" in r.headers["X-FineStyle-Warning"]
        )


def test_train_refuses_a_dataset_whose_style_phrase_is_cut(two_styles):
    """Prepared without a base (no window known), the tiny captioner's long captions push the style
    past tiny-sd's window: train says so in one line, exit 2, and writes nothing."""
    ds = _prepare(two_styles["root"], "neon glow", base=None)
    out = two_styles["root"] / "refused"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "finestyle.cli",
            "train",
            str(ds),
            "--base",
            "builtin:tiny-sd",
            "--out",
            str(out),
        ]
        + ["--steps", "2", "--resolution", "64"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "past the text encoder's 77-token window" in line and "'neon glow'" in line
    assert not (out / "adapter").exists()

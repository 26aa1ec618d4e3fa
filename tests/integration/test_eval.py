"""`finestyle eval`: the maths of the three axes, the report, reuse, the comparison, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from finestyle.config import EvalConfig, TrainConfig
from finestyle.eval.judges import ClipJudge, Scores, leak_matrix, leaked
from finestyle.eval.prompts import Prompt, read_prompt_file, real_prompts, world_prompts
from finestyle.eval.run import run_eval
from finestyle.train.loop import run_train
from finestyle.world.scene import OBJECTS
from tests.conftest import REPO, make_scene, prepare_small_dataset

QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def refs_dataset(tmp_path_factory) -> Path:
    return prepare_small_dataset(tmp_path_factory.mktemp("eval"))


def _adapter(dataset: Path, out: Path, **kw) -> str:
    cfg = dict(
        dataset=str(dataset),
        base="builtin:tiny-sd",
        out=str(out),
        steps=2,
        resolution=64,
        rank=4,
        samples=False,
    )
    cfg.update(kw)
    return run_train(TrainConfig(**cfg), **QUIET).adapter


def _ecfg(refs_dataset: Path, out: Path, **kw) -> EvalConfig:
    cfg = dict(
        model="builtin:tiny-sd",
        references=str(refs_dataset),
        out=str(out),
        judge="clip:builtin:tiny-clip",
        n_prompts=3,
        seeds=2,
        steps=2,
        batch=4,
        device="cpu",
    )
    cfg.update(kw)
    return EvalConfig(**cfg)


def test_identical_images_give_clip_i_one_and_gram_one():
    judge = ClipJudge("clip:builtin:tiny-clip")
    im = make_scene((96, 96), seed=5)
    refs = judge.references([im, im.copy()])
    sc = judge.score([im], [Prompt("a boat")], [], "paper-cut", refs)
    assert sc.style[0] == pytest.approx(1.0, abs=1e-5)
    assert sc.style_extra[0] == pytest.approx(1.0, abs=1e-5)
    other = judge.score([make_scene((96, 96), seed=9)], [Prompt("a boat")], [], "paper-cut", refs)
    assert other.style[0] < 1.0 - 1e-6  # a different picture is less similar (random weights: barely)


def test_leakage_counts_only_concepts_the_prompt_does_not_name():
    prompts = [Prompt("a red boat"), Prompt("a cat"), Prompt("a house")]
    concepts = ["boat", "tree"]
    present = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.8]])  # boat in 1 and 2, tree in 3
    sc = Scores(np.zeros(3), np.zeros(3), np.zeros(3), present)
    got = leaked(sc, np.array([0.5, 0.5]), prompts, concepts)
    # image 1 asked for the boat: not leakage; image 2 shows a boat unasked; image 3 a tree unasked
    assert got.tolist() == [False, True, True]
    # per concept (the report's leakage_by_concept): the boat leaks in image 2, the tree in image 3
    m = leak_matrix(sc, np.array([0.5, 0.5]), prompts, concepts)
    assert m.tolist() == [[False, False], [True, False], [False, True]]


def test_the_world_judge_reports_other_unasked_objects_as_the_leakage_control():
    """A judge that sees a boat, a cat and a tree in every image; the prompt asks for the boat, the
    references' concept is the cat: the cat is leakage, the tree is the control."""
    from PIL import Image

    from finestyle.eval.run import summarize

    judge = _fixed_world_judge([["object:boat", "object:cat", "object:tree", "style:halftone"]] * 2)
    images = [Image.new("RGB", (64, 64))] * 2
    prompts = [Prompt("a red boat"), Prompt("a tree")]
    sc = judge.score(images, prompts, ["cat"], "halftone", None)
    assert sc.prompt.tolist() == [1.0, 1.0] and sc.style.tolist() == [1.0, 1.0]
    other = sc.extra["other_objects"]
    assert other.shape == (2, 11)  # every world object but the references' cat
    # image 1 shows the tree unasked (the boat was asked for); image 2 asked for the tree, boat unasked
    assert other.sum(1).tolist() == [1, 1]
    base = Scores(
        np.zeros(2), np.zeros(2), np.zeros(2), np.zeros((2, 1)), {"other_objects": np.zeros((2, 11), bool)}
    )
    leak = leak_matrix(sc, np.array([0.5]), prompts, ["cat"])
    out = summarize(sc, leak, np.zeros((2, 1), bool), judge, ["cat"], base)
    assert out["leakage_by_concept"]["cat"] == {"with_adapter": 1.0, "base_model": 0.0}
    assert out["leakage_per_object"]["reference_objects"] == {"with_adapter": 1.0, "base_model": 0.0}
    # per image, 1 of the 10 unasked control objects shows (the tree, or the boat)
    assert out["leakage_per_object"]["other_objects"] == {"with_adapter": 0.1, "base_model": 0.0}
    # leakage is the excess over the control: the cat rises by 1, the control by 0.1 per object
    assert out["leakage"] == pytest.approx(0.9) and out["leakage_any_concept"] == 1.0


def _fixed_world_judge(present: list[list[str]]):
    """A world judge whose logits say, per image, exactly the labels in `present`."""
    from types import SimpleNamespace

    import torch

    from finestyle.eval.judges import WorldJudge
    from finestyle.world.data import JUDGE_LABELS

    logits = torch.full((len(present), len(JUDGE_LABELS)), -10.0)
    for i, labels in enumerate(present):
        for label in labels:
            logits[i, JUDGE_LABELS.index(label)] = 10.0

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, pixel_values):
            return SimpleNamespace(logits=logits[: len(pixel_values)])

    judge = WorldJudge.__new__(WorldJudge)
    judge.model = Fixed()
    return judge


def test_leakage_is_the_reference_objects_excess_over_the_control():
    """An adapter that draws extra objects of every kind leaks no reference content; one that adds the
    references' cat alone does."""
    from PIL import Image

    from finestyle.eval.run import summarize

    images = [Image.new("RGB", (64, 64))] * 4
    prompts = [Prompt("a red boat"), Prompt("a blue cup"), Prompt("a red boat"), Prompt("a blue cup")]
    concepts, th = ["cat", "tree"], np.array([0.5, 0.5])
    style = ["style:duotone", "background:grass"]
    base_j = _fixed_world_judge([[*style, "object:boat"], [*style, "object:cup"]] * 2)
    base = base_j.score(images, prompts, concepts, "duotone", None)
    base_leak = leak_matrix(base, th, prompts, concepts)
    # every world object shows in every image: reference and control rise alike
    crowd = _fixed_world_judge([[*style, *(f"object:{o}" for o in OBJECTS)]] * 4)
    sc = crowd.score(images, prompts, concepts, "duotone", None)
    out = summarize(sc, leak_matrix(sc, th, prompts, concepts), base_leak, crowd, concepts, base)
    assert out["leakage_any_concept"] == 1.0  # the old measure: every image "leaks"
    assert out["leakage"] == pytest.approx(0.0)  # the new one: no reference content
    # the cat alone appears: half the reference objects, none of the control
    cat = _fixed_world_judge(
        [[*style, "object:boat", "object:cat"], [*style, "object:cup", "object:cat"]] * 2
    )
    sc = cat.score(images, prompts, concepts, "duotone", None)
    out = summarize(sc, leak_matrix(sc, th, prompts, concepts), base_leak, cat, concepts, base)
    assert out["leakage"] == pytest.approx(0.5)
    assert out["leakage_per_object"]["other_objects"]["with_adapter"] == 0.0


def test_background_leakage_counts_the_references_background_shown_unasked():
    from PIL import Image

    from finestyle.eval.run import summarize

    images = [Image.new("RGB", (64, 64))] * 4
    prompts = [Prompt("a red boat on the grass"), Prompt("a blue cup over the sea")] * 2
    obj = [["object:boat"], ["object:cup"]] * 2
    base_j = _fixed_world_judge([o + ["background:grass"] for o in obj[:1]] + [o + ["background:sea"] for o in obj[1:2]] + [obj[0] + ["background:grass"], obj[1] + ["background:sea"]])  # fmt: skip
    base = base_j.score(images, prompts, [], "duotone", None)
    # the tuned model paints the references' desert into three of the four images
    planted = ["background:desert", "background:desert", "background:desert", "background:sea"]
    tuned_j = _fixed_world_judge([o + [b] for o, b in zip(obj, planted, strict=True)])
    sc = tuned_j.score(images, prompts, [], "duotone", None)
    none = np.zeros((4, 0), bool)
    out = summarize(sc, none, none, tuned_j, [], base, backgrounds=["desert"])
    assert out["background_leakage"] == 0.75
    assert out["background_leakage_raw"] == {"with_adapter": 0.75, "base_model": 0.0}
    assert summarize(base, none, none, base_j, [], base, backgrounds=["desert"])["background_leakage"] == 0


def test_world_object_thresholds_are_calibrated_on_base_images_of_prompts_not_naming_the_object():
    from finestyle.eval.judges import WORLD_CALIBRATION_QUANTILE, WorldJudge

    probs = np.full((100, len(OBJECTS)), 0.01)
    boat, cat = OBJECTS.index("boat"), OBJECTS.index("cat")
    probs[:, boat] = np.linspace(0, 0.9, 100)  # the judge sees boats where none was asked
    probs[:50, cat] = 0.99  # ... and cats where cats were asked (not a false positive)
    prompts = [Prompt("a red cat")] * 50 + [Prompt("a red cup")] * 50
    judge = WorldJudge.__new__(WorldJudge)
    judge.calibrate(Scores(np.zeros(100), np.zeros(100), np.zeros(100), np.zeros((100, 0)), {"objects": probs}), prompts)  # fmt: skip
    assert judge.object_thresholds[boat] == pytest.approx(
        np.quantile(probs[:, boat], WORLD_CALIBRATION_QUANTILE)
    )
    assert judge.object_thresholds[cat] == 0.5  # never above 0.5 where the base model is clean
    assert judge.object_thresholds[OBJECTS.index("cup")] == 0.5


def test_truth_is_read_from_the_labels_of_world_references(tmp_path):
    from finestyle.eval.run import read_truth
    from finestyle.world.data import render_folder

    folder = render_folder(tmp_path / "refs", 3, 64, "heldout", seed=5)
    lines = [json.loads(x) for x in (folder / "labels.jsonl").read_text().splitlines()]
    truth = read_truth([str(folder / x["file_name"]) for x in lines])
    assert truth == {
        "objects": sorted({o["name"] for x in lines for o in x["objects"]}),
        "backgrounds": sorted({x["background"] for x in lines}),
    }
    # an image without a labels line: no truth (the captioner's concepts are used)
    other = tmp_path / "other.png"
    other.write_bytes((folder / lines[0]["file_name"]).read_bytes())
    assert read_truth([str(folder / lines[0]["file_name"]), str(other)]) is None
    # world prompts then ask for the other backgrounds
    w = world_prompts({"boat"}, ("boat", "cat", "cup"), ["red", "blue"], 4, backgrounds=["on the grass", "over the sea"])  # fmt: skip
    assert [p.content for p in w][:2] == [w[0].content.split(" on ")[0] + " on the grass", w[1].content.split(" over ")[0] + " over the sea"]  # fmt: skip


def test_bootstrap_intervals_resample_whole_prompts():
    from finestyle.eval.run import bootstrap_ci

    groups = np.repeat(np.arange(4), 3)  # 4 prompts × 3 seeds
    same = bootstrap_ci({"x": np.full(12, 0.25)}, groups)["x"]
    assert same == pytest.approx([0.25, 0.25])  # no spread, no interval
    # one prompt leaks in all its seeds, three in none: the mean is 0.25 and the interval spans it
    v = np.repeat([1.0, 0.0, 0.0, 0.0], 3)
    lo, hi = bootstrap_ci({"x": v}, groups)["x"]
    assert lo == 0.0 and 0.25 < hi <= 1.0
    # the same figures over 40 prompts: a narrower interval
    lo40, hi40 = bootstrap_ci({"x": np.repeat(np.tile([1.0, 0, 0, 0], 10), 3)}, np.repeat(np.arange(40), 3))[
        "x"
    ]
    assert lo40 < 0.25 < hi40 and hi40 - lo40 < hi - lo
    assert bootstrap_ci({"x": v}, groups) == bootstrap_ci({"x": v}, groups)  # reproducible


def test_clip_thresholds_are_calibrated_on_base_images_of_prompts_not_naming_the_concept():
    judge = ClipJudge.__new__(ClipJudge)
    prompts = [Prompt("a boat")] + [Prompt(f"a thing {i}") for i in range(20)]
    scores = np.concatenate([[10.0], np.linspace(0, 1, 20)])[
        :, None
    ]  # the boat prompt's own image is ignored
    th = judge.thresholds(Scores(np.zeros(21), np.zeros(21), np.zeros(21), scores), prompts, ["boat"])
    assert th[0] == pytest.approx(np.quantile(np.linspace(0, 1, 20), 0.95))


def test_adapter_off_gives_zero_leakage_and_a_rerun_reuses_every_image(refs_dataset, tmp_path):
    # a LoRA with B = 0 (peft's default init) and no learning: the tuned model is the base model
    off = _adapter(refs_dataset, tmp_path / "off", init="default", lr=1e-30, steps=1)
    rep = run_eval(_ecfg(refs_dataset, tmp_path / "e", adapter=off), **QUIET)
    assert rep["leakage"] == 0.0
    assert rep["leakage_raw"]["with_adapter"] == rep["leakage_raw"]["base_model"]
    assert rep["ci95"]["leakage"] == [0.0, 0.0]  # the same images: no difference to resample
    lo, hi = rep["ci95"]["prompt_fidelity"]
    assert lo <= rep["prompt_fidelity"] <= hi
    assert set(rep["leakage_by_concept"]) == set(rep["concepts"]) and rep["concepts"]
    for c, rates in rep["leakage_by_concept"].items():
        assert rates["with_adapter"] == rates["base_model"], c
    assert rep["n_images"] == 6
    for key in ("prompt_fidelity", "style_fidelity", "leakage"):
        assert isinstance(rep[key], float)
    prov = rep["provenance"]
    assert prov["dataset_fingerprint"] and prov["adapter_fingerprint"] and prov["versions"]["torch"]
    assert prov["seeds"] == [20_000_000, 20_000_001] and len(prov["prompts"]) == 3
    out = tmp_path / "e"
    assert json.loads((out / "report.json").read_text())["n_images"] == 6
    md = (out / "report.md").read_text()
    assert "| model |" in md and "Leakage by reference concept" in md and rep["concepts"][0] in md
    assert (out / "grid.png").stat().st_size > 0
    again = run_eval(_ecfg(refs_dataset, tmp_path / "e", adapter=off), **QUIET)
    assert again["images_reused"] == 12  # 6 base + 6 tuned, nothing generated again
    assert again["prompt_fidelity"] == rep["prompt_fidelity"]


def test_style_guidance_sweep_writes_the_trade_off_plot(refs_dataset, tmp_path):
    ad = _adapter(refs_dataset, tmp_path / "a", lr=1e-2, steps=2)
    rep = run_eval(
        _ecfg(refs_dataset, tmp_path / "e", adapter=ad, style_guidance=[0.0, 1.0], n_prompts=1), **QUIET
    )
    assert [s["style_guidance"] for s in rep["sweep"]] == [0.0, 1.0]
    assert rep["sweep"][0]["style_fidelity"] != rep["sweep"][1]["style_fidelity"]
    assert (tmp_path / "e" / "guidance.png").stat().st_size > 0


def test_prompt_files_and_sets():
    assert len(real_prompts()) >= 100
    supers = {p.superclass for p in real_prompts()}
    assert {"animals", "objects", "vehicles", "food", "buildings", "plants", "people"} <= supers
    assert real_prompts()[0].full("watercolor") == "A cat, animals, in watercolor style"
    w = world_prompts({"boat", "cat"}, ("boat", "cat", "cup", "moon"), ["red", "orange"], 5)
    assert len(w) == 5 and not any(p.names("boat") or p.names("cat") for p in w)
    assert all(p.content.startswith(("a red ", "an orange ")) for p in w)
    w = world_prompts({"boat"}, ("boat", "cat", "cup"), ["red", "orange", "blue"], 6)
    assert len({p.content for p in w}) == 6  # no prompt repeats while unused pairs remain


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "eval", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
        cwd=cwd,
    )


def test_bad_input_is_one_line_and_exit_2(refs_dataset, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    base = ["builtin:tiny-sd", "--adapter", "x", "--out", str(tmp_path / "o")]
    export = tmp_path / "export"  # a plain export without its base UNet: λ1 > 0 cannot run
    export.mkdir()
    (export / "manifest.json").write_text(
        json.dumps({"base_model": "builtin:tiny-sd", "has_base_unet": False})
    )
    cases = [
        (
            [
                str(export),
                "--references",
                str(refs_dataset),
                "--style-guidance",
                "0,1",
                "--out",
                str(tmp_path / "o"),
            ],
            "has no base UNet",
        ),
        ([*base, "--references", str(refs_dataset), "--prompts", str(empty)], "has no prompts"),
        ([*base, "--references", str(refs_dataset), "--judge", "oracle"], "--judge 'oracle'"),
        ([*base, "--references", str(tmp_path)], "holds no prepared dataset"),
        (
            [
                "no-such-org/no-such-model",
                "--references",
                str(refs_dataset),
                "--out",
                str(tmp_path / "o"),
                "--judge",
                "clip:no-such-org/no-such-clip",
            ],
            "no-such-org/no-such-clip",
        ),
    ]
    for args, words in cases:
        p = _cli(*args)
        assert p.returncode == 2, (args, p.stdout[-1500:], p.stderr[-1500:])
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert read_prompt_file(REPO / "finestyle" / "eval" / "prompts_real.tsv")


@pytest.mark.slow
def test_compare_trains_four_variants_and_reports_each(tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(2):
        make_scene((128, 96), seed=i).save(refs / f"s{i}.png")
    p = _cli(
        "--compare", "--references", str(refs), "--style", "paper-cut", "--base", "builtin:tiny-sd",
        "--judge", "clip:builtin:tiny-clip", "--out", str(tmp_path / "c"), "--train-steps", "2",
        "--n-prompts", "2", "--seeds", "1", "--steps", "2", "--device", "cpu",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((tmp_path / "c" / "report.json").read_text())
    assert set(rep["variants"]) == {"finestyle", "plain", "attention_attn", "none_kv"}
    for name, v in rep["variants"].items():
        for key in (
            "prompt_fidelity",
            "style_fidelity",
            "leakage",
            "n_images",
            "trainable_params",
            "train_seconds",
        ):
            assert key in v, (name, key)
    kv, attn = rep["variants"]["finestyle"]["trainable_params"], rep["variants"]["plain"]["trainable_params"]
    assert attn > kv > 0  # q/k/v/out of every attention layer vs cross-attention K/V
    assert rep["variants"]["finestyle"]["data"] == "attention" and rep["variants"]["plain"]["data"] == "none"
    assert "| finestyle |" in p.stdout
    from PIL import Image

    grid = Image.open(tmp_path / "c" / "grid.png")
    cell = 128 + 2 * 11 + 4  # an image and two caption lines
    assert grid.height == 5 * cell  # the base model's row, then one row per variant
    assert grid.width > 2 * 128  # the row labels' column beside the two prompts


def _world_judge_installed() -> bool:
    from finestyle.core.models import SHA256SUMS, weights_dir

    return (weights_dir() / "world-judge" / SHA256SUMS).is_file()


@pytest.mark.skipif(not _world_judge_installed(), reason="the world judge's weights are not installed")
def test_planted_reference_objects_are_reported_as_leakage():
    """Scenes of the asked object alone vs the same scenes with a reference object added: the world
    judge and the leakage maths must report the planted object, and nothing where none is planted."""
    import random

    from finestyle.eval.judges import WorldJudge
    from finestyle.world.scene import render, sample_scene

    judge = WorldJudge("world")
    asked = ["cup", "bird", "car", "flower"] * 5
    clean, planted = [], []
    for i, obj in enumerate(asked):
        clean.append(
            render(sample_scene(random.Random(i), "halftone", n_objects=1, objects=(obj,)), 64).image
        )
        two = sample_scene(random.Random(i), "halftone", n_objects=2, objects=(obj, "boat"))
        planted.append(render(two, 64).image)
    prompts = [Prompt(f"a red {o}") for o in asked]
    th = np.full(1, 0.5)
    base = leaked(judge.score(clean, prompts, ["boat"], "halftone", None), th, prompts, ["boat"])
    tuned = leaked(judge.score(planted, prompts, ["boat"], "halftone", None), th, prompts, ["boat"])
    assert base.mean() <= 0.1 and tuned.mean() >= 0.8

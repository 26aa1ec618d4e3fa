"""Leakage-aware checkpoints: `train --eval-every N --select best` scores the adapter during training on
prompts disjoint from the final evaluation's, plots the three axes, publishes the chosen step as adapter/,
and the export's manifest records those figures. Evaluation never changes how the run trains."""

from __future__ import annotations

import json

import pytest
import torch

from finestyle.artifacts.adapter import ADAPTER_WEIGHTS
from finestyle.config import EvalConfig, TrainConfig
from finestyle.eval.checkpoints import finish_selection, select_best, selection_prompts, train_with_eval

pytestmark = pytest.mark.slow
JUDGE = "clip:builtin:tiny-clip"


def test_select_best_is_least_leakage_within_the_style_margin():
    h = [
        {"step": 2, "style_fidelity": 0.50, "leakage": 0.00},  # leaks least, but its style is too weak
        {"step": 4, "style_fidelity": 0.80, "leakage": 0.20},
        {"step": 6, "style_fidelity": 0.84, "leakage": 0.10},
        {"step": 8, "style_fidelity": 0.86, "leakage": 0.30},  # the best style
        {"step": 10, "style_fidelity": 0.82, "leakage": 0.10},  # ties with step 6: the later wins
    ]
    assert select_best(h)["step"] == 10
    assert select_best(h[:4])["step"] == 6


def test_selection_prompts_are_disjoint_from_the_final_evaluation():
    from finestyle.eval.judges import load_eval_judge
    from finestyle.eval.run import default_prompts

    judge = load_eval_judge(JUDGE, "cpu")
    final = set(default_prompts(judge, [], EvalConfig().n_prompts, EvalConfig().seed))
    picked = selection_prompts(judge, [], 6)
    assert len(picked) == 6 and not final & set(picked)


def _cfg(dataset, out, **kw) -> TrainConfig:
    base = dict(
        dataset=str(dataset),
        base="builtin:tiny-sd",
        out=str(out),
        steps=6,
        lr=1e-3,
        rank=4,
        seed=1,
        samples=False,
        checkpoint_every=2,
        eval_judge=JUDGE,
        eval_prompts=2,
        eval_seeds=1,
        eval_steps=2,
    )
    return TrainConfig(**(base | kw))


def test_train_eval_every_selects_and_the_export_records_it(tmp_path):
    from safetensors.torch import load_file

    from finestyle.config import ExportConfig
    from finestyle.export.steps import run_export
    from tests.conftest import prepare_small_dataset

    ds = prepare_small_dataset(tmp_path / "data")
    plain = train_with_eval(_cfg(ds, tmp_path / "plain"), log=lambda m: None)
    run = tmp_path / "run"
    res = train_with_eval(_cfg(ds, run, eval_every=2, select="best"), log=lambda m: None)
    rep = json.loads((run / "report.json").read_text())
    hist = rep["selection"]["history"]
    assert [h["step"] for h in hist] == [2, 4, 6] and (run / "eval.png").is_file()
    assert res.selected_step == select_best(hist)["step"] == rep["selection"]["step"]
    info = json.loads((run / "adapter" / "finestyle_adapter.json").read_text())
    assert info["step"] == res.selected_step
    # evaluating at checkpoints does not change training: the final weights equal a run without it
    a = load_file(str(tmp_path / "plain" / "adapter" / ADAPTER_WEIGHTS))
    b = load_file(str(run / "eval" / "step-0000006" / "adapter" / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert plain.steps == 6
    # the checkpoint prompts are the disjoint set, written beside the scores
    assert len((run / "eval" / "prompts.txt").read_text().splitlines()) == 2

    # a history where step 4 leaks least within the margin: adapter/ becomes step 4's weights
    planted = [dict(h) for h in hist]
    for h in planted:
        h.update(style_fidelity=0.9, leakage=0.3)
    planted[1].update(leakage=0.0)
    finish_selection(_cfg(ds, run, eval_every=2, select="best"), planted, res, log=lambda m: None)
    c = load_file(str(run / "adapter" / ADAPTER_WEIGHTS))
    d = load_file(str(run / "eval" / "step-0000004" / "adapter" / ADAPTER_WEIGHTS))
    assert all(torch.equal(c[k], d[k]) for k in c)
    assert json.loads((run / "adapter" / "finestyle_adapter.json").read_text())["step"] == 4

    run_export(
        ExportConfig(
            base="builtin:tiny-sd",
            adapter=str(run / "adapter"),
            out=str(tmp_path / "exp"),
            parity_steps=2,
            check_bf16=False,
            check_openvino=False,
        ),
        log=lambda m: None,
    )
    ev = json.loads((tmp_path / "exp" / "manifest.json").read_text())["eval"]
    assert ev["step"] == 4 and ev["select"] == "best" and ev["leakage"] == 0.0 and ev["judge"] == JUDGE


def test_select_best_without_eval_every_is_refused():
    from finestyle.core.errors import UserError

    with pytest.raises(UserError, match="eval_every"):
        TrainConfig(select="best")

"""Leakage-aware checkpoints: score style fidelity, prompt fidelity and leakage during training, and
let the least-leaking good checkpoint become the adapter.

`train --eval-every N` evaluates the adapter every N steps (and at the last step) on a small prompt
set that is disjoint from the one a final `finestyle eval` uses (other prompts, other seeds), so the
selection never sees the final evaluation's images. `--select best` then publishes, as `adapter/`,
the evaluated step with the least leakage among those whose style fidelity is within 0.05 of the
best; `last` keeps the final weights. The train package only calls a hook; this module connects it.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finestyle.config import EvalConfig, TrainConfig
from finestyle.core.fs import read_json, staging_dir, write_json
from finestyle.eval.judges import check_judge_spec, load_eval_judge
from finestyle.eval.prompts import Prompt
from finestyle.eval.run import default_prompts, read_references, run_eval
from finestyle.train.loop import TrainHooks, TrainResult, TrainState, adapter_meta, run_train, save_adapter

STYLE_MARGIN = 0.05
SELECTION_SEED = 30_000_000  # apart from training seeds, EvalConfig's 20_000_000 and calibration 35_000_000


def selection_prompts(judge: Any, concepts: list[str], n: int) -> list[Prompt]:
    """`n` prompts of the judge's own kind that a default final evaluation does not use."""
    final = EvalConfig()
    used = set(default_prompts(judge, concepts, final.n_prompts, final.seed))
    pool = default_prompts(judge, concepts, 10 * (n + final.n_prompts), SELECTION_SEED)
    fresh = list(dict.fromkeys(p for p in pool if p not in used))
    if len(fresh) < n:
        fresh += [p for p in dict.fromkeys(pool) if p not in fresh][: n - len(fresh)]
    return fresh[:n]


def select_best(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The least leakage among the steps whose style fidelity is within STYLE_MARGIN of the best;
    ties go to the later step."""
    top = max(h["style_fidelity"] for h in history)
    ok = [h for h in history if h["style_fidelity"] >= top - STYLE_MARGIN]
    return min(ok, key=lambda h: (h["leakage"], -h["step"]))


@dataclass
class CheckpointEval:
    """The train hook: at every `cfg.eval_every` steps and at the end, save the adapter and score it."""

    cfg: TrainConfig
    log: Callable[[str], None]
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.cfg.out) / "eval"
        check_judge_spec(self.cfg.eval_judge)
        hist = self.root / "history.json"
        if hist.is_file() and self.cfg.resume:  # a resumed run keeps the scores it already has
            self.history = read_json(hist)["history"]
        self.prompts_file = self.root / "prompts.txt"

    def _write_prompts(self) -> None:
        refs = read_references(self.cfg.dataset)
        judge = load_eval_judge(self.cfg.eval_judge, "cpu")
        concepts, _ = judge.concepts(refs["concepts"])
        prompts = selection_prompts(judge, concepts, self.cfg.eval_prompts)
        self.root.mkdir(parents=True, exist_ok=True)
        lines = [f"{p.content}\t{p.superclass}" if p.superclass else p.content for p in prompts]
        self.prompts_file.write_text("\n".join(lines) + "\n")

    def on_step(self, st: TrainState) -> None:
        if not st.main_proc:
            return
        if st.step % self.cfg.eval_every and st.step != self.cfg.steps:
            return
        if any(h["step"] == st.step for h in self.history):
            return
        if not self.prompts_file.is_file():
            self._write_prompts()
        step_dir = self.root / f"step-{st.step:07d}"
        was_training = st.unet.training
        st.unet.eval()
        # evaluation loads models and LoRA layers (their init draws from the global RNG): fork it,
        # so that a run with evaluation trains exactly as one without
        with torch.random.fork_rng(devices=[]):
            with staging_dir(step_dir / "adapter") as tmp:
                save_adapter(tmp, st.unet, st.lcfg, adapter_meta(st))
            rep = run_eval(
                EvalConfig(
                    model=self.cfg.base,
                    adapter=str(step_dir / "adapter"),
                    references=self.cfg.dataset,
                    out=str(step_dir),
                    prompts=str(self.prompts_file),
                    judge=self.cfg.eval_judge,
                    seeds=self.cfg.eval_seeds,
                    steps=self.cfg.eval_steps,
                    device=str(st.device),
                    seed=SELECTION_SEED,
                ),
                log=lambda m: None,
                cache_dir=self.root / "images",
            )
        if was_training:
            st.unet.train()
        entry = {
            "step": st.step,
            "prompt_fidelity": rep["prompt_fidelity"],
            "style_fidelity": rep["style_fidelity"],
            "leakage": rep["leakage"],
            "adapter": str(step_dir / "adapter"),
        }
        self.history.append(entry)
        self.history.sort(key=lambda h: h["step"])
        write_json(self.root / "history.json", {"judge": self.cfg.eval_judge, "history": self.history})
        self.log(
            f"train: step {st.step}: prompt {entry['prompt_fidelity']:.3f}, style {entry['style_fidelity']:.3f}, "
            f"leakage {entry['leakage']:+.3f}"
        )


def train_with_eval(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """`run_train`, plus checkpoint evaluation (`eval_every`) and the selection of adapter/ (`select`)."""
    if not cfg.eval_every:
        return run_train(cfg, log)
    ev = CheckpointEval(cfg, log)
    result = run_train(cfg, log, TrainHooks(on_step=ev.on_step))
    if result.reused or result.rank != 0:
        return result
    return finish_selection(cfg, ev.history, result, log)


def finish_selection(
    cfg: TrainConfig, history: list[dict[str, Any]], result: TrainResult, log: Callable[[str], None]
) -> TrainResult:
    """Publish the selected adapter, the eval plot and the selection in report.json."""
    out = Path(cfg.out)
    chosen = select_best(history) if cfg.select == "best" else history[-1]
    if cfg.select == "best" and chosen["step"] != history[-1]["step"]:
        with staging_dir(out / "adapter") as tmp:  # replaced atomically: old or new, never a mix
            shutil.copytree(chosen["adapter"], tmp, dirs_exist_ok=True)
    plot_history(history, out / "eval.png", chosen["step"])
    selection = {
        "mode": cfg.select,
        "step": chosen["step"],
        "figures": {k: chosen[k] for k in ("prompt_fidelity", "style_fidelity", "leakage")},
        "judge": cfg.eval_judge,
        "style_margin": STYLE_MARGIN,
        "history": history,
    }
    report = read_json(out / "report.json")
    write_json(out / "report.json", report | {"selection": selection})
    log(
        f"train: adapter/ holds step {chosen['step']} ({cfg.select}): leakage {chosen['leakage']:+.3f}, "
        f"style {chosen['style_fidelity']:.3f}, prompt {chosen['prompt_fidelity']:.3f}"
    )
    return dataclasses.replace(result, selected_step=chosen["step"], selection=selection["figures"])


def plot_history(history: list[dict[str, Any]], path: Path, chosen: int) -> None:
    """The three axes over the training steps, the selected step marked (eval.png beside loss.png)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for key, label in (("style_fidelity", "style"), ("prompt_fidelity", "prompt"), ("leakage", "leakage")):
        ax.plot(steps, [h[key] for h in history], marker="o", label=label)
    ax.axvline(chosen, color="grey", linestyle="--", linewidth=1, label=f"adapter/ (step {chosen})")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)

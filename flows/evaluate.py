"""`evaluate` flow: `finestyle eval` on a model, with its table and grid published as artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from finestyle.config import EvalConfig, from_dict
from finestyle.eval.run import run_eval
from flows.common import RETRY, markdown, table


@task(**RETRY, log_prints=False)
def eval_task(config: dict[str, Any]) -> dict[str, Any]:
    return run_eval(from_dict(EvalConfig, config, "eval"), log=get_run_logger().info)


@flow(name="evaluate", log_prints=True)
def evaluate_model(config: dict[str, Any]) -> dict[str, Any]:
    """Style fidelity, prompt fidelity and leakage (tuned minus base) of one model."""
    cfg = from_dict(EvalConfig, config, "eval")
    rep = eval_task(config)
    rows = [{"style_guidance": s["style_guidance"], **{k: s[k] for k in AXES}} for s in rep["sweep"]] or [
        {"style_guidance": rep["style_guidance"], **{k: rep[k] for k in AXES}}
    ]
    table("eval-axes", rows, "Prompt fidelity, style fidelity and leakage (tuned minus base)")
    markdown(
        "eval-summary",
        f"# eval: `{cfg.model}`\n\n"
        + Path(cfg.out, "report.md").read_text()
        + f"\n- judge: `{cfg.judge}`, {rep['n_images']} images\n- grid: `{cfg.out}/grid.png`\n"
        f"- report: `{cfg.out}/report.json`\n",
        "FineStyle evaluation",
    )
    return {k: rep[k] for k in (*AXES, "n_images")} | {"out": cfg.out}


AXES = ("prompt_fidelity", "style_fidelity", "leakage")

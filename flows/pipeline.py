"""The whole DAG as one Prefect flow: prepare_dataset -> train_adapter -> export_model (-> one image).

Each stage's result is keyed by content (input hashes, upstream fingerprints, configuration), so a
second run of the same configuration reuses all three stages, a changed training option re-runs
train and export but not prepare, and `force` re-runs a stage on purpose. A run killed during
training resumes from its newest checkpoint: the training folder is named by its content key, so a
checkpoint is only ever resumed by the same configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task

from finestyle.config import PipelineConfig, from_dict, to_dict
from finestyle.runtime.generate import GenerateResult, run_generate
from finestyle.train.loop import train_cache_key
from flows.common import inline_image, markdown
from flows.evaluate import evaluate_model
from flows.export import export_model
from flows.prepare import prepare_dataset, task_runner_for
from flows.train import train_adapter


@dataclass
class PipelineResult:
    """The pipeline's export, what each stage did (built, reused, trained) and the summary lines."""

    export: str
    stages: dict[str, str]
    summary: dict[str, str]


def resolve_paths(cfg: PipelineConfig) -> PipelineConfig:
    """Fill stage paths from `workdir` and chain the stages (dataset -> train, train -> export)."""
    from finestyle.config import ExportConfig, PrepareConfig, TrainConfig

    wd = Path(cfg.workdir)
    if cfg.prepare.out == PrepareConfig().out:
        cfg.prepare.out = str(wd / "dataset")
    cfg.train.dataset = cfg.prepare.out
    if cfg.train.base == TrainConfig().base and cfg.prepare.base:
        cfg.train.base = cfg.prepare.base
    cfg.export.base = cfg.train.base
    if cfg.export.out == ExportConfig().out:
        cfg.export.out = str(wd / "export")
    if cfg.eval is not None:
        from finestyle.config import EvalConfig

        cfg.eval.model = cfg.export.out
        if cfg.eval.references == EvalConfig().references:
            cfg.eval.references = cfg.prepare.out
        if cfg.eval.out == EvalConfig().out:
            cfg.eval.out = str(wd / "eval")
    return cfg


@task
def generate_image(export_dir: str, prompt: str, out: str) -> GenerateResult:
    from finestyle.config import GenerateConfig

    return run_generate(GenerateConfig(model=export_dir, prompt=prompt, out=out, steps=20))


def tracked_run_line(train_out: Path) -> str | None:
    """Where the training run is tracked: MLflow's run (URI and id), TensorBoard's log folder."""
    from finestyle.core.tracking import read_identity

    ident = read_identity(train_out)
    parts = []
    if ident.get("mlflow_run_id"):
        parts.append(f"MLflow run {ident['mlflow_run_id']} at {ident['mlflow_uri']}")
    if ident.get("tensorboard_dir"):
        parts.append(f"TensorBoard: tensorboard --logdir {ident['tensorboard_root']}")
    return "; ".join(parts) or None


@flow(name="finestyle-pipeline", log_prints=True)
def finestyle_pipeline(
    config: dict[str, Any] | None = None, force: list[str] | None = None
) -> PipelineResult:
    """prepare -> train -> export as subflows. Returns the export, what each stage did and a summary."""
    force = list(force or [])
    cfg = resolve_paths(from_dict(PipelineConfig, config or {}))
    # 1. prepare
    cfg.prepare.force = cfg.prepare.force or "prepare" in force
    runner = prepare_dataset.with_options(task_runner=task_runner_for(cfg.task_runner))
    ds = runner(config=to_dict(cfg.prepare))
    if cfg.review:  # a person approves the rows (or a reviewed version of them) before any training
        from flows.common import run_log
        from flows.review import await_review

        cfg.train.dataset = await_review(
            ds.out, cfg.review_host, cfg.review_port, cfg.review_timeout, run_log()
        )
    # 2. train: the folder is named by the run's content key (dataset fingerprint + options)
    cfg.train.force = cfg.train.force or "train" in force
    if cfg.train.out == "runs/train":
        cfg.train.out = str(Path(cfg.workdir) / "train" / train_cache_key(cfg.train)[:12])
    cfg.train.resume = True  # continue a killed run of this same configuration, if any
    tr = train_adapter(config=to_dict(cfg.train))
    # 3. export
    cfg.export.adapter = tr.adapter
    cfg.export.force = cfg.export.force or "export" in force
    ex = export_model(config=to_dict(cfg.export))
    # 4. one image from the export
    image = None
    if cfg.generate_prompt:
        image = generate_image(ex.out, cfg.generate_prompt, str(Path(cfg.workdir) / "generated.png")).files[0]
    stages = {
        "prepare": "reused" if ds.reused else "built",
        "train": "reused" if tr.reused else "trained",
        "export": "reused" if ex.reused else "built",
    }
    summary = {
        "stages": ", ".join(f"{k} {v}" for k, v in stages.items()),
        "dataset preview": f"{cfg.train.dataset}/preview.png",
        "training samples": tr.samples_dir,
        "loss curve": f"{tr.out}/loss.png",
        "export": ex.out,
        "manifest": f"{ex.out}/manifest.json",
    }
    if image:
        summary["generated image"] = image
    tracked = tracked_run_line(Path(tr.out))
    if tracked:
        summary["tracked run"] = tracked
    if ex.registered:
        r = ex.registered
        summary["registered model"] = f"models:/{r['name']}/{r['version']} ({r['tracking_uri']})"
    # 5. optional: evaluate the export (style, prompt, leakage against the base model)
    if cfg.eval is not None:
        ev = evaluate_model(config=to_dict(cfg.eval))
        summary["eval"] = (
            f"prompt {ev['prompt_fidelity']:.3f}, style {ev['style_fidelity']:.3f}, "
            f"leakage {ev['leakage']:+.3f} ({ev['out']}/report.md)"
        )
    pictures = "".join(
        f"\n\n### {title}\n\n{inline_image(path, title)}"
        for title, path in (
            ("dataset preview", f"{cfg.train.dataset}/preview.png"),
            ("loss curve", f"{tr.out}/loss.png"),
            ("generated image", image or ""),
        )
        if path and Path(path).is_file()
    )
    markdown(
        "pipeline-summary",
        "# FineStyle pipeline\n\n" + "\n".join(f"- **{k}**: `{v}`" for k, v in summary.items()) + pictures,
        "FineStyle pipeline run",
    )
    return PipelineResult(export=ex.out, stages=stages, summary=summary)

"""Runs tracked where ML engineers look: TensorBoard and MLflow through accelerate's trackers, a resumed
training continuing its run, eval figures in the same run, exports registered in MLflow's registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finestyle.config import TrainConfig
from finestyle.core.errors import UserError
from finestyle.train.loop import run_train
from finestyle.train.state import TrainHooks
from tests.conftest import prepare_small_dataset

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

Q = {"log": lambda m: None}


class Crash(Exception):
    pass


def _crash_at(step: int) -> TrainHooks:
    def on_checkpoint(st, path):
        if st.step == step:
            raise Crash

    return TrainHooks(on_checkpoint=on_checkpoint)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> Path:
    """4 steps tracked to TensorBoard and MLflow, killed after the step-2 checkpoint, then resumed."""
    root = tmp_path_factory.mktemp("track")
    ds = prepare_small_dataset(root / "data")
    out = root / "run"
    cfg = TrainConfig(
        dataset=str(ds),
        base="builtin:tiny-sd",
        out=str(out),
        steps=4,
        lr=5e-2,
        resolution=64,
        checkpoint_every=2,
        sample_every=1,
        sample_steps=2,
        report_to="tensorboard,mlflow",
    )
    with pytest.raises(Crash):
        run_train(cfg, hooks=_crash_at(2), **Q)
    cfg.resume = True
    run_train(cfg, **Q)
    return out


def test_tensorboard_reads_back_the_scalars_and_the_samples(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ident = json.loads((tracked_run / "tracking.json").read_text())
    acc = EventAccumulator(ident["tensorboard_dir"], size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/steps_per_s"} <= set(tags["scalars"])
    steps = sorted({e.step for e in acc.Scalars("train/loss")})
    assert steps == [1, 2, 3, 4]  # one run: the resumed steps continue the first ones
    # grids at every step but 2 (its checkpoint hook crashed before them), then the final one
    assert "samples" in tags["images"] and {e.step for e in acc.Images("samples")} == {1, 3, 4}


def test_mlflow_has_one_run_with_metrics_params_tags_and_sample_images(tracked_run):
    import mlflow

    ident = json.loads((tracked_run / "tracking.json").read_text())
    mlflow.set_tracking_uri(ident["mlflow_uri"])
    runs = mlflow.search_runs(experiment_names=["finestyle"], output_format="list")
    assert [r.info.run_id for r in runs] == [ident["mlflow_run_id"]]  # the resume did not start a new run
    run = runs[0]
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert run.data.params["rank"] and run.data.params["steps"] == "4"
    report = json.loads((tracked_run / "report.json").read_text())
    assert run.data.tags["finestyle.dataset_key"] == report["dataset_fingerprint"]
    from finestyle.core.models import model_fingerprint

    assert run.data.tags["finestyle.base_key"] == model_fingerprint("builtin:tiny-sd")
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "images")]
    assert any("samples" in a for a in arts)


def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    from finestyle.core import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda n: None if n == "mlflow" else real(n))
    with pytest.raises(UserError, match=r"pip install 'finestyle\[mlflow\]'"):
        tracking.require("mlflow")
    with pytest.raises(UserError, match="train.report_to"):
        TrainConfig(dataset="x", report_to="wandb")


@pytest.fixture(scope="module")
def guide_run(tracked_run, tmp_path_factory) -> Path:
    """The guide's commands ("## Track a training run"), as written, with DATASET a prepared dataset,
    run in a fresh folder (its own ./mlruns). Returns that folder."""
    import os
    import re
    import shlex
    import subprocess
    import sys

    from tests.conftest import doc_section

    cwd = tmp_path_factory.mktemp("guide")
    block = re.search(r"```bash\n(.*?)```", doc_section("## Track a training run"), re.S).group(1)
    ds = str(tracked_run.parent / "data" / "ds")
    for line in block.strip().splitlines():
        args = [ds if a == "DATASET" else a for a in shlex.split(line)]
        assert args[0] == "finestyle"
        r = subprocess.run(
            [sys.executable, "-m", "finestyle.cli", *args[1:]],
            cwd=cwd,
            capture_output=True,
            text=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": ""},
        )
        assert r.returncode == 0, (line, r.stderr[-2000:])
    return cwd


def test_export_registered_in_mlflow_loads_as_pyfunc_and_serves(guide_run, tmp_path):
    """`export --register mlflow:NAME` (the guide's): a model version in the training run, tagged with its
    lineage; pyfunc.load_model generates the image `finestyle generate` gives; `serve models:/NAME/1`
    serves it."""
    import base64
    import io
    import os
    import subprocess
    import sys

    import httpx
    import mlflow
    import numpy as np
    import pandas as pd
    from PIL import Image

    from finestyle.core.fs import sha256_file
    from tests.integration.test_server import wait_ready

    run = guide_run / "runs" / "tracked"
    ident = json.loads((run / "tracking.json").read_text())
    export = guide_run / "exports" / "tracked"
    mlflow.set_tracking_uri(ident["mlflow_uri"])
    v = mlflow.MlflowClient().get_model_version("my-style", "1")
    assert v.run_id == ident["mlflow_run_id"]  # lineage: logged into the training run
    manifest = json.loads((export / "manifest.json").read_text())
    assert v.tags["finestyle.manifest_sha256"] == sha256_file(export / "manifest.json")
    assert v.tags["finestyle.base_model"] == "builtin:tiny-sd"
    assert v.tags["finestyle.adapter_key"] == manifest["adapter_fingerprint"]
    assert (
        v.tags["finestyle.dataset_key"]
        == json.loads((run / "report.json").read_text())["dataset_fingerprint"]
    )
    assert float(v.tags["finestyle.parity.unet_max_abs_diff"]) == pytest.approx(
        manifest["parity"]["unet"]["max_abs_diff"], rel=1e-2
    )
    model = mlflow.pyfunc.load_model("models:/my-style/1")
    got = model.predict(pd.DataFrame([{"prompt": "a red boat", "seed": 5, "steps": 3}]))
    assert len(got) == 1
    mine = np.asarray(Image.open(io.BytesIO(base64.b64decode(got[0]))))
    cli = tmp_path / "cli.png"
    r = subprocess.run(
        [sys.executable, "-m", "finestyle.cli", "generate", str(export), "a red boat", "--seed", "5"]
        + ["--steps", "3", "--out", str(cli)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-1500:]
    assert np.array_equal(mine, np.asarray(Image.open(cli)))
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": ident["mlflow_uri"]}
    proc = subprocess.Popen(
        [sys.executable, "-m", "finestyle.cli", "serve", "models:/my-style/1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 120)
        r = httpx.post(url + "/v1/generate", json={"prompt": "a red boat", "steps": 3, "seed": 5}, timeout=60)
        assert r.status_code == 200
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), mine)
    finally:
        proc.terminate()
        proc.wait(30)


def test_eval_figures_go_to_the_training_run(tracked_run, tmp_path):
    import mlflow

    from finestyle.config import EvalConfig
    from finestyle.eval.run import run_eval

    cfg = EvalConfig(
        model="builtin:tiny-sd",
        adapter=str(tracked_run / "adapter"),
        references=str(tracked_run.parent / "data" / "ds"),
        out=str(tmp_path / "eval"),
        judge="clip:builtin:tiny-clip",
        n_prompts=2,
        seeds=2,
        steps=2,
        batch=4,
        device="cpu",
        report_to="mlflow",
    )
    rep = run_eval(cfg, **Q)
    ident = json.loads((tracked_run / "tracking.json").read_text())
    mlflow.set_tracking_uri(ident["mlflow_uri"])
    run = mlflow.get_run(ident["mlflow_run_id"])
    assert run.data.metrics["eval/leakage"] == pytest.approx(rep["leakage"])
    assert run.data.metrics["eval/style_fidelity"] == pytest.approx(rep["style_fidelity"])
    lo, hi = rep["ci95"]["leakage"]
    assert run.data.metrics["eval/leakage_ci95_low"] == pytest.approx(lo) and hi >= lo
    assert len(mlflow.search_runs(experiment_names=["finestyle"], output_format="list")) == 1


def test_the_tracking_guide_runs_as_written(guide_run):
    """ "## Track a training run": both trackers, and the export registered in the training run."""
    ident = json.loads((guide_run / "runs" / "tracked" / "tracking.json").read_text())
    assert ident["trackers"] == ["tensorboard", "mlflow"] and Path(ident["tensorboard_dir"]).is_dir()
    import mlflow

    mlflow.set_tracking_uri(ident["mlflow_uri"])
    v = mlflow.MlflowClient().get_model_version("my-style", "1")
    assert v.run_id == ident["mlflow_run_id"]
    assert (guide_run / "exports" / "tracked" / "manifest.json").is_file()

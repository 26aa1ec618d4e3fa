"""The Prefect layer under a real (temporary, local) Prefect API."""

from __future__ import annotations

import pytest

from tests.conftest import make_scene, write_scene_boxes


@pytest.fixture(scope="module", autouse=True)
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _pipeline_config(tmp_path, refs, steps=4):
    return {
        "workdir": str(tmp_path / "wd"),
        "prepare": {
            "images": [str(refs)],
            "style": "ink",
            "concepts": "boxes",
            "boxes": write_scene_boxes(
                tmp_path / "boxes.json", {f"s{i}.png": ((128, 96), i) for i in range(2)}
            ),
            "max_concepts": 2,
            "resolution": 64,
            "num_beams": 1,
        },
        "train": {"steps": steps, "resolution": 64, "sample_steps": 2, "checkpoint_every": 2, "rank": 4},
        "export": {"parity_steps": 2, "check_bf16": False, "check_openvino": False},
    }


@pytest.fixture
def refs(tmp_path):
    d = tmp_path / "refs"
    d.mkdir()
    for i in range(2):
        make_scene((128, 96), seed=i).save(d / f"s{i}.png")
    return d


def test_task_fn_wraps_the_library(refs, tmp_path):
    from prefect.logging import disable_run_logger

    from flows.prepare import plan_task, process_chunk_task, publish_task

    cfg = {
        "images": [str(refs)],
        "style": "ink",
        "out": str(tmp_path / "ds"),
        "concepts": "none",
        "resolution": 64,
    }
    with disable_run_logger():
        plan = plan_task.fn(cfg)
        assert len(plan.candidates) == 2 and plan.reuse is None
        m = [
            process_chunk_task.fn([p], cfg, str(tmp_path / "scratch"), i)
            for i, p in enumerate(plan.candidates)
        ]
        assert all(x["images"] == 1 for x in m)
        r = publish_task.fn(cfg, plan, m)
    assert r.rows == 2 and (tmp_path / "ds" / "report.json").exists()
    with disable_run_logger():
        assert plan_task.fn(cfg).reuse.reused is True


def test_pipeline_runs_reuses_and_invalidates(refs, tmp_path):
    from prefect.artifacts import Artifact

    from flows.pipeline import finestyle_pipeline

    cfg = _pipeline_config(tmp_path, refs)
    first = finestyle_pipeline(config=cfg)
    assert first.stages == {"prepare": "built", "train": "trained", "export": "built"}
    assert (tmp_path / "wd" / "export" / "manifest.json").exists()
    second = finestyle_pipeline(config=cfg)
    assert second.stages == {"prepare": "reused", "train": "reused", "export": "reused"}
    # one training option changed: train and export re-run, prepare does not
    cfg["train"]["rank"] = 2
    third = finestyle_pipeline(config=cfg)
    assert third.stages == {"prepare": "reused", "train": "trained", "export": "built"}
    # forcing a stage re-runs it
    fourth = finestyle_pipeline(config=cfg, force=["prepare"])
    assert fourth.stages["prepare"] == "built"
    summary = Artifact.get("pipeline-summary")
    assert Artifact.get("export-parity") is not None
    # pictures where the production user looks: inline PNGs (data: URIs) in the artifacts, within the limit
    import base64
    import io
    import re

    from PIL import Image

    from flows.common import INLINE_MAX_BYTES, INLINE_MAX_SIDE

    for key, n in (("pipeline-summary", 2), ("prepare-summary", 1), ("train-summary", 2)):
        body = summary.data if key == "pipeline-summary" else Artifact.get(key).data
        pngs = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", body)
        assert len(pngs) >= n, (key, body[:300])
        for b in pngs:
            raw = base64.b64decode(b)
            assert len(raw) <= INLINE_MAX_BYTES and max(Image.open(io.BytesIO(raw)).size) <= INLINE_MAX_SIDE


def test_bad_input_fails_without_retry(tmp_path):
    from prefect.logging import disable_run_logger

    from finestyle.core.errors import UserError
    from flows.prepare import prepare_dataset

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    with disable_run_logger(), pytest.raises(UserError, match="none of the 1 input"):
        prepare_dataset(
            config={
                "images": [str(tmp_path / "bad")],
                "style": "ink",
                "out": str(tmp_path / "o"),
                "concepts": "none",
            }
        )


def test_killed_pipeline_resumes_training_and_redoes_nothing_finished(refs, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from flows.pipeline import finestyle_pipeline

    cfg = _pipeline_config(tmp_path, refs, steps=6)
    code = f"""
import os, signal
import finestyle.train.loop as T
real = T.save_checkpoint
def die(root, step, *a, **k):
    p = real(root, step, *a, **k)
    if step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return p
T.save_checkpoint = die
from flows.pipeline import finestyle_pipeline
finestyle_pipeline(config={cfg!r})
"""
    import signal

    env = os.environ.copy()
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "killed.log"
    # Own session: the killed run's temporary Prefect server (a child process) is cleaned up with it.
    with open(log, "w") as f:
        p = subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = p.wait(timeout=600)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert rc == -9, log.read_text()[-2000:]
    assert not (tmp_path / "wd" / "export").exists()
    again = finestyle_pipeline(config=cfg)
    assert again.stages == {"prepare": "reused", "train": "trained", "export": "built"}
    train_dirs = list((tmp_path / "wd" / "train").iterdir())
    assert len(train_dirs) == 1
    rep = json.loads((train_dirs[0] / "report.json").read_text())
    assert rep["steps"] == 6 and rep["steps_this_run"] == 2  # resumed at step 4


def test_deployments_register_validate_and_schedule():
    import importlib

    import yaml
    from prefect import Flow
    from prefect.client.orchestration import get_client

    from finestyle.config import PipelineConfig, from_dict
    from flows.deployments import WATCH_CRON, build_deployments
    from tests.conftest import REPO

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert {"finestyle-pipeline", "finestyle-pipeline-gpu", "prepare-watched"} <= names
    for d in spec["deployments"]:
        path, fn = d["entrypoint"].split(":")
        fl = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), fn)
        assert isinstance(fl, Flow), d["entrypoint"]
        params = fl.validate_parameters(d.get("parameters", {}))
        if "config" in params:
            from_dict(PipelineConfig, params["config"])  # our own validation, too
        if d["name"] == "prepare-watched":
            assert d["schedules"][0]["cron"] == WATCH_CRON
        if d["name"] == "finestyle-pipeline-gpu":
            assert d["work_pool"]["name"] == "gpu"
    for dep in build_deployments():
        dep.apply()
    with get_client(sync_client=True) as client:
        watched = client.read_deployment_by_name("prepare_watched/prepare-watched")
        assert watched.entrypoint.endswith("flows/watch.py:prepare_watched")
        assert watched.schedules and watched.schedules[0].schedule.cron == WATCH_CRON
        pipe = client.read_deployment_by_name("finestyle-pipeline/finestyle-pipeline")
        assert pipe.parameters["config"]["workdir"] == "runs/pipeline"


def test_watched_flow_skips_unchanged_folders(tmp_path):
    from flows.watch import prepare_watched

    watch = tmp_path / "incoming"
    for name, seed in (("a", 1), ("b", 2)):
        (watch / name).mkdir(parents=True)
        make_scene((128, 96), seed=seed).save(watch / name / "x.png")
    kw = dict(watch_dir=str(watch), datasets_dir=str(tmp_path / "ds"), concepts="none", resolution=64)
    first = prepare_watched(**kw)
    assert {v["status"] for v in first.values()} == {"prepared"}
    make_scene((128, 96), seed=9).save(watch / "b" / "y.png")
    second = prepare_watched(**kw)
    assert second["a"]["status"] == "skipped (unchanged)" and second["b"]["status"] == "prepared"
    assert second["b"]["rows"] == 2


def test_dask_runner_builds_the_same_dataset(refs, tmp_path):
    pytest.importorskip("prefect_dask")
    from datasets import load_from_disk

    from flows.prepare import prepare_dataset, task_runner_for

    base = {
        "images": [str(refs)],
        "style": "ink",
        "concepts": "boxes",
        "boxes": write_scene_boxes(tmp_path / "boxes.json", {f"s{i}.png": ((128, 96), i) for i in range(2)}),
        "max_concepts": 2,
        "resolution": 64,
        "num_beams": 1,
    }
    prepare_dataset(config={**base, "out": str(tmp_path / "threads")}, chunk_size=1)
    dask_flow = prepare_dataset.with_options(task_runner=task_runner_for("dask", workers=2))
    dask_flow(config={**base, "out": str(tmp_path / "dask")}, chunk_size=1)
    a, b = load_from_disk(str(tmp_path / "threads")), load_from_disk(str(tmp_path / "dask"))
    assert len(a) == len(b) > 2
    for col in ("text", "concept", "bbox", "source", "method"):
        assert a[col] == b[col], col
    assert [r["image"].tobytes() for r in a] == [r["image"].tobytes() for r in b]


def test_pull_step_uses_finestyle_checkout_else_the_deploying_folder(tmp_path, monkeypatch):
    import asyncio
    import os

    import yaml
    from prefect.deployments.steps.core import run_steps
    from prefect.utilities.templating import apply_values

    from tests.conftest import REPO

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployed, override = tmp_path / "deployed", tmp_path / "override"
    deployed.mkdir(), override.mkdir()
    # what `prefect deploy` stores: the pull steps with the build step's output filled in
    pull = apply_values(spec["pull"], {"checkout": {"stdout": str(deployed)}}, remove_notset=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FINESTYLE_CHECKOUT", raising=False)
    asyncio.run(run_steps(pull))
    assert os.getcwd() == str(deployed)
    monkeypatch.setenv("FINESTYLE_CHECKOUT", str(override))
    asyncio.run(run_steps(pull))
    assert os.getcwd() == str(override)


def test_pipeline_eval_section_evaluates_the_export_and_publishes_artifacts(refs, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.pipeline import finestyle_pipeline

    cfg = _pipeline_config(tmp_path, refs)
    cfg["eval"] = {"judge": "clip:builtin:tiny-clip", "n_prompts": 2, "seeds": 1, "steps": 2, "device": "cpu"}
    out = finestyle_pipeline(config=cfg)
    assert out.summary["eval"].startswith("prompt ")
    import json

    rep = json.loads((tmp_path / "wd" / "eval" / "report.json").read_text())
    assert rep["provenance"]["model"] == str(tmp_path / "wd" / "export")
    assert rep["provenance"]["dataset"] == str(tmp_path / "wd" / "dataset") and rep["n_images"] == 2
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"eval-axes", "eval-summary"} <= keys


def test_publish_style_creates_adds_and_reloads_a_running_server(tmp_path, monkeypatch):
    import httpx

    from finestyle.config import ServeConfig, TrainConfig
    from finestyle.train.loop import run_train
    from flows.styles import publish_style
    from tests.conftest import prepare_small_dataset
    from tests.integration.test_server import Server

    ds = prepare_small_dataset(tmp_path / "data")
    adapters = {}
    for i, name in enumerate(("ink", "chalk")):
        cfg = TrainConfig(
            dataset=str(ds),
            base="builtin:tiny-sd",
            out=str(tmp_path / name),
            steps=2,
            resolution=64,
            rank=4,
            samples=False,
            seed=i,
        )
        adapters[name] = run_train(cfg, log=lambda m: None).adapter
    export = str(tmp_path / "studio")
    first = publish_style(export_dir=export, adapter=adapters["ink"], name="ink")  # creates the export
    assert first["styles"] == ["ink"] and first["served"] is None
    monkeypatch.setenv("FINESTYLE_ADMIN_TOKEN", "t0ken")
    with Server(ServeConfig(export=export, max_steps=4, max_size=128)) as s:
        res = publish_style(export_dir=export, adapter=adapters["chalk"], name="chalk", server=s.url)
        assert res["styles"] == ["chalk", "ink"] and res["served"] == ["base", "chalk", "ink"]
        assert [d["id"] for d in httpx.get(s.url + "/v1/models").json()["data"]] == ["base", "chalk", "ink"]
    monkeypatch.setenv("FINESTYLE_ADMIN_TOKEN", "wrong")
    with Server(ServeConfig(export=export, max_steps=4, max_size=128)) as s:
        monkeypatch.setenv("FINESTYLE_ADMIN_TOKEN", "other")
        with pytest.raises(Exception, match="refused the admin token"):
            publish_style(export_dir=export, adapter=adapters["chalk"], name="chalk2", server=s.url)

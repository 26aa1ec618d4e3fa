"""The Prefect layer under a real (temporary, local) Prefect API."""

from __future__ import annotations

import pytest

from tests.conftest import make_scene


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
            "concepts": "grid",
            "grid_scales": [2],
            "max_concepts": 2,
            "resolution": 64,
            "num_beams": 1,
        },
        "train": {"steps": steps, "resolution": 64, "sample_steps": 2, "checkpoint_every": 2, "rank": 4},
        "export": {"parity_steps": 2},
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

    from flows.prepare import build_dataset, discover_inputs

    with disable_run_logger():
        found = discover_inputs.fn([str(refs)])
        assert len(found["candidates"]) == 2
        r = build_dataset.fn(
            {
                "images": [str(refs)],
                "style": "ink",
                "out": str(tmp_path / "ds"),
                "concepts": "none",
                "resolution": 64,
            }
        )
    assert r["rows"] == 2 and (tmp_path / "ds" / "report.json").exists()


def test_pipeline_runs_reuses_and_invalidates(refs, tmp_path):
    from prefect.artifacts import Artifact

    from flows.pipeline import finestyle_pipeline

    cfg = _pipeline_config(tmp_path, refs)
    first = finestyle_pipeline(config=cfg)
    assert first["stages"] == {"prepare": "built", "train": "trained", "export": "built"}
    assert (tmp_path / "wd" / "export" / "manifest.json").exists()
    second = finestyle_pipeline(config=cfg)
    assert second["stages"] == {"prepare": "reused", "train": "reused", "export": "reused"}
    # one training option changed: train and export re-run, prepare does not
    cfg["train"]["rank"] = 2
    third = finestyle_pipeline(config=cfg)
    assert third["stages"] == {"prepare": "reused", "train": "trained", "export": "built"}
    # forcing a stage re-runs it
    fourth = finestyle_pipeline(config=cfg, force=["prepare"])
    assert fourth["stages"]["prepare"] == "built"
    assert Artifact.get("pipeline-summary") is not None
    assert Artifact.get("export-parity") is not None


def test_bad_input_fails_without_retry(tmp_path):
    from prefect.logging import disable_run_logger

    from finestyle.errors import UserError
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

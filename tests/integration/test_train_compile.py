"""`train --compile on` and `--channels-last` on the tiny builtin: the compiled step equals the eager
one within float noise, the report gives the compile apart from the steady step, and a compiled
run's checkpoint resumes to the uninterrupted run's adapter."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from finestyle.train.loop import ADAPTER_WEIGHTS, run_train
from tests.integration.test_train import QUIET, dataset, tcfg  # noqa: F401  (module fixture reuse)

pytestmark = pytest.mark.slow


def _adapter(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / ADAPTER_WEIGHTS))


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |a| over all the adapter's tensors (Frobenius)."""
    num = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    return float(num / sum((a[k] ** 2).sum() for k in a) ** 0.5)


def test_compiled_training_matches_eager_and_resumes_from_its_checkpoint(dataset, tmp_path):  # noqa: F811
    # one square shape: one compiled graph (about 80 s of inductor on 2 cores; a graph per bucket shape)
    kw = dict(steps=6, samples=False, checkpoint_every=3, keep_checkpoints=2, buckets=False)
    eager, comp = tmp_path / "eager", tmp_path / "compiled"
    run_train(tcfg(dataset, eager, **kw), **QUIET)
    run_train(tcfg(dataset, comp, compile="on", channels_last=True, **kw), **QUIET)
    le = json.loads((eager / "report.json").read_text())
    lc = json.loads((comp / "report.json").read_text())
    # same data, noise and timesteps: the losses agree to float noise (fused kernels reorder sums)
    assert lc["losses"] == pytest.approx(le["losses"], rel=1e-4, abs=1e-6)
    a, b = _adapter(eager), _adapter(comp)
    assert a.keys() == b.keys()
    # Adam turns float noise in near-zero gradients into full-size steps: measured 0.9% apart
    assert _rel(a, b) < 0.05
    assert lc["compile"] == "on" and lc["first_step_seconds"] > lc["steady_step_seconds"] > 0
    # a compiled run killed after step 3 resumes from that checkpoint (compiled) to the same adapter
    resumed = tmp_path / "resumed"
    shutil.copytree(comp, resumed)
    shutil.rmtree(resumed / "adapter")
    shutil.rmtree(resumed / "checkpoints" / "step-0000006")
    (resumed / "report.json").unlink()
    run_train(tcfg(dataset, resumed, compile="on", channels_last=True, resume=True, **kw), **QUIET)
    rep = json.loads((resumed / "report.json").read_text())
    assert rep["steps_this_run"] == 3
    c = _adapter(resumed)
    assert _rel(b, c) < 1e-3, _rel(b, c)

"""Stage 2 on the builtin tiny model: targets, reload equivalence, exact resume, other SD configs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finestyle.config import TrainConfig
from finestyle.train.loop import ADAPTER_WEIGHTS, TrainingDiverged, run_train
from tests.conftest import doc_section

QUIET = {"log": lambda m: None}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from tests.conftest import prepare_small_dataset

    return prepare_small_dataset(tmp_path_factory.mktemp("train"), sizes=[(128, 96), (160, 96)])


def tcfg(dataset, out, **kw) -> TrainConfig:
    base = dict(
        dataset=str(dataset),
        base="builtin:tiny-sd",
        out=str(out),
        steps=6,
        resolution=64,
        sample_steps=2,
        lr=1e-3,
        rank=4,
        seed=3,
        mixed_precision="no",  # fp32 on every CPU (`auto` is bf16 on CPUs with bf16 units)
    )
    base.update(kw)
    return TrainConfig(**base)


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    c = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=c).sample


def test_train_writes_everything_and_reloads_with_diffusers(dataset, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from finestyle.core.models import build_builtin_pipeline
    from finestyle.train.loop import add_lora, load_lora_state

    out = tmp_path / "run"
    r = run_train(tcfg(dataset, out, alpha=8.0), **QUIET)  # alpha != rank: a lost alpha shows
    for p in (
        "adapter/" + ADAPTER_WEIGHTS,
        "adapter/finestyle_lora_kohya.safetensors",
        "adapter/finestyle_adapter.json",
        "loss.png",
        "report.json",
    ):
        assert (out / p).exists(), p
    assert list((out / "samples").glob("*.png")) and list((out / "checkpoints").glob("step-*"))
    rep = json.loads((out / "report.json").read_text())
    assert rep["steps"] == 6 and rep["trainable_params"] == r.trainable_params > 0
    assert 0 < rep["trainable_share"] < 0.05 and rep["dataset_fingerprint"]
    meta = json.loads((out / "adapter" / "finestyle_adapter.json").read_text())
    assert meta["base_model"] == "builtin:tiny-sd" and meta["rank"] == 4 and meta["alpha"] == 8.0

    # the trained UNet, rebuilt from the final checkpoint through our own peft path
    trained = build_builtin_pipeline("builtin:tiny-sd")
    add_lora(trained.unet, tcfg(dataset, out, alpha=8.0))
    ck = sorted((out / "checkpoints").glob("step-*"))[-1]
    load_lora_state(trained.unet, load_file(str(ck / "adapter.safetensors")))
    # a fresh diffusers pipeline + load_lora_weights must reproduce it
    fresh = StableDiffusionPipeline(**build_builtin_pipeline("builtin:tiny-sd").components)
    base_out = _unet_out(fresh.unet)
    fresh.load_lora_weights(str(out / "adapter"), weight_name=ADAPTER_WEIGHTS)
    torch.testing.assert_close(_unet_out(fresh.unet), _unet_out(trained.unet), atol=1e-6, rtol=0)
    assert (_unet_out(fresh.unet) - base_out).abs().max() > 1e-6, "adapter had no effect"
    # kohya copy carries alpha and the lora_unet_ names
    kohya = load_file(str(out / "adapter" / "finestyle_lora_kohya.safetensors"))
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert any(k.endswith(".alpha") and float(v) == 8.0 for k, v in kohya.items())


@pytest.mark.parametrize(
    "targets,pattern", [("kv", r"attn2\.to_[kv]$"), ("attn", r"attn[12]\.to_(q|k|v|out\.0)$")]
)
def test_only_targeted_modules_change(dataset, tmp_path, targets, pattern):
    from safetensors.torch import load_file

    from finestyle.core.models import build_builtin_pipeline

    run_train(tcfg(dataset, tmp_path / "r", targets=targets, steps=2), **QUIET)
    sd = load_file(str(tmp_path / "r" / "adapter" / ADAPTER_WEIGHTS))
    modules = {
        re.sub(r"\.lora\.(up|down)\.weight$|\.lora_[AB]\.weight$", "", k).replace("unet.", "", 1) for k in sd
    }
    assert modules and all(re.search(pattern, m) for m in modules), modules
    all_targets = [
        n for n, _ in build_builtin_pipeline("builtin:tiny-sd").unet.named_modules() if re.search(pattern, n)
    ]
    assert len(modules) == len(all_targets)
    if targets == "kv":
        assert not any("attn1" in m or "to_q" in m or "to_out" in m for m in modules)


def _train_in_subprocess(
    dataset, out, kill_at: int | None = None, resume: bool = False, base: str = "builtin:tiny-sd"
) -> int:
    """Each run in a fresh process, so that all three start from identical process state."""
    code = f"""
import os, signal
import finestyle.train.loop as T
from finestyle.config import TrainConfig
def die_after(state, path):
    if state.step == {kill_at!r}:
        os.kill(os.getpid(), signal.SIGKILL)
T.run_train(hooks=T.TrainHooks(on_checkpoint=die_after), cfg=TrainConfig(dataset={str(dataset)!r}, base={base!r}, out={str(out)!r}, steps=6,
            resolution=64, sample_steps=2, lr=1e-3, rank=4, seed=3, checkpoint_every=2, caption_dropout=0.3,
            dropout=0.1, flip=True, resume={resume!r}), log=lambda m: None)
"""
    return subprocess.run(
        [sys.executable, "-c", code], env=os.environ.copy(), capture_output=True, text=True
    ).returncode


def test_kill_and_resume_is_bit_exact(dataset, tmp_path):
    from safetensors.torch import load_file

    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _train_in_subprocess(dataset, full) == 0
    assert _train_in_subprocess(dataset, killed, kill_at=4) == -9
    assert (
        not (killed / "adapter").exists()
        and (killed / "checkpoints" / "step-0000004" / "state.json").exists()
    )
    assert _train_in_subprocess(dataset, killed, resume=True) == 0
    a = load_file(str(full / "adapter" / ADAPTER_WEIGHTS))
    b = load_file(str(killed / "adapter" / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    rep = json.loads((killed / "report.json").read_text())
    assert rep["steps_this_run"] == 2


def test_nan_loss_stops_with_step_and_keeps_checkpoint(dataset, tmp_path, monkeypatch):
    import finestyle.train.step as T

    real = T.diffusion_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(T, "diffusion_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"at step 3.*step-0000002"):
        run_train(tcfg(dataset, tmp_path / "r", checkpoint_every=2), **QUIET)
    assert (tmp_path / "r" / "checkpoints" / "step-0000002" / "state.json").exists()


def test_v_prediction_and_linear_projection_config_trains(dataset, tmp_path):
    from diffusers import UNet2DConditionModel

    from finestyle.core.models import build_builtin_pipeline

    pipe = build_builtin_pipeline("builtin:tiny-sd")
    cfg = dict(pipe.unet.config)
    cfg["use_linear_projection"] = True
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    pipe.unet = UNet2DConditionModel(**cfg)
    pipe.register_modules(unet=pipe.unet)
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    folder = tmp_path / "sd2like"
    pipe.save_pretrained(folder, safe_serialization=True)
    assert (
        json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
        == "v_prediction"
    )
    r = run_train(tcfg(dataset, tmp_path / "r", base=str(folder), steps=3), **QUIET)
    assert r.steps == 3 and r.final_loss == r.final_loss  # finite


def test_cli_train_20_steps(dataset, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "finestyle.cli",
            "train",
            str(dataset),
            "--base",
            "builtin:tiny-sd",
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "20",
            "--resolution",
            "64",
            "--sample-steps",
            "2",
        ],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "steps/s" in r.stdout and (tmp_path / "run" / "adapter" / ADAPTER_WEIGHTS).exists()


@pytest.mark.slow
def test_data_parallel_with_accelerate_launch_on_cpu(dataset, tmp_path):
    """Two processes (gloo on CPU) through `accelerate launch`: DDP keeps the ranks in step."""
    import shutil

    acc = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert acc, "accelerate's launcher is installed with the package"
    out = tmp_path / "ddp"
    # the docs' command ("### Data-parallel training"), as written, with this test's dataset, model and
    # out; --multi_gpu is accelerate's data-parallel launcher (torchrun), and with --device cpu the
    # ranks use gloo; the other flags only silence accelerate's questions about its config.
    block = re.search(r"```bash\n(.*?)```", doc_section("### Data-parallel training"), re.S).group(1)
    argv = shlex.split(block.strip())
    assert argv[:2] == ["accelerate", "launch"] and "--multi_gpu" in argv, argv
    subs = {"4": "2", "DATASET": str(dataset), "MODEL": "builtin:tiny-sd", "DIR": str(out)}
    argv = [acc] + [subs.get(a, a) for a in argv[1:]]
    at = argv.index("-m")
    argv[at:at] = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    r = subprocess.run(
        [
            *argv,
            "--steps",
            "4",
            "--resolution",
            "64",
            "--sample-steps",
            "2",
            "--device",
            "cpu",
            "--checkpoint-every",
            "2",
        ],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["world_size"] == 2 and rep["steps"] == 4
    assert (out / "adapter" / ADAPTER_WEIGHTS).exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def test_bf16_autocast_on_cpu_trains_with_fp32_lora_and_samples(dataset, tmp_path):
    from safetensors.torch import load_file

    from finestyle.core.env import cpu_has_bf16

    lines: list[str] = []
    r = run_train(
        tcfg(dataset, tmp_path / "bf", mixed_precision="bf16", sample_every=2, steps=4), log=lines.append
    )
    rep = json.loads((tmp_path / "bf" / "report.json").read_text())
    assert rep["autocast"] == "torch.bfloat16" and r.final_loss == r.final_loss
    assert len(list((tmp_path / "bf" / "samples").glob("*.png"))) >= 2
    sd = load_file(str(tmp_path / "bf" / "adapter" / ADAPTER_WEIGHTS))
    assert all(v.dtype == torch.float32 for v in sd.values())  # trainable weights kept in fp32
    # a CPU without bf16 units says so once (bf16 is emulated there, and samples are drawn in fp32)
    said = [x for x in lines if "no bf16 units" in x]
    assert len(said) == (0 if cpu_has_bf16() else 1), lines


def test_fp32_previews_give_the_frozen_bf16_weights_back_bit_for_bit():
    from finestyle.train.samples import frozen_in_fp32

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 4))
    net[0].to(torch.bfloat16).requires_grad_(False)
    frozen, trained = net[0].weight, net[1].weight
    before, trained_before = frozen.detach().clone(), trained.detach().clone()
    with frozen_in_fp32(net):
        assert frozen.dtype == torch.float32 and torch.equal(frozen.to(torch.bfloat16), before)
        assert trained.dtype == torch.float32
    assert frozen.dtype == torch.bfloat16 and torch.equal(frozen.view(torch.int16), before.view(torch.int16))
    assert net[1].weight is trained and torch.equal(trained, trained_before)

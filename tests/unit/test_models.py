from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from finestyle.core.errors import ModelLoadError
from finestyle.core.models import (
    BUILTINS,
    build_builtin_captioner,
    build_builtin_pipeline,
    load_captioner,
    load_sd_pipeline,
    pick_device,
    pick_dtype,
)


def test_builtins_are_deterministic_and_leave_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_builtin_pipeline("builtin:tiny-sd")
    after = torch.rand(1)
    b = build_builtin_pipeline("builtin:tiny-sd")
    assert torch.equal(before, after), "building a builtin changed the caller's RNG stream"
    for (k, va), (_, vb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k
    # it really has cross-attention blocks
    assert any(n.endswith("attn2.to_k") for n, _ in a.unet.named_modules())


def test_saved_tiny_sd_loads_with_plain_diffusers_and_generates(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    assert (tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(tiny_sd_dir.rglob("*.bin"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(
        "a red boat", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert img.size == (64, 64)
    assert np.asarray(img).std() > 0


def test_saved_tiny_blip_loads_and_captions(tiny_blip_dir):
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(tiny_blip_dir, use_safetensors=True)
    proc = BlipProcessor.from_pretrained(tiny_blip_dir)
    inputs = proc(images=[Image.new("RGB", (80, 80), (200, 10, 10))], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=2)
    text = proc.batch_decode(out, skip_special_tokens=True)[0]
    assert len(text.split()) >= 2


def test_load_from_local_folder_and_builtin_agree(tiny_sd_dir):
    a = load_sd_pipeline(str(tiny_sd_dir), device="cpu")
    b = load_sd_pipeline("builtin:tiny-sd", device="cpu")
    assert a.unet.dtype == torch.float32
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    m, p = load_captioner("builtin:tiny-blip", device="cpu")
    assert m.dtype == torch.float32 and p.tokenizer.bos_token == "[DEC]"


def test_missing_models_give_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="hub is unreachable.*pass DIR"):
        load_sd_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="local folder lacks the files"):
        load_sd_pipeline(str(tmp_path / "empty"), device="cpu")
    with pytest.raises(ModelLoadError, match="unknown builtin"):
        load_captioner("builtin:nope")
    with pytest.raises(ModelLoadError, match="captioner model"):
        load_sd_pipeline("builtin:tiny-blip")


def test_a_hub_id_without_network_fails_with_one_line_when_offline_mode_is_unset(tmp_path):
    """No hub here: the first load probes it once, switches the process offline, and the hub client's
    retry blocks (five MaxRetryError tracebacks over ~30 s before) never start."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "finestyle.cli",
            "generate",
            "org/model",
            "a boat",
            "--out",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "hub is unreachable" in lines[0], r.stderr
    assert "MaxRetryError" not in r.stderr + r.stdout


def test_device_and_dtype_choice():
    dev = pick_device()
    assert dev.type in ("cuda", "mps", "cpu")
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cuda")) == torch.float16
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16


def test_benchmark_builtins_are_registered():
    assert {"builtin:tiny-sd", "builtin:tiny-blip", "builtin:sd15-random", "builtin:blip-base-random"} <= set(
        BUILTINS
    )
    m, _ = build_builtin_captioner("builtin:tiny-blip")
    assert sum(p.numel() for p in m.parameters()) < 2_000_000


def test_import_sets_nothing_global():
    code = (
        "import os; before = dict(os.environ); import finestyle, finestyle.core.models, finestyle.config, "
        "finestyle.cli.app; assert dict(os.environ) == before, set(os.environ) ^ set(before)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT", "ORT_", "DO_NOT"))}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)

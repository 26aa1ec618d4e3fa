"""The model family, read from the model; SDXL's conditioning packing; kohya SGM names; the memory guard."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from finestyle.config import TrainConfig
from finestyle.core import sd
from finestyle.core.errors import ModelLoadError, UserError


def test_family_comes_from_the_model(tmp_path):
    from safetensors.torch import save_file

    from finestyle.core.models import model_family

    assert model_family("builtin:tiny-sd") == sd.SD
    assert model_family("builtin:tiny-sdxl") == model_family("builtin:sdxl-random") == sd.SDXL
    xl = tmp_path / "xl"
    xl.mkdir()
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert model_family(str(xl)) == sd.SDXL
    only_unet = tmp_path / "u" / "unet"
    only_unet.mkdir(parents=True)
    (only_unet / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    assert model_family(str(only_unet.parent)) == sd.SDXL
    (only_unet / "config.json").write_text(json.dumps({"addition_embed_type": None}))
    assert model_family(str(only_unet.parent)) == sd.SD
    # single files: SDXL's original checkpoints hold a second text encoder (conditioner.embedders.1)
    save_file(
        {"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, str(tmp_path / "xl.safetensors")
    )
    save_file({"cond_stage_model.transformer.x": torch.zeros(2)}, str(tmp_path / "v1.safetensors"))
    assert model_family(str(tmp_path / "xl.safetensors")) == sd.SDXL
    assert model_family(str(tmp_path / "v1.safetensors")) == sd.SD
    (tmp_path / "m.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        model_family(str(tmp_path / "m.ckpt"))


def test_pack_and_unpack_round_trip_and_unet_kwargs():
    from finestyle.core.models import build_builtin_pipeline

    hidden, pooled = torch.randn(3, 77, 64), torch.randn(3, 100)  # pooled wider than a row
    cond = sd.pack_cond(hidden, pooled)
    assert cond.shape == (3, 79, 64)
    h, p = sd.unpack_cond(cond, 100)
    assert torch.equal(h, hidden) and torch.equal(p, pooled)
    assert sd.pack_cond(hidden, None) is hidden

    unet = build_builtin_pipeline("builtin:tiny-sdxl").unet
    assert sd.pooled_dim(unet.config) == 32
    kw = sd.unet_kwargs(unet.config, sd.pack_cond(torch.randn(2, 77, 64), torch.randn(2, 32)), (48, 80))
    assert kw["added_cond_kwargs"]["time_ids"].tolist() == [[48, 80, 0, 0, 48, 80]] * 2
    assert sd.unet_kwargs(build_builtin_pipeline("builtin:tiny-sd").unet.config, hidden, (64, 64)).keys() == {
        "encoder_hidden_states"
    }


@pytest.mark.parametrize(
    "diffusers_name, sgm",
    [
        (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
            "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
        ),
        (
            "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_v",
            "input_blocks.8.1.transformer_blocks.9.attn2.to_v",
        ),
        (
            "mid_block.attentions.0.transformer_blocks.3.attn2.to_k",
            "middle_block.1.transformer_blocks.3.attn2.to_k",
        ),
        (
            "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0",
            "output_blocks.2.1.transformer_blocks.0.attn1.to_out.0",
        ),
        ("up_blocks.1.attentions.0.proj_in", "output_blocks.3.1.proj_in"),
    ],
)
def test_sgm_names_are_the_ones_kohya_sdxl_loras_use(diffusers_name, sgm):
    assert sd.sgm_module_name(diffusers_name) == sgm


def test_training_resolution_follows_the_model():
    from finestyle.core.models import build_builtin_pipeline

    assert TrainConfig().resolution is None  # resolved from the base model when training starts
    assert sd.native_size(build_builtin_pipeline("builtin:tiny-sd")) == 64
    assert sd.native_size(build_builtin_pipeline("builtin:tiny-sdxl")) == 64


def test_memory_guard_estimates_from_parameter_counts(monkeypatch):
    from finestyle.core import memory

    params = memory.component_params("builtin:sdxl-random")  # counted on the meta device
    assert 2.5e9 < params["unet"] < 2.7e9 and 6.5e8 < params["text_encoder_2"] < 7.5e8
    need = memory.estimate_bytes("export", params)
    assert need > 40 * memory.GB  # ~4x the 10 GB fp32 UNet
    assert memory.estimate_bytes("export", memory.component_params("builtin:sd15-random")) < 16 * memory.GB
    monkeypatch.setattr(memory, "host_memory_bytes", lambda: 24 * memory.GB)
    with pytest.raises(UserError, match=r"export: builtin:sdxl-random needs about 4\d GB .* has 24 GB"):
        memory.check_fits("export", "builtin:sdxl-random", "use a bigger machine")
    assert memory.check_fits("train", "builtin:sdxl-random", "x")["estimate_gb"] < 24
    monkeypatch.setenv("FINESTYLE_MEMORY_GUARD", "0")
    warned = []
    memory.check_fits("export", "builtin:sdxl-random", "x", log=warned.append)
    assert warned and "going on" in warned[0]


def test_tensorrt_profiles_follow_the_model(tmp_path):
    """SDXL's engine profiles: native 1024 px (128² latents), text_embeds and time_ids, both text encoders."""
    from finestyle.config import ExportConfig
    from finestyle.export.tensorrt import _profiles, unet_shapes
    from finestyle.runtime.tensorrt import ort_trt_provider_options

    onnx = tmp_path / "onnx"
    for comp, cfg in {
        "unet": {
            "sample_size": 128,
            "in_channels": 4,
            "cross_attention_dim": 2048,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "vae_decoder": {"block_out_channels": [128, 256, 512, 512]},
    }.items():
        (onnx / comp).mkdir(parents=True)
        (onnx / comp / "config.json").write_text(json.dumps(cfg))
    shapes, scale = unet_shapes(onnx, ExportConfig())
    assert scale == 8 and shapes["sample"] == (2, 4, 128, 128)
    assert shapes["text_embeds"] == (2, 1280) and shapes["time_ids"] == (2, 6)
    assert shapes["encoder_hidden_states"] == (2, 77, 2048)
    cfg = ExportConfig(trt_static=False)
    assert _profiles("text_encoder_2", cfg, shapes, scale)["input_ids"][1] == (2, 77)
    assert _profiles("vae_encoder", cfg, shapes, scale)["sample"][1] == (1, 3, 1024, 1024)
    opts = ort_trt_provider_options(tmp_path, ExportConfig(), shapes)
    assert (
        "text_embeds:2x1280" in opts["trt_profile_opt_shapes"]
        and "time_ids:2x6" in opts["trt_profile_opt_shapes"]
    )
    small, _ = unet_shapes(onnx, ExportConfig(trt_size=512, trt_batch=2))
    assert small["sample"] == (4, 4, 64, 64)


def test_swappable_export_of_sdxl_is_refused_with_one_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "finestyle.cli",
            "export",
            "--swappable",
            "--base",
            "builtin:tiny-sdxl",
            "--adapter",
            str(tmp_path),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "SDXL" in r.stderr and r.stderr.strip().count("\n") == 0

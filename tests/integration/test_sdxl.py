"""SDXL through every stage: a local SDXL folder that is not a builtin (other widths and text-encoder
sizes) goes through prepare (attention concepts) -> train (aspect buckets with SDXL's time ids,
kill-free resume across buckets) -> export (optimum's SDXL layout) -> both runtimes; the adapter
loads in plain diffusers in both formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from finestyle.artifacts.adapter import ADAPTER_WEIGHTS, KOHYA_WEIGHTS
from finestyle.core.sd import SDXL

pytestmark = pytest.mark.slow


def _custom_sdxl(folder: Path) -> Path:
    """An SDXL that no builtin matches: 16/32-channel UNet, text encoders 16 and 48 wide (so the
    cross-attention width is 64), a 24-wide pooled projection."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from finestyle.core.models import write_byte_clip_tokenizer

    torch.manual_seed(0)
    write_byte_clip_tokenizer(folder / "_tok")
    tok = CLIPTokenizer.from_pretrained(folder / "_tok")

    def te_cfg(width: int, proj: int, layers: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_attention_heads=4,
            num_hidden_layers=layers,
            vocab_size=len(tok),
            projection_dim=proj,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )

    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 24,
        cross_attention_dim=16 + 48,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 32],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(te_cfg(16, 16, 3)),
        # 10 layers: diffusers recognises an SGM-layout SDXL file by its second encoder's 10th block
        text_encoder_2=CLIPTextModelWithProjection(te_cfg(48, 24, 10)),
        tokenizer=tok,
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "_tok"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading"
        ),
        add_watermarker=False,
    )
    pipe.save_pretrained(folder / "model", safe_serialization=True)
    return folder / "model"


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return _custom_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def sdxl_dataset(tmp_path_factory, sdxl_dir) -> Path:
    """Attention concepts located by the SDXL UNet itself, from scenes of two aspect ratios."""
    from finestyle.config import PrepareConfig
    from finestyle.prepare.stage import run_prepare
    from tests.conftest import make_scene

    root = tmp_path_factory.mktemp("sdxl-ds")
    (root / "refs").mkdir()
    for i, size in enumerate([(128, 96), (96, 160)]):
        make_scene(size, seed=i).save(root / "refs" / f"s{i}.png")
    run_prepare(
        PrepareConfig(
            images=[str(root / "refs")],
            style="paper-cut",
            out=str(root / "ds"),
            base=str(sdxl_dir),
            concepts="attention",
            concept_words=["sun", "ground"],
            max_concepts=2,
            resolution=64,
            num_beams=1,
        ),
        log=lambda m: None,
    )
    return root / "ds"


def _train(dataset: Path, base: Path, out: Path, kill_at: int | None = None, resume: bool = False) -> int:
    """A training run in a fresh process (identical start state), optionally killed at a checkpoint."""
    code = f"""
import os, signal
import finestyle.train.loop as T
from finestyle.config import TrainConfig
def die_after(state, path):
    if state.step == {kill_at!r}:
        os.kill(os.getpid(), signal.SIGKILL)
T.run_train(hooks=T.TrainHooks(on_checkpoint=die_after), cfg=TrainConfig(dataset={str(dataset)!r},
            base={str(base)!r}, out={str(out)!r}, steps=6, resolution=128, sample_steps=2, lr=1e-3, rank=4,
            seed=3, checkpoint_every=2, caption_dropout=0.3, flip=True, snr_gamma=5.0, resume={resume!r}),
            log=lambda m: None)
"""
    return subprocess.run([sys.executable, "-c", code], env=os.environ.copy(), capture_output=True).returncode


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, sdxl_dataset, sdxl_dir) -> Path:
    out = tmp_path_factory.mktemp("sdxl-run") / "full"
    assert _train(sdxl_dataset, sdxl_dir, out) == 0
    return out


def test_buckets_carry_sdxl_time_ids(sdxl_dataset, sdxl_dir):
    from finestyle.artifacts.dataset import load_training_rows
    from finestyle.config import TrainConfig
    from finestyle.core.models import load_sd_pipeline
    from finestyle.train.loop import build_caches

    pipe = load_sd_pipeline(str(sdxl_dir), device="cpu")
    rows = load_training_rows(str(sdxl_dataset))
    cfg = TrainConfig(dataset=str(sdxl_dataset), base=str(sdxl_dir))
    examples, _, text = build_caches(pipe, rows, cfg, torch.device("cpu"), torch.float32, 128)
    assert len({ex.size for ex in examples}) >= 2  # several aspect buckets
    for ex, r in zip(examples, rows, strict=True):
        ow, oh = r["image"].size
        w, h = ex.size
        top, left = ex.time_ids[2:4]
        # (original h, w, crop top, left, target h, w), as SDXL was trained
        assert ex.time_ids[:2] == (oh, ow) and ex.time_ids[4:] == (h, w)
        assert top >= 0 and left >= 0 and (top == 0 or left == 0)
    # conditioning rows: 77 tokens of both encoders (16 + 48 wide), then the 24-wide pooled row
    assert text.shape[1:] == (78, 64)


def test_resume_across_buckets_is_bit_exact(sdxl_dataset, sdxl_dir, sdxl_run, tmp_path):
    from safetensors.torch import load_file

    killed = tmp_path / "killed"
    assert _train(sdxl_dataset, sdxl_dir, killed, kill_at=4) == -9
    assert _train(sdxl_dataset, sdxl_dir, killed, resume=True) == 0
    a = load_file(str(sdxl_run / "adapter" / ADAPTER_WEIGHTS))
    b = load_file(str(killed / "adapter" / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    rep = json.loads((sdxl_run / "report.json").read_text())
    assert rep["resolution"] == 128


def test_adapter_loads_in_plain_diffusers_in_both_formats(sdxl_run, sdxl_dir):
    """diffusers' StableDiffusionXLPipeline reads both files (the kohya one by its SGM names) and gives
    the image the project's own torch runtime gives, same seed and scheduler."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from finestyle.runtime.generate import GenerationRequest, decoded_batch, torch_backend

    adapter = sdxl_run / "adapter"
    with safe_open(str(adapter / KOHYA_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any("_input_blocks_" in k or "_output_blocks_" in k for k in keys)
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)

    req = GenerationRequest("a red boat, in paper-cut style", steps=3, guidance=5.0, seed=2)
    ours = (decoded_batch(torch_backend(str(sdxl_dir), str(adapter), "cpu"), [req]) / 2 + 0.5).clamp(0, 1)
    base = None
    for weights in (ADAPTER_WEIGHTS, KOHYA_WEIGHTS):
        pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir), use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        if base is None:
            base = pipe(
                req.prompt,
                num_inference_steps=3,
                guidance_scale=5.0,
                output_type="np",
                generator=torch.Generator().manual_seed(2),
            ).images[0]
        pipe.load_lora_weights(str(adapter), weight_name=weights)
        img = pipe(
            req.prompt,
            num_inference_steps=3,
            guidance_scale=5.0,
            output_type="np",
            generator=torch.Generator().manual_seed(2),
        ).images[0]
        assert np.abs(img - ours[0].permute(1, 2, 0).numpy()).max() <= 1e-3, weights
    assert np.abs(img - base).max() > 1e-3  # the adapter changed the image


def test_export_is_optimums_sdxl_layout_and_runtimes_agree(sdxl_run, sdxl_dir, tmp_path):
    from optimum.onnxruntime import ORTStableDiffusionXLPipeline

    from finestyle.config import ExportConfig
    from finestyle.export.steps import run_export
    from finestyle.runtime.generate import GenerationRequest, decoded_batch, load_backend

    out = tmp_path / "export"
    run_export(
        ExportConfig(base=str(sdxl_dir), adapter=str(sdxl_run / "adapter"), out=str(out), parity_steps=3),
        log=lambda m: None,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    for comp in ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"):
        assert f"onnx/{comp}/model.onnx" in manifest["files"]
    parity = manifest["parity"]
    assert parity["unet"]["max_abs_diff"] <= 1e-4 and parity["image"]["max_abs_diff"] <= 2e-3
    assert type(ORTStableDiffusionXLPipeline.from_pretrained(str(out / "onnx"))).__name__.endswith(
        "XLPipeline"
    )

    ort_be, torch_be = load_backend(str(out), "onnxruntime"), load_backend(str(out), runtime="torch")
    assert ort_be.family == torch_be.family == SDXL
    assert ort_be.native_size * ort_be.vae_scale == 32  # the model's own size, not 512 or 1024
    reqs = [
        GenerationRequest("a red boat", steps=3, guidance=5.0, seed=1),
        GenerationRequest("a red boat", negative_prompt="blurry", steps=3, guidance=5.0, seed=2),
    ]
    for r in reqs:  # an empty negative prompt is zeros (diffusers' SDXL), a given one is encoded
        a, b = decoded_batch(ort_be, [r]), decoded_batch(torch_be, [r])
        assert (a - b).abs().max() / 2 <= 2e-3
    wide = GenerationRequest("a red boat", steps=2, guidance=5.0, seed=1, width=64, height=32)
    assert decoded_batch(ort_be, [wide]).shape == (1, 3, 32, 64)
    pytest.importorskip("openvino")
    ov_be = load_backend(str(out), runtime="openvino", dtype="fp32")
    for r in (*reqs, wide):
        assert (decoded_batch(ov_be, [r]) - decoded_batch(torch_be, [r])).abs().max() / 2 <= 2e-3
    # the export recorded OpenVINO's check at the precision `--dtype auto` picks on this CPU
    assert all(c["pass"] for c in manifest["openvino"]["checks"].values())


def test_a_single_file_checkpoint_is_a_base(sdxl_dir, sdxl_dataset, tmp_path, monkeypatch):
    """An original-layout (SGM) SDXL .safetensors, as most shared SDXL models come, goes through
    loading, training and the export (fp16, with the base UNet), read by diffusers' `from_single_file`."""
    from finestyle.config import ExportConfig, TrainConfig
    from finestyle.core.errors import ModelLoadError
    from finestyle.core.models import SINGLE_FILE_CONFIG_ENV, load_sd_pipeline, model_family
    from finestyle.export.steps import run_export
    from finestyle.train.loop import run_train
    from tests.sgm_checkpoint import write_sgm_checkpoint

    folder_pipe = load_sd_pipeline(str(sdxl_dir), device="cpu")
    single = write_sgm_checkpoint(folder_pipe, tmp_path / "custom-xl.safetensors")
    assert model_family(str(single)) == SDXL
    # offline, without the base's configs: one line that says what to set
    monkeypatch.delenv(SINGLE_FILE_CONFIG_ENV, raising=False)
    with pytest.raises(ModelLoadError, match=SINGLE_FILE_CONFIG_ENV):
        load_sd_pipeline(str(single), device="cpu")
    monkeypatch.setenv(SINGLE_FILE_CONFIG_ENV, str(sdxl_dir))
    pipe = load_sd_pipeline(str(single), device="cpu")
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(folder_pipe, comp).state_dict(), getattr(pipe, comp).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), comp
    run = run_train(
        TrainConfig(
            dataset=str(sdxl_dataset),
            base=str(single),
            out=str(tmp_path / "run"),
            steps=2,
            rank=4,
            samples=False,
        ),
        log=lambda m: None,
    )
    run_export(
        ExportConfig(
            base=str(single),
            adapter=run.adapter,
            out=str(tmp_path / "exp"),
            parity_steps=2,
            fp16=True,  # SDXL's fp16 export and its base UNet for style guidance, on the way
            with_base_unet=True,
        ),
        log=lambda m: None,
    )
    manifest = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    assert manifest["base_model"] == str(single) and manifest["family"] == SDXL
    assert manifest["precision"] == "fp16" and "text_encoder_2" in manifest["fp16"]["converted"]
    assert manifest["fp16"]["vae"] in ("fp16", "fp32")  # the VAE probe decided, and the manifest says which
    parity = manifest["parity"]
    assert parity["unet"]["max_abs_diff"] <= 2e-2 and parity["unet_base"]["max_abs_diff"] <= 2e-2

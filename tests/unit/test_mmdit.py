"""SD 3.5 and FLUX.1 (MMDiT): the tiny builtins load, save and reload as their families; FineStyle's
adapter sits on the text stream's K/V of the joint blocks only; diffusers' `load_lora_weights` reads its
diffusers file back (and, for FLUX, its kohya fused-qkv file) to the same transformer output."""

from __future__ import annotations

import pytest
import torch

from finestyle.artifacts.adapter import ADAPTER_WEIGHTS, KOHYA_WEIGHTS
from finestyle.config import TrainConfig
from finestyle.core.loading import load_sd_pipeline, load_tokenizers, model_family, save_builtin
from finestyle.core.sd import FLUX, SD3, denoiser, pipe_family
from finestyle.core.text import window
from finestyle.train.lora import add_lora, kohya_mmdit, lora_state_dict, save_adapter

FAMILIES = {"builtin:tiny-sd3": SD3, "builtin:tiny-flux": FLUX}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tiny_mmdit_builtins_load_generate_save_and_reload(name, tmp_path):
    pipe = load_sd_pipeline(name, device="cpu")
    assert pipe_family(pipe) == FAMILIES[name] == model_family(name)
    g = torch.Generator().manual_seed(0)
    img = pipe("a red boat", num_inference_steps=2, height=64, width=64, output_type="np", generator=g).images
    assert img.shape == (1, 64, 64, 3)
    folder = save_builtin(name, tmp_path / "m")
    assert model_family(str(folder)) == FAMILIES[name]
    again = load_sd_pipeline(str(folder), device="cpu")
    for (k, a), b in zip(
        denoiser(pipe).state_dict().items(), denoiser(again).state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k
    toks = load_tokenizers(str(folder))
    assert [window(t) for t in toks] == ([77, 77, 256] if FAMILIES[name] == SD3 else [77, 256])
    assert type(toks[-1]).__name__ == "T5TokenizerFast"


def _forward(tr, family: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    cfg = tr.config
    text = torch.randn(1, 7, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    if family == SD3:
        x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
        return tr(
            x, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.tensor([500.0])
        ).sample
    x = torch.randn(1, 16, cfg.in_channels, generator=g)
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return tr(
        x,
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=torch.tensor([0.5]),
        img_ids=ids,
        txt_ids=torch.zeros(7, 3),
        guidance=None,
    ).sample


@pytest.mark.parametrize("name", list(FAMILIES))
def test_finestyle_adapter_on_the_text_streams_kv_round_trips_through_diffusers(name, tmp_path):
    family = FAMILIES[name]
    pipe = load_sd_pipeline(name, device="cpu")
    tr = pipe.transformer
    base = _forward(tr, family)
    lcfg = add_lora(tr, TrainConfig(dataset="", base=name, targets="kv", rank=4))
    lora = lora_state_dict(tr)
    names = {k.rsplit(".lora_", 1)[0] for k in lora}
    assert names and all(n.startswith("transformer_blocks.") for n in names)  # never FLUX's single blocks
    assert {n.rsplit(".", 1)[1] for n in names} == {"add_k_proj", "add_v_proj"}
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    tuned = _forward(tr, family).detach()
    assert not torch.allclose(tuned, base, atol=1e-4)  # the adapter changes the output
    save_adapter(tmp_path / "adapter", tr, lcfg, {"targets": "kv"})
    for weights in (ADAPTER_WEIGHTS, KOHYA_WEIGHTS) if family == FLUX else (ADAPTER_WEIGHTS,):
        fresh = load_sd_pipeline(name, device="cpu")
        fresh.load_lora_weights(str(tmp_path / "adapter"), weight_name=weights)
        torch.testing.assert_close(_forward(fresh.transformer, family).detach(), tuned, atol=1e-5, rtol=1e-4)


def test_kohya_fused_qkv_is_exactly_the_kv_update():
    """SD 3's kohya file (diffusers cannot read SD 3 kohya LoRAs; ComfyUI and kohya do): its fused qkv
    update, up @ down x alpha / rank, equals [0; dK; dV] of the K/V LoRA."""
    g = torch.Generator().manual_seed(0)
    r, d_in, d_out, alpha = 4, 12, 10, 8.0
    peft = {
        f"transformer_blocks.0.attn.{p}.lora_{ab}.weight": torch.randn(*(shape), generator=g)
        for p in ("add_k_proj", "add_v_proj")
        for ab, shape in (("A", (r, d_in)), ("B", (d_out, r)))
    }
    k = kohya_mmdit(peft, SD3, alpha)
    key = "lora_unet_joint_blocks_0_context_block_attn_qkv"
    fused = k[key + ".lora_up.weight"] @ k[key + ".lora_down.weight"] * (k[key + ".alpha"] / (3 * r))
    dk = (
        peft["transformer_blocks.0.attn.add_k_proj.lora_B.weight"]
        @ peft["transformer_blocks.0.attn.add_k_proj.lora_A.weight"]
    )
    dv = (
        peft["transformer_blocks.0.attn.add_v_proj.lora_B.weight"]
        @ peft["transformer_blocks.0.attn.add_v_proj.lora_A.weight"]
    )
    torch.testing.assert_close(fused, torch.cat([torch.zeros(d_out, d_in), dk, dv]) * (alpha / r))
    assert (
        kohya_mmdit({"transformer_blocks.0.ff.net.0.proj.lora_A.weight": torch.zeros(1, 1)}, SD3, 1.0) is None
    )


@pytest.mark.parametrize("name", list(FAMILIES))
def test_joint_attention_capture_is_transparent_and_maps_each_phrase(name):
    """prepare's attention boxes on an MMDiT: the capture leaves the transformer's output unchanged, and
    each phrase gets a map over the image patches (its T5 tokens' share of the joint softmax)."""
    from finestyle.core.mmdit import CaptureJointAttention, joint_attention_maps

    family = FAMILIES[name]
    pipe = load_sd_pipeline(name, device="cpu")
    tr = pipe.transformer
    ref = _forward(tr, family)
    store: dict = {}
    procs = {
        n: CaptureJointAttention(n, p, family, store)
        for n, p in tr.attn_processors.items()
        if n.startswith("transformer_blocks.")
    }
    tr.set_attn_processor({**tr.attn_processors, **procs})
    torch.testing.assert_close(_forward(tr, family), ref)
    assert store and all(p.shape[-1] == 7 for p in store.values())  # 7 text tokens in _forward
    heads = tr.config.num_attention_heads
    assert all(float(p.min()) >= 0 and float(p.sum(-1).max()) <= heads + 1e-4 for p in store.values())
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    maps = joint_attention_maps(
        pipe, latents, "a red boat near a tall tree", ["red boat", "tall tree"], 0.4, 0
    )
    assert set(maps) == {"red boat", "tall tree"}
    assert all(m.shape == (8, 8) and torch.isfinite(m).all() for m in maps.values())
    assert not torch.equal(maps["red boat"], maps["tall tree"])


def test_sd3_without_t5_conditions_on_the_clips_and_the_guard_suggests_it(monkeypatch, tmp_path):
    from finestyle.config import TrainConfig
    from finestyle.core import memory
    from finestyle.core.errors import UserError
    from finestyle.core.sd import encode_texts
    from finestyle.train.loop import _load_and_cache, setup

    pipe = load_sd_pipeline("builtin:tiny-sd3", device="cpu", without_t5=True)
    assert pipe.text_encoder_3 is None
    hidden, pooled = encode_texts(pipe, ["a red boat"], "cpu")
    assert hidden.shape[1] == 77 + 256 and torch.count_nonzero(hidden[:, 77:]) == 0  # T5's part: zeros
    full = memory.component_params("builtin:tiny-sd3")
    need = memory.estimate_bytes("train", full)
    assert memory.estimate_bytes("train", {k: v for k, v in full.items() if k != "text_encoder_3"}) < need
    monkeypatch.setattr(memory, "host_memory_bytes", lambda: need - 1)
    from tests.conftest import prepare_small_dataset

    ds = prepare_small_dataset(tmp_path / "data")
    with pytest.raises(UserError, match=r"or without T5 \(--no-t5"):
        _load_and_cache(setup(TrainConfig(dataset=str(ds), base="builtin:tiny-sd3", out=str(tmp_path / "r"))))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_style_guidance_gives_the_pipeline_finestyles_velocity(name, tmp_path):
    """Inside diffusers' own loop, StyleGuided makes u + s(c - u) come out as u + s(c - u) + λ1(c - b):
    c and u with the adapter on, b with it off (FLUX: no CFG, c + λ1(c - b))."""
    from finestyle.runtime.torch_backend import StyleGuided

    family = FAMILIES[name]
    pipe = load_sd_pipeline(name, device="cpu")
    tr = pipe.transformer
    lcfg = add_lora(tr, TrainConfig(dataset="", base=name, targets="kv", rank=4))
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_adapter(tmp_path / "a", tr, lcfg, {"targets": "kv"})
    pipe = load_sd_pipeline(name, device="cpu")
    pipe.load_lora_weights(str(tmp_path / "a"), weight_name=ADAPTER_WEIGHTS, adapter_name="finestyle")
    tr = pipe.transformer
    one = _inputs_for(tr, family)
    s, lam = (5.0, 2.0) if family == SD3 else (None, 2.0)
    kw = {
        k: (torch.cat([v, v]) if s and torch.is_tensor(v) and k not in ("img_ids", "txt_ids") else v)
        for k, v in one.items()
    }
    if s:
        kw["encoder_hidden_states"] = torch.cat(
            [torch.zeros_like(one["encoder_hidden_states"]), one["encoder_hidden_states"]]
        )
    with torch.no_grad():
        tuned = tr(**kw, return_dict=False)[0]
        tr.disable_adapters()
        base = tr(
            **{k: (v[1:] if s and torch.is_tensor(v) and v.shape[:1] == (2,) else v) for k, v in kw.items()},
            return_dict=False,
        )[0]
        tr.enable_adapters()
        with StyleGuided(pipe, lam, s):
            got = tr(**kw, return_dict=False)[0]
    c = tuned[1:] if s else tuned
    torch.testing.assert_close(got[-1:] if s else got, c + (lam / (s or 1.0)) * (c - base))
    if s:
        torch.testing.assert_close(got[:1], tuned[:1])  # the negative branch untouched
        u = tuned[:1]
        final = got[:1] + s * (got[1:] - got[:1])
        torch.testing.assert_close(final, u + s * (c - u) + lam * (c - base), rtol=1e-4, atol=1e-5)


def _inputs_for(tr, family):
    g = torch.Generator().manual_seed(3)
    cfg = tr.config
    text = torch.randn(1, 7, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    if family == SD3:
        return dict(
            hidden_states=torch.randn(1, cfg.in_channels, 8, 8, generator=g),
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=torch.tensor([500.0]),
        )
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return dict(
        hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=torch.tensor([0.5]),
        img_ids=ids,
        txt_ids=torch.zeros(7, 3),
    )

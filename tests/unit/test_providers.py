"""onnxruntime provider options: the TensorRT EP gets a persistent per-export engine cache."""

from __future__ import annotations

import json

from finestyle.runtime.generate import provider_config


def test_tensorrt_ep_options_per_export_and_component(tmp_path, monkeypatch):
    monkeypatch.setenv("FINESTYLE_TRT_CACHE", str(tmp_path / "cache"))
    exp = tmp_path / "export"
    (exp / "tensorrt").mkdir(parents=True)
    (exp / "manifest.json").write_text("{}")
    shapes = "sample:2x4x64x64,encoder_hidden_states:2x77x768"
    (exp / "tensorrt" / "ort_tensorrt_provider.json").write_text(
        json.dumps(
            {
                k: shapes
                for k in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
            }
        )
    )
    provs = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    unet = provider_config(provs, "unet", exp, {"precision": "fp16"})
    name, opts = unet[0]
    assert name == "TensorrtExecutionProvider" and unet[1:] == provs[1:]
    assert opts["trt_engine_cache_enable"] and opts["trt_fp16_enable"] is True
    assert opts["trt_engine_cache_path"].startswith(str(tmp_path / "cache")) and opts[
        "trt_engine_cache_path"
    ].endswith("unet")
    assert opts["trt_profile_opt_shapes"] == shapes
    _, te = provider_config(provs, "text_encoder", exp, {"precision": "fp32"})[0]
    assert "trt_profile_opt_shapes" not in te and te["trt_fp16_enable"] is False
    assert te["trt_engine_cache_path"] != opts["trt_engine_cache_path"]
    # another export (another manifest) never shares engines
    (exp / "manifest.json").write_text('{"x": 1}')
    assert (
        provider_config(provs, "unet", exp, {})[0][1]["trt_engine_cache_path"]
        != opts["trt_engine_cache_path"]
    )
    assert provider_config(["CPUExecutionProvider"], "unet", exp, {}) == ["CPUExecutionProvider"]


def test_dtype_for_a_non_torch_runtime_is_refused_before_loading(tmp_path):
    """`--runtime onnxruntime --dtype bf16` used to load fp32 ONNX silently; now one clear error."""
    import pytest

    from finestyle.core.errors import UserError
    from finestyle.runtime.generate import load_backend

    (tmp_path / "manifest.json").write_text("{}")
    for runtime in ("onnxruntime", "tensorrt"):
        with pytest.raises(UserError, match="applies to the torch and openvino runtimes"):
            load_backend(str(tmp_path), runtime, dtype="bf16")

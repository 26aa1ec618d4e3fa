"""OpenVINO: CPU inference over the same ONNX export, in bf16 where the CPU has bf16 units.

OpenVINO reads the export's ONNX files directly (no second export). Each component is compiled
per input shape (static shapes are OpenVINO's fast path), and the compiled blobs are cached on disk
under FINESTYLE_OV_CACHE (default ~/.cache/finestyle/openvino), in one folder per component keyed by
the sha256 of that component's files: neither a restart nor a new manifest recompiles.

Precision (`--dtype`): auto | fp32 | bf16 | fp16 | int8. `auto` is int8 when the export holds an int8
UNet whose quality guard passed (`finestyle export --quantize int8`), else bf16 on a CPU with AMX or
AVX-512 BF16 when the export recorded a passing OpenVINO check at bf16, else fp32 (said once). An
explicit reduced precision needs that passing check; the export's fp32 parity does not cover it.
int8 runs the NNCF-quantized UNet (`openvino/unet_int8`) and the other components in fp32.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finestyle.core.env import BF16_CPU_FLAGS, INT8_CPU_FLAGS, cpu_flags
from finestyle.core.errors import UserError
from finestyle.core.fs import hash_json
from finestyle.core.sd import onnx_cond_feeds, sdxl_prompt_encoder

OV_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
"""--dtype name -> OpenVINO's INFERENCE_PRECISION_HINT (int8: for the ops NNCF left in float)."""
INT8_UNET = "openvino/unet_int8/model.xml"
"""The int8 UNet of an export, beside its fp32 ONNX graph."""
OV_IMAGE_MEAN_ATOL = 2e-2
"""The reduced-precision image check: mean |diff| on [0, 1] against fp32 (as for the torch bf16 path)."""

_said: set[str] = set()


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        print(msg, file=sys.stderr, flush=True)


def require_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise UserError(
            "the openvino runtime needs OpenVINO: pip install 'finestyle[cpu]' (it includes openvino)"
        ) from None
    return ov


def hardware_precision(flags: frozenset[str] | None = None) -> str:
    """bf16 where the CPU has bf16 arithmetic (AMX or AVX-512 BF16), else fp32."""
    flags = cpu_flags() if flags is None else flags
    return "bf16" if any(f in flags for f in BF16_CPU_FLAGS) else "fp32"


def ov_checks(manifest: dict[str, Any]) -> dict[str, Any]:
    return ((manifest.get("openvino") or {}).get("checks")) or {}


def resolve_precision(
    dtype: str | None, manifest: dict[str, Any], flags: frozenset[str] | None = None
) -> str:
    """The precision an export runs at under OpenVINO, or a UserError naming why not."""
    dtype = dtype or "auto"
    if dtype not in ("auto", *OV_PRECISIONS):
        raise UserError(f"--dtype {dtype!r}: use auto, fp32, bf16, fp16 or int8")
    checks = ov_checks(manifest)
    if dtype == "int8" and not (checks.get("int8") or {}).get("pass"):
        why = "failed its int8 quality guard" if "int8" in checks else "has no int8 UNet"
        raise UserError(
            f"--runtime openvino --dtype int8: this export {why}; use --dtype auto or fp32, or "
            "`finestyle export --quantize int8 --to EXPORT`"
        )
    flags = cpu_flags() if flags is None else flags
    if dtype == "auto" and (checks.get("int8") or {}).get("pass"):
        if any(f in flags for f in INT8_CPU_FLAGS):
            return "int8"
        _say_once(
            "openvino: this CPU has no int8 dot-product units (VNNI / AMX), where int8 runs no faster than "
            "float; running float (--dtype int8 forces it)"
        )
    if dtype == "auto":
        hw = hardware_precision(flags)
        if hw == "fp32":
            _say_once("openvino: this CPU has no bf16 units (AMX / AVX-512 BF16); running fp32")
            return "fp32"
        if (checks.get(hw) or {}).get("pass"):
            return hw
        _say_once(
            f"openvino: the export records no passing {hw} check (re-export with openvino installed); "
            "running fp32"
        )
        return "fp32"
    if dtype != "fp32" and not (checks.get(dtype) or {}).get("pass"):
        why = "failed its" if dtype in checks else "has no recorded"
        raise UserError(
            f"--runtime openvino --dtype {dtype}: this export {why} OpenVINO {dtype} image check; "
            "use --dtype fp32, or re-export on a CPU with bf16 units"
        )
    return dtype


def cache_root() -> Path:
    return Path(os.environ.get("FINESTYLE_OV_CACHE") or Path.home() / ".cache" / "finestyle" / "openvino")


class OvComponent:
    """One ONNX component compiled per input shape; thread-safe (one infer request per call)."""

    def __init__(self, core: Any, path: Path, precision: str, cache_key: str, hint: str = "LATENCY") -> None:
        self.core, self.path = core, path
        self.config = {
            "INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision],
            "PERFORMANCE_HINT": hint,
            "CACHE_DIR": str(cache_root() / cache_key[:16]),
        }
        self.compiled: dict[tuple[Any, ...], Any] = {}
        self.lock = threading.Lock()
        try:
            self.model = core.read_model(str(path))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise UserError(f"OpenVINO cannot read {path} ({first}); use --runtime onnxruntime") from exc
        self.input_types = {p.get_any_name(): p.get_element_type().to_dtype() for p in self.model.inputs}
        self.compiles = 0
        self.from_cache = 0

    def _compiled(self, feeds: dict[str, np.ndarray]) -> Any:
        key = tuple((k, v.shape) for k, v in sorted(feeds.items()))
        cm = self.compiled.get(key)
        if cm is None:
            with self.lock:
                cm = self.compiled.get(key)
                if cm is None:
                    m = self.model.clone()
                    m.reshape({k: list(v.shape) for k, v in feeds.items()})
                    cm = self.core.compile_model(m, "CPU", self.config)
                    self.compiled[key] = cm
                    self.compiles += 1
                    self.from_cache += bool(cm.get_property("LOADED_FROM_CACHE"))
        return cm

    def __call__(self, **feeds: np.ndarray) -> np.ndarray:
        return self.outputs(None, **feeds)[0]

    def output_names(self) -> list[str]:
        return [o.get_any_name() for o in self.model.outputs]

    def outputs(self, names: list[str] | None, **feeds: np.ndarray) -> list[np.ndarray]:
        """The named outputs (None: the first) of one inference, as fp32 arrays."""
        # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make the timestep shape (1,))
        feeds = {k: np.require(v, self.input_types[k], "C") for k, v in feeds.items()}
        req = self._compiled(feeds).create_infer_request()
        req.infer(feeds)
        if names is None:
            return [np.array(req.get_output_tensor(0).data, dtype=np.float32)]
        return [np.array(req.get_tensor(n).data, dtype=np.float32) for n in names]


def component_key(files: dict[str, str], comp: str, precision: str) -> str:
    """The cache key of one component: the sha256 of its files (from the manifest) and the precision."""
    mine = {k: v for k, v in files.items() if k.startswith(f"onnx/{comp}/")}
    return hash_json({"files": mine, "precision": precision})


def openvino_components(
    onnx_dir: Path, files: dict[str, str], precision: str, hint: str = "LATENCY"
) -> dict[str, OvComponent]:
    ov = require_openvino()
    core = ov.Core()
    comps = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "unet_base")
    float_precision = "fp32" if precision == "int8" else precision
    out = {
        c: OvComponent(
            core, onnx_dir / c / "model.onnx", float_precision, component_key(files, c, float_precision), hint
        )
        for c in comps
        if (onnx_dir / c / "model.onnx").is_file()
    }
    if precision == "int8":
        int8 = onnx_dir.parent / INT8_UNET
        mine = {k: v for k, v in files.items() if k.startswith("openvino/unet_int8/")}
        out["unet"] = OvComponent(core, int8, "int8", hash_json({"files": mine, "precision": "int8"}), hint)
    return out


def unet_fn(comp: OvComponent, unet_cfg: dict[str, Any], vae_scale: int) -> Any:
    def run(lat: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        size_hw = (lat.shape[-2] * vae_scale, lat.shape[-1] * vae_scale)
        out = comp(
            sample=lat.numpy(),
            timestep=np.array(float(t), dtype=np.float32),
            **onnx_cond_feeds(unet_cfg, emb, size_hw),
        )
        return torch.from_numpy(out)

    return run


def backend_parts(
    onnx_dir: Path, files: dict[str, str], precision: str, layout: dict[str, Any]
) -> dict[str, Any]:
    """encode_text / encode_prompts / unet / unet_base / decode callables for the runtime's Backend;
    `layout` is the export's (`artifacts.manifest.export_layout`)."""
    comps = openvino_components(onnx_dir, files, precision)
    te, vd = comps["text_encoder"], comps["vae_decoder"]
    cfg, scale = layout["unet_config"], layout["vae_scale"]
    # a swappable export has no onnx/unet graph (its K/V UNet is run by the caller)
    parts = {
        "encode_text": lambda ids: torch.from_numpy(te(input_ids=ids.numpy().astype(np.int64))),
        "unet": unet_fn(comps["unet"], cfg, scale) if "unet" in comps else None,
        "unet_base": unet_fn(comps["unet_base"], cfg, scale) if "unet_base" in comps else None,
        "decode": lambda z: torch.from_numpy(vd(latent_sample=z.numpy())),
        "components": comps,
    }
    if "text_encoder_2" in comps:

        def runner(comp: OvComponent) -> tuple[Any, list[str]]:
            return (lambda ids, names: comp.outputs(names, input_ids=ids)), comp.output_names()

        parts["encode_prompts"] = sdxl_prompt_encoder(
            [layout["tokenizer"], layout["tokenizer_2"]],
            [runner(te), runner(comps["text_encoder_2"])],
            bool(layout["force_zeros_for_empty_prompt"]),
        )
    return parts

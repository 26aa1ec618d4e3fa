"""`finestyle export --quantize int8 --to EXPORT`: an int8 UNet for CPUs, beside the fp32 graph, with a
measured quality guard.

1. Calibration: the export's own pipeline (OpenVINO fp32) generates images for the style's prompts
   (on a world export, the world's prompts), and every UNet call's inputs are recorded (`prompts` ×
   `steps` × the CFG batch of 2).
2. NNCF post-training quantization of the UNet's ONNX graph for OpenVINO, calibrated on those inputs,
   in one of two modes (`--quantize-mode`): `hybrid` (the default, as OpenVINO's Stable Diffusion
   recipe: int8 weights only on the matrix products with weights; weights and activations of the
   convolutions and of the attention's activation products in int8) or `full` (weights and activations
   of every convolution and matrix product, SmoothQuant). Hybrid was measured closer to fp32: mean
   image difference 0.037 against full's 0.068 on 16 world prompts. Written as
   `openvino/unet_int8/model.xml` (+ `.bin`), its files hashed into the manifest.
3. The guard: the first calibration prompts on other seeds, generated with the int8 UNet and in fp32;
   the mean |diff| on [0, 1] must be within INT8_IMAGE_MEAN_ATOL. On a world export a second, judged
   guard may be passed in (`judged`: the world's judge on 64 images, `finestyle.world.int8`). It is
   recorded as the `int8` OpenVINO check, which `--dtype auto` reads; a failing guard marks int8
   unusable and does not fail the step.

The manifest is rewritten last; until then the export is what it was.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from finestyle.artifacts.manifest import MANIFEST, verify_export
from finestyle.core.env import cpu_name
from finestyle.core.errors import UserError
from finestyle.core.fs import check_free_space, hash_tree
from finestyle.runtime.generate import GenerationRequest, generate, load_backend

INT8_DIR = "openvino/unet_int8"
INT8_IMAGE_MEAN_ATOL = 3e-2
"""The guard: mean |int8 - fp32| over the image on [0, 1] (bf16's is 2e-2; int8 keeps 8 bits of
mantissa-equivalent per tensor, so a little more is allowed, and stated)."""
GUARD_SEEDS = (11, 12, 13, 14)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def calibration_prompts(manifest: dict[str, Any], n: int) -> list[str]:
    """The style's own prompts: its concepts and a few new objects, in its style words."""
    style = manifest.get("style") or "the reference"
    concepts = [c for c in manifest.get("concepts", []) if c][: max(1, n // 2)]
    objects = [
        "a lighthouse on a cliff",
        "a cup of tea",
        "a red bicycle",
        "a cat on a sofa",
        "a sailing boat",
        "a city street at night",
        "a bowl of fruit",
        "a portrait of an old man",
        "a mountain lake at dawn",
        "a vintage car",
        "a forest path in autumn",
        "a bird on a branch",
        "a market square with people",
        "a wooden house in the snow",
        "a vase of flowers",
        "a harbour with fishing boats",
    ]
    return [f"{c}, in {style} style" for c in (concepts + objects)][:n]


def record_unet_inputs(
    be: Any, prompts: list[str], steps: int, size: int | None
) -> list[dict[str, np.ndarray]]:
    """Every UNet call's inputs while `be` (an OpenVINO backend) generates `prompts`."""
    comp = be.parts["unet"]
    feeds: list[dict[str, np.ndarray]] = []
    run = comp.outputs

    def recording(names: Any, **f: np.ndarray) -> Any:
        feeds.append({k: np.array(v) for k, v in f.items()})
        return run(names, **f)

    comp.outputs = recording
    try:
        for i, p in enumerate(prompts):
            generate(be, GenerationRequest(p, steps=steps, seed=1000 + i, width=size, height=size))
    finally:
        comp.outputs = run
    return feeds


@contextlib.contextmanager
def _quiet_nncf() -> Any:
    """NNCF's INFO lines and progress bars (rich, on stdout) show at --verbose only."""
    import io
    import logging
    import os

    import nncf

    if os.environ.get("FINESTYLE_QUIET") != "1":
        yield
        return
    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        yield


INT8_MODES = {
    "full": "full int8 (weights and activations of convolutions and matrix products), SmoothQuant",
    "hybrid": "hybrid: int8 weights only on the matrix products with weights; weights and activations "
    "of convolutions and of the attention's activation products in int8",
}


def _weight_matmuls(model: Any) -> list[str]:
    """The MatMuls with a constant input (through Convert/Transpose/Reshape): hybrid mode compresses
    their weights only."""
    passthrough = {"Convert", "Transpose", "Reshape", "Unsqueeze", "Squeeze"}

    def constant(node: Any) -> bool:
        while node.get_type_name() in passthrough:
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    return [
        op.get_friendly_name()
        for op in model.get_ops()
        if op.get_type_name() == "MatMul" and any(constant(i.get_node()) for i in op.input_values())
    ]


def _nncf_quantize(model: Any, feeds: list[dict[str, np.ndarray]], mode: str) -> Any:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    data = nncf.Dataset(feeds)
    if mode == "full":
        return nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds))
    weighted = _weight_matmuls(model)
    model = nncf.compress_weights(
        model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=nncf.IgnoredScope(types=["Convolution"])
    )
    return nncf.quantize(
        model,
        data,
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(feeds),
        ignored_scope=nncf.IgnoredScope(names=weighted, validate=False),
        advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alpha=-1),
    )


def quantize_unet(
    onnx_path: Path, feeds: list[dict[str, np.ndarray]], out_xml: Path, mode: str = "hybrid"
) -> dict[str, Any]:
    if mode not in INT8_MODES:
        raise UserError(f"--quantize-mode {mode!r}: use {' or '.join(INT8_MODES)}")
    try:
        import nncf
        import openvino as ov
    except ImportError:
        raise UserError("--quantize int8 needs NNCF and OpenVINO: pip install 'finestyle[cpu]'") from None
    model = ov.Core().read_model(str(onnx_path))
    t0 = time.perf_counter()
    with _quiet_nncf():
        q = _nncf_quantize(model, feeds, mode)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(q, str(out_xml), compress_to_fp16=False)
    fq = sum(1 for op in q.get_ops() if op.get_type_name() == "FakeQuantize")
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "fake_quantize_ops": fq,
        "nncf": nncf.__version__,
        "mode": mode,
        "mode_detail": INT8_MODES[mode],
    }


def int8_guard(export_dir: Path, files: dict[str, str], prompts: list[str], steps: int, size: int | None):
    """The calibration prompts (cycled) on GUARD_SEEDS, in fp32 and with the int8 UNet (OpenVINO both):
    mean and max |diff| on [0, 1]."""
    import openvino as ov

    from finestyle.runtime.onnx_backends import openvino_backend

    diffs = []
    for precision in ("fp32", "int8"):
        be = openvino_backend(export_dir, precision, manifest={"files": files}, files=files)
        imgs = [
            np.asarray(generate(be, GenerationRequest(p, steps=steps, seed=s, width=size, height=size))[0])
            for p, s in zip(prompts, GUARD_SEEDS, strict=False)
        ]
        diffs.append(np.stack(imgs).astype(np.float32) / 255)
    d = np.abs(diffs[0] - diffs[1])
    mean = float(d.mean())
    return {
        "mean_abs_diff": mean,
        "max_abs_diff": float(d.max()),
        "mean_atol": INT8_IMAGE_MEAN_ATOL,
        "pass": bool(mean <= INT8_IMAGE_MEAN_ATOL),
        "images": len(diffs[0]),
        "steps": steps,
        "openvino": ov.__version__,
        "cpu": cpu_name(),
        "how": "finestyle generate EXPORT PROMPT --runtime openvino --dtype int8",
    }


def quantize_export(
    folder: str,
    prompts: int | list[str] = 16,
    steps: int = 20,
    size: int | None = None,
    guard_steps: int = 20,
    log=_log,
    mode: str = "hybrid",
    judged: Callable[[Path, dict[str, Any], dict[str, str], int], dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """Add a guarded int8 UNet to a plain export; returns what it recorded (`openvino.int8`).

    `judged(export, manifest, files, steps)`, where given, is a second guard that judges what the
    images show (the world's judge on world exports); it returns None where it does not apply, else
    its record, whose `pass` the guard's pass also requires."""
    from finestyle.artifacts.styles import is_swappable

    if mode not in INT8_MODES:
        raise UserError(f"--quantize-mode {mode!r}: use {' or '.join(INT8_MODES)}")
    dest = Path(folder)
    manifest = verify_export(dest)
    if is_swappable(manifest):
        raise UserError("--quantize int8: swappable exports are not supported yet; quantize a plain export")
    if manifest.get("family") not in (None, "sd"):
        raise UserError("--quantize int8: SDXL exports are not supported yet (not yet measured)")
    onnx_unet = dest / "onnx" / "unet" / "model.onnx"
    unet_bytes = sum(f.stat().st_size for f in onnx_unet.parent.iterdir() if f.is_file())
    check_free_space(
        "--quantize int8", dest, unet_bytes // 2 + 2**24, "free space there; the export was not changed"
    )
    be = load_backend(str(dest), "openvino", dtype="fp32")
    texts = prompts if isinstance(prompts, list) else calibration_prompts(manifest, prompts)
    feeds = record_unet_inputs(be, texts, steps, size)
    del be
    log(f"quantize: {len(feeds)} UNet calls recorded from {len(texts)} prompt(s) x {steps} steps")
    work = dest / f".int8.tmp-{uuid.uuid4().hex[:8]}"
    try:
        rep = quantize_unet(onnx_unet, feeds, work / "model.xml", mode)
        target = dest / INT8_DIR
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(exist_ok=True)
        shutil.move(str(work), str(target))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    files = {k: v for k, v in manifest["files"].items() if not k.startswith(INT8_DIR + "/")}
    files.update({f"{INT8_DIR}/{k}": v for k, v in hash_tree(dest / INT8_DIR).items()})
    cycle = [texts[i % len(texts)] for i in range(len(GUARD_SEEDS))]
    guard = int8_guard(dest, files, cycle, guard_steps, size)
    extra = judged(dest, manifest, files, guard_steps) if judged else None
    if extra is not None:
        guard["judged"] = extra
        guard["pass"] = bool(guard["pass"] and extra["pass"])
        log(
            f"quantize: judged on {extra['images']} images, int8 against {extra['reference']}: prompt "
            f"{extra['delta']['prompt']:+.3f}, style {extra['delta']['style']:+.3f} (within {extra['atol']})"
        )
    record = {
        **rep,
        "calibration": {"prompts": len(texts), "steps": steps, "unet_calls": len(feeds)},
    }
    manifest["files"] = files
    ov = manifest.setdefault("openvino", {}) or {}
    manifest["openvino"] = ov
    ov.setdefault("checks", {})["int8"] = guard
    ov["int8"] = record
    tmp = dest / f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(dest / MANIFEST)
    verdict = "passes" if guard["pass"] else "FAILS (int8 marked unusable; --dtype auto keeps to float)"
    log(
        f"quantize: int8 UNet {guard['mean_abs_diff']:.2e} mean image diff to fp32 (<= {INT8_IMAGE_MEAN_ATOL}); "
        f"the guard {verdict}"
    )
    return {**record, "guard": guard}

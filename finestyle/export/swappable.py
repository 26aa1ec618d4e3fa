"""The style-swappable export: one UNet graph with K/V inputs, and each style as a few-MB artifact.

`finestyle export --swappable --adapter A [--adapter B ...] [--name N ...]` builds it;
`finestyle export --add-style RUN/adapter --to DIR` and `--remove-style NAME --to DIR` change its
styles without touching the UNet. Every style is proven against its own merged model: the shared
graph with that style's K/V equals the merged UNet (≤ unet_atol at 3 timesteps × 2 batch sizes), and
a whole image through the runtime equals the merged pipeline's (≤ image_atol). A failure fails the
export (or the addition) and leaves the folder as it was. See `finestyle.artifacts.styles` for the
layout.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finestyle.artifacts.adapter import ADAPTER_WEIGHTS, adapter_info
from finestyle.artifacts.manifest import MANIFEST, verify_export
from finestyle.artifacts.styles import (
    BASE_STYLE,
    KV_BASE,
    KV_UNET,
    STYLE_INFO,
    STYLE_WEIGHTS,
    check_name,
    is_swappable,
    load_base_kv,
    load_style,
    style_names,
    style_slug,
)
from finestyle.config import ExportConfig
from finestyle.core.env import cpu_name
from finestyle.core.errors import UserError, VerificationError
from finestyle.core.fs import check_free_space, hash_json, hash_tree, publish_dir, write_json
from finestyle.core.kv import KVUNet, StyleKV, base_kv_weights, cross_attention_layers, project_kv
from finestyle.core.models import load_sd_pipeline, model_family, model_fingerprint, quiet_hf_logs
from finestyle.core.onnxrt import ort_session, require_tensorrt
from finestyle.core.sd import SDXL
from finestyle.export.steps import (
    FP16_IMAGE_ATOL,
    FP16_UNET_ATOL,
    ExportResult,
    begin_export,
    export_versions,
    merge_adapter,
    onnx_export,
    parity_summary,
    probe_parity,
    release_memory,
    to_fp16,
    unet_outputs,
    unet_probe_inputs,
)
from finestyle.export.tensorrt import build_swappable_engines
from finestyle.runtime.generate import GenerationRequest, decoded_batch, torch_backend_from_pipe


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def style_lora(
    pipe: Any, adapter: str, lora_scale: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The adapter's LoRA factors per K/V projection, read through peft as diffusers loads them.

    Refuses adapters that touch anything but cross-attention K/V (they cannot be swapped)."""
    info = adapter_info(adapter)
    with quiet_hf_logs():
        pipe.load_lora_weights(
            adapter, weight_name=info.get("weight_name", ADAPTER_WEIGHTS), adapter_name="swap"
        )
    try:
        pipe.set_adapters(["swap"], adapter_weights=[lora_scale])
        out, other = {}, []
        for name, mod in pipe.unet.named_modules():
            if not hasattr(mod, "lora_A") or "swap" not in getattr(mod, "lora_A", {}):
                continue
            if not re.search(r"attn2\.to_[kv]$", name):
                other.append(name)
                continue
            if getattr(mod, "use_dora", {}).get("swap"):
                raise UserError(
                    f"adapter {adapter!r} uses DoRA; a swappable export takes plain LoRA K/V adapters"
                )
            out[name] = (
                mod.lora_A["swap"].weight.detach().float().cpu().clone(),
                mod.lora_B["swap"].weight.detach().float().cpu().clone(),
                float(mod.scaling["swap"]),
            )
        if other:
            raise UserError(
                f"adapter {adapter!r} also adapts {other[0]} (and {len(other) - 1} more); only K/V adapters "
                "(`finestyle train --targets kv`, the default) can be swapped: export it merged instead"
            )
        if not out:
            raise UserError(f"adapter {adapter!r} adapts no cross-attention K/V projection")
        return out
    finally:
        pipe.delete_adapters(["swap"])


def export_kv_unet(unet: Any, layers: list[str], path: Path) -> None:
    """The shared UNet as ONNX: inputs sample, timestep, kv_0..; K/V weights are not in the graph."""
    from finestyle.export.steps import quiet_export_warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    dims = [_inner_dim(unet, n) for n in layers for _ in (0, 1)]
    x, _ = unet_probe_inputs(unet, 2)
    wrapper = KVUNet(unet, layers).eval()
    kv = [torch.randn(2, 77, d) for d in dims]
    names = [f"kv_{i}" for i in range(len(kv))]
    axes = {
        "sample": {0: "batch", 2: "height", 3: "width"},
        "out_sample": {0: "batch", 2: "height", 3: "width"},
    }
    axes.update({n: {0: "batch", 1: "sequence"} for n in names})
    ctx = quiet_export_warnings()
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                (x, torch.tensor(500.0), *kv),
                str(path),
                input_names=["sample", "timestep", *names],
                output_names=["out_sample"],
                dynamic_axes=axes,
                opset_version=18,
                dynamo=False,
            )
    finally:
        ctx.__exit__(None, None, None)


def _inner_dim(unet: Any, layer: str) -> int:
    return dict(unet.named_modules())[f"{layer}.to_k"].out_features


def _kv_feeds(kv: list[torch.Tensor]) -> dict[str, np.ndarray]:
    return {f"kv_{i}": t.numpy().astype(np.float32) for i, t in enumerate(kv)}


def kv_unet_parity(
    sess: Any,
    ref: dict[str, torch.Tensor],
    probe_unet: Any,
    layers: list[str],
    base: dict,
    style: StyleKV,
    atol: float,
) -> dict[str, Any]:
    """The shared graph with `style`'s K/V vs the merged UNet's outputs `ref` (same probe inputs)."""

    def feeds(x: torch.Tensor, c: torch.Tensor, t: int) -> dict[str, np.ndarray]:
        kv = project_kv(c, layers, base, [style] * x.shape[0])
        return {"sample": x.numpy(), "timestep": np.array(t, dtype=np.float32), **_kv_feeds(kv)}

    return probe_parity(
        sess, feeds, ref, probe_unet, atol, f"style {style.name}: the K/V UNet", "its merged UNet"
    )


def image_parity_style(
    folder: Path, merged_pipe: Any, name: str, manifest: dict[str, Any], steps: int, atol: float
) -> dict[str, Any]:
    """A whole image: the merged pipeline (torch) vs the swappable runtime (onnxruntime) in `name`."""
    from finestyle.runtime.generate import swappable_backend

    req = GenerationRequest("a lighthouse on a cliff at night", steps=steps, seed=1234)
    a = decoded_batch(torch_backend_from_pipe(merged_pipe), [req]).clamp(-1, 1) / 2 + 0.5
    be = swappable_backend(folder, "onnxruntime", manifest=manifest)
    req.style = name
    b = decoded_batch(be, [req]).clamp(-1, 1) / 2 + 0.5
    diff = float((a - b).abs().max())
    if not diff <= atol:
        raise VerificationError(
            f"style {name}: its image differs from the merged model's by {diff:.3g} (> {atol:g})"
        )
    return {"max_abs_diff": diff, "atol": atol, "steps": steps}


def openvino_check_swappable(
    folder: Path, manifest: dict[str, Any], steps: int, log=None
) -> dict[str, Any] | None:
    """The swappable export under OpenVINO at the precision `--dtype auto` picks on this CPU: a whole
    image in the first style against onnxruntime fp32. Recorded, not enforced (as for a plain export):
    a failed check makes `--runtime openvino` refuse that precision. None without OpenVINO."""
    from finestyle.runtime.generate import swappable_backend
    from finestyle.runtime.openvino import OV_IMAGE_MEAN_ATOL, hardware_precision

    try:
        import openvino as ov
    except ImportError:
        (log or _log)("export: OpenVINO not installed; no OpenVINO check recorded")
        return None
    precision = hardware_precision()
    req = GenerationRequest("a lighthouse on a cliff at night", steps=steps, seed=1234)
    req.style = style_names(manifest)[-1]
    ref = decoded_batch(swappable_backend(folder, "onnxruntime", manifest=manifest), [req])
    be = swappable_backend(folder, "openvino", manifest=manifest, precision=precision)
    got = decoded_batch(be, [req])
    a, b = (x.clamp(-1, 1) / 2 + 0.5 for x in (ref, got))
    mean, mx = float((a - b).abs().mean()), float((a - b).abs().max())
    rep = {
        "mean_abs_diff": mean,
        "max_abs_diff": mx,
        "mean_atol": OV_IMAGE_MEAN_ATOL,
        "pass": bool(mean <= OV_IMAGE_MEAN_ATOL),
        "steps": steps,
        "style": req.style,
        "openvino": ov.__version__,
        "cpu": cpu_name(),
        "how": f"finestyle generate EXPORT PROMPT --style STYLE --runtime openvino --dtype {precision}",
    }
    verdict = "ok" if rep["pass"] else "FAILED: this precision is marked unusable"
    (log or _log)(
        f"export: OpenVINO {precision} image mean diff {mean:.2e} (<= {OV_IMAGE_MEAN_ATOL:g}) {verdict}"
    )
    return {"checks": {precision: rep}}


def _write_style(
    folder: Path, name: str, lora: dict, adapter: str, lora_scale: float, base_fp: str
) -> dict[str, Any]:
    from safetensors.torch import save_file

    info = adapter_info(adapter)
    d = folder / "styles" / name
    shutil.rmtree(d, ignore_errors=True)  # an unlisted leftover of an interrupted addition
    d.mkdir(parents=True)
    tensors = {}
    for key, (a, b, _) in lora.items():
        tensors[f"{key}.lora_A"], tensors[f"{key}.lora_B"] = a.contiguous(), b.contiguous()
    save_file(tensors, str(d / STYLE_WEIGHTS))
    meta = {
        "name": name,
        "style": info.get("style"),
        "concepts": info.get("concepts", []),
        "lora_scale": lora_scale,
        "scales": {k: s for k, (_, _, s) in lora.items()},
        "base_model": info.get("base_model"),
        "base_fingerprint": base_fp,
        "adapter": str(adapter),
        "adapter_fingerprint": hash_json(hash_tree(adapter)),
    }
    write_json(d / STYLE_INFO, meta)
    return meta


def _base_check(adapter: str, base_fp: str) -> None:
    """A style must come from the export's base: compared by fingerprint, not by name."""
    info = adapter_info(adapter)
    fp = info.get("base_fingerprint") or model_fingerprint(info.get("base_model"))
    if fp != base_fp:
        raise UserError(
            f"adapter {adapter!r} was trained on {info.get('base_model')!r}, not on this export's base "
            "(their fingerprints differ); train it on the export's base model"
        )


def _add_styles(
    folder: Path,
    pipe: Any,
    adapters: list[str],
    names: list[str],
    lora_scale: float,
    manifest: dict[str, Any],
    steps: int,
    unet_atol: float,
    image_atol: float,
    log,
) -> dict[str, Any]:
    """Write, then prove, each style into `folder` (a work copy); returns the parity figures."""
    layers = manifest["swappable"]["layers"]
    base = load_base_kv(folder)
    sess = ort_session(folder / KV_UNET)
    parity = {}
    for adapter, name in zip(adapters, names, strict=True):
        _base_check(adapter, manifest["base_fingerprint"])
        if name in manifest["swappable"]["styles"]:
            raise UserError(
                f"style {name!r} is already in the export; pick another --name or --remove-style it"
            )
        lora = style_lora(pipe, adapter, lora_scale)
        if set(lora) - {f"{n}.to_k" for n in layers} - {f"{n}.to_v" for n in layers}:
            raise UserError(f"adapter {adapter!r} adapts layers this export's UNet does not have")
        meta = _write_style(folder, name, lora, adapter, lora_scale, manifest["base_fingerprint"])
        manifest["swappable"]["styles"][name] = {
            k: meta[k] for k in ("style", "concepts", "lora_scale", "base_model", "adapter_fingerprint")
        }
        merged, _ = merge_adapter(str(folder / "merged"), adapter, lora_scale, torch.device("cpu"), 1e-4)
        ref = unet_outputs(merged.unet)
        style = load_style(folder, name, manifest)
        parity[f"unet_{name}"] = kv_unet_parity(sess, ref, merged.unet, layers, base, style, unet_atol)
        parity[f"image_{name}"] = image_parity_style(folder, merged, name, manifest, steps, image_atol)
        del merged
        release_memory()
        log(
            f"export: style {name}: UNet {parity[f'unet_{name}']['max_abs_diff']:.2e} <= {unet_atol:g}, "
            f"image {parity[f'image_{name}']['max_abs_diff']:.2e}"
        )
    return parity


def run_swappable_export(
    base: str,
    adapters: list[str],
    names: list[str],
    out: str,
    lora_scale: float = 1.0,
    parity_steps: int = 4,
    unet_atol: float | None = None,
    image_atol: float | None = None,
    log=_log,
    fp16: bool = False,
    trt: ExportConfig | None = None,
    check_openvino: bool = True,
) -> ExportResult:
    """Build a swappable export of `base` with one style per adapter; publish it with its manifest.

    `trt`: an ExportConfig with format tensorrt: also build TensorRT engines (`tensorrt/`) whose K/V
    UNet takes the K/V as inputs, at its trt_batch/trt_size/trt_static (not yet run on a GPU).

    `fp16`: the K/V UNet and the text encoder in half precision with fp32 inputs and outputs (the
    style K/V stay fp32 and are cast at the graph's edge), the VAE only if it passes the fp16 probe;
    parity then uses the stated fp16 thresholds. Default thresholds: 1e-4 / 2e-3 (fp32).

    `check_openvino`: record the OpenVINO image check at this CPU's precision (fp32 exports only, as
    for a plain export)."""
    unet_atol = unet_atol or (FP16_UNET_ATOL if fp16 else 1e-4)
    image_atol = image_atol or (FP16_IMAGE_ATOL if fp16 else 2e-3)
    if model_family(base) == SDXL:
        raise UserError(
            f"--swappable: {base} is an SDXL model; swappable exports support SD 1.x/2.x bases so far. "
            "Export each SDXL style on its own (finestyle export --adapter ...)"
        )
    names = [check_name(n) for n in (names or [style_slug(adapter_info(a).get("style")) for a in adapters])]
    if len(names) != len(adapters) or len(set(names)) != len(names):
        raise UserError("--name: give one distinct name per --adapter (or none: each style's text as a slug)")
    if trt is not None:
        require_tensorrt()  # before any work: one line, exit 2, when TensorRT is not installed
    base_fp = model_fingerprint(base)
    for a in adapters:
        _base_check(a, base_fp)
    tmp = Path(begin_export(ExportConfig(base=base, out=out, adapter=None)))
    try:
        pipe = load_sd_pipeline(base, device="cpu", dtype=torch.float32)
        pipe.save_pretrained(tmp / "merged", safe_serialization=True)
        onnx_export(tmp / "merged", tmp / "onnx", fp16=False, opset=None)
        for p in (tmp / "onnx" / "unet").glob("model.onnx*"):
            p.unlink()  # the shared K/V graph replaces it; unet/config.json stays for the layout
        layers = cross_attention_layers(pipe.unet)
        from safetensors.torch import save_file

        (tmp / "kv").mkdir()
        base_w = base_kv_weights(pipe.unet, layers)
        save_file(base_w, str(tmp / KV_BASE))
        ref_base = unet_outputs(pipe.unet)
        export_kv_unet(
            load_sd_pipeline(str(tmp / "merged"), device="cpu", dtype=torch.float32).unet,
            layers,
            tmp / KV_UNET,
        )
        half = to_fp16(tmp / "onnx", components=("text_encoder", Path(KV_UNET).parent.name)) if fp16 else None
        manifest: dict[str, Any] = {
            "format": "finestyle-export",
            "version": 1,
            "kind": "swappable",
            "base_model": base,
            "base_fingerprint": base_fp,
            "swappable": {"layers": layers, "styles": {}},
            "precision": "fp16" if fp16 else "fp32",
            "fp16": half,
            "thresholds": {"unet_atol": unet_atol, "image_atol": image_atol},
        }
        sess = ort_session(tmp / KV_UNET)
        probe = load_sd_pipeline(str(tmp / "merged"), device="cpu", dtype=torch.float32).unet
        parity = {
            "unet_base": kv_unet_parity(
                sess, ref_base, probe, layers, base_w, StyleKV(BASE_STYLE, {}), unet_atol
            )
        }
        del sess
        parity.update(
            _add_styles(
                tmp, pipe, adapters, names, lora_scale, manifest, parity_steps, unet_atol, image_atol, log
            )
        )
        if check_openvino and not fp16:
            ov_rep = openvino_check_swappable(tmp, manifest, parity_steps, log)
            release_memory()
            if ov_rep is not None:
                manifest["openvino"] = ov_rep
        if trt is not None:
            manifest["tensorrt"] = build_swappable_engines(tmp / "onnx", tmp / "tensorrt", trt)
            log(f"export: TensorRT engines with K/V inputs: {', '.join(manifest['tensorrt']['engines'])}")
        manifest.update(parity=parity, versions=export_versions(), files=hash_tree(tmp, exclude=(MANIFEST,)))
        write_json(tmp / MANIFEST, manifest)
        publish_dir(tmp, Path(out).absolute())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"export: {out} (swappable: {', '.join(style_names(manifest))}) verified and published")
    return ExportResult(out=out, styles=style_names(manifest), parity=parity_summary(parity))


def _swappable_manifest(folder: Path, flag: str) -> dict[str, Any]:
    m = verify_export(folder)
    if not is_swappable(m):
        raise UserError(
            f"{flag}: {str(folder)!r} is not a swappable export; build one with `finestyle export --swappable`"
        )
    return m


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(folder / MANIFEST)


def _style_files(folder: Path, name: str) -> dict[str, str]:
    return {f"styles/{name}/{k}": v for k, v in hash_tree(folder / "styles" / name).items()}


def style_disk_bytes(adapter: str) -> int:
    """The disk a new style needs: its K/V factors and check images, a few times its adapter's files
    (the work copy links the export's big files rather than copying them)."""
    files = [f for f in Path(adapter).rglob("*") if f.is_file()]
    return 4 * sum(f.stat().st_size for f in files) + 2**20


def add_style(
    folder: str,
    adapter: str,
    name: str | None = None,
    lora_scale: float = 1.0,
    parity_steps: int = 4,
    log=_log,
) -> ExportResult:
    """`finestyle export --add-style ADAPTER --to DIR`: prove the style in a work copy of its files,
    then move it in; the UNet graph and the other styles are not touched."""
    dest = Path(folder)
    manifest = _swappable_manifest(dest, "--add-style")
    name = check_name(name or style_slug(adapter_info(adapter).get("style")))
    _base_check(adapter, manifest["base_fingerprint"])  # the cheap checks first, before any loading
    if name in manifest["swappable"]["styles"]:
        raise UserError(f"style {name!r} is already in the export; pick another --name or --remove-style it")
    check_free_space(
        "--add-style",
        dest,
        style_disk_bytes(adapter),
        "free space there; the export was not changed",
    )
    work = dest.parent / f".{dest.name}.work-{uuid.uuid4().hex[:8]}"
    try:
        # the work copy links the big files (nothing writes to them) and holds the new style
        shutil.copytree(dest, work, copy_function=_link_or_copy)
        pipe = load_sd_pipeline(str(work / "merged"), device="cpu", dtype=torch.float32)
        th = manifest.get("thresholds", {})
        parity = _add_styles(
            work,
            pipe,
            [adapter],
            [name],
            lora_scale,
            manifest,
            parity_steps,
            th.get("unet_atol", 1e-4),
            th.get("image_atol", 2e-3),
            log,
        )
        manifest["parity"].update(parity)
        manifest["files"].update(_style_files(work, name))
        # move the proven style in, then write the manifest last: until then it is not listed
        target = dest / "styles" / name
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(exist_ok=True)
        shutil.move(str(work / "styles" / name), str(target))
        _write_manifest(dest, manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"export: style {name} added to {folder}")
    return ExportResult(out=folder, styles=style_names(manifest), added=name)


def remove_style(folder: str, name: str, log=_log) -> ExportResult:
    dest = Path(folder)
    manifest = _swappable_manifest(dest, "--remove-style")
    if name not in manifest["swappable"]["styles"]:
        raise UserError(
            f"--remove-style: no style {name!r}; this export has: {', '.join(style_names(manifest))}"
        )
    del manifest["swappable"]["styles"][name]
    for k in (f"unet_{name}", f"image_{name}"):
        manifest["parity"].pop(k, None)
    prefix = f"styles/{name}/"
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith(prefix)}
    _write_manifest(dest, manifest)  # first: an unlisted folder left by a crash is harmless
    shutil.rmtree(dest / "styles" / name, ignore_errors=True)
    log(f"export: style {name} removed from {folder}")
    return ExportResult(out=folder, styles=style_names(manifest), removed=name)


def _link_or_copy(src: str, dst: str) -> None:
    import os

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)

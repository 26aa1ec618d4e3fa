"""The backend of a swappable export: one K/V UNet on onnxruntime, OpenVINO or TensorRT, with each
request's style's cross-attention keys and values fed as inputs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finestyle.artifacts.manifest import export_layout, verify_export
from finestyle.core.errors import UserError
from finestyle.core.fs import hash_tree, sha256_file
from finestyle.core.models import load_sd_pipeline
from finestyle.core.onnxrt import ort_providers, ort_session
from finestyle.runtime.backend import Backend
from finestyle.runtime.onnx_backends import backend_layout, sd_only
from finestyle.runtime.openvino import backend_parts as openvino_parts
from finestyle.runtime.openvino import resolve_precision
from finestyle.runtime.tensorrt import TrtEngine
from finestyle.runtime.torch_backend import build_torch_backend


def _kv_feeds(lat: torch.Tensor, t: torch.Tensor, kvs: list[torch.Tensor]) -> dict[str, np.ndarray]:
    feeds = {"sample": lat.numpy().astype(np.float32), "timestep": np.array(float(t), dtype=np.float32)}
    feeds.update({f"kv_{i}": k.numpy().astype(np.float32) for i, k in enumerate(kvs)})
    return feeds


def _kv_parts_onnxruntime(
    export_dir: Path, manifest: dict[str, Any], dtype: str | None, layout: Any, precision: str | None = None
) -> dict[str, Any]:
    from finestyle.artifacts.styles import KV_UNET

    provs = ort_providers(None)
    te, vd, sess = (
        ort_session(export_dir / rel, provs)
        for rel in ("onnx/text_encoder/model.onnx", "onnx/vae_decoder/model.onnx", KV_UNET)
    )
    return {
        "name": f"onnxruntime[{provs[0]}]",
        "encode_text": lambda ids: torch.from_numpy(
            te.run(None, {"input_ids": ids.numpy().astype(np.int64)})[0].astype(np.float32)
        ),
        "decode": lambda z: torch.from_numpy(
            vd.run(None, {"latent_sample": z.numpy().astype(np.float32)})[0].astype(np.float32)
        ),
        "unet": lambda lat, t, kvs: torch.from_numpy(
            np.asarray(sess.run(None, _kv_feeds(lat, t, kvs))[0], dtype=np.float32)
        ),
    }


def _kv_parts_openvino(
    export_dir: Path, manifest: dict[str, Any], dtype: str | None, layout: Any, precision: str | None = None
) -> dict[str, Any]:
    """`precision` set: run at it without the export's recorded check (the export's own check)."""
    from finestyle.artifacts.styles import KV_UNET
    from finestyle.runtime.openvino import OvComponent, component_key, require_openvino

    prec = precision or resolve_precision(dtype, manifest)
    files = manifest.get("files") or hash_tree(export_dir, exclude=("manifest.json",))
    comp = OvComponent(
        require_openvino().Core(), export_dir / KV_UNET, prec, component_key(files, "unet_kv", prec)
    )
    parts = openvino_parts(export_dir / "onnx", files, prec, layout)
    comps = {**parts["components"], "unet_kv": comp}
    return {
        "name": f"openvino[CPU,{prec}]",
        "encode_text": parts["encode_text"],
        "decode": parts["decode"],
        "unet": lambda lat, t, kvs: torch.from_numpy(
            np.asarray(comp(**_kv_feeds(lat, t, kvs)), dtype=np.float32)
        ),
        "components": comps,
    }


def _kv_parts_tensorrt(
    export_dir: Path, manifest: dict[str, Any], dtype: str | None, layout: Any, precision: str | None = None
) -> dict[str, Any]:
    """The engines `export --swappable --format tensorrt` built; K/V are engine inputs, so every
    style runs on the same engines (not yet run on a GPU)."""
    if "tensorrt" not in manifest:
        raise UserError(
            f"{export_dir} has no TensorRT engines; export it with --swappable --format tensorrt, "
            "or use --runtime onnxruntime"
        )
    trt_dir = export_dir / "tensorrt"
    te, un, vd = (TrtEngine(trt_dir / f"{c}.plan") for c in ("text_encoder", "unet_kv", "vae_decoder"))

    def unet_fn(lat: torch.Tensor, t: torch.Tensor, kvs: list[torch.Tensor]) -> torch.Tensor:
        kv = {f"kv_{i}": k for i, k in enumerate(kvs)}
        return un(sample=lat, timestep=torch.tensor(float(t)), **kv)[0].cpu()

    return {
        "name": "tensorrt",
        "encode_text": lambda ids: te(input_ids=ids.to(torch.int64))[0].cpu(),
        "decode": lambda z: vd(latent_sample=z)[0].cpu(),
        "unet": unet_fn,
    }


_KV_PARTS = {
    "onnxruntime": _kv_parts_onnxruntime,
    "openvino": _kv_parts_openvino,
    "tensorrt": _kv_parts_tensorrt,
}


def _kv_unet_backend(
    export_dir: Path,
    runtime: str,
    manifest: dict[str, Any],
    msha: str | None,
    dtype: str | None,
    layers: list[str],
    precision: str | None = None,
) -> Backend:
    """The shared K/V UNet with the text encoder and VAE decoder of a swappable export, on one runtime;
    `unet(latents, t, kv)` takes the K/V list in place of the text embedding."""
    from finestyle.core.kv import KVUNet

    layout = sd_only(export_layout(export_dir / "onnx"), "a swappable export")
    if runtime == "torch":
        pipe = load_sd_pipeline(str(export_dir / "merged"), device="cpu", dtype=torch.float32)
        be = build_torch_backend(pipe, manifest, msha, None, False)
        kv_unet = KVUNet(pipe.unet, layers).eval()

        @torch.no_grad()
        def unet_fn(lat: torch.Tensor, t: torch.Tensor, kvs: list[torch.Tensor]) -> torch.Tensor:
            return kv_unet(lat, t, *kvs).float()

        be.unet, be.unet_base = unet_fn, None
        return be
    parts = _KV_PARTS[runtime](export_dir, manifest, dtype, layout, precision)
    return Backend(
        name=parts["name"],
        **backend_layout(layout),
        encode_text=parts["encode_text"],
        unet=parts["unet"],
        decode=parts["decode"],
        manifest=manifest,
        manifest_sha256=msha,
        parts=parts.get("components") or {},
    )


# How long a style removed by a reload still serves the requests accepted before it (longer than any
# request's timeout).
RETIRED_S = 3600.0


def swappable_backend(
    export_dir: Path,
    runtime: str = "onnxruntime",
    manifest: dict[str, Any] | None = None,
    dtype: str | None = None,
    precision: str | None = None,
) -> Backend:
    """A style-swappable export: the shared K/V UNet on onnxruntime, openvino, torch or TensorRT, with every
    style's K/V computed from the text embedding once per denoising loop (`Backend.kv`). Without
    `manifest` the folder is verified first (the export's own checks pass theirs). `precision`: the
    export's own OpenVINO check runs at it, before the manifest records a check."""
    from finestyle.artifacts.styles import load_base_kv, load_style, style_names
    from finestyle.core.kv import project_kv

    export_dir = Path(export_dir)
    msha = None
    if manifest is None:
        manifest = verify_export(export_dir)
        msha = sha256_file(export_dir / "manifest.json")
    layers = manifest["swappable"]["layers"]
    base = load_base_kv(export_dir)
    names = style_names(manifest)
    # The live styles' K/V factors, replaced whole by a reload (one assignment: the worker thread sees
    # the old set or the new one, never a half-built one); styles a reload removed stay in `retired`
    # for RETIRED_S, so that a request accepted while its style was live is still served.
    cur: dict[str, Any] = {"manifest": manifest, "cache": {}, "retired": {}}

    def style(name: str) -> Any:
        found = cur["cache"].get(name)
        if found is None and name in cur["retired"]:
            found = cur["retired"][name][0]
        if found is None:
            found = load_style(export_dir, name, cur["manifest"])  # raises UserError naming the styles
            cur["cache"] = {**cur["cache"], name: found}
        return found

    def kv(emb: torch.Tensor, row_styles: list[str]) -> list[torch.Tensor]:
        return project_kv(emb, layers, base, [style(n) for n in row_styles])

    for n in names:  # every style at load: a style made for another base is refused here
        style(n)

    be = _kv_unet_backend(export_dir, runtime, manifest, msha, dtype, layers, precision)

    def reload() -> list[str]:
        """Re-read the manifest: styles added or removed since start-up, each verified (hashes,
        base fingerprint) before it is served; the shared graph must be the one loaded."""
        from finestyle.artifacts.styles import verify_styles

        new = verify_export(export_dir, deep=False)
        if {k: v for k, v in new["files"].items() if not k.startswith("styles/")} != {
            k: v for k, v in cur["manifest"]["files"].items() if not k.startswith("styles/")
        }:
            raise UserError("the export's shared files changed since start-up; restart the server")
        verify_styles(export_dir, new)
        fresh = {n: load_style(export_dir, n, new) for n in style_names(new)}  # refuses a wrong base
        now = time.monotonic()
        retired = {n: v for n, v in cur["retired"].items() if now - v[1] < RETIRED_S and n not in fresh}
        retired.update({n: (v, now) for n, v in cur["cache"].items() if n not in fresh})
        # retired first: a reader that then finds a style gone from the new set finds it there
        cur["retired"], be.retired_styles = retired, sorted(set(retired) | set(be.styles) - set(fresh))
        cur["manifest"], cur["cache"] = new, fresh
        be.manifest, be.styles = new, style_names(new)
        be.manifest_sha256 = sha256_file(export_dir / "manifest.json")
        return be.styles

    be.name = f"{be.name},swappable"
    be.kv, be.styles, be.reload = kv, names, reload
    be.default_style = manifest["swappable"].get("default") or (names[1] if len(names) > 1 else names[0])
    return be

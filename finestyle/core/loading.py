"""Model loading (hub id, local folder, single file or builtin name) with errors that say what to do.

Safetensors only; remote code is never trusted. A hub id on a machine that cannot reach the hub fails
fast with one line instead of a minute of retries.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from finestyle.core.builtin_nets import seeded, tiny_clip
from finestyle.core.builtins import (
    BUILTINS,
    build_builtin_captioner,
    build_builtin_pipeline,
    builtin_folder,
    get_builtin,
    is_builtin,
    pipeline_class,
    pipeline_extras,
)
from finestyle.core.env import quiet_progress_bars
from finestyle.core.errors import ModelLoadError, UserError
from finestyle.core.fs import staging_dir
from finestyle.core.sd import FLUX, SD, SD3, SDXL, denoiser, family_of_class, folder_family


def pick_device(prefer: str | None = None) -> torch.device:
    """Return `prefer` if given, else the best available device: cuda > mps > cpu."""
    if prefer and prefer != "auto":
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, prefer: str | None = None) -> torch.dtype:
    """fp32 on CPU; fp16 on cuda/mps unless `prefer` names one (fp32, fp16, bf16)."""
    if prefer and prefer != "auto":
        names = {
            "fp32": torch.float32,
            "float32": torch.float32,
            "fp16": torch.float16,
            "float16": torch.float16,
            "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16,
        }
        if prefer not in names:
            raise UserError(f"dtype: unknown value {prefer!r}; use one of fp32, fp16, bf16, auto")
        return names[prefer]
    return torch.float32 if device.type == "cpu" else torch.float16


@contextlib.contextmanager
def quiet_hf_logs() -> Iterator[None]:
    """Silence diffusers/transformers loggers during a load: we report failures ourselves."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    old = (dlog.get_verbosity(), tlog.get_verbosity())
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(old[0])
        tlog.set_verbosity(old[1])


def model_family(name: str) -> str:
    """`sd` or `sdxl` for a model argument, read from the model itself (builtin, folder, file or hub id)."""
    name = str(name)
    if is_builtin(name):
        return get_builtin(name, "text-to-image").family
    p = Path(name).expanduser()
    if p.is_file():
        return _single_file_family(p)
    if p.is_dir():
        fam = folder_family(p)
        if fam is None:
            raise ModelLoadError(
                f"cannot load model {name!r}: the local folder lacks the files a model needs (no "
                "model_index.json or unet/config.json); pass a diffusers folder saved with save_pretrained, "
                "a single-file .safetensors checkpoint, or a builtin (`finestyle models`)"
            )
        return fam
    from diffusers import DiffusionPipeline

    index = _guarded_load(name, lambda: DiffusionPipeline.load_config(name))
    return family_of_class(index.get("_class_name", ""))


def _single_file_family(path: Path) -> str:
    """The family of a single-file checkpoint, from its tensor names (SDXL has a second text encoder)."""
    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"cannot load model {str(path)!r}: single-file checkpoints are read as .safetensors only "
            "(pickled .ckpt/.bin files can run code); convert it, or pass a diffusers folder"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise ModelLoadError(f"cannot read {str(path)!r} as safetensors: {exc}") from exc
    if any(".double_blocks." in f".{k}" or k.startswith("single_transformer_blocks.") for k in keys):
        return FLUX  # BFL's layout (double_blocks, optionally under model.diffusion_model.) or diffusers'
    if any(".joint_blocks." in f".{k}" for k in keys) or any(
        k.startswith("transformer_blocks.") for k in keys
    ):
        return SD3
    if any(k.startswith(("conditioner.embedders.1.", "text_encoder_2.")) for k in keys):
        return SDXL
    return SD


def load_clip(name: str, device: str | torch.device | None = None) -> tuple[Any, Any]:
    """(CLIPModel, CLIPProcessor) from a hub id (e.g. openai/clip-vit-large-patch14), a local folder or
    `builtin:tiny-clip`; safetensors only."""
    from transformers import CLIPModel, CLIPProcessor

    dev = device if isinstance(device, torch.device) else pick_device(device)
    if is_builtin(name):
        get_builtin(name, "clip")
        with seeded(0):
            model, proc = tiny_clip()
    else:
        model = _guarded_load(name, lambda: CLIPModel.from_pretrained(name, use_safetensors=True))
        proc = _guarded_load(name, lambda: CLIPProcessor.from_pretrained(name))
    return model.to(dev).eval(), proc


def save_builtin(name: str, out: str | os.PathLike) -> Path:
    """Write a builtin as an ordinary local folder (safetensors) that `from_pretrained` loads."""

    b = BUILTINS.get(name)
    if b is None:
        raise UserError(f"unknown builtin model {name!r}; known builtins: {', '.join(BUILTINS)}")
    out = Path(out)
    with staging_dir(out) as tmp:
        if b.folder:
            shutil.copytree(builtin_folder(name), tmp, dirs_exist_ok=True)
        elif b.kind == "text-to-image":
            build_builtin_pipeline(name).save_pretrained(tmp, safe_serialization=True)
        else:
            model, processor = load_clip(name, "cpu") if b.kind == "clip" else build_builtin_captioner(name)
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
    return out


def _explain_load_failure(name: str, exc: BaseException) -> ModelLoadError:
    text = f"{type(exc).__name__}: {exc}"
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            why = "is a file, not a model folder"
        else:
            why = f"lacks the files a model needs ({str(exc).splitlines()[0][:200]})"
        return ModelLoadError(
            f"cannot load model {name!r}: the local folder {why}; pass a diffusers/transformers "
            "folder saved with save_pretrained (safetensors), or a builtin (`finestyle models`)"
        )
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        return ModelLoadError(
            f"cannot load model {name!r}: no such local folder; pass an existing diffusers/transformers "
            "folder, a hub id (org/name) or a builtin (`finestyle models`)"
        )
    if "/" in name or "offline" in text.lower() or "connect" in text.lower():
        return ModelLoadError(
            f"cannot load model {name!r}: the Hugging Face hub is unreachable (or offline mode is on) "
            "and it is not in the local cache, or it has no safetensors weights; on a connected machine "
            f"run `huggingface-cli download {name} --local-dir DIR` and pass DIR instead"
        )
    return ModelLoadError(
        f"cannot load model {name!r}: it is neither a builtin (`finestyle models`), an existing "
        "local folder, nor a Hugging Face hub id of the form org/name"
    )


_HUB_PROBED: list[bool] = []


def _looks_like_hub_id(name: str) -> bool:
    return (
        not name.startswith(("builtin:", "/", ".", "~"))
        and name.count("/") == 1
        and not Path(name).expanduser().exists()
    )


def offline_unless_hub_reachable(timeout: float = 3.0) -> bool:
    """With HF_HUB_OFFLINE unset, probe the hub once per process (a TCP connect to its endpoint within
    `timeout` s). When it is unreachable, switch this process to offline mode, so that a cached model
    loads and any other fails at once rather than after the hub client's retries. True when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    if _HUB_PROBED:
        return _HUB_PROBED[0]
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        _HUB_PROBED.append(False)
        return False
    except OSError:
        pass
    _HUB_PROBED.append(True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    from huggingface_hub.utils import reset_sessions

    reset_sessions()  # new sessions refuse requests at once (offline adapters)
    try:
        import transformers.utils.hub as tf_hub

        tf_hub._is_offline_mode = True
    except (ImportError, AttributeError):
        pass
    return True


def _guarded_load(name: str, load: Callable[[], Any]) -> Any:
    """Run a `from_pretrained` call; turn hub/folder failures into one clear ModelLoadError. A hub id
    with the hub unreachable is tried offline (`offline_unless_hub_reachable`)."""
    if _looks_like_hub_id(name):
        offline_unless_hub_reachable()
    try:
        with quiet_hf_logs():
            return load()
    except (OSError, ValueError) as exc:
        raise _explain_load_failure(name, exc) from exc
    except Exception as exc:  # hub client errors that aren't OSError
        if type(exc).__module__.startswith(("huggingface_hub", "requests", "httpx")):
            raise _explain_load_failure(name, exc) from exc
        raise


SINGLE_FILE_CONFIG_ENV = "FINESTYLE_SINGLE_FILE_CONFIG"
"""A diffusers folder or hub id whose configs and tokenizers fit a single-file checkpoint; unset,
diffusers picks the published base of the checkpoint's family (which must then be in the HF cache
on a machine without network)."""


def _load_single_file(cls: Any, path: Path, dtype: torch.dtype, extras: dict[str, Any]) -> Any:
    """A single-file (original-layout) checkpoint through diffusers' `from_single_file`."""
    config = os.environ.get(SINGLE_FILE_CONFIG_ENV)
    kw = {"config": config} if config else {}
    try:
        with quiet_hf_logs():
            return cls.from_single_file(str(path), torch_dtype=dtype, **kw, **extras)
    except Exception as exc:  # diffusers/hub errors of every kind: one line that says what to do
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(
            f"cannot load the single-file checkpoint {str(path)!r} ({first}); diffusers reads it with the "
            f"configs and tokenizers of its base model: set {SINGLE_FILE_CONFIG_ENV} to a diffusers "
            "folder (or a cached hub id) of the same architecture, or convert it to a diffusers folder"
        ) from exc


def load_sd_pipeline(
    name: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    without_t5: bool = False,
) -> Any:
    """Load a Stable Diffusion (1.x/2.x, XL, 3.x) or FLUX.1 pipeline from a hub id, local folder, single
    file or builtin. `without_t5`: an SD 3.x pipeline without its T5 encoder (never loaded; its part of
    the conditioning is zeros, as diffusers does with `text_encoder_3=None`).

    The family comes from the model itself (`model_family`): an SDXL base loads as
    `StableDiffusionXLPipeline`, anything else as `StableDiffusionPipeline`.

    Args:
        name: `org/name` on the hub, a local diffusers folder, a single-file `.safetensors`
            checkpoint, or `builtin:tiny-sd` etc.
        device: where to put it; default: cuda > mps > cpu.
        dtype: torch dtype or a name (fp32/fp16/bf16); default: fp32 on CPU, fp16 on GPU.
    """
    quiet_progress_bars()
    dev = device if isinstance(device, torch.device) else pick_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else pick_dtype(dev, dtype)
    name = str(name)
    if is_builtin(name):
        pipe = build_builtin_pipeline(name)
        if without_t5 and getattr(pipe, "text_encoder_3", None) is not None:
            pipe.text_encoder_3, pipe.tokenizer_3 = None, None
    else:
        family = model_family(name)
        cls, extras = pipeline_class(family), pipeline_extras(family)
        if without_t5 and family == SD3:
            extras = {**extras, "text_encoder_3": None, "tokenizer_3": None}
        if Path(name).expanduser().is_file():
            pipe = _load_single_file(cls, Path(name).expanduser(), dt, extras)
        else:
            pipe = _guarded_load(
                name, lambda: cls.from_pretrained(name, use_safetensors=True, torch_dtype=dt, **extras)
            )
    pipe.set_progress_bar_config(disable=True)
    if denoiser(pipe).dtype != dt:
        pipe.to(dtype=dt)
    return pipe.to(dev)


_TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")


def require_unet(stage: str, name: str) -> None:
    """Refuse, in one line, an SD 3.x / FLUX.1 model in a stage that runs UNets only so far."""
    family = model_family(name)
    if family in (SD3, FLUX):
        raise UserError(
            f"{stage}: {name!r} is {'an SD 3.x' if family == SD3 else 'a FLUX.1'} model (MMDiT); `finestyle "
            f"{stage}` runs SD 1.x/2.x and SDXL UNets only so far. For SD 3.x and FLUX.1 FineStyle has their "
            "models, adapters (diffusers and kohya formats) and prepare's text fitting: "
            "docs/guides/sd3-flux.md says what each stage supports"
        )


def load_tokenizers(name: str) -> list[Any]:
    """The text-to-image model's tokenizers, in its encoders' order (SDXL and FLUX: two, SD 3: three,
    its T5 last), without its weights.

    A folder or hub id reads `tokenizer/` (and `tokenizer_2/`) only; a builtin or single file builds the
    pipeline, which for those is cheap or unavoidable. Each tokenizer's `model_max_length` is its
    encoder's window.
    """
    from transformers import AutoTokenizer

    name = str(name)
    if is_builtin(name) or Path(name).expanduser().is_file():
        pipe = load_sd_pipeline(name, device="cpu", dtype="fp32")
        return [getattr(pipe, s) for s in _TOKENIZERS if getattr(pipe, s, None) is not None]
    subs = {SDXL: 2, FLUX: 2, SD3: 3}.get(model_family(name), 1)
    subs = list(_TOKENIZERS[:subs])
    return [_guarded_load(name, lambda s=s: AutoTokenizer.from_pretrained(name, subfolder=s)) for s in subs]


def load_captioner(
    name: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[Any, Any]:
    """Load a BLIP captioner and its processor from a hub id, local folder or builtin name."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    dev = device if isinstance(device, torch.device) else pick_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else pick_dtype(dev, dtype)
    name = str(name)
    if is_builtin(name):
        model, processor = build_builtin_captioner(name)
    else:
        processor = _guarded_load(name, lambda: BlipProcessor.from_pretrained(name))
        model = _guarded_load(
            name, lambda: BlipForConditionalGeneration.from_pretrained(name, use_safetensors=True)
        )
    if model.dtype != dt:
        model = model.to(dtype=dt)
    return model.to(dev).eval(), processor


def load_judge(name: str, device: str | torch.device | None = None) -> Any:
    """Load an image classifier (e.g. `builtin:world-judge`, or a folder saved with save_pretrained)."""
    from transformers import AutoModelForImageClassification

    dev = device if isinstance(device, torch.device) else pick_device(device)
    name = str(name)
    if is_builtin(name):
        folder: str | Path = builtin_folder(get_builtin(name, "judge").name)
    else:
        folder = name
    model = _guarded_load(
        name, lambda: AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True)
    )
    return model.to(dev).eval()

"""Checkpoints that resume exactly: adapter, optimizer, scheduler, scaler, every RNG state and the data
order position, written atomically.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import torch

from finestyle.core.fs import read_json, staging_dir, write_bytes, write_json
from finestyle.train.lora import load_lora_state, lora_state_dict


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    st = {"gen": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(gen: torch.Generator, st: dict[str, Any]) -> None:
    gen.set_state(st["gen"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    unet: Any,
    optimizer: Any,
    lr_sched: Any,
    scaler: Any,
    gen: torch.Generator,
    position: dict[str, int],
    losses: list[float],
    keep: int,
) -> Path:
    """Write checkpoints/step-N atomically (state.json last), then prune the oldest beyond `keep`."""
    from safetensors.torch import save_file

    final = ckpt_root / f"step-{step:07d}"
    with staging_dir(final) as tmp:
        save_file(lora_state_dict(unet), str(tmp / "adapter.safetensors"))
        # optimizer/scheduler/RNG states are plain tensors and numbers: torch.save here, read back
        # with weights_only=True (no pickle code execution). Serialised in memory, then written by
        # Python: torch's own file writer turns a full disk into "unexpected pos" instead of ENOSPC.
        buf = io.BytesIO()
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": _rng_state(gen),
            },
            buf,
        )
        write_bytes(tmp / "training_state.pt", buf.getvalue())
        write_json(
            tmp / "state.json", {"step": step, "position": position, "losses": losses, "complete": True}
        )
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "state.json").exists())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(
    path: Path, unet: Any, optimizer: Any, lr_sched: Any, scaler: Any, gen: torch.Generator
) -> dict[str, Any]:
    from safetensors.torch import load_file

    load_lora_state(unet, load_file(str(path / "adapter.safetensors")))
    st = torch.load(path / "training_state.pt", weights_only=True)
    optimizer.load_state_dict(st["optimizer"])
    lr_sched.load_state_dict(st["lr_scheduler"])
    if scaler is not None and st["scaler"]:
        scaler.load_state_dict(st["scaler"])
    _set_rng_state(gen, st["rng"])
    return read_json(path / "state.json")

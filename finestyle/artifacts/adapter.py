"""The adapter folder that train writes and export, runtime and serve read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finestyle.core.errors import UserError
from finestyle.core.fs import read_json

ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "finestyle_lora_kohya.safetensors"
# Objects used for concept-swap validation prompts: none of them is in the example references, so
# whatever of the references shows up in these samples is content leakage.
ADAPTER_INFO = "finestyle_adapter.json"
"""The project's own record beside the weights: base model, rank, alpha, targets, concepts, style."""


def adapter_info(adapter_dir: str | Path) -> dict[str, Any]:
    """The finestyle_adapter.json of an adapter folder (base model, rank, alpha, concepts...)."""
    p = Path(adapter_dir) / "finestyle_adapter.json"
    if not p.exists():
        raise UserError(
            f"adapter {str(adapter_dir)!r} has no finestyle_adapter.json; pass the adapter/ "
            "folder written by `finestyle train`"
        )
    return read_json(p)

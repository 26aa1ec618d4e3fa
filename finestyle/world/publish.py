"""Installing a trained world model as a builtin: fp16 safetensors, a model card, SHA256SUMS."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from finestyle.core.errors import UserError
from finestyle.core.fs import staging_dir
from finestyle.core.models import BUILTINS, weights_dir, write_sha256sums

# world train --model NAME -> the builtin it installs as
BUILTIN_OF = {"sd": "builtin:world-sd", "blip": "builtin:world-blip", "judge": "builtin:world-judge"}


def _to_fp16(folder: Path) -> None:
    """Store every floating tensor of every safetensors file as fp16 (loaders upcast to their dtype)."""
    for f in folder.rglob("*.safetensors"):
        tensors = load_file(f)
        half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
        save_file(half, f, metadata={"format": "pt"})


def model_card(name: str, reports: list[dict[str, Any]], gates: dict[str, Any] | None) -> str:
    """The card: what the model is, its data, training runs (steps, time, hardware) and measured gates."""
    lines = [f"# {name}", "", BUILTINS[name].description + ".", ""]
    lines += [
        "## Data",
        "Procedural world renders (`finestyle world render`), 64 px, seeds 0..n_train-1; the held-out",
        "style is never shown to the text-to-image model. Reproduce with `finestyle world train`.",
        "",
        "## Training",
    ]
    for r in reports:
        c = r.get("config", {})
        lines.append(
            f"- {c.get('model')}: {c.get('steps')} steps, batch {c.get('batch_size')}, lr {c.get('lr')}, "
            f"{c.get('n_train')} renders, {r.get('seconds_total', r.get('seconds_this_run', 0)) / 60:.0f} min "
            f"on {r.get('cpu', 'a CPU')}, final loss {r.get('final_loss', 0):.4f}"
            + (f" ({r['note']})" if r.get("note") else "")
        )
    if gates:
        lines += [
            "",
            "## Gates (`finestyle world check`)",
            "",
            "| gate | value | goal | pass |",
            "|---|---|---|---|",
        ]
        for g, v in gates.items():
            goal = ("<= " if v.get("at_most") else ">= ") + str(v["goal"])
            lines.append(f"| {g} | {v['value']:.3f} | {goal} | {'yes' if v['pass'] else 'no'} |")
    return "\n".join(lines) + "\n"


def install(run_dirs: list[Path], model: str, gates_json: Path | None = None) -> Path:
    """Copy `run_dirs[0]/model` into the package's weights as fp16, with a card and SHA256SUMS.

    Further run folders (e.g. the VAE run under world-sd) only contribute their reports to the card.
    """
    if model not in BUILTIN_OF:
        raise UserError(f"--model: {model!r} is not one of {', '.join(BUILTIN_OF)}")
    src = run_dirs[0] / "model"
    if not src.is_dir():
        raise UserError(f"{src}: no trained model here; run `finestyle world train --model {model}` first")
    name = BUILTIN_OF[model]
    reports = [json.loads((d / "report.json").read_text()) for d in run_dirs if (d / "report.json").is_file()]
    gates = json.loads(gates_json.read_text())["gates"] if gates_json else None
    dest = weights_dir() / BUILTINS[name].folder
    with staging_dir(dest) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        _to_fp16(tmp)
        (tmp / "README.md").write_text(model_card(name, reports, gates))
        write_sha256sums(tmp)
    return dest

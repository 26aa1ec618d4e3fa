"""Shared fixtures: builtin models as local folders, synthetic images, and an offline environment.

The environment is set here, before anything imports Prefect or the HF hub client: offline hub,
Prefect state in a temp folder with analytics off, no onnxruntime telemetry.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_STATE = Path(tempfile.mkdtemp(prefix="finestyle-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["FINESTYLE_HOME"] = str(_STATE)
os.environ.setdefault("PREFECT_HOME", str(_STATE / "prefect"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = str(_STATE / "hf")
os.environ["FINESTYLE_OV_CACHE"] = str(_STATE / "ov-cache")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    # pytest -n N: the cores are shared between N workers (and the processes they start); more
    # OpenMP threads than cores make every worker spin-wait on the others
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

REPO = Path(__file__).resolve().parent.parent


def doc_pages() -> list[Path]:
    """The README and every page of the documentation site."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def docs_text() -> str:
    return "\n".join(p.read_text() for p in doc_pages())


def doc_section(heading: str, page: str | None = None) -> str:
    """The text after `heading` (a whole line, e.g. "## SDXL") on the first page that has it (or on
    `page`, a path from the repository's root)."""
    for path in [REPO / page] if page else doc_pages():
        text = path.read_text()
        lines = text.splitlines()
        if heading in lines:
            return "\n".join(lines[lines.index(heading) + 1 :])
    raise AssertionError(f"no page of the README or docs/ has the heading {heading!r}")


EXAMPLES = REPO / "data" / "examples"


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_trt = pytest.mark.skip(reason="needs TensorRT (not installed)")
    cuda, trt = _has_cuda(), _has_tensorrt()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not trt:
            item.add_marker(skip_trt)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """builtin:tiny-sd written as an ordinary diffusers folder."""
    from finestyle.core.models import save_builtin

    return save_builtin("builtin:tiny-sd", tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finestyle.core.models import save_builtin

    return save_builtin("builtin:tiny-blip", tmp_path_factory.mktemp("models") / "tiny-blip")


@pytest.fixture(scope="session")
def tiny_pipe():
    from finestyle.core.models import load_sd_pipeline

    return load_sd_pipeline("builtin:tiny-sd", device="cpu")


def make_scene(size: tuple[int, int] = (160, 128), seed: int = 0):
    """A synthetic reference image: flat sky, ground, and two coloured shapes."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    im = Image.new("RGB", size, (190, 215, 230))
    d = ImageDraw.Draw(im)
    w, h = size
    d.rectangle((0, int(h * 0.65), w, h), fill=(140, 190, 130))
    x = rng.randint(5, w // 3)
    d.ellipse((x, 20, x + w // 4, 20 + w // 4), fill=(240, 190, 100))
    d.rectangle((w // 2, h // 2, w // 2 + w // 4, h // 2 + h // 4), fill=(220, 110, 100))
    return im


def scene_boxes(size: tuple[int, int] = (160, 128), seed: int = 0) -> list[dict]:
    """The true boxes of `make_scene(size, seed)`'s two shapes, as `prepare --boxes` takes them.

    Tests that need concept rows use these rather than the random tiny captioner's grid captions: a
    random-weight BLIP barely looks at the image, so whether its crop captions differ from the whole
    image's (and survive deduplication) depends on the CPU's arithmetic."""
    import random

    rng = random.Random(seed)
    w, h = size
    x = rng.randint(5, w // 3)
    return [
        {"concept": "yellow sun", "bbox": [x, 20, x + w // 4, 20 + w // 4]},
        {"concept": "red block", "bbox": [w // 2, h // 2, w // 2 + w // 4, h // 2 + h // 4]},
    ]


def write_scene_boxes(path: Path, scenes: dict[str, tuple[tuple[int, int], int]]) -> str:
    """A boxes JSON for the `make_scene` images named in `scenes` (file name -> (size, seed))."""
    import json

    path.write_text(json.dumps({name: scene_boxes(size, seed) for name, (size, seed) in scenes.items()}))
    return str(path)


@pytest.fixture
def scene_dir(tmp_path: Path) -> Path:
    """A folder of three distinct synthetic reference images."""
    d = tmp_path / "refs"
    d.mkdir()
    for i in range(3):
        make_scene((160 + 16 * i, 128), seed=i).save(d / f"scene{i}.png")
    return d


def prepare_small_dataset(root: Path, n: int = 2, style: str = "paper-cut", sizes=None) -> Path:
    """`n` synthetic scenes under root/refs, prepared at 64 px with their two true concept boxes into
    root/ds."""
    from finestyle.config import PrepareConfig
    from finestyle.prepare.stage import run_prepare

    refs = root / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    scenes = {f"s{i}.png": (sizes[i] if sizes else (128, 96), i) for i in range(n)}
    for name, (size, seed) in scenes.items():
        make_scene(size, seed=seed).save(refs / name)
    out = root / "ds"
    run_prepare(
        PrepareConfig(
            images=[str(refs)],
            style=style,
            out=str(out),
            concepts="boxes",
            boxes=write_scene_boxes(root / "boxes.json", scenes),
            max_concepts=2,
            resolution=64,
            num_beams=1,
        ),
        log=lambda m: None,
    )
    return out


def free_port() -> int:
    """A free TCP port on the loopback address, for a server a test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

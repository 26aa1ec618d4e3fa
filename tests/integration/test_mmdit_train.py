"""SD 3.5 and FLUX.1 through prepare and train, as the guide shows them: rectified-flow training of the
text stream's K/V, a SIGKILLed run resumed bit-exact, and adapters that diffusers' pipelines load."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
import torch

from finestyle.artifacts.adapter import ADAPTER_WEIGHTS
from tests.conftest import REPO, doc_section, free_port, prepare_small_dataset
from tests.integration.test_train import _train_in_subprocess


def _guide(heading: str) -> list[list[str]]:
    block = re.search(r"```bash\n(.*?)```", doc_section(heading, "docs/guides/sd3-flux.md"), re.S).group(1)
    return [shlex.split(line) for line in block.strip().splitlines()]


def _run_guide(heading: str, cwd) -> None:
    for args in _guide(heading):
        assert args[0] == "finestyle"
        r = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args[1:]], cwd=cwd, capture_output=True, text=True
        )
        assert r.returncode == 0, (args, r.stderr[-2000:])


@pytest.fixture(scope="module")
def tours(tmp_path_factory):
    """Both tours of the guide, as written, in one folder (data/examples linked in)."""
    cwd = tmp_path_factory.mktemp("tours")
    (cwd / "data").mkdir()
    (cwd / "data" / "examples").symlink_to(REPO / "data" / "examples")
    _run_guide("## The tour on SD 3.5", cwd)
    _run_guide("## The tour on FLUX.1", cwd)
    return cwd


@pytest.mark.parametrize("name,base", [("ink-sd3", "builtin:tiny-sd3"), ("ink-flux", "builtin:tiny-flux")])
def test_the_guide_tour_prepares_and_trains_an_mmdit_adapter_diffusers_loads(tours, name, base):
    """ "## The tour on SD 3.5" and "## The tour on FLUX.1": rectified-flow training of the text K/V."""
    run = tours / "runs" / name
    import json

    report = json.loads((run / "report.json").read_text())
    assert report["family"] == ("sd3" if "sd3" in base else "flux") and report["steps"] == 4
    assert all(v == v for v in report["losses"])  # finite
    from finestyle.core.loading import load_sd_pipeline

    pipe = load_sd_pipeline(base, device="cpu")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    before = pipe("a red boat, in ink wash style", generator=g(), **kw).images
    pipe.load_lora_weights(str(run / "adapter"), weight_name=ADAPTER_WEIGHTS)
    names = {n for n, _ in pipe.transformer.named_modules() if "lora_A" in n}
    assert names and all(".attn.add_k_proj." in n or ".attn.add_v_proj." in n for n in names)
    assert not any(n.startswith("single_transformer_blocks") for n in names)
    after = pipe("a red boat, in ink wash style", generator=g(), **kw).images
    assert not (before == after).all()  # the trained adapter changes the image


def test_the_guide_exports_both_families_with_parity(tours):
    """ "## Export", as written, on the tours' adapters: merged, ONNX, parity in the manifest."""
    import json

    _run_guide("## Export", tours)
    tmp_path = tours
    for name, family in (("ink-sd3", "sd3"), ("ink-flux", "flux")):
        m = json.loads((tmp_path / "exports" / name / "manifest.json").read_text())
        assert m["family"] == family and m["merge"]["adapter_effect"] > 0
        assert (
            m["parity"]["transformer"]["max_abs_diff"] <= 1e-4
            and m["parity"]["image"]["max_abs_diff"] <= 2e-3
        )
        assert (
            "transformer" in m["onnx_checker"]
            and (tmp_path / "exports" / name / "onnx" / "transformer" / "model.onnx").is_file()
        )


def test_the_guide_generates_and_serves_an_sd3_export(tours):
    """ "## Generate and serve", as written: the PNG, and the server's image for the same request."""
    import io
    import os
    import signal

    import httpx
    import numpy as np
    from PIL import Image

    from tests.integration.test_server import wait_ready

    if not (tours / "exports" / "ink-sd3" / "manifest.json").exists():
        _run_guide("## Export", tours)
    gen, serve = _guide("## Generate and serve")
    r = subprocess.run(
        [sys.executable, "-m", "flows.cli", *gen[1:]], cwd=tours, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    png = Image.open(tours / "boat.png")
    assert (
        "ORTStableDiffusion3Pipeline" in png.text["finestyle:runtime"] and png.text["finestyle:seed"] == "5"
    )
    port = free_port()
    args = [a if a != "8000" else str(port) for a in serve[1:]]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=tours,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 120)
        body = {"prompt": "a red boat, in ink wash style", "steps": 4, "seed": 5}
        got = httpx.post(url + "/v1/generate", json=body, timeout=120)
        assert got.status_code == 200
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(got.content))), np.asarray(png))
        bad = httpx.post(url + "/v1/generate", json={**body, "style_guidance": 1.0}, timeout=60)
        assert bad.status_code in (400, 422) and "not yet" in bad.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_the_guide_generates_with_style_guidance_on_torch(tours):
    """ "## Style guidance for flow-matching models", as written: λ1 on the torch runtime, in the PNG."""
    from PIL import Image

    _run_guide("## Style guidance for flow-matching models", tours)
    png = Image.open(tours / "guided.png")
    assert (
        png.text["finestyle:style_guidance"] == "2.0"
        and "StableDiffusion3Pipeline" in png.text["finestyle:runtime"]
    )


def test_sd3_kill_and_resume_is_bit_exact(tmp_path):
    from safetensors.torch import load_file

    ds = prepare_small_dataset(tmp_path / "data")
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _train_in_subprocess(ds, full, base="builtin:tiny-sd3") == 0
    assert _train_in_subprocess(ds, killed, kill_at=4, base="builtin:tiny-sd3") == -9
    assert not (killed / "adapter").exists()
    assert _train_in_subprocess(ds, killed, resume=True, base="builtin:tiny-sd3") == 0
    a = load_file(str(full / "adapter" / ADAPTER_WEIGHTS))
    b = load_file(str(killed / "adapter" / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(k.startswith("transformer.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"

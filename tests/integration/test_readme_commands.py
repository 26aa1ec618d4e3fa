"""The documentation's commands (README and docs/), run as written with tiny models and parameters.

Each command is read from the bash block under its heading, on whichever page has it; the test substitutes only model
names (real hub ids become builtins: no hub here), input paths, and appends size parameters.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import doc_section, make_scene

pytestmark = pytest.mark.slow

TINY = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "builtin:tiny-sd",
    "Salesforce/blip-image-captioning-base": "builtin:tiny-blip",
    "clip:openai/clip-vit-large-patch14": "clip:builtin:tiny-clip",
    "builtin:sd15-random": "builtin:tiny-sd",
    "stabilityai/stable-diffusion-xl-base-1.0": "builtin:tiny-sdxl",
}
# the world builtins, where their weights are not installed
WORLD_TINY = {"builtin:world-sd": "builtin:tiny-sd", "builtin:world-blip": "builtin:tiny-blip"}


def readme_commands(heading: str, block: int = 0) -> list[list[str]]:
    """The commands of the `block`-th bash block under `heading` (within its section)."""
    text = doc_section(heading)
    code = re.findall(r"```bash\n(.*?)```", text, re.S)[block].replace("\\\n", " ")
    return [shlex.split(line.split("  #")[0]) for line in code.splitlines() if line.strip()]


def run(argv: list[str], cwd, timeout=600) -> subprocess.CompletedProcess:
    assert argv[0] == "finestyle", argv
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *argv[1:]],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=os.environ.copy(),
    )


def test_world_commands(tmp_path):
    render, train, check = readme_commands("## A world where quality is measurable")
    assert render[:3] == ["finestyle", "world", "render"] and train[:3] == ["finestyle", "world", "train"]
    p = run(render, tmp_path)
    assert p.returncode == 0, p.stderr
    labels = (tmp_path / "runs/world/refs/labels.jsonl").read_text().splitlines()
    assert len(labels) == 3 and all(json.loads(x)["style"] == "duotone" for x in labels)
    p = run([*train, "--steps", "2", "--batch-size", "4", "--n-train", "8"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "runs/world/judge/model/model.safetensors").is_file()
    p = run([*check, "--scale", "0.02"], tmp_path)
    # a 2-step judge fails its gates: `world check` then exits 1 and prints the table
    assert p.returncode in (0, 1), p.stderr
    assert "judge_objects_f1" in p.stdout and "judge_style_accuracy" in p.stdout


def test_eval_commands(tmp_path):
    single, compare = readme_commands("## Evaluation: style, prompt and leakage")
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(2):
        make_scene((128, 96), seed=i).save(refs / f"s{i}.png")
    small = ["--n-prompts", "2", "--seeds", "1", "--steps", "2", "--device", "cpu"]
    argv = [TINY.get(a, a) for a in compare]
    argv[argv.index("--resolution") + 1] = "64"
    argv[argv.index("--train-steps") + 1] = "2"
    p = run([*argv, *small], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((tmp_path / "runs/compare/report.json").read_text())
    assert set(rep["variants"]) == {"finestyle", "plain", "attention_attn", "none_kv"}
    # the single-model command on the compare's FineStyle adapter and attention dataset
    argv = [TINY.get(a, a) for a in single]
    argv[argv.index("--adapter") + 1] = "runs/compare/runs/finestyle/adapter"
    argv[argv.index("--references") + 1] = "runs/compare/datasets/attention"
    p = run([*argv, *small], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((tmp_path / "runs/eval/watercolor/report.json").read_text())
    assert [s["style_guidance"] for s in rep["sweep"]] == [0.0, 0.5, 1.0, 2.0]
    assert (tmp_path / "runs/eval/watercolor/guidance.png").is_file()
    # the leakage-aware checkpoints command, on the same dataset
    (train,) = readme_commands("## Evaluation: style, prompt and leakage", block=2)
    argv = [TINY.get(a, a) for a in train]
    argv[argv.index("data/prepared/watercolor")] = "runs/compare/datasets/attention"
    for flag, value in (("--steps", "4"), ("--checkpoint-every", "2"), ("--eval-every", "2")):
        argv[argv.index(flag) + 1] = value
    p = run([*argv, "--eval-steps", "2", "--eval-prompts", "2", "--eval-seeds", "1"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((tmp_path / "runs/watercolor-best/report.json").read_text())
    assert [h["step"] for h in rep["selection"]["history"]] == [2, 4] and rep["selection"]["mode"] == "best"
    assert (tmp_path / "runs/watercolor-best/eval.png").is_file()


def world_or_tiny(argv: list[str]) -> list[str]:
    """A world-set command as written where the world builtins are installed, else on the tiny ones."""
    from finestyle.core.models import SHA256SUMS, weights_dir

    if all((weights_dir() / f"world-{m}" / SHA256SUMS).is_file() for m in ("sd", "blip", "judge")):
        return list(argv)
    argv = [WORLD_TINY.get(a, a) for a in argv]
    argv[argv.index("--judge") + 1] = "clip:builtin:tiny-clip"
    return argv


def small_sets(reference_size: int) -> list[str]:
    """Tiny world sets: small references, two training steps, two prompts, one seed, two steps."""
    return [
        "--reference-size",
        str(reference_size),
        *"--train-steps 2 --n-prompts 2 --seeds 1 --steps 2".split(),
    ]


def test_verdict_command(tmp_path):
    """`eval --compare --sets`: paired per-set differences, the t-interval, the rule and the verdict."""
    (argv,) = readme_commands("## Evaluation: style, prompt and leakage", block=1)
    argv = world_or_tiny(argv)
    argv[argv.index("--sets") + 1] = "2"
    argv[argv.index("--calibration-sets") + 1] = "1"
    small = small_sets(reference_size=64)
    p = run([*argv, *small, "--device", "cpu"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "runs/verdict"
    rep = json.loads((out / "report.json").read_text())
    assert [s["set"] for s in rep["sets"]["calibration"]] == ["calibration-00"]
    assert [s["set"] for s in rep["sets"]["test"]] == ["test-00", "test-01"]
    v = rep["verdict"]
    assert v["outcome"] in ("no verdict", "FineStyle wins", "FineStyle does not win") and v["why"]
    diffs = [s["finestyle"]["leakage"] - s["plain"]["leakage"] for s in rep["sets"]["test"]]
    assert v["paired"]["leakage"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert (
        v["paired"]["leakage"]["n"] == 2 and v["paired"]["leakage"]["low"] <= v["paired"]["leakage"]["high"]
    )
    # each set drawn from its own seed, with its truth: 1-3 held-out-style scenes on one background
    for name in ("calibration-00", "test-00", "test-01"):
        lines = [
            json.loads(x) for x in (out / "sets" / name / "references/labels.jsonl").read_text().splitlines()
        ]
        assert 1 <= len(lines) <= 3 and len({x["background"] for x in lines}) == 1
        assert all(x["style"] == "duotone" and len(x["objects"]) >= 2 for x in lines)
    md = (out / "report.md").read_text()
    assert "Decision rule (fixed before the run)" in md and f"**Verdict: {v['outcome']}**" in md
    assert "**Verdict:" in p.stdout
    # --sets without --compare, or with --references, is refused with one line and exit 2
    for bad in (["eval", "--sets", "2", "--out", "x"], [*argv[:2], *argv[2:], "--references", "refs"]):
        p = run(["finestyle", *bad[1:]] if bad[0] == "finestyle" else ["finestyle", *bad], tmp_path)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_openvino_commands(tmp_path):
    pytest.importorskip("openvino")
    export, generate, bench = readme_commands("### CPU runtimes: PyTorch bf16, onnxruntime and OpenVINO")
    p = run([TINY.get(a, a) for a in export], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    checks = json.loads((tmp_path / "exports/base/manifest.json").read_text())["openvino"]["checks"]
    assert all(c["pass"] for c in checks.values()) and checks
    p = run([*generate, "--steps", "2"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "openvino[CPU," in p.stdout and (tmp_path / "lighthouse.png").is_file()
    p = run(
        [TINY.get(a, a) for a in bench] + ["--latent", "8", "--iters", "1", "--image-size", "64"], tmp_path
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "OpenVINO fp32 (the same ONNX)" in p.stdout and "whole image (64 px" in p.stdout
    assert "Loading pipeline components" not in p.stderr  # the quiet CLI's own output only


def test_many_styles_commands(tmp_path, monkeypatch):
    from finestyle.config import ServeConfig, TrainConfig
    from finestyle.train.loop import run_train
    from tests.conftest import prepare_small_dataset
    from tests.integration.test_server import Server

    ds = prepare_small_dataset(tmp_path / "data")
    for i, name in enumerate(("ink", "chalk")):
        cfg = TrainConfig(
            dataset=str(ds),
            base="builtin:tiny-sd",
            out=str(tmp_path / "runs" / name),
            steps=2,
            resolution=64,
            rank=4,
            samples=False,
            seed=i,
        )
        run_train(cfg, log=lambda m: None)
    export, add, gen, remove = readme_commands("## Many styles, one server")
    for argv in (export, add, [*gen, "--steps", "2"]):
        p = run([TINY.get(a, a) for a in argv], tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
    from PIL import Image

    assert Image.open(tmp_path / "boat.png").text["finestyle:style"] == "chalk"
    styles = json.loads((tmp_path / "exports/studio/manifest.json").read_text())["swappable"]["styles"]
    assert sorted(styles) == ["chalk", "ink"]
    # the README's Python client snippet, against a live server of that export
    text = doc_section("## Many styles, one server")
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    with Server(ServeConfig(export=str(tmp_path / "exports/studio"), max_steps=20, max_size=512)) as s:
        code = snippet.replace("http://127.0.0.1:8000", s.url)  # as written: no size, the export's own
        code = code.replace('"steps": 20', '"steps": 2')
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)
        assert len(scope["img"].data) == 1 and scope["img"].data[0].b64_json
    p = run(remove, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    styles = json.loads((tmp_path / "exports/studio/manifest.json").read_text())["swappable"]["styles"]
    assert sorted(styles) == ["ink"] and not (tmp_path / "exports/studio/styles/chalk").exists()
    # the SD 1.5 memory figures' command, on the tiny builtin
    (bench,) = re.findall(r"`(finestyle bench serve --styles [^`]*--memory-only)`", text)
    p = run([TINY.get(a, a) for a in shlex.split(bench)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "server memory after one request" in p.stdout and "UNet step" not in p.stdout


def test_sdxl_commands(tmp_path):
    from finestyle.core.memory import GB, host_memory_bytes

    demo, stages, export = readme_commands("## SDXL")
    p = run([*demo, "--steps", "2"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    manifest = json.loads((tmp_path / "runs/demo-sdxl/export/manifest.json").read_text())
    assert "onnx/text_encoder_2/model.onnx" in manifest["files"]
    argv = [a.replace("builtin:sdxl-random", "builtin:tiny-sdxl") for a in stages]
    argv[argv.index("--resolution") + 1] = "64"
    argv[argv.index("--steps") + 1] = "1"
    p = run(argv, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert all(s in p.stdout for s in ("prepare", "train", "export-parts", "peak RSS"))
    if (host_memory_bytes() or 0) < 48 * GB:  # the README's refusal, as written
        p = run(export, tmp_path)
        assert p.returncode == 2 and "needs about" in p.stderr and not (tmp_path / "exports").exists()
        assert p.stderr.strip().count("\n") == 0  # one line
    prepare, train = readme_commands("## SDXL", block=1)
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(2):
        make_scene((128, 96), seed=i).save(refs / f"s{i}.png")
    p = run([TINY.get(a, a) for a in prepare], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    p = run([*(TINY.get(a, a) for a in train), "--steps", "2"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((tmp_path / "runs/watercolor-xl/report.json").read_text())
    assert rep["family"] == "sdxl" and rep["resolution"] == 64  # the tiny model's own size


def test_real_model_commands(tmp_path):
    """The README's real-model walk-through with the tiny builtins in place of the hub models; the
    server is started, answers one request, and is stopped."""
    import signal

    import httpx

    from tests.integration.test_server import wait_ready

    prepare, train, export, generate, serve = readme_commands("## Real models on a GPU machine")
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(2):
        make_scene((128, 96), seed=i).save(refs / f"s{i}.png")
    argv = [TINY.get(a, a) for a in train]
    argv[argv.index("--steps") + 1] = "2"
    argv[argv.index("--resolution") + 1] = "64"
    argv[argv.index("--checkpoint-every") + 1] = "1"
    for cmd in (
        [TINY.get(a, a) for a in prepare],
        argv,
        [TINY.get(a, a) for a in export],
        [*generate, "--steps", "2"],
    ):
        p = run(cmd, tmp_path)
        assert p.returncode == 0, (cmd, p.stderr[-3000:])
    m = json.loads((tmp_path / "exports/watercolor/manifest.json").read_text())
    assert m["has_base_unet"] and m["optimize"] and (tmp_path / "sneaker.png").is_file()
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *serve[1:], "--port", port],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ.copy(),
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", 120)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "a boat", "steps": 1}, timeout=60
        )
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=os.environ.copy(),
    )


def test_help_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("prepare", "train", "export", "generate", "serve", "run", "demo", "models", "bench"):
        assert cmd in r.stdout, cmd


@pytest.mark.parametrize("cmd", ["prepare", "train", "export", "generate", "serve", "run", "demo"])
def test_each_command_has_help(cmd):
    r = run_cli(cmd, "--help")
    assert r.returncode == 0 and "Usage" in r.stdout and "--help" in r.stdout


def test_models_lists_and_saves(tmp_path):
    r = run_cli("models")
    assert r.returncode == 0 and "builtin:tiny-sd" in r.stdout and "builtin:tiny-blip" in r.stdout
    r = run_cli("models", "save", "builtin:tiny-sd", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "model_index.json").exists()


def test_offline_hub_id_exits_2_with_one_line(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")
    r = run_cli(
        "prepare",
        str(tmp_path),
        "--style",
        "ink",
        "--out",
        str(tmp_path / "o"),
        "--base",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1


def test_bad_option_value_exits_2():
    r = run_cli("train", "x", "--base", "builtin:tiny-sd", "--out", "y", "--rank", "0")
    assert r.returncode == 2 and "train.rank" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------
# the CLI is generated from the config dataclasses


def _commands():
    import click
    from typer.main import get_command

    from flows.cli import app

    root = get_command(app)

    def walk(group, path, parent):
        for name in group.list_commands(parent):
            cmd = group.get_command(parent, name)
            ctx = click.Context(cmd, info_name=name, parent=parent, terminal_width=80, max_content_width=80)
            yield (*path, name), cmd, ctx
            if hasattr(cmd, "list_commands"):
                yield from walk(cmd, (*path, name), ctx)

    top = click.Context(root, info_name="finestyle", terminal_width=80, max_content_width=80)
    return list(walk(root, (), top))


def _squash(text: str) -> str:
    import re

    return re.sub(r"\s+", "", text)


def test_every_config_field_is_an_option_with_its_doc():
    import dataclasses

    from finestyle.cli import evaluate, inference, stages
    from finestyle.cli.options import flags_of
    from finestyle.config import field_docs

    specs = {
        "prepare": stages.PREPARE,
        "train": stages.TRAIN,
        "export": stages.EXPORT,
        "generate": inference.GENERATE,
        "serve": inference.SERVE,
        "eval": evaluate.EVAL,
    }
    helps = {path[-1]: cmd.get_help(ctx) for path, cmd, ctx in _commands() if len(path) == 1}
    for name, spec in specs.items():
        text, docs = helps[name], field_docs(spec.cls)
        for field in dataclasses.fields(spec.cls):
            flag = flags_of(spec)[field.name]
            assert flag in text, f"{name}: {field.name} has no option {flag}"
            if field.name not in spec.skip:
                words = " ".join(docs[field.name].split()[:6])
                assert _squash(words) in _squash(text), f"{name} {flag}: doc missing from --help"


def test_help_at_80_columns_shows_every_flag_whole():
    import re

    seen = 0
    for path, cmd, ctx in _commands():
        text = cmd.get_help(ctx)
        for p in cmd.params:
            for opt in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]:
                if opt.startswith("-"):
                    seen += 1
                    assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), (path, opt)
    assert seen > 150


def test_help_reads_as_click_writes_it():
    """Usage lines name arguments NAME / [NAME] (not {name}), repeated values show their item's type
    (not <list[str]>), and every [default: ...] sits two spaces after its text, as [required] does."""
    import re

    for path, cmd, ctx in _commands():
        text = cmd.get_help(ctx)
        usage = text.splitlines()[0]
        assert "{" not in usage and "}" not in usage, (path, usage)
        assert "<list[" not in text, path
        for line in text.splitlines():  # within a line (a wrapped line may start with it)
            for m in re.finditer(r"(\S)(\s*)\[default: ", line):
                assert m.group(2) == "  ", (path, line)
    gen = next(c.get_help(x) for p, c, x in _commands() if p == ("generate",))
    assert gen.splitlines()[0].endswith("[OPTIONS] MODEL PROMPT")


def test_help_piped_fits_80_columns():
    r = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "80"},
        timeout=120,
    )
    assert r.returncode == 0
    assert "--gradient-checkpointing / --no-gradient-checkpointing" in r.stdout
    assert "--checkpoint-every" in r.stdout and "--keep-checkpoints" in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80


def test_generated_options_fill_only_what_was_given():
    from dataclasses import dataclass, field

    import typer
    from typer.testing import CliRunner

    from finestyle.cli.options import OptionSpec, config_options

    @dataclass
    class Demo:
        path: str = "x"
        """Where."""
        batch_size: int = 4
        """Images per batch."""
        words: list[str] = field(default_factory=list)
        """Words."""
        prompts: list[str] = field(default_factory=list)
        """Prompts."""
        flip: bool = False
        """Flip."""
        force: bool = False
        """Rebuild."""

    got = {}
    spec = OptionSpec(
        Demo, arguments=("path",), repeat=("prompts",), flags=("force",), names={"prompts": "prompt"}
    )
    app = typer.Typer()

    @app.command()
    @config_options(spec)
    def run(values, extra: int = typer.Option(0)) -> None:
        got.update(values, extra=extra)

    r = CliRunner().invoke(
        app, ["p", "--batch-size", "3", "--words", "a, b", "--prompt", "x, y", "--prompt", "z", "--no-flip"]
    )
    assert r.exit_code == 0, r.output
    assert got == {
        "path": "p",
        "batch_size": 3,
        "words": "a, b",
        "prompts": ["x, y", "z"],
        "flip": False,
        "force": None,
        "extra": 0,
    }
    from finestyle.config import from_dict

    cfg = from_dict(Demo, {k: v for k, v in got.items() if v is not None and k != "extra"})
    assert cfg.words == ["a", "b"] and cfg.prompts == ["x, y", "z"] and cfg.batch_size == 3


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_output_hides_only_known_benign_warnings(verbose):
    code = (
        "import warnings; from finestyle.core.env import quiet_output; "
        f"quiet_output({verbose}); "
        "warnings.warn('Constant folding - Only steps=1 can be constant folded for opset >= 10', UserWarning); "
        "warnings.warn('something new and unknown', UserWarning)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "something new and unknown" in r.stderr
    assert ("Constant folding" in r.stderr) is verbose

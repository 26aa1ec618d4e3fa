"""The `finestyle` app and its groups, the error wrapper every command runs in, and the summary printer.

Exit codes: 0 success (bad inputs skipped and reported still count), 2 unusable input or arguments
(one line on stderr, no traceback), 1 internal failure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

from finestyle.core.errors import UserError, VerificationError


def _usage_name(self: Any) -> str:
    """Click's usage convention (typer's plain help writes {name}): NAME required, [NAME] optional."""
    name = self.display_name_raw.upper()
    return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")


if hasattr(typer.core.TyperArgument, "_usage_display_name"):
    typer.core.TyperArgument._usage_display_name = _usage_name


def _item_display_type(typer_display_type: Any) -> Any:
    def display_type(self: Any, ctx: Any) -> str:
        """A repeated value shows its item's type (<str>, not <list[str]>)."""
        shown = typer_display_type(self, ctx)
        return shown.replace("<list[", "<").replace("]>", ">") if shown.startswith("<list[") else shown

    return display_type


for _param in (typer.core.TyperArgument, typer.core.TyperOption):
    if hasattr(_param, "display_type"):
        _param.display_type = _item_display_type(_param.display_type)


app = typer.Typer(
    name="finestyle",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: wraps at any width, never cuts a flag name
    help="FineStyle: concept-oriented style personalization for Stable Diffusion, from a few "
    "reference images to a validated ONNX/TensorRT export and an inference server.",
)


models_app = typer.Typer(
    rich_markup_mode=None,
    no_args_is_help=False,
    invoke_without_command=True,
    help="List the builtin models, or write one as a local folder.",
)


bench_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Benchmarks that print a ratio against a baseline."
)


world_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="The procedural world: render scenes, train and check its builtin models.",
)
app.add_typer(models_app, name="models")
app.add_typer(world_app, name="world")
app.add_typer(bench_app, name="bench")


@app.callback()
def _options(
    verbose: bool = typer.Option(
        False,
        "--verbose",
        help="Also show the third-party warnings and progress bars that commands hide as benign.",
    ),
) -> None:
    """Options of every command (give them before the command's name)."""
    from finestyle.core.env import quiet_output

    quiet_output(verbose)


def _fail(msg: str, code: int) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map our exceptions onto the exit-code contract."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from finestyle.core.env import configure_environment

        configure_environment()
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 2)
        except VerificationError as exc:
            _fail(f"verification failed: {exc}", 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:  # a full disk is the user's to fix: one line, exit 2
            from finestyle.core.fs import disk_full, disk_full_message

            full = disk_full(exc)
            if full is None:
                raise
            _fail(disk_full_message(full), 2)

    return wrapper


def print_summary(title: str, lines: dict[str, Any]) -> None:
    typer.echo(f"\n{title}")
    width = max((len(k) for k in lines), default=0)
    for k, v in lines.items():
        typer.echo(f"  {k.ljust(width)}  {v}")

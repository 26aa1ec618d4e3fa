"""CLI options generated from a config dataclass: one option per field, with the field's doc and default.

A stage's config dataclass is the one place a field's name, type, default and documentation are
written. `config_options` turns it into the command's options (`--batch-size`, `--full-image/
--no-full-image`, ...), so the CLI never re-types them. Values the user did not give stay None, so a
YAML `--config` section (then the dataclass default) fills them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, Optional, get_type_hints

import typer

from finestyle.config import field_docs


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """How one config dataclass becomes options.

    arguments: fields taken as positional arguments, in order; required: options that must be given;
    names: field -> flag name (without dashes) where the flag reads better than the field;
    repeat: list fields given by repeating the flag (others take a comma-separated list);
    flags: bool fields that are a single on-switch (`--force`) rather than `--x/--no-x`;
    decls: field -> explicit flag declaration (e.g. "--fp16/--fp32");
    skip: fields the command spells out itself (their flags must still appear in its help);
    no_default: fields whose dataclass default the command does not apply (it asks for them)."""

    cls: type
    arguments: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    names: dict[str, str] = dataclasses.field(default_factory=dict)
    repeat: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    decls: dict[str, str] = dataclasses.field(default_factory=dict)
    skip: tuple[str, ...] = ()
    no_default: tuple[str, ...] = ()

    def flag(self, name: str) -> str:
        return "--" + self.names.get(name, name).replace("_", "-")

    def generated(self) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.cls) if f.name not in self.skip]


LIST_METAVAR = "<str>"
"""A list option's value as --help shows it: each occurrence (or comma-separated item) is a string."""


def _default_text(f: dataclasses.Field) -> str | None:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return None
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _inner(tp: Any) -> Any:
    args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
    if type(None) in getattr(tp, "__args__", ()) and len(args) == 1:
        return args[0]
    return tp


def _parameter(spec: OptionSpec, f: dataclasses.Field, tp: Any, doc: str) -> inspect.Parameter:
    tp = _inner(tp)
    shown = f.name not in (*spec.required, *spec.flags, *spec.no_default)
    default = _default_text(f) if shown else None
    help_text = " ".join(doc.split())
    list_field = getattr(tp, "__origin__", None) is list
    if f.name in spec.arguments:
        if default is not None:
            help_text += f"  [default: {default}]"
        annotation: Any = list[str] if list_field else str
        arg = typer.Argument(
            ... if f.name in spec.required else None,
            help=help_text,
            show_default=False,
            metavar=f.name.upper(),  # the usage line reads MODEL PROMPT, as click's convention
        )
        return inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=arg, annotation=Optional[annotation]
        )
    if tp is bool:
        annotation = Optional[bool]
        decl = spec.decls.get(f.name) or (
            spec.flag(f.name) if f.name in spec.flags else f"{spec.flag(f.name)}/--no-{spec.flag(f.name)[2:]}"
        )
    elif list_field:
        annotation = Optional[list[str]] if f.name in spec.repeat else Optional[str]
        decl = spec.decls.get(f.name, spec.flag(f.name))
        help_text += " (repeatable)" if f.name in spec.repeat else " (comma-separated)"
    else:
        annotation = Optional[tp if tp in (int, float, str) else str]
        decl = spec.decls.get(f.name, spec.flag(f.name))
    if default is not None:
        help_text += f"  [default: {default}]"  # two spaces, as click puts before [required]
    opt = typer.Option(
        ... if f.name in spec.required else None,
        *decl.split(" "),
        help=help_text,
        show_default=False,
        metavar=LIST_METAVAR if list_field else None,
    )
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=annotation)


def config_options(spec: OptionSpec) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command `fn(values, **own)`: its options become the config's fields plus its own.

    `values` holds every field the user gave (others None), ready for `stage_from_sources`."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        own_hints = get_type_hints(fn)
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=own_hints.get(p.name, p.annotation))
            for p in inspect.signature(fn).parameters.values()
            if p.name != "values"
        ]
        hints, docs = get_type_hints(spec.cls), field_docs(spec.cls)
        fields = spec.generated()
        missing = [f.name for f in fields if not docs.get(f.name)]
        if missing:
            raise TypeError(f"{spec.cls.__name__}: fields without a doc: {', '.join(missing)}")
        gen = [_parameter(spec, f, hints[f.name], docs[f.name]) for f in fields]
        args = sorted(
            (p for p in gen if p.name in spec.arguments), key=lambda p: spec.arguments.index(p.name)
        )
        params = args + [p for p in gen if p.name not in spec.arguments] + own
        names = {f.name for f in fields}

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            for k in spec.flags:  # an absent on-switch leaves the file's value (or the default)
                if values.get(k) is False:
                    values[k] = None
            return fn(values=values, **kwargs)

        del wrapper.__wrapped__  # typer must read the generated signature, not fn's
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        wrapper.option_spec = spec  # type: ignore[attr-defined]
        return wrapper

    return deco


def flags_of(spec: OptionSpec) -> dict[str, str]:
    """field -> the flag (or argument name) it appears as in --help."""
    return {
        f.name: f.name if f.name in spec.arguments else spec.flag(f.name)
        for f in dataclasses.fields(spec.cls)
    }

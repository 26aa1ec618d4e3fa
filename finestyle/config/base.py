"""The config base: dataclasses from dicts and YAML, CLI overrides, and each field's documentation.

Every stage's options are one dataclass with a docstring under each field; these helpers turn dicts,
YAML files and command-line values into them, rejecting unknown keys and bad values by name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from finestyle.core.errors import UserError

T = TypeVar("T")


def check(cond: bool, name: str, value: Any, allowed: str) -> None:
    """Raise a UserError naming the field, the bad value and what is allowed."""
    if not cond:
        raise UserError(f"{name}: invalid value {value!r}; {allowed}")


# --------------------------------------------------------------------------------------------
# dict / YAML / overrides


def _coerce(tp: Any, value: Any, name: str) -> Any:
    if value is None:
        return None
    origin = getattr(tp, "__origin__", None)
    targs = getattr(tp, "__args__", ())
    if tp in (int, float, bool, str):
        if tp is bool and isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise UserError(f"{name}: invalid value {value!r}; use true or false")
        if tp is bool and not isinstance(value, bool):
            raise UserError(f"{name}: invalid value {value!r}; use true or false")
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise UserError(f"{name}: invalid value {value!r}; expected {tp.__name__}") from None
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name}: invalid value {value!r}; expected a list")
        return [_coerce(targs[0], v, name) for v in value] if targs else list(value)
    if targs and type(None) in targs:  # Optional[X]
        inner = [a for a in targs if a is not type(None)][0]
        return _coerce(inner, value, name)
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, section: str = "") -> T:
    """Build a config dataclass from a dict, rejecting unknown keys by name."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    prefix = f"{section}." if section else ""
    if unknown:
        raise UserError(f"{prefix}{sorted(unknown)[0]}: unknown option; known: {', '.join(sorted(names))}")
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        tp = hints[k]
        optional = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
        if (
            type(None) in getattr(tp, "__args__", ())
            and len(optional) == 1
            and dataclasses.is_dataclass(optional[0])
        ):
            if v is None:
                kwargs[k] = None
                continue
            tp = optional[0]  # an optional section, e.g. the pipeline's `eval:`
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise UserError(f"{prefix}{k}: expected a mapping, got {v!r}")
            kwargs[k] = from_dict(tp, v, f"{prefix}{k}")
        else:
            kwargs[k] = _coerce(tp, v, f"{prefix}{k}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def unkeyed(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A field whose value stays out of its stage's content key: it says where or how the stage
    runs (output path, device, --force, checkpoints, samples), or names an input that the stage
    identifies by its content instead (the dataset's and the base model's fingerprints)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"key": False})


def keyed_fields(cfg: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The config's values that enter its stage's content key: every field not declared `unkeyed`."""
    values = to_dict(cfg)
    return {
        f.name: values[f.name]
        for f in dataclasses.fields(cfg)
        if f.metadata.get("key", True) and f.name not in skip
    }


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {str(p)!r} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise UserError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def stage_from_sources(cls: type[T], section: str, config_file: str | None, cli_values: dict[str, Any]) -> T:
    """Build one stage's config: file section (if any), then CLI values that were given."""
    data: dict[str, Any] = {}
    if config_file:
        raw = load_yaml(config_file)
        data = dict(raw.get(section, raw if section not in raw and _looks_flat(raw, cls) else {}))
    for k, v in cli_values.items():
        if v is not None:
            data[k] = v
    return from_dict(cls, data, section)


def _looks_flat(raw: dict[str, Any], cls: type) -> bool:
    names = {f.name for f in dataclasses.fields(cls)}
    return bool(raw) and set(raw) <= names


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (read from the source, base classes included)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for a, b in zip(body, body[1:], strict=False):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = str(b.value.value)  # type: ignore[union-attr]
    return docs

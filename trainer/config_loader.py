"""Typed YAML configs: build nested dataclasses from YAML, checking every key, type and value.

Errors name the file and the dotted field (`data.mix.image`), and are raised before any work starts.
Sections validate their own values in `__post_init__` by raising `ValueError("field: message")`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(Exception):
    """A config that cannot be used; the message names the source and the dotted field."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source, self.field, self.message = source, field, message
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {message}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, path: str, source: str) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, source, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path, source)
            except ConfigError as err:
                errors.append(err.message)
        raise ConfigError(source, path, "; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(source, path, f"{value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(source, path, f"expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, path, f"expected a mapping, got {type(value).__name__} {value!r}")
        key_t, val_t = args
        return {
            _coerce(key_t, k, f"{path}.{k}", source): _coerce(val_t, v, f"{path}.{k}", source)
            for k, v in value.items()
        }
    if tp is Any:
        return value
    return _coerce_scalar(tp, value, path, source)


def _coerce_scalar(tp: type, value: Any, path: str, source: str) -> Any:
    """Scalars: ints are accepted for floats, numeric strings for int/float keys; bools never pass as numbers."""
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (int, float) and isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if tp is bool and isinstance(value, bool):
        return value
    raise ConfigError(source, path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type[T], data: Any, source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, prefix, f"expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(fields)})"
            raise ConfigError(source, _join(prefix, str(key)), f"unknown key{hint}")
    hints = _hints(cls)
    kwargs = {k: _coerce(hints[k], v, _join(prefix, k), source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:
        field, _, message = str(err).partition(": ")
        if not message:
            field, message = "", str(err)
        raise ConfigError(source, _join(prefix, field), message) from None


def to_dict(obj: Any) -> Any:
    """Plain YAML-able data from a (nested) dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


_PART = re.compile(r"([^.\[\]]+)((?:\[\d+\])*)")
"""One dotted step of an override key: a name with optional list indexes (`phases[1]`)."""


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`a.b[1].c=value` → (["a", "b", 1, "c"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", text, "expected KEY=VALUE, e.g. optim.lr=3e-4")
    path: list[str | int] = []
    for part in key.strip().split("."):
        match = _PART.fullmatch(part)
        if match is None:
            raise ConfigError("--set", key, f"cannot read {part!r} (expected name or name[index])")
        path.append(match[1])
        path.extend(int(i) for i in re.findall(r"\d+", match[2]))
    return path, yaml.safe_load(raw) if raw.strip() else ""


def _field_default(cls: Any, name: str) -> Any:
    """The default of dataclass field `name` as plain data, or MISSING."""
    for f in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
        if f.name == name:
            if f.default_factory is not dataclasses.MISSING:
                return to_dict(f.default_factory())
            return to_dict(f.default)
    return dataclasses.MISSING


def _child_type(tp: Any, part: str | int) -> Any:
    """The declared type one step below `tp` (a dataclass field, a dict value, a list item); Any if unknown."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if dataclasses.is_dataclass(tp) and isinstance(part, str):
        return _hints(tp).get(part, Any)
    if typing.get_origin(tp) in (dict, list):
        return typing.get_args(tp)[-1]
    return Any


def apply_overrides(data: dict, overrides: typing.Iterable[str], cls: Any = Any) -> dict:
    """Set dotted keys (`a.b.c`, `phases[1].start`) in the raw YAML mapping; validation happens when the dataclasses
    are built. Under `cls`, a dict or list field the YAML leaves out starts from its default, so an override
    changes one key of it (`model.llm.model_kwargs.num_hidden_layers=4`) instead of replacing it."""
    for text in overrides:
        path, value = parse_override(text)
        node, tp, where = data, cls, ""
        for part, below in zip(path, path[1:]):
            where = f"{where}[{part}]" if isinstance(part, int) else _join(where, part)
            child_tp = _child_type(tp, part)
            container = typing.get_origin(child_tp) in (dict, list) and isinstance(part, str)
            node = _step(node, part, _field_default(tp, part) if container else dataclasses.MISSING,
                         isinstance(below, int), where)
            tp = child_tp
        last = path[-1]
        if isinstance(last, int):
            _check_index(node, last, f"{where}[{last}]")
        elif not isinstance(node, dict):
            raise ConfigError("--set", _join(where, last), f"'{where}' is not a section")
        node[last] = value
    return data


def _check_index(node: Any, index: int, where: str) -> None:
    if not isinstance(node, list) or index >= len(node):
        size = len(node) if isinstance(node, list) else 0
        raise ConfigError("--set", where, f"no item {index} (the list has {size})")


def _step(node: Any, part: str | int, default: Any, wants_list: bool, where: str) -> Any:
    """The child at `part`, created from the field's default (or empty) when the YAML leaves it out."""
    if isinstance(part, int):
        _check_index(node, part, where)
        return node[part]
    if not isinstance(node, dict):
        raise ConfigError("--set", where, f"'{where.rpartition('.')[0]}' is not a section")
    if part not in node:
        node[part] = default if isinstance(default, (dict, list)) else ([] if wants_list else {})
    return node[part]


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, turning I/O and syntax problems into ConfigError naming the file."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(source, "", f"cannot read config: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(source, "", f"invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(source, "", "the top level must be a mapping of sections")
    return data


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written directly under each field of a dataclass (torchtitan style)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def render_yaml(obj: Any, indent: int = 0) -> str:
    """Resolved config as YAML with each field's docstring as a trailing comment."""
    lines = []
    pad = "  " * indent
    docs = field_docs(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        comment = f"  # {docs[f.name]}" if f.name in docs else ""
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:{comment}")
            lines.append(render_yaml(value, indent + 1))
            continue
        dumped = yaml.safe_dump(to_dict(value), default_flow_style=True, width=10_000).strip()
        dumped = dumped.removesuffix("\n...").removesuffix("...").strip()
        lines.append(f"{pad}{f.name}: {dumped}{comment}")
    return "\n".join(lines)

"""Typed configuration: dataclasses filled from YAML/dicts, checked at start.

Every error names the dotted key that is wrong (``model.precision: expected one of ...``), so a
bad config fails before any model is built.

A YAML file may start from another (``base: ../liqe_reference.yaml``, relative to the file): the
base is read first and the file's keys are merged into it, mappings key by key, everything else
replaced. Dotted overrides (``--set optim.lr=1e-5``) are applied last, values parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted key."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a config with one is an error."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _check(value: Any, annotation: Any, key: str) -> Any:
    origin = get_origin(annotation)
    args = get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tagged = _tagged_choice(value, args, key)
        if tagged is not None:
            return _check(value, tagged, key)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(annotation, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        items = [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        kt, vt = args if args else (Any, Any)
        return {_check(k, kt, key): _check(v, vt, f"{key}.{k}") for k, v in value.items()}
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


TAG = "family"  # the field that picks one dataclass of a union (``model.family: pmt_iqa``)


def _tag_values(cls: type) -> tuple | None:
    """The values of ``cls``'s ``family: Literal[...]`` field, None if it has none."""
    if not dataclasses.is_dataclass(cls):
        return None
    hint = typing.get_type_hints(cls).get(TAG)
    return get_args(hint) if get_origin(hint) is Literal else None


def _tagged_choice(value: Any, args: tuple, key: str) -> type | None:
    """For a union of tagged dataclasses: the one ``value[TAG]`` names (the first one's by
    default), or an error naming the known tags; None when ``args`` is not such a union."""
    choices = [a for a in args if a is not type(None)]
    tags = [_tag_values(a) for a in choices]
    if len(choices) < 2 or any(t is None for t in tags):
        return None
    if isinstance(value, tuple(choices)):
        return type(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    tag = value.get(TAG, tags[0][0])
    for cls, values in zip(choices, tags):
        if tag in values:
            return cls
    known = [v for values in tags for v in values]
    raise ConfigError(f"{key}.{TAG}: expected one of {known}, got {tag!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]!s} (known keys: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check(value, hints[name], key)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None
    except ValueError as exc:  # __post_init__ validation
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{prefix + ': ' if prefix else ''}{exc}") from None
    return obj


def merge(base: dict, update: dict) -> dict:
    """``update`` merged into a copy of ``base``: mappings key by key, other values replaced. A
    mapping naming another ``family`` than the base's replaces it whole (the sections of two
    model families have different keys)."""
    out = dict(base)
    for k, v in update.items():
        old = out.get(k)
        other_family = isinstance(old, dict) and isinstance(v, dict) and TAG in v and TAG in old and v[TAG] != old[TAG]
        out[k] = merge(old, v) if isinstance(v, dict) and isinstance(old, dict) and not other_family else v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-5", "model.tasks=[quality]"]`` -> ``{"optim.lr": 1e-05, ...}`` (YAML values)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. optim.lr=1e-5)")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return out


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys (``optim.lr``) in a nested dict; unknown keys are caught by validation."""
    data = merge(data, {})
    for dotted, value in overrides.items():
        node = data
        *parents, last = dotted.split(".")
        for i, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {'.'.join(parents[:i + 1])} is not a mapping")
            else:
                child = node[part] = dict(child)
            node = child
        node[last] = value
    return data


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (mappings opened, everything else a leaf)."""
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping with its ``base:`` chain resolved; errors name the file."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: base chain loops ({' -> '.join(str(p) for p in _seen)})")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file path, got {base!r}")
    return merge(read_yaml(path.parent / base, _seen + (path.resolve(),)), data)


def load_yaml(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Read a YAML file (and its bases) into dataclass ``cls``, then apply dotted ``overrides``;
    errors name the file and the key."""
    data = apply_overrides(read_yaml(path), overrides or {})
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (for logs, manifests and checkpoint metadata)."""
    return dataclasses.asdict(obj)


def describe_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (``key: old -> new``): what a
    resumed run or a restored search reports when its configuration changed."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_changes(a, b, dotted + ".")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                out += describe_changes({f"[{i}]": x}, {f"[{i}]": y}, dotted)
        elif a != b:
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out

"""One configuration approach for every command: dataclasses, filled from YAML and ``key.sub=value`` overrides.

``bft train``, ``bft eval`` and ``bft reproduce`` each describe their settings as (nested) dataclasses with
defaults. :func:`build_dataclass` fills one from a mapping: unknown keys are errors with a "did you mean" hint,
values are checked against the field types (and minimally converted: YAML 1.1 reads ``1e-5`` as a string, a float
field accepts it). :func:`apply_overrides` sets command-line ``key.sub=value`` strings (values parsed as YAML) into
the mapping first, and :func:`load_yaml_mapping` reads a file. Range checks stay with each config's own
``validate``, or with a dataclass that checks itself on construction: its ``ValueError`` ("completion must be one
of ...") becomes a :class:`ConfigError` prefixed with the section ("loss.completion must be one of ...").
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "build_dataclass", "parse_override", "apply_overrides", "load_yaml_mapping"]


class ConfigError(ValueError):
    """A config file, flag or override that does not fit its dataclass."""


def _unknown_key(key: str, allowed: Iterable[str], where: str) -> ConfigError:
    allowed = sorted(allowed)
    hint = difflib.get_close_matches(key, allowed, n=1)
    suggestion = f" (did you mean {where + hint[0]!r}?)" if hint else ""
    return ConfigError(f"unknown config key {where + key!r}{suggestion}; valid keys here: {', '.join(allowed)}")


def _coerce_scalar(value: Any, annotation: Any, where: str) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {annotation}")  # a bug in the dataclass, not in the user's input


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` checked against (and minimally converted to) the type ``annotation``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} fits none of {annotation}")
    if annotation is Any:
        return value
    if annotation is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        if not args:
            return dict(value)
        return {_coerce(k, args[0], where): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return build_dataclass(annotation, value, where + ".")
    return _coerce_scalar(value, annotation, where)


def build_dataclass(cls, data: Any, where: str = ""):
    """An instance of the dataclass ``cls`` from the mapping ``data`` (nested mappings for nested dataclasses);
    missing keys keep their defaults. ``where`` prefixes key names in error messages (e.g. ``"optim."``)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section {where.rstrip('.') or '(top level)'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(str(key), names, where)
        kwargs[key] = _coerce(value, hints[key], f"{where}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:  # a dataclass that validates itself: its message names the field first
        raise ConfigError(f"{where}{error}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=2e-5"`` -> ``(["optim", "lr"], "2e-5" parsed as YAML)``."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. optim.lr=2e-5)")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    return path, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Nested dict ``data`` with each ``key.sub=value`` override set (keys are checked by :func:`build_dataclass`)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def load_yaml_mapping(path: str | Path) -> dict:
    """The YAML mapping in the file ``path`` (an empty file is ``{}``)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a YAML mapping, got {type(data).__name__}")
    return data


def accept_overrides(parser, dest: str = "overrides") -> None:
    """Let an argparse parser take ``key.sub=value`` overrides anywhere on the line (before or after options):
    every leftover argument with ``=`` that is not an option lands in ``args.<dest>`` (a list).

    argparse fills a ``nargs="*"`` positional once, with the strings right after the one before it; later ones come
    back as "unrecognized". ``parse_intermixed_args`` would fix that but refuses sub-commands, so the parser's
    ``parse_known_args`` moves those ``key=value`` strings itself.
    """
    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, extras = original(args, namespace)
        moved = [a for a in extras if "=" in a and not a.startswith("-")]
        setattr(namespace, dest, list(getattr(namespace, dest, None) or []) + moved)
        return namespace, [a for a in extras if a not in moved]

    parser.parse_known_args = parse_known_args

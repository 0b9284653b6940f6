"""Typed configs: their fields, and the one merge of defaults, a profile and the values a user gave.

Every stage of prunerec takes a documented dataclass config (the service a pydantic settings model). A
*profile* (``cpu``, ``gpu``, ``tiny``) is a dict of field values, nested dicts for nested configs. The
command line (:mod:`cli.options`), the benchmark and the stages' own ``apply_profile`` all build their config
through :func:`merge`, so "the profile's value unless the user gave one" means the same thing everywhere.
Plain Python: no torch, so that the service can use it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union, get_args, get_origin


def fields_of(cls: type) -> list[tuple[str, Any, Any]]:
    """(name, type, default) of a dataclass's or a pydantic model's fields; ``dataclasses.MISSING`` where a
    field has no default."""
    hints = typing.get_type_hints(cls)
    if dataclasses.is_dataclass(cls):
        out = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            out.append((f.name, hints[f.name], default))
        return out
    model_fields = getattr(cls, "model_fields", None)
    if model_fields is None:
        raise TypeError(f"{cls.__name__} is neither a dataclass nor a pydantic model")
    return [(name, hints[name], info.get_default(call_default_factory=True)) for name, info in model_fields.items()]


def strip_optional(kind: Any) -> Any:
    """``X`` for ``X | None``; anything else unchanged."""
    if get_origin(kind) in (Union, types.UnionType):
        args = [a for a in get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def nested_config(kind: Any) -> type | None:
    """The dataclass of a nested-config field, else None."""
    base = strip_optional(kind)
    return base if isinstance(base, type) and dataclasses.is_dataclass(base) else None


def flatten(cls: type, values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested profile values as dotted paths ({'distill': {'lr': 1}} → {'distill.lr': 1}); dict-valued fields
    that are not nested configs (e.g. PrunePEFT's assignment) stay whole."""
    kinds = {name: kind for name, kind, _ in fields_of(cls)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        nested = nested_config(kinds[key]) if key in kinds else None
        if nested is not None and isinstance(value, dict):
            out.update(flatten(nested, value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _nest(paths: dict[str, Any]) -> dict[str, Any]:
    """Dotted paths back to nested dicts."""
    values: dict[str, Any] = {}
    for path, value in paths.items():
        target = values
        *parents, last = path.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[last] = value
    return values


def merge(cls: type, profile: dict[str, Any] | None = None, given: dict[str, Any] | None = None, /,
          **required: Any) -> Any:
    """The config ``cls`` from its defaults, overridden by the ``profile`` (nested dicts), then by the values
    ``given`` (dotted paths; None means "not given"), then by ``required`` (e.g. the output path)."""
    chosen = {**flatten(cls, profile or {}), **{k: v for k, v in (given or {}).items() if v is not None}, **required}
    return build(cls, _nest(chosen))


def apply_profile(config: Any, profiles: dict[str, dict[str, Any]], name: str, /, **given: Any) -> Any:
    """``config`` with the values of ``profiles[name]`` and then ``given`` (dotted paths) applied."""
    if name not in profiles:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(profiles)}")
    chosen = {**flatten(type(config), profiles[name]), **{k: v for k, v in given.items() if v is not None}}
    return build(type(config), _nest(chosen), base=config)


def build(cls: type, values: dict[str, Any], base: Any = None) -> Any:
    """``cls(**values)``, or ``base`` with ``values`` replaced; a nested config given as a dict overrides
    that field's current instance (its default, or ``base``'s), so {'ratios': {'mlp': 0.5}} keeps the other
    ratios. The config's own validation runs."""
    known = fields_of(cls)
    unknown = set(values) - {name for name, _, _ in known}
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, kind, default in known:
        if name not in values:
            continue
        value = values[name]
        nested = nested_config(kind)
        if nested is not None and isinstance(value, dict):
            start = getattr(base, name) if base is not None else default
            value = build(nested, value, base=start if dataclasses.is_dataclass(start) else None)
        kwargs[name] = value
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)

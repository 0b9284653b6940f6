"""Command-line options derived from the stage configs, and the one place that merges a profile with them.

Every field of a config dataclass (or pydantic settings model) becomes a ``--option`` whose help is the
field's docstring, with its default and the profiles' values appended; a nested config becomes a group with
a prefix (``PruneConfig.distill.lr`` → ``--distill-lr``). All derived options default to ``None``, so a
command can tell "not given" from "given", and :func:`llmrec.configs.merge` applies, in order: the config's
defaults, the profile's values, then the options given. Adding a field to a config adds its option; no command restates it.

Nothing here imports a stage module: the configs are passed in, so ``prunerec serve`` stays within ``app``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args, get_origin

import typer

from llmrec.configs import fields_of, flatten, nested_config, strip_optional


@dataclass(frozen=True)
class OptionSpec:
    """One derived option."""

    path: str
    """Dotted field path inside the config ('distill.lr')."""
    param: str
    """Python parameter name of the command ('distill_lr')."""
    flags: tuple[str, ...]
    """The option's names, the derived one first ('--distill-lr'), then aliases."""
    kind: Any
    """The type typer parses: int, float, str, bool or a Literal."""
    help: str
    element: Any = None
    """A list field's element type: the option is comma-separated values."""


@dataclass
class OptionGroup:
    """The options of one config class (and of its nested configs)."""

    config: type
    specs: list[OptionSpec] = field(default_factory=list)

    def given(self, values: dict[str, Any]) -> dict[str, Any]:
        """The options that were given (not None), as dotted paths → parsed values."""
        out: dict[str, Any] = {}
        for spec in self.specs:
            value = values.get(spec.param)
            if value is None:
                continue
            if spec.element is not None:
                value = [spec.element(part.strip()) for part in str(value).split(",") if part.strip()]
            out[spec.path] = value
        return out


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under a field) of a class and its bases, one line each."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tree = ast.parse(source)
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def options_of(
    config: type,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    aliases: dict[str, str | tuple[str, ...]] | None = None,
    names: dict[str, str] | None = None,
    help: dict[str, str] | None = None,
    profiles: dict[str, dict[str, Any]] | None = None,
) -> OptionGroup:
    """The options of ``config``'s fields (dotted paths for nested configs).

    ``include`` / ``exclude`` select fields by dotted path (a nested config's name selects all of it);
    ``names`` renames an option ('ratios.mlp' → 'keep-mlp'; a boolean may name both forms,
    '--exclude-history/--include-history'), ``aliases`` adds old names, ``help`` replaces a
    docstring, ``profiles`` ({profile: values}) are shown in each option's help.
    """
    included = set(include) if include is not None else None
    excluded = set(exclude)
    aliases, names, help = aliases or {}, names or {}, help or {}
    flat_profiles = {name: flatten(config, values) for name, values in (profiles or {}).items()}
    group = OptionGroup(config)

    def wanted(path: str) -> bool:
        parts = path.split(".")
        prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
        if prefixes & excluded:
            return False
        return included is None or bool(prefixes & included)

    def walk(cls: type, prefix: str, instance: Any) -> None:
        docs = field_docs(cls)
        for name, kind, default in fields_of(cls):
            if instance is not None:  # a nested config's default is its parent's default instance
                default = getattr(instance, name)
            path = f"{prefix}{name}"
            nested = nested_config(kind)
            if nested is not None:
                walk(nested, f"{path}.", default if dataclasses.is_dataclass(default) else None)
                continue
            if not wanted(path):
                continue
            base = strip_optional(kind)
            element = get_args(base)[0] if get_origin(base) is list and get_args(base) else None
            if element is not None:
                parsed: Any = str
            elif base in (int, float, str, bool) or get_origin(base) is Literal:
                parsed = base
            else:
                continue  # dicts, tuples and other structures: the command handles them
            text = help.get(path) or docs.get(name)
            if not text:
                raise ValueError(f"{cls.__name__}.{name} has no docstring: every option needs help")
            shown = [] if default is dataclasses.MISSING or default is None else [f"default {_show(default)}"]
            shown += [f"profile {p}: {_show(v[path])}" for p, v in flat_profiles.items() if path in v]
            if element is not None:
                shown.insert(0, "comma-separated")
            option = names.get(path, path.replace(".", "-").replace("_", "-"))
            extra = aliases.get(path, ())
            flags: tuple[str, ...] = (option if option.startswith("--") else f"--{option}",
                                      *((extra,) if isinstance(extra, str) else extra))
            if base is bool:  # --x/--no-x unless a name gives its own negative form
                flags = tuple(flag if "/" in flag else f"{flag}/--no-{flag[2:]}" for flag in flags)
            param = flags[0].split("/")[0][2:].replace("-", "_")
            group.specs.append(OptionSpec(path, param, flags, parsed,
                                          f"{text} ({'; '.join(shown)})" if shown else text, element))

    walk(config, "", None)
    return group


def with_options(*groups: OptionGroup) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command ``groups``' options: its own parameters first, then one keyword per option, all
    delivered in the command's ``**options``."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in own}
        generated = []
        for group in groups:
            for spec in group.specs:
                if spec.param in taken:
                    raise ValueError(f"option {spec.flags[0]} is defined twice")
                taken.add(spec.param)
                optional = spec.kind | None  # the option may be left out (None: not given)
                annotation = Annotated[optional, typer.Option(*spec.flags, help=spec.help)]  # type: ignore[valid-type]
                generated.append(inspect.Parameter(spec.param, inspect.Parameter.KEYWORD_ONLY, default=None,
                                                   annotation=annotation))
        keyword_only = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]
        positional = [p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        command.__signature__ = signature.replace(parameters=[*positional, *keyword_only, *generated])  # type: ignore[attr-defined]
        return command

    return decorate

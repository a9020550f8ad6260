"""Command-line options made from config dataclass fields.

The recipe and gate options are made from the fields of `TrainConfig` and `GateConfig`
(`config_options`), so that every field can be set and no default is copied: ``lr`` is
``--lr``, with the field's default and the help its class's docstring gives it ("Attributes:").
A `GateConfig` field whose name `TrainConfig` has too is ``--gate-<name>``: ``--momentum`` is
SGD's, ``--gate-momentum`` the running open rate's. A bool is a ``--x/--no-x`` flag, a tuple
takes comma-separated values (or the option repeated), and ``X | None`` takes "none". The
configs check the values (`command_configs`): what they refuse is a usage error naming the
option, before anything is read or trained.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from ..config import GateConfig
from ..training.config import TrainConfig

CONFIGS = (TrainConfig, GateConfig)  # in this order; a later one's clashing names get a prefix


PREFIXES = {GateConfig: "gate"}


class FieldOption(click.Option):
    """An option that sets one field of a config dataclass (`config_options`)."""

    def __init__(self, param_decls, *, config: type, field: str, **attrs: Any) -> None:
        super().__init__(param_decls, **attrs)
        self.config, self.field = config, field

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        """A repeated tuple option's values, joined into one tuple (or None for "none")."""
        value = super().process_value(ctx, value)
        if not self.multiple:
            return value
        if None in value:
            if len(value) > 1:
                raise click.BadParameter("none cannot be given with values", ctx, self)
            return None
        return tuple(v for part in value for v in part)


class _Items(click.ParamType):
    """Comma-separated values of one type, for a tuple field: "30,60" is (30, 60)."""

    def __init__(self, item: click.ParamType) -> None:
        self.item, self.name = item, f"{item.name}s"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(self.item.convert(v.strip(), param, ctx)
                         for v in str(value).split(",") if v.strip())  # fmt: skip
        except click.BadParameter:
            self.fail(f"expected {self.name} separated by commas, got {value!r}", param, ctx)


class _OrNone(click.ParamType):
    """A value of `inner`, or "none" for None."""

    def __init__(self, inner: click.ParamType) -> None:
        self.inner, self.name = inner, f"{inner.name} or none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if value is None or isinstance(value, str) and value.strip().lower() == "none":
            return None
        return self.inner.convert(value, param, ctx)


_SCALARS = {int: click.INT, float: click.FLOAT, str: click.STRING}


def _click_type(hint: Any) -> tuple[click.ParamType, bool]:
    """The click type for a field's type hint, and whether it is a tuple (a repeatable
    option). A Literal is its values' type: the config checks the value."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        (hint,) = [a for a in args if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        kind, multiple = _Items(_scalar(typing.get_args(hint)[0])), True
    else:
        kind = _scalar(type(typing.get_args(hint)[0]) if origin is typing.Literal else hint)
        multiple = False
    return (_OrNone(kind) if optional else kind), multiple


def _scalar(python_type: Any) -> click.ParamType:
    if python_type not in _SCALARS:
        raise TypeError(f"no command-line type for a config field of type {python_type!r}")
    return _SCALARS[python_type]


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def option_names() -> dict[tuple[type, str], str]:
    """(config, field) → its option's name, without the dashes: the field's name, or with the
    config's prefix where an earlier config has the name: (GateConfig, "momentum") →
    "gate_momentum"."""
    names: dict[tuple[type, str], str] = {}
    for config in CONFIGS:
        taken = {field for (_, field) in names}
        for f in dataclasses.fields(config):
            prefix = PREFIXES.get(config, config.__name__.lower())
            names[config, f.name] = f"{prefix}_{f.name}" if f.name in taken else f.name
    return names


def _attribute_help(config: type) -> dict[str, str]:
    """Each field's entry in the "Attributes:" section of `config`'s docstring, on one line
    (an entry ``a, b: text`` is both fields')."""
    lines = inspect.cleandoc(config.__doc__ or "").splitlines()
    if "Attributes:" not in lines:
        return {}
    entries: dict[str, list[str]] = {}
    names: list[str] = []
    indent = None
    for line in lines[lines.index("Attributes:") + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break
        if depth == indent:
            head, _, text = line.strip().partition(": ")
            names = [n.strip() for n in head.split(",")]
            entries.update((n, [text]) for n in names)
        else:
            for n in names:
                entries[n].append(line.strip())
    return {n: " ".join(parts) for n, parts in entries.items()}


def _help(config: type, field: str, names: dict[tuple[type, str], str]) -> str:
    """A field's docstring entry as option help, naming its config's fields as options."""
    text = re.sub(r"``(.+?)``", r"\1", _attribute_help(config).get(field, ""))
    options = {f: "--" + n.replace("_", "-") for (c, f), n in names.items() if c is config}
    text = re.sub(r"`(\w+)`", lambda m: options.get(m[1], m[1]), text)
    return re.sub(r"\bNone\b", "none", text)  # what the command line takes


def _metavar(kind: click.ParamType) -> str:
    if isinstance(kind, _OrNone):
        return f"{_metavar(kind.inner)}|none"
    if isinstance(kind, _Items):
        return f"{_metavar(kind.item)},..."
    return kind.name.upper()


def _field_option(
    config: type, field: dataclasses.Field, names: dict[tuple[type, str], str]
) -> Callable:
    """The ``click.option`` decorator for one field."""
    name = names[config, field.name]
    flag, default = "--" + name.replace("_", "-"), _default(field)
    hint = typing.get_type_hints(config)[field.name]
    attrs: dict[str, Any] = {"default": default, "help": _help(config, field.name, names)}
    if hint is bool:
        decls, attrs["show_default"] = [f"{flag}/--no-{flag[2:]}", name], True
    else:
        kind, multiple = _click_type(hint)
        decls = [flag, name]
        shown = "none" if default is None else ",".join(map(str, default)) if multiple else True
        attrs.update(type=kind, multiple=multiple, metavar=_metavar(kind),
                     show_default=shown or False)  # fmt: skip
    return click.option(*decls, cls=FieldOption, config=config, field=field.name, **attrs)


def config_options(command: Callable) -> Callable:
    """Add an option for every field of `CONFIGS` to a click command function, in the
    fields' order."""
    names = option_names()
    options = [_field_option(c, f, names) for c in CONFIGS for f in dataclasses.fields(c)]
    for option in reversed(options):
        command = option(command)
    return command


def command_configs(ctx: click.Context) -> tuple[TrainConfig, GateConfig]:
    """The configs `ctx`'s command line asks for: each given option sets its field, the
    rest keep the dataclasses' defaults. Raises click.BadParameter, naming the options whose
    values a config refuses."""
    train_config, gate_config = (_config(ctx, c) for c in CONFIGS)
    return train_config, gate_config


def _config(ctx: click.Context, config: type) -> Any:
    options = {p.field: p for p in ctx.command.params
               if isinstance(p, FieldOption) and p.config is config}  # fmt: skip
    given = {field: ctx.params[p.name] for field, p in options.items()
             if ctx.get_parameter_source(p.name) is not ParameterSource.DEFAULT}  # fmt: skip
    try:
        return config(**given)
    except ValueError as e:
        refused = [options[f].opts[0] for f, v in given.items() if _refuses(config, f, v)]
        raise click.BadParameter(str(e), param_hint=refused or None) from None


def _refuses(config: type, field: str, value: Any) -> bool:
    """Whether `config` refuses `value` for `field`, the other fields at their defaults."""
    try:
        config(**{field: value})
    except ValueError:
        return True
    return False

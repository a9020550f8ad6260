"""A study read from TOML: shared settings in ``[base]``, one ``[[runs]]`` entry per row.

    name = "table5_heads"                       # required; results go to OUT/<name>/
    title = "Paper Table 5: gate heads"         # optional, for the summary
    description = "..."                         # optional
    seeds = [0, 1, 2]                           # default [0]

    [base]                                      # every run starts from these
    model = "resnet20"
    model_args = { in_channels = 1 }
    dataset = "fashion_mnist"
    data_root = "../shared/data"                # relative to the working directory
    train_subset = 10000
    test_subset = 5000
    batch_size = 128
    epochs = 4                                  # the total training budget of a run
    method = "gates"                            # see `METHODS`
    [base.gates]                                # GateConfig fields
    head = "ste"
    [base.train]                                # TrainConfig fields, except epochs/target/seed
    lambda_polar = 3.0
    progressive = true                          # gated runs only (see below)
    [base.latency]                              # LatencyConfig fields
    batch = 64

    [[runs]]
    label = "Gumbel"                            # required, unique
    gates = { head = "gumbel" }                 # deep-merged over [base]
    targets = [0.4, 0.6]                        # one run per FLOPs-ratio target

A method's own keys (``finetune_epochs`` of the torch-pruning methods, ``density_every`` and
``density_scale`` of ``density``, ...) sit beside these: they are the fields of its options
dataclass (see `methods`), checked against those fields' types. In ``[base]`` a key of any
method may appear (it applies to the runs whose method has it); in a run, only a key of
that run's method. A ``density`` run, which has no FLOPs target, may list
``density_scale = [0.8, 1.2]`` instead: one run per scale (an option marked `SWEEP`).

The train keys only gated training knows, ``progressive`` and ``settle_steps``, apply from
``[base.train]`` to the runs whose method trains gates (``gates``); the dense and baseline
runs train with the rest of ``[base.train]`` and those at their defaults. In such a run's own
``train`` they are refused.

Every key is checked: an unknown one, a wrong type or a bad value raises `ConfigError` naming
the file, the run and the key, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from ..bench.measure import BenchConfig
from ..config import GateConfig
from ..fx.positions import POSITIONS
from ..gates.heads import HEADS
from ..training.config import TrainConfig
from .methods import METHODS, Method, MethodOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A study file that cannot be read, or holds an unknown key or a bad value."""


@dataclass(frozen=True)
class LatencyConfig:
    """How the runner times the final model against the original: `bench.compare`, each
    model in its own process, `rounds` alternating rounds of `runs` timed batches.
    `keep_freed_memory` times both as a CPU deployment should run them (docs/benchmarks.md:
    with glibc's default, page faults take about 40% of the time and follow activation
    memory, not FLOPs)."""

    enabled: bool = True
    batch: int = 64
    rounds: int = 2
    runs: int = 20
    warmup: int = 5
    threads: int | None = None  # None: torch's default
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        if self.batch < 1 or self.rounds < 1:
            raise ValueError(f"batch and rounds must be >= 1, got {self.batch}, {self.rounds}")
        self.bench_config()  # checks runs, warmup and threads now, not after the training

    def bench_config(self) -> BenchConfig:
        """How `bench.compare` times each model."""
        return BenchConfig(threads=self.threads, warmup=self.warmup, runs=self.runs,
                           keep_freed_memory=self.keep_freed_memory)  # fmt: skip


@dataclass(frozen=True)
class RunConfig:
    """One row of a study, with one target: everything a method needs to train and prune.

    Attributes:
        label: the row's name, shared by the runs a ``targets`` list (or a swept option's,
            such as ``density_scale``) expands into.
        method: a key of `METHODS`.
        epochs: the training budget. Every method spends exactly this many epochs, unless
            its options say otherwise (``extra_finetune_epochs`` of the torch-pruning
            methods).
        target: the FLOPs ratio to reach (pruned / original): `TrainConfig.target` for our
            gates, the pruning target for the baselines.
        options: the method's own settings, an instance of its options class
            (`Method.options`); None: that class's defaults.
        device: where to train (``"cpu"``, ``"cuda"``); latency is always measured on CPU.
        train: the recipe of the method's main training, with the run's ``epochs``; the
            methods set the target (ours) and the seed.
    """

    label: str
    method: str
    model: str
    dataset: str
    epochs: int
    data_root: str = "data"
    model_args: Mapping[str, Any] = field(default_factory=dict)
    train_subset: int | None = None
    test_subset: int | None = None
    batch_size: int = 128
    workers: int = 0
    device: str = "cpu"
    target: float | None = None
    options: MethodOptions | None = None  # filled in: never None once built
    gates: GateConfig = field(default_factory=GateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        method = METHODS[self.method]
        if self.options is None:
            object.__setattr__(self, "options", method.options())
        rule = method.target
        if rule == "required" and self.target is None:
            raise ValueError(f"method {self.method!r} needs a FLOPs 'target' (or 'targets')")
        if rule == "refused" and self.target is not None:
            raise ValueError(f"method {self.method!r} takes no 'target'; remove it")
        if self.target is not None and not 0 < self.target <= 1:
            raise ValueError(f"target must be in (0, 1], got {self.target}")
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 0:
            raise ValueError("epochs and batch_size must be >= 1, workers >= 0")
        for name in ("train_subset", "test_subset"):
            size = getattr(self, name)
            if size is not None and size < 1:
                raise ValueError(f"{name} must be >= 1 (leave it out for every image), got {size}")
        if not isinstance(self.options, method.options):
            raise ValueError(
                f"method {self.method!r} takes {method.options.__name__} options, got "
                f"{type(self.options).__name__}"
            )
        self.options.check(self)

    @property
    def setting(self) -> str:
        """What tells apart the runs of one label: the target, or what the options sweep (a
        density run's scale)."""
        if self.target is not None:
            return f"{self.target:g}"
        return self.options.setting

    def as_record(self) -> dict[str, Any]:
        """The run as its results file records it: every field, with the options flat among
        them as a study names them (``finetune_epochs``, ``density_scale``). The options of
        the other registered methods are there too, at their defaults, so that every record
        has the same keys whatever its method."""
        options: dict[str, Any] = {}
        for method in METHODS.values():
            options |= {k: v for k, v in dataclasses.asdict(method.options()).items()
                        if k not in options}  # fmt: skip
        options |= dataclasses.asdict(self.options)
        record: dict[str, Any] = {}
        for key, value in dataclasses.asdict(self).items():
            record |= options if key == "options" else {key: value}
        return record

    def run_id(self, seed: int) -> str:
        """The file name stem of this run's results for `seed`: label, setting, seed."""
        return "-".join(filter(None, (slug(self.label), slug(self.setting), f"s{seed}")))


@dataclass(frozen=True)
class StudyConfig:
    """A study: its runs (one per label and target) and the seeds each is trained with."""

    name: str
    runs: tuple[RunConfig, ...]
    seeds: tuple[int, ...] = (0,)
    title: str = ""
    description: str = ""
    path: str | None = None  # the file it was read from

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(r.label for r in self.runs))


def slug(text: str) -> str:
    """A file-name-safe form of `text`: lower case, runs of other characters as ``-``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


# The run keys, with the TOML types each accepts (TOML has no null: leave a key out instead).
_NUMBER = (int, float)
_KINDS = {(str,): "a string", (int,): "an integer", _NUMBER: "a number", (dict,): "a table"}
_SCALARS: dict[str, tuple[type, ...]] = {
    "label": (str,),
    "method": (str,),
    "model": (str,),
    "dataset": (str,),
    "data_root": (str,),
    "device": (str,),
    "epochs": (int,),
    "train_subset": (int,),
    "test_subset": (int,),
    "batch_size": (int,),
    "workers": (int,),
    "target": _NUMBER,
}
_TABLES = {"gates": GateConfig, "train": TrainConfig, "latency": LatencyConfig}
# all but the methods' options: the scalars, targets (one run each), and the tables
_RUN_KEYS = (*_SCALARS, "targets", "model_args", *_TABLES)
_STUDY_KEYS = ("name", "title", "description", "seeds", "base", "runs")
_REQUIRED = ("method", "model", "dataset", "epochs")
# TrainConfig fields for gated training only: from [base.train], the runs with gates get them
_GATED_TRAIN_KEYS = ("progressive", "settle_steps")
# TrainConfig fields the runner fills in; set at the run level instead
_SET_BY_RUN = {
    "epochs": "set 'epochs' on the run (or in [base]): methods split it themselves",
    "target": "set 'target' or 'targets' on the run (or in [base])",
    "seed": "set the study's 'seeds'",
}


def _unknown(key: str, known: tuple[str, ...] | list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _check_type(value: Any, types: tuple[type, ...], key: str, where: str) -> None:
    # bool is an int in Python, but `epochs = true` is a mistake
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ConfigError(f"{where}: {key!r} must be {_KINDS[types]}, got {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a TOML value fits a dataclass field's type (a list for a tuple; a Literal's
    values are left to the dataclass, which names them)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args if a is not type(None))
    if origin is Literal:
        return any(isinstance(value, type(a)) for a in args)
    if origin is tuple:
        if not isinstance(value, list):
            return False
        if args[1:] == (Ellipsis,):
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_fits, value, args))
    if hint is float:
        return isinstance(value, _NUMBER) and not isinstance(value, bool)
    return isinstance(value, hint) and (hint is bool or not isinstance(value, bool))


def _describe(hint: Any, plural: bool = False) -> str:
    """A field's type in words: "a number", "a list of 2 integers"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args if a is not type(None))
    if origin is Literal:
        return f"one of {', '.join(map(repr, args))}"
    if origin is tuple:
        count = "" if args[1:] == (Ellipsis,) else f"{len(args)} "
        return f"a list of {count}{_describe(args[0], plural=True)}"
    words = {int: ("an integer", "integers"), float: ("a number", "numbers"),
             str: ("a string", "strings"), bool: ("true or false", "booleans")}  # fmt: skip
    return words[hint][plural]


class _Option(NamedTuple):
    """A study key of a method's options: its type, whether a list sweeps it (one run per
    value), and the methods that take it."""

    hint: Any
    sweep: bool
    methods: tuple[str, ...]


def _options(methods: Iterable[Method]) -> dict[str, _Option]:
    """The study keys of the options of `methods`, from the fields of their options
    dataclasses; where several methods take a key, the first gives its type."""
    out: dict[str, _Option] = {}
    for method in methods:
        hints = typing.get_type_hints(method.options)
        for f in dataclasses.fields(method.options):
            if f.name in _RUN_KEYS:
                raise TypeError(f"method {method.name!r}: option {f.name!r} is a run key")
            hint, sweep, names = out.get(f.name, (hints[f.name], bool(f.metadata.get("sweep")), ()))
            out[f.name] = _Option(hint, sweep, (*names, method.name))
    return out


def _method_of(entry: Mapping[str, Any], base: Mapping[str, Any]) -> Method | None:
    """The registered method of a run entry; None if it names none (an error said later)."""
    name = entry.get("method", base.get("method"))
    return METHODS.get(name) if isinstance(name, str) else None


def _check_option(value: Any, option: _Option, key: str, where: str) -> None:
    values = value if option.sweep and isinstance(value, list) else [value]
    if not values:
        plural = _describe(option.hint, plural=True)
        raise ConfigError(f"{where}: {key!r} must be a non-empty list of {plural}")
    for v in values:
        if not _fits(v, option.hint):
            raise ConfigError(f"{where}: {key!r} must be {_describe(option.hint)}, got {v!r}")


def _check_keys(
    table: Mapping[str, Any], where: str, *, label: bool, method: Method | None = None
) -> None:
    """Check the keys of [base] (no `label`: options of any method) or of a run entry (the
    options of its `method`; of any if it has none registered)."""
    every = _options(METHODS.values())
    own = every if method is None else _options([method])
    generic = [k for k in _RUN_KEYS if label or k != "label"]
    for key, value in table.items():
        if key in own:
            _check_option(value, own[key], key, where)
        elif key in every:
            methods = ", ".join(every[key].methods)
            raise ConfigError(
                f"{where}: unknown key {key!r} for method {method.name!r} (an option of {methods})"
            )
        elif key not in generic:
            raise _unknown(key, [*generic, *own], where)
        elif key in _SCALARS:
            _check_type(value, _SCALARS[key], key, where)
        elif key == "targets":
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{where}: {key!r} must be a non-empty list of numbers")
            for v in value:
                _check_type(v, _NUMBER, key, where)
        else:  # model_args and the sub-config tables
            _check_type(value, (dict,), key, where)


def _option_values(merged: dict[str, Any], method: Method | None, where: str) -> list[dict]:
    """Take every option key out of `merged`: the values of `method`'s own options, one dict
    per run (a swept list gives one run per value). Other methods' keys come from [base],
    for the runs of those methods: left out here."""
    every = _options(METHODS.values())
    own = _options([method]) if method is not None else {}
    fixed, sweeps = {}, []
    for key in [k for k in merged if k in every]:
        value = merged.pop(key)
        if key not in own:
            continue
        _check_option(value, own[key], key, where)  # a [base] value too, for this method
        if own[key].sweep and isinstance(value, list):
            sweeps.append([(key, v) for v in value])
        else:
            fixed[key] = tuple(value) if isinstance(value, list) else value
    return [{**fixed, **dict(chosen)} for chosen in itertools.product(*sweeps)]


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, tables merged key by key rather than replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _sub_config(cls: type, table: Mapping[str, Any], where: str, **filled: Any) -> Any:
    """Build `cls` (GateConfig, TrainConfig, LatencyConfig) from a TOML table, letting its own
    validation speak; TOML arrays become the tuples the dataclasses expect."""
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    if cls is GateConfig:  # names of registries: the names registered now
        hints |= {"head": Literal[tuple(HEADS)], "position": Literal[tuple(POSITIONS)]}
    for key, value in table.items():
        if key in filled:  # only TrainConfig has fields the run fills in
            raise ConfigError(f"{where}: {key!r} is not set here: {_SET_BY_RUN[key]}")
        if key not in names:
            raise _unknown(key, names, where)
        if not _fits(value, hints[key]):
            raise ConfigError(f"{where}: {key!r} must be {_describe(hints[key])}, got {value!r}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    try:
        return cls(**values, **filled)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _without_gate_keys(
    train: dict[str, Any], own: Any, method: Method, where: str
) -> dict[str, Any]:
    """The [train] table of a run whose method trains no gates: the keys only gated training
    knows are dropped where [base.train] gives them, and refused in the run's own."""
    for key in _GATED_TRAIN_KEYS:
        if isinstance(own, dict) and key in own:
            raise ConfigError(
                f"{where} [train]: {key!r} is for runs with gates, and method {method.name!r} "
                "trains none: remove it"
            )
    return {k: v for k, v in train.items() if k not in _GATED_TRAIN_KEYS}


def _build_runs(base: dict[str, Any], entry: Mapping[str, Any], where: str) -> list[RunConfig]:
    merged = _merge(base, entry)
    missing = [k for k in _REQUIRED if k not in merged]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(map(repr, missing))} (here or in [base])")
    if "target" in merged and "targets" in merged:
        raise ConfigError(f"{where}: give 'target' or 'targets', not both")
    targets = merged.pop("targets", [merged.pop("target", None)])
    method = METHODS.get(merged["method"])
    settings = _option_values(merged, method, where)
    tables = {k: merged.pop(k, {}) for k in _TABLES}
    if method is not None and not method.gates:
        tables["train"] = _without_gate_keys(tables["train"], entry.get("train"), method, where)
    gates = _sub_config(GateConfig, tables["gates"], f"{where} [gates]")
    latency = _sub_config(LatencyConfig, tables["latency"], f"{where} [latency]")
    recipe = _sub_config(TrainConfig, tables["train"], f"{where} [train]",
                         epochs=merged["epochs"], target=None, seed=0)  # fmt: skip
    runs = []
    for target, values in itertools.product(targets, settings):
        try:
            options = method.options(**values) if method is not None else None
            runs.append(RunConfig(**merged, target=target, options=options, gates=gates,
                                  train=recipe, latency=latency))  # fmt: skip
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return runs


def parse_study(data: Mapping[str, Any], source: str) -> StudyConfig:
    """A `StudyConfig` from the parsed TOML `data`; `source` names the file in errors."""
    for key in data:
        if key not in _STUDY_KEYS:
            raise _unknown(key, _STUDY_KEYS, source)
    if not isinstance(data.get("name"), str) or not data["name"]:
        raise ConfigError(f"{source}: the study needs a 'name' (a string)")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
        raise ConfigError(f"{source}: 'seeds' must be a non-empty list of integers")
    base, entries = data.get("base", {}), data.get("runs", [])
    if not isinstance(base, dict):
        raise ConfigError(f"{source}: [base] must be a table")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: no [[runs]]; add at least one")
    _check_keys(base, f"{source}: [base]", label=False)
    runs: list[RunConfig] = []
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), str):
            raise ConfigError(f"{source}: run {i} needs a 'label' (a string)")
        where = f"{source}: run {entry['label']!r}"
        _check_keys(entry, where, label=True, method=_method_of(entry, base))
        if entry["label"] in {r.label for r in runs}:
            raise ConfigError(f"{where}: the label is used twice; labels must be unique")
        runs += _build_runs(base, entry, where)
    ids = [r.run_id(0) for r in runs]
    clash = next((i for i in ids if ids.count(i) > 1), None)
    if clash is not None:
        raise ConfigError(f"{source}: two runs would write {clash}.json; make the labels differ")
    return StudyConfig(
        name=data["name"],
        runs=tuple(runs),
        seeds=tuple(seeds),
        title=str(data.get("title", data["name"])),
        description=str(data.get("description", "")),
        path=source,
    )


def load_study(path: str | Path) -> StudyConfig:
    """Read and check a study file (see the module docstring for the schema)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return parse_study(data, str(path))

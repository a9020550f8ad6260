"""`cgates train`: gate a model and train weights and gates in one pass.

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
import json
import os
import re
import subprocess
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch
import torch.distributed as dist
from click.core import ParameterSource

from .._utils import atomic_path
from ..config import GateConfig
from ..consensus import consensus
from ..errors import DataError, ModelFileError, TrainingDiverged
from ..fx.graph_module import GatedModel
from ..fx.insert import insert_gates
from ..models.registry import create_model_for
from ..saving.files import load, read_spec
from ..training.config import TrainConfig
from ..training.data import DATASETS, DataInfo, make_loaders
from ..training.runs import CHECKPOINT, RUN, check_resume
from ..training.trainer import train
from .app import (
    main,
    model_arg_option,
    out_folder,
    overwrite_option,
    parse_model_args,
    refuse_existing_run,
)

# --------------------------------------------------------------------------------------
# Options made from config dataclass fields
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def build_gated(
    model: str, model_args: dict[str, Any], info: DataInfo, config: GateConfig
) -> GatedModel:
    """The gated model to train: a zoo/torchvision name sized to the data set, or a file
    written by `save` (a plain model gets gates; a gated one keeps its own)."""
    if Path(model).is_file():
        spec = read_spec(model)
        if spec["kind"] == "slim":
            raise ModelFileError(f"{model} is already a slim model; train the original or gated")
        loaded = load(model)
        if spec["kind"] == "gated":
            return loaded.train()
        net = loaded
    else:
        net = create_model_for(model, info.num_classes, info.in_channels, model_args)
    x = torch.randn(2, info.in_channels, info.image_size, info.image_size)
    return insert_gates(net.train(), x, config)


def _init_distributed() -> torch.device:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA); pick this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", local) if cuda else torch.device("cpu")


def _relaunch(nproc: int) -> None:
    """Run this same command under torchrun with `nproc` processes, without --nproc."""
    args, skip = [], False
    for a in sys.argv[2:]:  # after "cgates train"
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "consensus_gates.cli", "train", *args]  # fmt: skip
    raise SystemExit(subprocess.call(cmd))


@main.command("train")
@click.argument("model")
@click.option("--data", "data_name", required=True, help=f"one of {', '.join(DATASETS)}")
@click.option("--data-root", default="data", show_default=True, help="where the data set is")
@click.option("--download", is_flag=True, help="download the data set if it is missing")
@click.option("--batch-size", default=128, show_default=True, help="per process")
@click.option("--subset", type=click.IntRange(min=1), default=None,
              help="train on this many images only [all]")  # fmt: skip
@click.option("--test-subset", type=click.IntRange(min=1), default=None,
              help="test on this many images only [all]")  # fmt: skip
@click.option("--workers", type=int, default=None, help="DataLoader workers [0 on CPU, else 4]")
@config_options
@click.option("--out", "out_dir", default="runs/train", show_default=True, callback=out_folder)
@click.option("--resume", is_flag=True,
              help="continue OUT/checkpoint.pt exactly; give the same MODEL, data and options "
              "(only --epochs may change)")  # fmt: skip
@overwrite_option
@click.option("--nproc", type=int, default=None, help="train with N processes (torchrun, DDP)")
@model_arg_option
def train_command(model: str, data_name: str, data_root: str, download: bool, batch_size: int,
                  subset: int | None, test_subset: int | None, workers: int | None,
                  out_dir: str, resume: bool, overwrite: bool, nproc: int | None,
                  model_args: tuple[str, ...], **_fields: Any) -> None:  # fmt: skip
    """Gate MODEL and train its weights and gates together in one pass.

    MODEL is a zoo or torchvision name (sized to the data set's classes), or a model file
    written by `save`. OUT gets run.json, metrics.jsonl, checkpoint.pt (every epoch),
    gates.png and curves.png; then `cgates slim OUT/checkpoint.pt` cuts the consensus
    sub-network out. An OUT that holds a run is refused unless --resume or --overwrite.
    The recipe options are TrainConfig's fields, the gate options GateConfig's (--seed also
    seeds the model's initial weights and the data subsets).

    \b
    Examples:
      cgates train resnet20 --data fashion_mnist --data-root ../shared/data --epochs 4
      cgates train resnet56 --data cifar10 --download --epochs 200 --target 0.5
      cgates train resnet20 --data cifar10 --mode channel --head gumbel --out runs/ch
      cgates train resnet20 --data cifar10 --mode channel --head gumbel --out runs/ch \\
          --epochs 20 --resume                              # 10 more epochs
      cgates train resnet20 --data cifar10 --weight-decay 1e-4 --exclude 'layer1.*'
      cgates train resnet56 --data cifar10 --nproc 2      # DistributedDataParallel
    """
    if resume and overwrite:
        raise click.UsageError("--resume continues the run in --out, --overwrite replaces it")
    config, gate_config = command_configs(click.get_current_context())
    out = Path(out_dir)
    if not resume:  # before a torchrun relaunch, and before any rank writes run.json
        refuse_existing_run(out, overwrite, resumable=True)
    if nproc is not None and nproc > 1 and "LOCAL_RANK" not in os.environ:
        _relaunch(nproc)
    device = _init_distributed()
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    data = _Data(data_name, data_root, download, batch_size, subset, test_subset, workers)
    try:
        torch.manual_seed(config.seed)  # the gates' and model's initial weights
        train_loader, test_loader, info = data.loaders(config.seed, device, rank, distributed)
        gated = build_gated(model, parse_model_args(model_args), info, gate_config)
        if resume:  # refuse a changed run before run.json says it was resumed
            check_resume(out, gated, config, data.identity())
        if rank == 0:
            _write_run(out, model, data.identity(), config, gated, resume)
        train(gated, train_loader, test_loader, config, out_dir=out, device=device,
              resume=resume, overwrite=not resume, identity=data.identity(),
              log=click.echo)  # fmt: skip
    except (DataError, ModelFileError, TrainingDiverged, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank == 0:
        click.echo(str(consensus(gated)))
        click.echo(f"\nwrote {out}/; next: cgates slim {out / CHECKPOINT} -o {out / 'slim'}")


@dataclasses.dataclass(frozen=True)
class _Data:
    """The data options of `cgates train`."""

    name: str
    root: str
    download: bool
    batch_size: int
    subset: int | None
    test_subset: int | None
    workers: int | None

    def loaders(self, seed: int, device: torch.device, rank: int, distributed: bool):
        """The train and test loaders and the data set's `DataInfo` (rank 0 downloads)."""
        workers = self.workers if self.workers is not None else 0 if device.type == "cpu" else 4
        return make_loaders(
            self.name, self.root, batch_size=self.batch_size, download=self.download and rank == 0,
            subset=self.subset, test_subset=self.test_subset, seed=seed, distributed=distributed,
            workers=workers,
        )  # fmt: skip

    def identity(self) -> dict[str, Any]:
        """The data as the checkpoint remembers it, wherever --data-root puts it."""
        return {"data": self.name, "subset": self.subset, "test_subset": self.test_subset}


def _write_run(
    out: Path, model: str, identity: dict[str, Any], config: TrainConfig, gated: GatedModel,
    resumed: bool,
) -> None:  # fmt: skip
    """run.json: what was trained, for people reading the folder later. A resumed run keeps
    the first command in ``argv`` and adds its own to ``resumed``."""
    run = {"model": model, **identity, "gates": gated.spec["config"],
           "train": json.loads(json.dumps(config.__dict__)), "argv": sys.argv}  # fmt: skip
    if resumed:
        before = _read_json(out / RUN)
        run["argv"] = before.get("argv")
        run["resumed"] = [*before.get("resumed", []), sys.argv]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / RUN) as tmp:
        tmp.write_text(json.dumps(run, indent=2) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} if it is missing or not one (run.json is for people)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}

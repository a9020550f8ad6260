"""`cgates train`: gate a model and train weights and gates in one pass.

Its recipe and gate options are made from the config fields (`config_options`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import torch
import torch.distributed as dist

from .._utils import atomic_path
from ..config import GateConfig
from ..consensus import consensus
from ..errors import ModelFileError
from ..fx.graph_module import GatedModel
from ..fx.insert import insert_gates
from ..models.registry import create_model_for
from ..saving.files import load, read_spec
from ..training.config import TrainConfig
from ..training.data import DATASETS, DataInfo, make_loaders
from ..training.runs import CHECKPOINT, RUN, check_resume
from ..training.trainer import train
from .app import (
    USER_ERRORS,
    main,
    model_arg_option,
    out_folder,
    overwrite_option,
    parse_model_args,
    refuse_existing_run,
)
from .config_options import command_configs, config_options


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
    except USER_ERRORS as e:
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

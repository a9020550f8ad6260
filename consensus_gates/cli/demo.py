"""`cgates demo`: the whole job on a small setting: train, slim, bench, report."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import torch
from torch import nn
from torch.utils.data import DataLoader

from .._utils import atomic_path
from ..bench.compare import compare, ratios
from ..bench.measure import BenchConfig
from ..consensus import fix_decisions, unfix_decisions
from ..cost import flops
from ..errors import DataError
from ..fx.graph_module import GatedModel
from ..fx.insert import insert_gates
from ..models import create_model
from ..saving.files import export, save
from ..training.config import TrainConfig
from ..training.data import make_loaders
from ..training.trainer import evaluate, train
from .app import USER_ERRORS, main, out_folder, overwrite_option, refuse_existing_run
from .slim import print_report, slim_report


@main.command("demo")
@click.option("--data-root", default="data", show_default=True,
              help="Fashion-MNIST's folder; downloaded there if missing")  # fmt: skip
@click.option("--out", "out_dir", default="runs/demo", show_default=True, callback=out_folder)
@overwrite_option
@click.option("--epochs", default=4, show_default=True)
@click.option("--subset", type=click.IntRange(min=0), default=15000, show_default=True,
              help="training images (0: all)")  # fmt: skip
@click.option("--target", default=0.5, show_default=True, help="FLOPs budget, original = 1")
@click.option("--batch", default=64, show_default=True, help="batch size for the latency test")
@click.option("--rounds", default=3, show_default=True, help="alternating timing rounds")
@click.option("--no-progress", is_flag=True)
def demo(
    data_root: str, out_dir: str, overwrite: bool, epochs: int, subset: int, target: float,
    batch: int, rounds: int, no_progress: bool,
) -> None:  # fmt: skip
    """Train a gated CIFAR ResNet-20 on Fashion-MNIST, cut it, time it, report.

    Layer gates (STE head) on all 9 residual blocks, the paper's recipe and λ↑ schedule,
    and a FLOPs budget (--target) that a controller reaches through λ_act; gates are cut out
    of the network as they settle, so it trains faster as it shrinks. About 4 minutes
    on 2 CPU cores. Prints accuracy, FLOPs, parameters and latency before and after; OUT
    gets the training outputs, the slim model (slim.safetensors, slim.pt2) and report.json.
    An OUT that holds any of these (an earlier demo) is kept unless --overwrite.

    \b
    Examples:
      cgates demo --data-root ../shared/data
      cgates demo --data-root ../shared/data --overwrite  # run it again into runs/demo
      cgates demo --epochs 1 --subset 2000 --rounds 1 --out runs/quick  # a quick look
    """
    began = time.time()
    out = Path(out_dir)
    refuse_existing_run(out, overwrite, also=("slim.safetensors", "slim.pt2", "report.json"))
    try:
        model, gated, x, test_loader, training = _train(
            data_root, out, overwrite, epochs, subset, target, not no_progress
        )
        click.echo("\n2/3 cutting out the consensus sub-network")
        report = {**_cut(gated, x, test_loader, out), "training": training}
        click.echo(f"\n3/3 timing both models, batch {batch}, each in its own process")
        _time(report, model, x, out / "slim.pt2", batch, rounds)
    except USER_ERRORS as e:  # a diverged training, a failed timing process, a full disk
        raise click.ClickException(str(e)) from e
    report["seconds"] = round(time.time() - began)
    _print(report, batch, rounds)
    with atomic_path(out / "report.json") as tmp_file:
        tmp_file.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(f"\nwrote {out}/ in {report['seconds']} s: checkpoint, metrics, plots, slim model")


def _train(
    data_root: str, out: Path, overwrite: bool, epochs: int, subset: int, target: float,
    progress: bool,
) -> tuple[nn.Module, GatedModel, torch.Tensor, DataLoader, dict]:  # fmt: skip
    """Step 1: a gated ResNet-20 trained on Fashion-MNIST into `out`, cutting decided gates
    out as it goes; the original model, the gated one, example inputs, the test loader and
    what the training cost."""
    torch.manual_seed(0)
    try:
        train_loader, test_loader, info = make_loaders(
            "fashion_mnist", data_root, batch_size=128, subset=subset or None, download=True
        )
    except DataError as e:
        raise click.ClickException(
            f"{e}\nOffline? Point --data-root at a folder that has FashionMNIST/raw/."
        ) from e
    model = create_model("resnet20", in_channels=info.in_channels, num_classes=info.num_classes)
    x = torch.randn(2, info.in_channels, info.image_size, info.image_size)
    gated = insert_gates(model, x)
    uncut = 3 * flops(gated, x[:1]).flops * len(train_loader.dataset) * epochs
    click.echo(f"1/3 training {epochs} epochs on {len(train_loader.dataset):,} images, "
               "cutting decided gates out as it goes")  # fmt: skip
    config = TrainConfig(epochs=epochs, target=target, progress=progress, progressive=True)
    records = train(gated, train_loader, test_loader, config, out_dir=out, overwrite=overwrite,
                    log=click.echo)  # fmt: skip
    seconds = [r["train_seconds"] for r in records]
    training = {
        "seconds": round(sum(seconds), 1),
        # An estimate, where the first epoch cut nothing (λ_polar starts at 0 in it): the
        # same run without cuts would take about that epoch's time in every epoch.
        "uncut_seconds": None if records[0]["cut"] else round(seconds[0] * epochs, 1),
        "flops_ratio": records[-1]["train_flops"] / uncut,
        "gates_cut": sum(len(r["cut"]) for r in records),
    }
    return model, gated, x, test_loader, training


def _cut(gated: GatedModel, x: torch.Tensor, test_loader: DataLoader, out: Path) -> dict:
    """Step 2: the slim model, saved and exported into `out`; the report so far, with the
    accuracy of the gated model (its consensus pinned) and of the slim one."""
    slim, report = slim_report(gated)
    save(slim, out / "slim.safetensors")
    export(slim, x, out / "slim.pt2")
    fix_decisions(gated, report["decisions"])
    report["accuracy"] = [evaluate(gated, test_loader), evaluate(slim, test_loader)]
    unfix_decisions(gated)
    return report


def _time(
    report: dict, model: nn.Module, x: torch.Tensor, slim: Path, batch: int, rounds: int
) -> None:
    """Step 3: the original and slim models' latency, each exported and timed in its own
    process, into `report`."""
    with tempfile.TemporaryDirectory() as tmp:
        original = Path(tmp) / "original.pt2"
        export(model, x, original)
        results = compare({"original": original, "slim": slim}, x.shape[1:], [batch],
                          BenchConfig(), rounds=rounds)  # fmt: skip
    report["latency_ms"] = [m.median_ms for m in results]
    report["latency_ratio"] = ratios(results, "original")[("slim", batch)]["latency"]
    report["threads"] = results[0].threads


def _print(report: dict, batch: int, rounds: int) -> None:
    click.echo("")
    print_report(report)
    acc, ms = report["accuracy"], report["latency_ms"]
    click.echo(f"{'test accuracy':<24}{acc[0]:>14.4f}{acc[1]:>14.4f}")
    click.echo(
        f"{f'latency ms, batch {batch}':<24}{ms[0]:>14.2f}{ms[1]:>14.2f}"
        f"{report['latency_ratio']:>15.3f}   ({report['threads']} threads, median of {rounds})"
    )
    click.echo(
        "(the accuracy on the left is the gated model with its consensus fixed: the slim "
        "model must match it)"
    )
    t = report["training"]
    click.echo(
        f"\ntraining: {t['gates_cut']} gates cut out while training; training FLOPs "
        f"{t['flops_ratio']:.3f} of the same run without cuts; {t['seconds']:.0f} s of steps"
    )
    if t["uncut_seconds"]:
        click.echo(
            f"  about {t['seconds'] / t['uncut_seconds']:.2f} of the {t['uncut_seconds']:.0f} s "
            "that every epoch at the first, uncut epoch's pace would take"
        )

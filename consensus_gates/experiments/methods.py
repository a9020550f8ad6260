"""The methods a study compares, one function each, registered in `METHODS`.

Every method gets a `RunContext` (an untrained model, the loaders, the run's settings, the
seed) and returns a `MethodResult`: the final model, which the runner then evaluates, counts
and times, and the epochs it spent. How each spends the run's ``epochs`` budget E:

- ``dense``: trains the plain model for E epochs.
- ``gates`` (ours): inserts gates, trains weights and gates for E epochs in one pass (with
  the FLOPs ``target`` reached by the trainer's controller), cuts the consensus out.
- ``dropout``, ``layer-drop``: the dense model of E epochs, then weights or residual
  branches removed at random, with no further training (paper Fig. 2).
- ``tp-magnitude``, ``tp-bn-scale``, ``tp-taylor``: dense pretraining for E - F epochs,
  torch-pruning to the target, fine-tuning for F = ``finetune_epochs``: E in all, the budget
  of our one pass. ``extra_finetune_epochs`` adds fine-tuning beyond it, and the results
  count it.
- ``density``: trains for E epochs while `DensityPruning` resizes each internal width to
  ``density_scale`` × its measured activation density every ``density_every`` epochs
  (except after the last epoch, which would leave the final shape untrained). Its size is
  set by the scale, not by a FLOPs target: searching the scale for a target would cost a
  full training per try, so a study lists several scales and reads the FLOPs ratio each
  reached.

Dense trainings are cached per (model, data, recipe, epochs, seed) under the output folder
and shared by the methods and targets that start from them; the training time of a reused
model is added to the run's wall time, so cached and uncached runs report the same cost.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .._utils import atomic_path
from ..baselines import (
    DensityPruning,
    drop_layers,
    drop_weights,
    prune_to_flops,
    sparse_flops_ratio,
)
from ..baselines.naive import WEIGHTED
from ..consensus import consensus
from ..fx.insert import insert_gates
from ..fx.surgery import materialize
from ..saving.files import load, save
from ..training.trainer import train

if TYPE_CHECKING:
    from .config import RunConfig

TAYLOR_BATCHES = 8  # training batches whose gradients score the channels for Taylor pruning


@dataclass
class RunContext:
    """What a method works with. `model` is freshly built and untrained, on the run's
    device, as is `example_inputs` (a batch of 2); methods may train and prune it in place.
    ``run.train.seed`` is `seed`. Training outputs (metrics.jsonl, gates.png) of our gates
    go to `work_dir`."""

    run: RunConfig
    seed: int
    model: nn.Module
    train_loader: DataLoader
    example_inputs: Tensor
    cache_dir: Path
    work_dir: Path
    log: Callable[[str], None] = print


@dataclass
class MethodResult:
    """The final model and how it was obtained.

    Attributes:
        epochs: training epochs spent in all, those of a reused (cached) model included.
        reused_seconds: training time of cached models this run reused, not spent again.
        flops_ratio, params_ratio: set when the model's dense count is not its cost (random
            weight dropping: the ratios as if zeros were skipped).
        extra: method-specific numbers for the results (R_polar, open ratio, ...).
    """

    model: nn.Module
    epochs: int
    reused_seconds: float = 0.0
    flops_ratio: float | None = None
    params_ratio: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered method: the function, and whether a run of it takes a FLOPs target."""

    fn: Callable[[RunContext], MethodResult]
    target: Literal["required", "optional", "refused"]

    def __call__(self, ctx: RunContext) -> MethodResult:
        return self.fn(ctx)


def _train(
    ctx: RunContext,
    model: nn.Module,
    *,
    out_dir: Path | None = None,
    epoch_end: Callable[[nn.Module, int], bool] | None = None,
    **recipe: Any,
) -> list[dict[str, Any]]:
    """`train` on the run's data and device with its recipe, `recipe` overriding fields of
    the `TrainConfig`. No test set: the runner evaluates the final model once. A run without
    a results file starts again from scratch, so its `out_dir` is overwritten."""
    config = replace(ctx.run.train, **recipe)
    return train(model, ctx.train_loader, None, config, out_dir=out_dir, device=ctx.run.device,
                 overwrite=True, log=ctx.log, epoch_end=epoch_end)  # fmt: skip


def _dense(ctx: RunContext, epochs: int) -> tuple[nn.Module, float]:
    """The plain model trained for `epochs`, and the seconds of training it saved: loaded
    from the cache if this model, data, recipe and seed were trained before (then the saved
    time of that training), else trained now and cached (0)."""
    run, recipe = ctx.run, ctx.run.train
    key = {
        "model": run.model,
        "model_args": dict(run.model_args),
        "dataset": run.dataset,
        "data_root": str(Path(run.data_root).resolve()),
        "train_subset": run.train_subset,
        "batch_size": run.batch_size,
        "epochs": epochs,
        "seed": ctx.seed,
        "recipe": {
            k: asdict(recipe)[k]
            for k in ("lr", "momentum", "weight_decay", "milestones", "lr_gamma")
        },
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = ctx.cache_dir / f"dense-{run.model}-e{epochs}-s{ctx.seed}-{digest}.safetensors"
    info = path.with_suffix(".json")
    if path.is_file() and info.is_file():
        seconds = json.loads(info.read_text())["seconds"]
        ctx.log(f"  reusing the dense model of {epochs} epochs in {path} ({seconds:.0f} s)")
        return load(path, device=run.device).train(), seconds
    began = time.perf_counter()
    # A hit draws no random numbers; keep a miss from drawing any either, so a run gives the
    # same numbers whichever run trained the cached model first.
    state = ctx.train_loader.generator.get_state() if ctx.train_loader.generator else None
    with torch.random.fork_rng():
        _train(ctx, ctx.model, epochs=epochs)
    if state is not None:
        ctx.train_loader.generator.set_state(state)
    save(ctx.model, path)
    with atomic_path(info) as tmp:
        tmp.write_text(json.dumps({**key, "seconds": time.perf_counter() - began}, indent=2))
    return ctx.model, 0.0


def dense(ctx: RunContext) -> MethodResult:
    """The unpruned reference: plain training for the whole budget."""
    model, reused = _dense(ctx, ctx.run.epochs)
    return MethodResult(model, ctx.run.epochs, reused)


def gates(ctx: RunContext) -> MethodResult:
    """Ours: gates on every residual branch, one pass of training, the consensus cut out."""
    run = ctx.run
    gated = insert_gates(ctx.model, ctx.example_inputs, run.gates)
    records = _train(ctx, gated, target=run.target, out_dir=ctx.work_dir)
    c = consensus(gated)
    extra = {
        "r_polar": records[-1]["r_polar"],  # the last epoch's mean: 0 = fully unified
        "open_ratio": c.open_ratio,
        "gates": len(c.decisions),
        "lambda_act": records[-1]["lambda_act"],
    }
    return MethodResult(materialize(gated, c), run.epochs, extra=extra)


def dropout(ctx: RunContext) -> MethodResult:
    """Naive dropout: the dense model with 1 - target of its conv and linear weights zeroed
    at random. Its structure and latency are unchanged; its FLOPs and parameter ratios are
    those if the zeros were skipped."""
    run = ctx.run
    model, reused = _dense(ctx, run.epochs)
    dropped = drop_weights(model, 1 - run.target, seed=ctx.seed)
    zeros = sum(
        m.weight.numel() - int(m.weight.count_nonzero())
        for m in dropped.modules()
        if isinstance(m, WEIGHTED)
    )
    return MethodResult(
        dropped,
        run.epochs,
        reused,
        flops_ratio=sparse_flops_ratio(dropped, model, ctx.example_inputs),
        params_ratio=1 - zeros / sum(p.numel() for p in model.parameters()),
        extra={"fraction_dropped": 1 - run.target},
    )


def layer_drop(ctx: RunContext) -> MethodResult:
    """Naive layer drop: random residual branches of the dense model removed to the target."""
    model, reused = _dense(ctx, ctx.run.epochs)
    slim = drop_layers(model, ctx.example_inputs, ctx.run.target, seed=ctx.seed)
    return MethodResult(slim, ctx.run.epochs, reused)


def _torch_pruning(importance: str) -> Callable[[RunContext], MethodResult]:
    def prune_then_finetune(ctx: RunContext) -> MethodResult:
        run = ctx.run
        pretrain = run.epochs - run.finetune_epochs
        model, reused = _dense(ctx, pretrain)
        batches = (
            list(itertools.islice(ctx.train_loader, TAYLOR_BATCHES))
            if importance == "taylor"
            else None
        )
        pruned = prune_to_flops(model, ctx.example_inputs, run.target, importance, batches=batches)
        finetune = run.finetune_epochs + run.extra_finetune_epochs
        lr = run.finetune_lr if run.finetune_lr is not None else run.train.lr * run.train.lr_gamma
        # the run's milestones belong to the full schedule; fine-tuning gets its own
        _train(ctx, pruned, epochs=finetune, lr=lr, milestones=None)
        extra = {
            "pretrain_epochs": pretrain,
            "finetune_epochs": finetune,
            "extra_finetune_epochs": run.extra_finetune_epochs,
            "finetune_lr": lr,
        }
        return MethodResult(pruned, pretrain + finetune, reused, extra=extra)

    prune_then_finetune.__doc__ = (
        f"Torch-Pruning with {importance} importance: pretrain, prune to the target FLOPs, "
        "fine-tune; the same total epochs as ours unless extra_finetune_epochs > 0."
    )
    return prune_then_finetune


def density(ctx: RunContext) -> MethodResult:
    """Activation-density pruning during training (Foldy-Porto & Panda): the model shrinks
    to its layers' measured densities as it trains."""
    run = ctx.run
    pruner = DensityPruning(
        ctx.example_inputs, ctx.train_loader, every=run.density_every, scale=run.density_scale
    )

    def resize(model: nn.Module, epoch: int) -> bool:
        # never after the last epoch: the final shape must be trained too
        return epoch < run.epochs - 1 and pruner(model, epoch)

    _train(ctx, ctx.model, epoch_end=resize)
    extra = {"density_every": run.density_every, "density_scale": run.density_scale}
    return MethodResult(ctx.model, run.epochs, extra=extra)


METHODS: dict[str, Method] = {
    "dense": Method(dense, "refused"),
    "gates": Method(gates, "optional"),
    "dropout": Method(dropout, "required"),
    "layer-drop": Method(layer_drop, "required"),
    "tp-magnitude": Method(_torch_pruning("magnitude"), "required"),
    "tp-bn-scale": Method(_torch_pruning("bn-scale"), "required"),
    "tp-taylor": Method(_torch_pruning("taylor"), "required"),
    "density": Method(density, "refused"),
}

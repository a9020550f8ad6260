"""Step 4: train weights and gates together in one pass (paper §4.1).

The loss is ``task + λ_polar · polarization_loss + λ_act · activation_loss``, with SGD and a
multi-step learning rate; a plain model without gates trains on the task loss alone. `train`
writes one JSON line per epoch, an atomic checkpoint that `--resume` continues exactly, and the
gates.png / curves.png plots. Under torchrun it trains with DistributedDataParallel; the gate
statistics are global (see `polarization_loss`).

`train` is a list of named steps: `_set_up` (check, claim the output folder, wrap for DDP),
`RunState.start` (optimizer, scheduler, controller), `_resume_or_seed`, then per epoch
`_train_epoch` (its `_train_step`s) and `_end_epoch` (the `epoch_end` callback, the
record with its evaluation, the checkpoint, metrics and plots). What changes as it trains is
the `RunState`, which is what the checkpoint holds.

    torchrun --nproc_per_node 2 -m consensus_gates.cli train resnet20 --data fashion_mnist ...
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .._utils import atomic_path, unwrap
from ..budget import project_to_budget
from ..consensus import consensus
from ..cost import flops_ratio, total_cost
from ..errors import TrainingDiverged
from ..fx.cut import replay_cuts
from ..fx.graph_module import Gated
from ..losses import gate_losses
from ..saving.files import model_spec
from ..saving.spec import parse_spec
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .plots import plot_curves, plot_gates
from .progressive import cut_settled, pin_gates
from .runs import CHECKPOINT, METRICS, check_folder, check_resume, claim_folder
from .state import RunState


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu"
) -> float:
    """The mean of a Hugging Face model's own loss over a loader of dict batches (with
    ``labels``), in eval mode, weighting each batch by its rows; exp of it is the
    perplexity of a language model."""
    was_training = model.training
    model.eval()
    total = rows = 0.0
    try:
        for batch in loader:
            loss, _, n = _task(model, batch, device)
            total, rows = total + loss.item() * n, rows + n
    finally:
        model.train(was_training)
    return total / max(rows, 1)


def _task(net: nn.Module, batch: Any, device: torch.device | str) -> tuple[Tensor, Tensor, int]:
    """A batch's task loss, correct predictions and size: cross-entropy over class labels
    for ``(inputs, labels)``; a Hugging Face model's own loss for a dict of its inputs
    (correct predictions are not counted)."""
    if isinstance(batch, Mapping):
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
                 for k, v in batch.items()}  # fmt: skip
        loss = getattr(net(**batch), "loss", None)
        if loss is None:
            raise ValueError(
                f"the model computed no loss from a batch of {sorted(batch)}; dict batches "
                "must hold what the model's own loss needs, such as labels"
            )
        rows = next(v for v in batch.values() if isinstance(v, Tensor)).shape[0]
        return loss, loss.new_zeros(()), rows
    x, y = batch
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    logits = net(x)
    return F.cross_entropy(logits, y), (logits.argmax(1) == y).sum(), len(y)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of `model` in eval mode (for a gated model: gates decide per sample,
    or as pinned by `fix_decisions`)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    finally:
        model.train(was_training)
    return correct / max(total, 1)


def train(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader | None = None,
    config: TrainConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    resume: bool = False,
    overwrite: bool = False,
    identity: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
    epoch_end: Callable[[nn.Module, int], bool] | None = None,
) -> list[dict[str, Any]]:
    """Train a gated model's weights and gates in one pass; return the per-epoch records.

    Args:
        model: a model from `insert_gates` (trained in place), or any plain classifier,
            which trains on the task loss alone: no gate losses, no `config.target`, and
            its records hold None for ``lambda_polar``, ``lambda_act``, ``r_polar``,
            ``open_rate``, ``open_ratio`` and ``flops_ratio``.
        train_loader, test_loader: batches of (inputs, class labels). With a
            DistributedSampler, its epoch is set each epoch.
        config: the recipe (`TrainConfig`).
        out_dir: where ``metrics.jsonl``, ``checkpoint.pt`` (every epoch, atomically),
            ``gates.png`` and ``curves.png`` go; None writes nothing.
        device: where to train; default: the model's device.
        resume: continue from ``out_dir/checkpoint.pt`` exactly where it stopped, with the
            same model, `identity` and recipe (only ``config.epochs`` may change).
        overwrite: replace a run that `out_dir` holds: its checkpoint, metrics and plots are
            deleted now. Without it (or `resume`), a folder with any of `RUN_FILES` is
            refused, so that no run is lost.
        identity: what else defines the run, such as the data set and its subsets (JSON
            values); kept in the checkpoint, and a resumed run must give the same. None: not
            checked.
        log: receives the per-epoch summary lines.
        epoch_end: called after each epoch's training, before its evaluation, with the model
            and the 0-based epoch. Returning True says it replaced the model's parameters
            (e.g. torch-pruning removed channels): the SGD optimizer is rebuilt over the new
            ones at the current learning rate, losing its momentum buffers, and the learning
            rate schedule continues. Resuming such a run needs a model of the new shapes.

    Under torch.distributed (torchrun) the model is wrapped in DistributedDataParallel and
    only rank 0 writes files and logs.

    Raises:
        ValueError: `config.target` with a plain model; `out_dir` with a plain model that
            `save` cannot describe (one not built by `create_model`), that is a file, or that
            holds a run without `resume` or `overwrite`; `resume` with another model, identity
            or recipe than the checkpoint's.
        TrainingDiverged: the loss became NaN or infinite; the checkpoint of the last good
            epoch is kept.
    """
    run = _set_up(model, config or TrainConfig(), out_dir, device, resume, overwrite, log)
    checkpoint = _checkpoint_to_resume(run, identity) if resume else None
    state = RunState.start(run.model, run.config, train_loader, identity)
    _resume_or_seed(run, state, checkpoint)
    for epoch in range(state.epoch, run.config.epochs):
        stats = _train_epoch(run, state, train_loader, epoch)
        _end_epoch(run, state, stats, test_loader, epoch_end)
    return state.records


@dataclass(eq=False)
class _Run:
    """What one `train` call works with beside its `RunState`: set up once, never saved."""

    model: nn.Module
    gated: Gated | None  # `model`, if it has gates
    config: TrainConfig
    device: torch.device
    out: Path | None
    rank: int
    world: int
    net: nn.Module  # what is called: `model`, in DistributedDataParallel under torchrun
    log: Callable[[str], None]
    forward_flops: int | None = None  # the training model's, per sample (`_forward_flops`)
    example: Any = None  # an input to measure it with: a tensor, or a dict batch's row
    dict_batches: bool = False  # batches are dicts of a Hugging Face model's inputs


@dataclass(eq=False)
class _Epoch:
    """One epoch's training: its settings and the sums of what its steps measured."""

    index: int  # 0-based
    lr: float  # what this epoch trains with
    lambda_polar: float
    began: float = field(default_factory=time.time)
    cut: list[dict[str, Any]] = field(default_factory=list)  # gates cut out in this epoch
    projected: int | None = None  # the step at which the gates were projected onto the target
    train_seconds: float = 0.0  # the steps' wall time, without the evaluation
    # summed over the steps: the loss, task, polar and act losses, the correct predictions
    # and the samples
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(6, dtype=torch.float64))
    steps: int = 0


def _set_up(
    model: nn.Module,
    config: TrainConfig,
    out_dir: str | Path | None,
    device: str | torch.device | None,
    resume: bool,
    overwrite: bool,
    log: Callable[[str], None],
) -> _Run:
    """Check the request, claim the output folder (before the first epoch, not after it),
    move the model to its device and wrap it for DDP."""
    model = unwrap(model)
    gated = model if isinstance(model, Gated) else None
    if gated is None and config.target is not None:
        raise ValueError(
            f"config.target={config.target} needs gates to reach it; a plain "
            f"{type(model).__name__} has none (call insert_gates first, or set target=None)"
        )
    if gated is None and config.progressive:
        raise ValueError(
            f"config.progressive cuts settled gates out; a plain {type(model).__name__} has "
            "none (call insert_gates first, or set progressive=False)"
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    rank, world = _distributed()
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("resume=True needs the out_dir of the run to continue")
    if resume and overwrite:
        raise ValueError("resume=True continues the run in out_dir, overwrite=True replaces it")
    if out is not None:
        _require_spec(model, "out_dir needs a checkpoint of the model")
        claim_folder(check_folder(out), resume, overwrite, rank)
    net = _wrap(model, device, world)
    return _Run(model, gated, config, device, out, rank, world, net, log)


def _checkpoint_to_resume(run: _Run, identity: Mapping[str, Any] | None) -> dict[str, Any]:
    """The checkpoint in ``run.out``, if it is of the same run (`check_resume`); the gates it
    had cut out while training are cut out of ``run.model`` too, so that the optimizer is
    built over the same parameters, and the gates it had projected are pinned again."""
    checkpoint = check_resume(run.out, run.model, run.config, identity)
    spec = parse_spec(checkpoint["spec"], str(run.out / CHECKPOINT))
    if run.gated is None:
        return checkpoint
    if spec.get("cut"):
        replay_cuts(run.gated, spec["cut"])
    if checkpoint.get("projected"):
        pin_gates(run.gated, spec.get("fixed", {}))
    run.net = _wrap(run.model, run.device, run.world)
    return checkpoint


def _resume_or_seed(run: _Run, state: RunState, checkpoint: dict[str, Any] | None) -> None:
    """Continue from `checkpoint`, or seed a fresh run."""
    if checkpoint is None:
        torch.manual_seed(run.config.seed)
        random.seed(run.config.seed)
        return
    state.load_state_dict(checkpoint)
    if run.rank == 0:
        run.log(f"resumed from {run.out / CHECKPOINT} after epoch {state.epoch}")


def _train_epoch(run: _Run, state: RunState, loader: DataLoader, epoch: int) -> _Epoch:
    """Train one epoch (0-based `epoch`), then step the learning rate schedule."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    stats = _Epoch(epoch, state.optimizer.param_groups[0]["lr"], run.config.lambda_polar_at(epoch))
    run.net.train()
    bar = tqdm(
        loader, desc=f"epoch {epoch + 1}/{run.config.epochs}", leave=False,
        disable=not run.config.progress or run.rank != 0, file=sys.stderr,
    )  # fmt: skip
    for batch in bar:
        values = _train_step(run, state, stats, batch)
        stats.sums += values
        stats.steps += 1
        if stats.steps % 20 == 0:
            bar.set_postfix(loss=f"{values[0].item():.3f}", polar=f"{values[2].item():.3f}")
    stats.train_seconds = time.time() - stats.began
    state.scheduler.step()
    return stats


def _train_step(run: _Run, state: RunState, stats: _Epoch, batch: Any) -> torch.Tensor:
    """One SGD step on a batch (and one controller step); return its loss, task, polar and
    act losses, correct predictions and size, as float64 on the CPU: one device sync per
    step."""
    if _projection_due(run, state, stats):
        _project(run, state, stats)
    run.dict_batches = isinstance(batch, Mapping)
    task, correct, rows = _task(run.net, batch, run.device)
    if run.gated is not None:
        polar, act, r_polar = gate_losses(
            run.gated, weight=run.config.act_weight, channels=run.config.channel_polarizer
        )
    else:
        polar = act = r_polar = torch.zeros((), device=run.device)
    loss = task + stats.lambda_polar * polar + state.lambda_act * act
    size = loss.new_tensor(rows)
    values = torch.stack([loss, task, r_polar, act, correct.to(loss.dtype), size])
    values = values.detach().double().cpu()
    _check_finite(run, state, stats, values)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    if state.controller is not None and not state.projected:
        state.lambda_act = state.controller.step()
    settled = {}
    if state.tracker is not None and stats.lambda_polar > 0:
        settled = state.tracker.update(run.gated, run.world)
    # this step's size, before any cut; measuring runs the model, so after the gates are read
    state.train_flops += 3 * _forward_flops(run, batch) * rows * run.world
    if settled:
        _cut(run, state, stats, settled)
    return values


def _forward_flops(run: _Run, batch: Any = None) -> int:
    """The training model's forward FLOPs per sample (gates included, for a dict batch per
    row of all its tokens), measured once on the first row of `batch` and again after each
    cut."""
    if run.forward_flops is None:
        if isinstance(batch, Mapping):
            run.example = {k: v[:1].to(run.device) for k, v in batch.items()
                           if isinstance(v, Tensor) and k != "labels"}  # fmt: skip
        elif batch is not None:
            run.example = batch[0][:1].to(run.device)
        run.forward_flops = total_cost(run.model, run.example).flops
    return run.forward_flops


def _cut(run: _Run, state: RunState, stats: _Epoch, settled: dict[str, bool]) -> None:
    """Cut the settled gates out of the training model: every rank the same gates at the
    same step, from all-reduced decisions. The optimizer keeps the other parameters' state,
    and DDP gets a new wrapper around the smaller module."""
    removed = cut_settled(run.gated, state.optimizer, settled)
    state.tracker.forget(removed)
    stats.cut += [{"gate": n, "open": d, "step": stats.steps + 1} for n, d in settled.items()]
    run.net = _wrap(run.model, run.device, run.world)
    run.forward_flops = None


def _projection_due(run: _Run, state: RunState, stats: _Epoch) -> bool:
    """Whether this step projects the gates onto the target: the first step after the
    setpoint's ramp with λ_polar above 0 (`TrainConfig.projection`)."""
    c = state.controller
    return (c is not None and run.config.projection and not state.projected
            and stats.lambda_polar > 0 and c.steps >= c.ramp_steps)  # fmt: skip


def _project(run: _Run, state: RunState, stats: _Epoch) -> None:
    """Round the gates onto the target (`project_to_budget`) and pin them there; with
    `progressive`, cut every gate out at once instead, closed blocks and channels with them.
    The same on every rank: the running open rates it ranks by are the global batches'."""
    config = run.config
    decisions = project_to_budget(run.gated, config.target, config.target_kind)
    if config.progressive:
        _cut(run, state, stats, decisions)
    else:
        pin_gates(run.gated, decisions)
        run.net = _wrap(run.model, run.device, run.world)
    state.projected, state.lambda_act = True, 0.0
    stats.projected = stats.steps + 1
    if run.rank == 0:
        run.log(
            f"epoch {stats.index + 1}, step {stats.projected}: gates projected onto the target "
            f"{config.target:g}: {config.target_kind} ratio {_projected_size(run):.3f}"
        )


def _projected_size(run: _Run) -> float:
    c = consensus(run.gated)
    return flops_ratio(run.gated, c) if run.config.target_kind == "flops" else c.open_ratio


def _check_finite(run: _Run, state: RunState, stats: _Epoch, values: torch.Tensor) -> None:
    """Raise `TrainingDiverged` if this step's loss is NaN or infinite."""
    total, task, polar, act = values[:4].tolist()
    if math.isfinite(total):
        return
    last = (
        f"{run.out / CHECKPOINT} (epoch {state.epoch})"
        if run.out is not None and state.records
        else "none (no epoch finished)"
    )
    raise TrainingDiverged(
        f"the loss became {total} at epoch {stats.index + 1}, step {stats.steps + 1} "
        f"(task {task:.4g}, R_polar {polar:.4g}, R_act {act:.4g}); the last good checkpoint "
        f"is {last}. Lower the learning rate or the λs, then --resume or start again."
    )


def _end_epoch(
    run: _Run,
    state: RunState,
    stats: _Epoch,
    test_loader: DataLoader | None,
    epoch_end: Callable[[nn.Module, int], bool] | None,
) -> None:
    """The `epoch_end` callback, then evaluate and record the epoch; on rank 0, log it and
    write the checkpoint, metrics and plots."""
    if epoch_end is not None and epoch_end(run.model, stats.index):
        _parameters_replaced(run, state, stats.index)
    record = _record(run, state, stats, test_loader)
    state.records.append(record)
    state.epoch = record["epoch"]
    if run.rank == 0:
        run.log(_summary(record, run.config.epochs))
        if run.out is not None:
            _write_outputs(run.out, state)
    if run.world > 1:
        dist.barrier()


def _parameters_replaced(run: _Run, state: RunState, epoch: int) -> None:
    """`epoch_end` replaced the model's parameters: a new optimizer, and a new DDP wrapper."""
    if run.out is not None:
        _require_spec(run.model, f"epoch_end changed the model after epoch {epoch + 1}")
    state.rebuild_optimizer()
    run.net = _wrap(run.model, run.device, run.world)
    run.forward_flops = None  # counted again on the new model


def _record(
    run: _Run, state: RunState, stats: _Epoch, test_loader: DataLoader | None
) -> dict[str, Any]:
    """The epoch's record: its mean losses over all processes, the gates, the accuracies."""
    sums = stats.sums
    if run.world > 1:
        sums = sums.to(run.device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    total, task, polar, act = (sums[:4] / (stats.steps * run.world)).tolist()
    record = {
        "epoch": stats.index + 1,
        "lr": stats.lr,
        "lambda_polar": None,
        "lambda_act": None,
        "loss": {"total": total, "task": task, "polar": polar, "act": act},
        "r_polar": None,
        "open_rate": None,
        "open_ratio": None,
        "flops_ratio": None,
    }
    if run.gated is not None:
        c = consensus(run.gated)
        record.update(
            lambda_polar=stats.lambda_polar,
            lambda_act=state.lambda_act,
            r_polar=polar,
            open_rate={n: list(r) if isinstance(r, tuple) else r for n, r in c.open_rate.items()},
            open_ratio=c.open_ratio,
            flops_ratio=flops_ratio(run.gated, c),
        )
    evaluated = test_loader is not None and run.rank == 0
    if run.dict_batches:  # a model's own loss: no accuracy, a test loss
        record["train_acc"], record["test_acc"] = None, None
        loss = evaluate_loss(run.model, test_loader, run.device) if evaluated else None
        record["test_loss"] = loss
    else:
        record["train_acc"] = sums[4].item() / max(sums[5].item(), 1)
        record["test_acc"] = evaluate(run.model, test_loader, run.device) if evaluated else None
    record["seconds"] = round(time.time() - stats.began, 2)
    record["train_seconds"] = round(stats.train_seconds, 2)
    record["model_flops"] = _forward_flops(run) if run.example is not None else None
    record["model_params"] = sum(p.numel() for p in run.model.parameters())
    record["train_flops"] = state.train_flops
    record["cut"] = list(stats.cut) if run.config.progressive else None
    record["projected"] = stats.projected
    return record


def _require_spec(model: nn.Module, why: str) -> None:
    """A checkpoint needs a spec to rebuild the model from: raise if `save` has none."""
    try:
        model_spec(model)
    except ValueError as e:
        raise ValueError(f"{why}, but {e} (or train with out_dir=None)") from e


def _wrap(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """The module to call: `model`, in DistributedDataParallel under torchrun."""
    if world == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None
    )


def _summary(r: dict[str, Any], epochs: int) -> str:
    loss, test = r["loss"], f"{r['test_acc']:.4f}" if r["test_acc"] is not None else "-"
    train = f"{r['train_acc']:.4f}" if r["train_acc"] is not None else "-"
    if r.get("test_loss") is not None:
        test = f"loss {r['test_loss']:.3f}"
    regularizers = size = ""
    if r["open_rate"] is not None:  # a gated model
        regularizers = (
            f"R_polar {r['r_polar']:.4f}  R_act {loss['act']:.3f}  "
            f"λ {r['lambda_polar']:g}/{r['lambda_act']:.3g}  "
        )
        size = f"open {r['open_ratio']:.3f}  FLOPs {r['flops_ratio']:.3f}  "
    return (
        f"epoch {r['epoch']}/{epochs}  loss {loss['total']:.3f} (task {loss['task']:.3f})  "
        f"{regularizers}train {train}  test {test}  {size}({r['seconds']:.0f}s)"
    )


def _write_outputs(out: Path, state: RunState) -> None:
    """The checkpoint (exactly `RunState.state_dict`), metrics.jsonl and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / CHECKPOINT, state.model, **state.state_dict())
    with atomic_path(out / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in state.records))
    if isinstance(state.model, Gated):
        plot_gates(state.records, out / "gates.png")
    plot_curves(state.records, out / "curves.png")

"""Step 4b: train weights and gates together in one pass (paper §4.1).

The loss is ``task + λ_polar · polarization_loss + λ_act · activation_loss``, with SGD and a
multi-step learning rate; a plain model without gates trains on the task loss alone. `train`
writes one JSON line per epoch, an atomic checkpoint that `--resume` continues exactly, and the
gates.png / curves.png plots. Under torchrun it trains with DistributedDataParallel; the gate
statistics are global (see `polarization_loss`).

    torchrun --nproc_per_node 2 -m consensus_gates.cli train resnet20 --data fashion_mnist ...
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .._utils import atomic_path, unwrap
from ..consensus import consensus
from ..cost import flops_ratio
from ..errors import TrainingDiverged
from ..fx.graph_module import GatedModel
from ..losses import gate_losses
from ..saving.files import model_spec
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .controller import SparsityController
from .plots import plot_curves, plot_gates
from .runs import CHECKPOINT, METRICS, _claim, check_folder, check_resume


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def _rng_state(loader: DataLoader) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader.generator is not None:
        state["loader"] = loader.generator.get_state()
    return state


def _set_rng_state(state: dict[str, Any], loader: DataLoader) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "loader" in state and loader.generator is not None:
        loader.generator.set_state(state["loader"])


def _as_tuple(v: Any) -> Any:
    return tuple(_as_tuple(x) for x in v) if isinstance(v, list | tuple) else v


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
    model = unwrap(model)
    gated = model if isinstance(model, GatedModel) else None
    config = config or TrainConfig()
    if gated is None and config.target is not None:
        raise ValueError(
            f"config.target={config.target} needs gates to reach it; a plain "
            f"{type(model).__name__} has none (call insert_gates first, or set target=None)"
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    rank, world = _distributed()
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("resume=True needs the out_dir of the run to continue")
    if resume and overwrite:
        raise ValueError("resume=True continues the run in out_dir, overwrite=True replaces it")
    if out is not None:  # fail now, not after the first epoch
        _require_spec(model, "out_dir needs a checkpoint of the model")
        _claim(check_folder(out), resume, overwrite, rank)
    net = _wrap(model, device, world)
    opt = _sgd(model, config, config.lr)
    sched = MultiStepLR(opt, config.lr_milestones(), config.lr_gamma)
    controller = None
    if config.target is not None:
        controller = SparsityController(gated, config, config.epochs * len(train_loader))
    lam_act, records, start = (config.lambda_act if controller is None else 0.0), [], 0
    if resume:
        ckpt = check_resume(out, model, config, identity)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], train_loader)
        lam_act, records, start = ckpt["lambda_act"], list(ckpt["records"]), ckpt["epoch"]
        sched.milestones = Counter(config.lr_milestones())  # `epochs` may have grown
        if controller is not None:
            controller.load_state_dict(ckpt["controller"])
        if rank == 0:
            log(f"resumed from {out / CHECKPOINT} after epoch {start}")
    else:
        torch.manual_seed(config.seed)
        random.seed(config.seed)

    for epoch in range(start, config.epochs):
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        lam_polar, lr = config.lambda_polar_at(epoch), opt.param_groups[0]["lr"]
        net.train()
        began, sums, steps = time.time(), torch.zeros(6, dtype=torch.float64), 0
        no_gates = torch.zeros((), device=device)
        bar = tqdm(
            train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
            disable=not config.progress or rank != 0, file=sys.stderr,
        )  # fmt: skip
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = net(x)
            task = F.cross_entropy(logits, y)
            polar, act = (
                gate_losses(gated, weight=config.act_weight)
                if gated is not None
                else (no_gates, no_gates)
            )
            loss = task + lam_polar * polar + lam_act * act
            correct = (logits.argmax(1) == y).sum().to(loss.dtype)
            # one device sync per step: the loss parts and the hits, as float64 on the CPU
            values = torch.stack([loss, task, polar, act, correct]).detach().double().cpu()
            total, task_v, polar_v, act_v = values[:4].tolist()
            if not math.isfinite(total):
                last = (
                    f"{out / CHECKPOINT} (epoch {records[-1]['epoch']})"
                    if out is not None and records
                    else "none (no epoch finished)"
                )
                raise TrainingDiverged(
                    f"the loss became {total} at epoch {epoch + 1}, step {steps + 1} "
                    f"(task {task_v:.4g}, R_polar {polar_v:.4g}, R_act "
                    f"{act_v:.4g}); the last good checkpoint is {last}. Lower the learning "
                    "rate or the λs, then --resume or start again."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if controller is not None:
                lam_act = controller.step()
            sums[:5] += values
            sums[5] += len(y)
            steps += 1
            if steps % 20 == 0:
                bar.set_postfix(loss=f"{total:.3f}", polar=f"{polar_v:.3f}")
        sched.step()
        if epoch_end is not None and epoch_end(model, epoch):
            if out is not None:
                _require_spec(model, f"epoch_end changed the model after epoch {epoch + 1}")
            opt, sched = _rebuilt(model, config, opt, sched)
            net = _wrap(model, device, world)
        if world > 1:
            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        total, task, polar, act = (sums[:4] / (steps * world)).tolist()
        record = _record(gated, epoch, lr, lam_polar, lam_act, (total, task, polar, act))
        record["train_acc"] = sums[4].item() / max(sums[5].item(), 1)
        record["test_acc"] = (
            evaluate(model, test_loader, device) if test_loader is not None and rank == 0 else None
        )
        record["seconds"] = round(time.time() - began, 2)
        records.append(record)
        if rank == 0:
            log(_summary(record, config.epochs))
            if out is not None:
                _write_outputs(
                    out,
                    model,
                    records,
                    opt,
                    sched,
                    train_loader,
                    lam_act,
                    config,
                    controller.state_dict() if controller is not None else None,
                    identity,
                )
        if world > 1:
            dist.barrier()
    return records


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


def _sgd(model: nn.Module, config: TrainConfig, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(
        model.parameters(), lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def _rebuilt(
    model: nn.Module, config: TrainConfig, opt: torch.optim.SGD, sched: MultiStepLR
) -> tuple[torch.optim.SGD, MultiStepLR]:
    """An optimizer over `model`'s new parameters at `opt`'s learning rate, and a scheduler
    that continues `sched`'s milestones (momentum buffers belong to the old parameters)."""
    new_opt = _sgd(model, config, opt.param_groups[0]["lr"])
    new_sched = MultiStepLR(new_opt, config.lr_milestones(), config.lr_gamma)
    new_sched.load_state_dict(sched.state_dict())
    for new, old in zip(new_opt.param_groups, opt.param_groups, strict=True):
        # the constructor's first step would apply a milestone at epoch 0 once more
        new["lr"], new["initial_lr"] = old["lr"], old["initial_lr"]
    return new_opt, new_sched


def _record(gated, epoch, lr, lam_polar, lam_act, losses) -> dict[str, Any]:
    total, task, polar, act = losses
    record = {
        "epoch": epoch + 1,
        "lr": lr,  # what this epoch trained with
        "lambda_polar": None,
        "lambda_act": None,
        "loss": {"total": total, "task": task, "polar": polar, "act": act},
        "r_polar": None,
        "open_rate": None,
        "open_ratio": None,
        "flops_ratio": None,
    }
    if gated is None:
        return record
    c = consensus(gated)
    return {
        **record,
        "lambda_polar": lam_polar,
        "lambda_act": lam_act,
        "r_polar": polar,
        "open_rate": {n: list(r) if isinstance(r, tuple) else r for n, r in c.open_rate.items()},
        "open_ratio": c.open_ratio,
        "flops_ratio": flops_ratio(gated, c),
    }


def _summary(r: dict[str, Any], epochs: int) -> str:
    loss, test = r["loss"], f"{r['test_acc']:.4f}" if r["test_acc"] is not None else "-"
    regularizers = size = ""
    if r["open_rate"] is not None:  # a gated model
        regularizers = (
            f"R_polar {r['r_polar']:.4f}  R_act {loss['act']:.3f}  "
            f"λ {r['lambda_polar']:g}/{r['lambda_act']:.3g}  "
        )
        size = f"open {r['open_ratio']:.3f}  FLOPs {r['flops_ratio']:.3f}  "
    return (
        f"epoch {r['epoch']}/{epochs}  loss {loss['total']:.3f} (task {loss['task']:.3f})  "
        f"{regularizers}train {r['train_acc']:.4f}  test {test}  {size}({r['seconds']:.0f}s)"
    )


def _write_outputs(
    out, model, records, opt, sched, loader, lam_act, config, control, identity
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        out / CHECKPOINT,
        model,
        epoch=records[-1]["epoch"],  # epochs completed
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
        rng=_rng_state(loader),
        lambda_act=lam_act,
        controller=control,
        records=records,
        train_config=json.dumps(asdict(config)),
        identity=json.dumps(identity),
    )
    with atomic_path(out / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    if isinstance(model, GatedModel):
        plot_gates(records, out / "gates.png")
    plot_curves(records, out / "curves.png")


"""Step 4b: train weights and gates together in one pass (paper §4.1).

The loss is ``task + λ_polar · polarization_loss + λ_act · activation_loss``, with SGD and a
multi-step learning rate; a plain model without gates trains on the task loss alone. `train`
writes one JSON line per epoch, an atomic checkpoint that `--resume` continues exactly, and the
gates.png / curves.png plots. Under torchrun it trains with DistributedDataParallel; the gate
statistics are global (see `polarization_loss`).

    torchrun --nproc_per_node 2 -m consensus_gates.train resnet20 --data fashion_mnist ...
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .consensus import consensus
from .cost import expected_flops_ratio, flops_ratio
from .errors import TrainingDiverged
from .insert import GatedModel, unwrap
from .losses import gate_losses
from .plots import plot_curves, plot_gates
from .saving import atomic_path, model_spec
from .spec import parse_spec

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RUN = "run.json"  # what `cgates train` trained, for people reading the folder later
RUN_FILES = (CHECKPOINT, METRICS, RUN)  # any of them in a folder: it holds a run
SCHEDULES = ("constant", "step", "warmup")
# TrainConfig's number fields (target and target_ramp may be None), and those that may be 0
_NON_NEGATIVE = ("momentum", "weight_decay", "lambda_polar", "lambda_act", "controller_kp",
                 "controller_ki", "lambda_act_max")  # fmt: skip
_NUMBERS = ("lr", "lr_gamma", "target", "target_ramp", *_NON_NEGATIVE)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; defaults are the paper's (SGD 0.1, momentum 0.9, weight decay
    5e-4, learning rate divided by 10 at each milestone, the "λ↑" schedule).

    Attributes:
        milestones: epochs at which the learning rate is multiplied by `lr_gamma`; None: at
            1/2 and 3/4 of the epochs.
        polar_schedule: λ_polar over epochs. ``"constant"``: `lambda_polar` throughout;
            ``"step"`` (paper's λ↑): 0 until epoch a, `lambda_polar` until b, then 1.5 ×
            `lambda_polar` (0, 2, 3 with the default 2); ``"warmup"``: rises linearly from
            0 to `lambda_polar` over `warmup_epochs`.
        polar_steps: (a, b) for ``"step"``; None: the paper's 125 and 190 of 300 epochs,
            scaled to `epochs`.
        act_weight: ``"flops"`` weighs each gate by the FLOPs it controls, ``"uniform"``
            counts gates equally (eq. 10).
        target: a sparsity target. With ``target_kind="flops"``, the sub-network's FLOPs as
            a fraction of the original's; with ``"open"``, the fraction of gate units kept.
            A PI controller then sets λ_act after every step (from 0, within
            ±`lambda_act_max`; `lambda_act` is not used), following a setpoint that moves
            from 1 to the target over the first `target_ramp` of the steps.
        target_ramp: None: three quarters of the epochs before λ_polar first rises above 0
            (a quarter of the training if it never is 0). Polarized gates stop learning (an
            STE passes no gradient far from 0), so the ramp should end before they polarize.
        controller_kp, controller_ki: the controller's proportional gain and its integral
            gain per step (`SparsityController`).
    """

    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] | None = None
    lr_gamma: float = 0.1
    lambda_polar: float = 2.0
    polar_schedule: Literal["constant", "step", "warmup"] = "step"
    polar_steps: tuple[int, int] | None = None
    warmup_epochs: int = 1
    lambda_act: float = 0.5
    act_weight: Literal["uniform", "flops"] = "flops"
    target: float | None = None
    target_kind: Literal["flops", "open"] = "flops"
    controller_kp: float = 4.0
    controller_ki: float = 0.05
    target_ramp: float | None = None
    lambda_act_max: float = 10.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in _NUMBERS:
            v = getattr(self, name)
            if v is not None and not (_is_number(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        for name in ("epochs", "warmup_epochs", "seed"):
            if not _is_number(getattr(self, name), int):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.polar_schedule not in SCHEDULES:
            raise ValueError(
                f"polar_schedule must be one of {SCHEDULES}, got {self.polar_schedule!r}"
            )
        if self.act_weight not in ("uniform", "flops"):
            raise ValueError(f"act_weight must be 'uniform' or 'flops', got {self.act_weight!r}")
        if self.target_kind not in ("flops", "open"):
            raise ValueError(f"target_kind must be 'flops' or 'open', got {self.target_kind!r}")
        if self.target is not None and not 0 < self.target <= 1:
            raise ValueError(f"target must be in (0, 1], got {self.target}")
        if self.target_ramp is not None and not 0 <= self.target_ramp <= 1:
            raise ValueError(f"target_ramp must be in [0, 1], got {self.target_ramp}")
        if self.milestones is not None and not _epochs(self.milestones, strict=True, least=1):
            raise ValueError(
                f"milestones must be increasing epochs >= 1 such as (30, 60), got {self.milestones}"
            )
        steps = self.polar_steps
        if steps is not None and not (_epochs(steps, strict=False, least=0) and len(steps) == 2):
            raise ValueError(f"polar_steps must be (a, b) with 0 <= a <= b, got {steps}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.lr <= 0 or self.lr_gamma <= 0:
            raise ValueError(f"lr must be > 0 and lr_gamma > 0, got {self.lr}, {self.lr_gamma}")
        negative = [n for n in _NON_NEGATIVE if getattr(self, n) < 0]
        if negative:
            values = ", ".join(f"{n}={getattr(self, n)}" for n in negative)
            raise ValueError(f"{' and '.join(negative)} must be >= 0, got {values}")

    def lr_milestones(self) -> list[int]:
        if self.milestones is not None:
            return list(self.milestones)
        return sorted({self.epochs // 2, self.epochs * 3 // 4} - {0})

    def ramp_fraction(self) -> float:
        """`target_ramp`, or its default: the share of epochs before polarization starts."""
        if self.target_ramp is not None:
            return self.target_ramp
        first = next((e for e in range(self.epochs) if self.lambda_polar_at(e) > 0), 0)
        # end early enough that the controller settles before the gates polarize
        return 0.75 * first / self.epochs if first > 0 else 0.25

    def lambda_polar_at(self, epoch: int) -> float:
        """λ_polar for a 0-based epoch."""
        lam = self.lambda_polar
        if self.polar_schedule == "constant":
            return lam
        if self.polar_schedule == "warmup":
            return lam * min(1.0, (epoch + 1) / max(self.warmup_epochs, 1))
        a, b = self.polar_steps or (self.epochs * 125 // 300, self.epochs * 190 // 300)
        return 0.0 if epoch < a else lam if epoch < b else 1.5 * lam


def _is_number(value: Any, types: tuple[type, ...] | type) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)


def _epochs(values: Any, *, strict: bool, least: int) -> bool:
    """Whether `values` is a sequence of integer epochs >= `least`, each greater than the
    last (`strict`) or at least as great."""
    if not isinstance(values, tuple | list) or not all(_is_number(v, int) for v in values):
        return False
    pairs = zip(values, values[1:], strict=False)
    return all(v >= least for v in values) and all(a < b or a == b and not strict
                                                   for a, b in pairs)  # fmt: skip


class SparsityController:
    """Proportional-integral control of λ_act towards a sparsity target.

    Closed gates saturate and stop learning (the STE passes no gradient far from 0), so the
    sub-network must approach the target from above, never overshoot it. The setpoint
    therefore moves from the full network (1.0) down to the target over the first
    `ramp_fraction` of the training steps. After each step, with the error ``e`` = the size
    the running open rates describe minus the setpoint, λ_act = kp·e + ki·Σe: positive
    while the sub-network is too large, negative (holding gates open) while too small.
    """

    def __init__(self, model: GatedModel, config: TrainConfig, total_steps: int):
        self.model, self.config = model, config
        self.lam, self.integral, self.steps = 0.0, 0.0, 0
        self.ramp_steps = max(1, round(config.ramp_fraction() * total_steps))
        if config.target_kind == "flops":
            flops_ratio(model)  # measures each gate's FLOPs, once

    def setpoint(self) -> float:
        target = self.config.target
        return 1 - (1 - target) * min(1.0, self.steps / self.ramp_steps)

    def current(self) -> float:
        """The sub-network size now (FLOPs ratio or kept fraction), from the running rates."""
        if self.config.target_kind == "flops":
            return expected_flops_ratio(self.model)
        rates = [g.running_open_rate.float().mean() for g in self.model.gates.values()]
        return float(torch.stack(rates).mean())

    def step(self) -> float:
        self.steps += 1
        error = self.current() - self.setpoint()
        c, limit = self.config, self.config.lambda_act_max
        self.integral += error
        if c.controller_ki > 0:  # anti-windup: the integral term alone stays within the limit
            bound = limit / c.controller_ki
            self.integral = min(max(self.integral, -bound), bound)
        lam = c.controller_kp * error + c.controller_ki * self.integral
        self.lam = min(max(lam, -limit), limit)
        return self.lam

    def state_dict(self) -> dict[str, float]:
        return {"lam": self.lam, "integral": self.integral, "steps": self.steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.lam, self.integral, self.steps = state["lam"], state["integral"], int(state["steps"])


def check_folder(path: str | Path) -> Path:
    """`path` as a Path; ValueError if it cannot be a folder: it, or a folder above it, is a
    file."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                why = "is a file" if p == path else f"cannot be a folder: {p} is a file"
                raise ValueError(f"{path} {why}; choose another output folder")
            break
    return path


def run_files(out: str | Path) -> list[str]:
    """The files of a run that the folder `out` already holds (`RUN_FILES`)."""
    return [name for name in RUN_FILES if (Path(out) / name).exists()]


def check_resume(
    out_dir: str | Path,
    model: nn.Module,
    config: TrainConfig,
    identity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint in `out_dir`, if `model`, `config` and `identity` (see `train`) are
    those it was trained with: only `epochs` may differ. Raises ValueError listing every
    difference, FileNotFoundError or ModelFileError for a missing or unreadable checkpoint."""
    ckpt = load_checkpoint(Path(out_dir) / CHECKPOINT)
    changed = _changed(_model_identity(parse_spec(ckpt["spec"], str(out_dir))),
                       _model_identity(model_spec(unwrap(model))))  # fmt: skip
    saved = json.loads(ckpt.get("identity", "null"))
    if saved is not None and identity is not None:
        changed += _changed(saved, _jsonable(identity))
    recipe = _jsonable(asdict(config))
    changed += _changed(json.loads(ckpt["train_config"]), recipe, skip=("epochs", "progress"))
    if changed:
        raise ValueError(
            f"--resume with a different recipe than the checkpoint's ({', '.join(changed)}); "
            "resume with the same model, data and settings (only --epochs may change), or "
            "start a new run in a new --out"
        )
    return ckpt


def _jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples as lists), to compare with a saved one."""
    return json.loads(json.dumps(value))


def _changed(saved: Mapping[str, Any], now: Mapping[str, Any], skip: tuple = ()) -> list[str]:
    """``"key: saved -> now"`` for each key whose value differs."""
    keys = [k for k in dict.fromkeys([*saved, *now]) if k not in skip]
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def _model_identity(spec: dict[str, Any]) -> dict[str, Any]:
    """What a resumed model must share with the checkpoint's, from its spec: the source model
    and its kwargs, the gate config (one key per field, so a difference names it), the
    example inputs less their batch size, and the rest of the spec but its format version and
    the gates a user fixed."""
    spec = _jsonable(spec)
    source, config = spec.pop("source", None) or {}, spec.pop("config", None) or {}
    for t in spec.get("inputs") or []:
        t["shape"] = t["shape"][1:]
    rest = {k: v for k, v in spec.items() if k not in ("format", "version", "fixed")}
    gates = {f"gates.{k}": v for k, v in config.items()}
    return {"model": source.get("name"), "model_args": source.get("kwargs"), **gates, **rest}


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


def _claim(out: Path, resume: bool, overwrite: bool, rank: int) -> None:
    """Refuse to train over the run `out` holds unless resuming or replacing it; on
    replacing, delete the files `train` writes (rank 0), so none of the old run is kept."""
    found = run_files(out)
    if found and not (resume or overwrite):
        raise ValueError(
            f"{out} already holds a run ({', '.join(found)}); continue it with resume=True, "
            "replace it with overwrite=True, or train into another out_dir"
        )
    if overwrite and rank == 0:
        for name in (CHECKPOINT, METRICS, "gates.png", "curves.png"):
            (out / name).unlink(missing_ok=True)


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


if __name__ == "__main__":  # torchrun --nproc_per_node N -m consensus_gates.train MODEL ...
    from .cli import main

    main(["train", *sys.argv[1:]])

"""A run's state (`RunState`): what `train` changes as it goes, and exactly what its
checkpoint holds."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR

from .config import TrainConfig
from .controller import SparsityController
from .progressive import SettleTracker


@dataclass(eq=False)
class RunState:
    """Everything a run carries from one step to the next. `state_dict` is the checkpoint's
    content (`save_checkpoint` adds its format, version and the model's spec), and
    `load_state_dict` restores all of it: nothing is saved or restored elsewhere.

    Attributes:
        model: the model being trained (never a DistributedDataParallel wrapper).
        config: the recipe; saved (as JSON, ``train_config``) for `check_resume` to compare.
        optimizer, scheduler: SGD or AdamW (`TrainConfig.optimizer`) and its multi-step
            learning rate.
        controller: the `SparsityController` that sets λ_act with a ``config.target``, else
            None.
        lambda_act: λ_act now: the controller's last value, or ``config.lambda_act``.
            (λ_polar is ``config.lambda_polar_at(epoch)``: nothing to save.)
        records: the per-epoch records so far.
        epoch: the epochs completed.
        identity: what else defines the run (see `train`); saved for `check_resume`.
        generator: the training loader's generator, whose state (the shuffled order) is
            saved with the global torch, CUDA and Python RNG states.
        tracker: with ``config.progressive``, the gates' unanimous steps (`SettleTracker`).
            The gates already cut are in the model's spec, which the checkpoint holds.
        projected: whether the gates were projected onto ``config.target`` and pinned
            (`TrainConfig.projection`); the pinned decisions are in the model's spec.
        train_flops: the training FLOPs so far: 3 × the training model's forward FLOPs per
            sample (forward, and a backward of about twice that) × the samples, all
            processes'.
    """

    model: nn.Module
    config: TrainConfig
    optimizer: torch.optim.Optimizer
    scheduler: MultiStepLR
    controller: SparsityController | None
    lambda_act: float
    records: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    identity: Mapping[str, Any] | None = None
    generator: torch.Generator | None = None
    tracker: SettleTracker | None = None
    train_flops: float = 0.0
    projected: bool = False

    @classmethod
    def start(
        cls,
        model: nn.Module,
        config: TrainConfig,
        loader: Iterable[Any],
        identity: Mapping[str, Any] | None = None,
    ) -> RunState:
        """The state before the first step: a fresh optimizer, scheduler and controller (a
        ``config.target`` needs `model` to be a `GatedModel`). `loader` is the training
        loader: its length sizes the controller's setpoint ramp, and its generator is kept."""
        optimizer = _optimizer(model, config, config.lr)
        scheduler = MultiStepLR(optimizer, config.lr_milestones(), config.lr_gamma)
        controller = None
        if config.target is not None:
            controller = SparsityController(model, config, config.epochs * len(loader))
        lambda_act = config.lambda_act if controller is None else 0.0
        tracker = SettleTracker(config.settle_steps) if config.progressive else None
        return cls(model, config, optimizer, scheduler, controller, lambda_act,
                   identity=identity, generator=getattr(loader, "generator", None),
                   tracker=tracker)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's content: tensors, numbers, strings and containers of them."""
        return {
            "model": self.model.state_dict(),
            "epoch": self.epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(self.generator),
            "lambda_act": self.lambda_act,
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "records": self.records,
            "train_config": json.dumps(asdict(self.config)),
            "identity": json.dumps(self.identity),
            "settle": self.tracker.state_dict() if self.tracker is not None else None,
            "train_flops": self.train_flops,
            "projected": self.projected,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state` (a checkpoint that `check_resume` accepted): the model's
        weights, the optimizer, scheduler, controller, RNG states, λ_act, records and epoch.
        ``train_config`` and ``identity`` are only compared (`check_resume`), not restored:
        ``config.epochs`` may have grown."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.milestones = Counter(self.config.lr_milestones())  # `epochs` may grow
        _set_rng_state(state["rng"], self.generator)
        self.lambda_act, self.epoch = state["lambda_act"], state["epoch"]
        self.records = list(state["records"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        if self.tracker is not None:
            self.tracker.load_state_dict(state["settle"])
        self.train_flops = state.get("train_flops", 0.0)  # none in older checkpoints
        self.projected = state.get("projected", False)

    def rebuild_optimizer(self) -> None:
        """An optimizer over the model's new parameters (after `epoch_end` replaced them) at
        the current learning rate, and a scheduler that continues the old one's milestones;
        the momentum buffers belonged to the old parameters and are lost."""
        old, old_scheduler = self.optimizer, self.scheduler
        self.optimizer = _optimizer(self.model, self.config, old.param_groups[0]["lr"])
        self.scheduler = MultiStepLR(
            self.optimizer, self.config.lr_milestones(), self.config.lr_gamma
        )
        self.scheduler.load_state_dict(old_scheduler.state_dict())
        for new, before in zip(self.optimizer.param_groups, old.param_groups, strict=True):
            # the constructor's first step would apply a milestone at epoch 0 once more
            new["lr"], new["initial_lr"] = before["lr"], before["initial_lr"]


def _optimizer(model: nn.Module, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def _rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "loader" in state and generator is not None:
        generator.set_state(state["loader"])


def _as_tuple(v: Any) -> Any:
    return tuple(_as_tuple(x) for x in v) if isinstance(v, list | tuple) else v

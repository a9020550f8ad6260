"""``tp-magnitude``, ``tp-bn-scale``, ``tp-taylor``: Torch-Pruning. Dense pretraining for
E - F epochs, pruning to the FLOPs target, fine-tuning for F = ``finetune_epochs``: E in all,
the budget of our one pass. ``extra_finetune_epochs`` adds fine-tuning beyond it, and the
results count it."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...baselines import IMPORTANCES, prune_to_flops
from ._registry import MethodOptions, MethodResult, RunContext, register_method
from ._training import dense_model, fit

if TYPE_CHECKING:
    from ..config import RunConfig

TAYLOR_BATCHES = 8  # training batches whose gradients score the channels for Taylor pruning


@dataclass(frozen=True)
class TorchPruningOptions(MethodOptions):
    """Attributes:
    finetune_epochs: the part of the run's epochs spent fine-tuning after pruning (the
        rest is dense pretraining).
    extra_finetune_epochs: fine-tuning beyond the equal budget.
    finetune_lr: the fine-tuning learning rate; None: ``train.lr * train.lr_gamma``.
    """

    finetune_epochs: int = 1
    extra_finetune_epochs: int = 0
    finetune_lr: float | None = None

    def __post_init__(self) -> None:
        if self.extra_finetune_epochs < 0:
            raise ValueError(
                f"extra_finetune_epochs must be >= 0, got {self.extra_finetune_epochs}"
            )
        if self.finetune_lr is not None and self.finetune_lr <= 0:
            raise ValueError(f"finetune_lr must be > 0, got {self.finetune_lr}")

    def check(self, run: RunConfig) -> None:
        if not 1 <= self.finetune_epochs < run.epochs:
            raise ValueError(
                f"finetune_epochs must be between 1 and epochs - 1 = {run.epochs - 1} (the "
                f"rest is pretraining), got {self.finetune_epochs}"
            )


def _torch_pruning(importance: str) -> Callable[[RunContext], MethodResult]:
    def prune_then_finetune(ctx: RunContext) -> MethodResult:
        run, options = ctx.run, ctx.options
        pretrain = run.epochs - options.finetune_epochs
        model, reused = dense_model(ctx, pretrain)
        batches = (
            list(itertools.islice(ctx.train_loader, TAYLOR_BATCHES))
            if importance == "taylor"
            else None
        )
        pruned = prune_to_flops(model, ctx.example_inputs, run.target, importance, batches=batches)
        finetune = options.finetune_epochs + options.extra_finetune_epochs
        lr = options.finetune_lr
        lr = lr if lr is not None else run.train.lr * run.train.lr_gamma
        # the run's milestones belong to the full schedule; fine-tuning gets its own
        fit(ctx, pruned, epochs=finetune, lr=lr, milestones=None)
        extra = {
            "pretrain_epochs": pretrain,
            "finetune_epochs": finetune,
            "extra_finetune_epochs": options.extra_finetune_epochs,
            "finetune_lr": lr,
        }
        return MethodResult(pruned, pretrain + finetune, reused, extra=extra)

    prune_then_finetune.__doc__ = (
        f"Torch-Pruning with {importance} importance: pretrain, prune to the target FLOPs, "
        "fine-tune; the same total epochs as ours unless extra_finetune_epochs > 0."
    )
    return prune_then_finetune


for _importance in IMPORTANCES:  # tp-magnitude, tp-bn-scale, tp-taylor
    register_method(f"tp-{_importance}", target="required", options=TorchPruningOptions)(
        _torch_pruning(_importance)
    )

"""``density``: activation-density pruning during training (Foldy-Porto & Panda).

Trains for the whole budget while `DensityPruning` resizes each internal width to
``density_scale`` × its measured activation density every ``density_every`` epochs (except
after the last epoch, which would leave the final shape untrained). Its size is set by the
scale, not by a FLOPs target: searching the scale for a target would cost a full training
per try, so a study lists several scales (``density_scale = [0.8, 1.2]``, one run each) and
reads the FLOPs ratio each reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...baselines import DensityPruning
from ._registry import SWEEP, MethodOptions, MethodResult, RunContext, register_method
from ._training import fit


@dataclass(frozen=True)
class DensityOptions(MethodOptions):
    """Attributes:
    density_every: resize every that many epochs.
    density_scale: each layer to this × its measured density × its width; a study may list
        several, one run each.
    """

    density_every: int = 1
    density_scale: float = field(default=1.0, metadata=SWEEP)

    def __post_init__(self) -> None:
        if self.density_every < 1:
            raise ValueError(f"density_every must be >= 1, got {self.density_every}")
        if self.density_scale <= 0:
            raise ValueError(f"density_scale must be > 0, got {self.density_scale}")

    @property
    def setting(self) -> str:
        return f"scale {self.density_scale:g}"


@register_method("density", target="refused", options=DensityOptions)
def density(ctx: RunContext) -> MethodResult:
    """Activation-density pruning during training (Foldy-Porto & Panda): the model shrinks
    to its layers' measured densities as it trains."""
    run, options = ctx.run, ctx.options
    pruner = DensityPruning(
        ctx.example_inputs,
        ctx.train_loader,
        every=options.density_every,
        scale=options.density_scale,
    )

    def resize(model: nn.Module, epoch: int) -> bool:
        # never after the last epoch: the final shape must be trained too
        return epoch < run.epochs - 1 and pruner(model, epoch)

    fit(ctx, ctx.model, epoch_end=resize)
    extra = {"density_every": options.density_every, "density_scale": options.density_scale}
    return MethodResult(ctx.model, run.epochs, extra=extra)

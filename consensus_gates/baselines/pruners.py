"""Torch-Pruning baselines: magnitude (group L1), BN-scale and Taylor channel pruning of a
trained model down to a FLOPs ratio, to be fine-tuned afterwards.

Only the internal widths of the residual branches are pruned (`inner_layers`: conv1's
outputs and conv2's inputs in a basic block), the search space of our ``middle`` channel
gates. Torch-Pruning 1.6 cannot prune the residual stream of the zoo's CIFAR ResNets: it
takes the option-A shortcut's channel ``F.pad`` for an elementwise op, so it couples the
16-, 32- and 64-channel stages index by index and cuts the same positions from all of them,
which leaves a model that no longer runs. Every other conv and linear layer, the final
classifier included, is therefore kept whole.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from .._utils import set_training
from ..cost import flops
from ..fx.tracing import as_input_tuple
from ..models.registry import forget_source
from .naive import WEIGHTED
from .space import inner_layers

IMPORTANCES = ("magnitude", "bn-scale", "taylor")
MAX_STEPS = 30  # bisection steps: far more than FLOPs ratios of a few hundred channels need

_SCORERS: dict[str, Callable[[], tp.importance.Importance]] = {
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "bn-scale": tp.importance.BNScaleImportance,
    "taylor": tp.importance.GroupTaylorImportance,
}


def prune_to_flops(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...],
    target_flops: float,
    importance: str,
    *,
    batches: Iterable[tuple[Tensor, Tensor]] | None = None,
    tolerance: float = 0.02,
) -> nn.Module:
    """A pruned deep copy of `model` whose fvcore FLOPs are `target_flops` (± `tolerance`)
    of `model`'s.

    Torch-Pruning removes the same fraction of channels from every internal width, the
    channels its `importance` scores lowest in each layer; that fraction is bisected until
    the FLOPs ratio is within `tolerance` of the target, each try on a fresh copy. The
    importance decides which channels go, not how many, so all three reach the same widths.

    Args:
        importance: one of `IMPORTANCES`: ``"magnitude"`` (L1 norm of each channel's weights
            over its group), ``"bn-scale"`` (|γ| of its BatchNorm, network slimming) or
            ``"taylor"`` (|weight · gradient|, first-order Taylor).
        batches: (inputs, labels) for ``"taylor"``: their cross-entropy gradients, computed
            in eval mode so BatchNorm statistics stay as trained, score the channels.

    Raises:
        ValueError: an unknown importance, Taylor without batches, or a target out of reach.
    """
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    if not 0 < target_flops <= 1:
        raise ValueError(f"target_flops must be in (0, 1], got {target_flops}")
    if importance == "taylor" and batches is None:
        raise ValueError(
            "importance='taylor' scores channels by weight × gradient: pass batches= a few "
            "(inputs, labels) batches of training data to compute the gradients on"
        )
    inputs = as_input_tuple(example_inputs)
    layers = {layer.producer for layer in inner_layers(model, inputs)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no internal branch width to prune")
    gradients = _gradients(model, batches) if importance == "taylor" else None
    base = flops(model, inputs).flops

    def attempt(ratio: float) -> tuple[nn.Module, float]:
        pruned = _pruned(model, inputs, layers, _SCORERS[importance](), ratio, gradients)
        return pruned, flops(pruned, inputs).flops / base

    # tp keeps int(n · (1 - ratio)) of n channels, and skips a layer it would empty: keep 1
    narrowest = min(model.get_submodule(name).weight.shape[0] for name in layers)
    low, high = 0.0, 1 - 1 / narrowest - 1e-6
    smallest, floor = attempt(high)
    if floor > target_flops + tolerance:
        raise ValueError(
            f"target_flops={target_flops} is out of reach: one channel left in every internal "
            f"width gives a FLOPs ratio of {floor:.3f}"
        )
    if abs(floor - target_flops) <= tolerance:
        return smallest
    for _ in range(MAX_STEPS):
        ratio = (low + high) / 2
        pruned, achieved = attempt(ratio)
        if abs(achieved - target_flops) <= tolerance:
            return pruned
        low, high = (ratio, high) if achieved > target_flops else (low, ratio)
    raise ValueError(
        f"no pruning ratio gives a FLOPs ratio within {tolerance} of {target_flops} (the "
        f"channel steps are too coarse here); raise the tolerance"
    )


def _gradients(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> list[Tensor | None]:
    """The summed cross-entropy gradient of each parameter over `batches`, in eval mode."""
    scored = copy.deepcopy(model)
    set_training(scored, False)
    device = next(scored.parameters()).device
    for x, y in batches:
        F.cross_entropy(scored(x.to(device)), y.to(device)).backward()
    gradients = [p.grad for p in scored.parameters()]
    if all(g is None for g in gradients):
        raise ValueError("batches is empty: Taylor importance needs at least one batch")
    return gradients


def _pruned(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    layers: set[str],
    scorer: tp.importance.Importance,
    ratio: float,
    gradients: list[Tensor | None] | None,
) -> nn.Module:
    """A copy of `model` with `ratio` of the channels of each internal width in `layers`
    removed, the lowest scored first, in the mode `model` was in."""
    pruned = copy.deepcopy(model)
    if gradients is not None:
        for p, g in zip(pruned.parameters(), gradients, strict=True):
            p.grad = None if g is None else g.clone()
    kept_whole = [
        m for name, m in pruned.named_modules() if isinstance(m, WEIGHTED) and name not in layers
    ]
    # tp traces in eval mode and leaves the model there
    tp.pruner.BasePruner(
        pruned, inputs, importance=scorer, pruning_ratio=ratio, ignored_layers=kept_whole
    ).step()
    pruned.zero_grad(set_to_none=True)
    set_training(pruned, model.training)
    forget_source(pruned)
    return pruned

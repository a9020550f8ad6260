"""The paper's naive baselines (Fig. 2): weights, or whole residual branches, dropped at random
from a trained network, with no retraining."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..cost import flops, module_flops
from ..fx.insert import insert_gates
from ..slimming import materialize
from .depth import random_order

WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


def drop_weights(model: nn.Module, fraction: float, *, seed: int = 0) -> nn.Module:
    """A deep copy of `model` with `fraction` of the entries of every conv and linear weight
    set to zero, drawn uniformly at random (biases and norms are kept; nothing is rescaled,
    as when weights of a trained network are dropped at test time)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    dropped = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in dropped.modules():
            if isinstance(m, WEIGHTED):
                n = m.weight.numel()
                zero = torch.zeros(n, dtype=torch.bool)
                zero[torch.randperm(n, generator=generator)[: round(fraction * n)]] = True
                m.weight.masked_fill_(zero.view(m.weight.shape).to(m.weight.device), 0)
    return dropped


def sparse_flops_ratio(
    model: nn.Module, original: nn.Module, example_inputs: Tensor | tuple[Tensor, ...]
) -> float:
    """`model`'s FLOPs over `original`'s if multiplications by zero weights were skipped:
    each conv and linear layer's fvcore FLOPs scaled by the density of its weight, the other
    ops counted as they are."""
    per_module = module_flops(model, example_inputs)
    saved = sum(
        per_module.get(name, 0) * (1 - m.weight.count_nonzero().item() / m.weight.numel())
        for name, m in model.named_modules()
        if isinstance(m, WEIGHTED)
    )
    return (per_module[""] - saved) / flops(original, example_inputs).flops


def drop_layers(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...],
    target_flops: float,
    *,
    seed: int = 0,
) -> fx.GraphModule:
    """Residual branches removed at random until the FLOPs ratio reaches `target_flops`.

    Branches are closed in a seeded random order (`depth.random_order`); of the last two
    states, the one whose FLOPs ratio is closer to the target is cut out with `materialize`:
    a slim GraphModule (its ``meta["consensus_gates"]["decisions"]`` says which branches
    are left).

    Raises:
        ValueError: `target_flops` is below the ratio with every branch removed.
    """
    gated = insert_gates(model, example_inputs)
    return materialize(gated, random_order(gated, target_flops, seed))

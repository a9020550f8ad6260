"""Step 4: the regularizers that polarize gates (eq. 7) and set how sparse they get (eq. 10)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .gates import Gate
from .insert import require_gated


def _batch_means(model: nn.Module) -> tuple[list[Gate], list[Tensor]]:
    """Each gate's batch-mean decision: a scalar for a layer gate, one per channel otherwise."""
    gates = list(require_gated(model).gates.values())
    missing = [g.name for g in gates if g.decisions is None]
    if missing:
        raise RuntimeError(
            "the gates have no decisions yet: run a forward pass of the gated model before "
            f"computing its losses (gates without decisions: {', '.join(missing[:3])}...)"
        )
    return gates, [g.decisions.float().mean(0) for g in gates]


def polarization_loss(model: nn.Module) -> Tensor:
    """Eq. 7: the mean over gates of ``(1 - ḡ) ḡ``, ``ḡ`` being a gate's batch-mean decision
    in the last forward pass; for channel gates eq. 8, the mean over channels first. Zero when
    every gate is open for all samples or closed for all: the consensus sub-network.
    Differentiable through the gate heads."""
    _, means = _batch_means(model)
    return torch.stack([((1 - m) * m).mean() for m in means]).mean()


def activation_loss(model: nn.Module, weight: Literal["uniform", "flops"] = "uniform") -> Tensor:
    """Eq. 10: the mean open rate of the gates in the last forward pass (a channel gate's open
    rate is the mean over its channels).

    With ``weight="flops"`` each gate counts by the FLOPs its branch costs (fvcore), so the
    value is the expected fraction of the gated FLOPs that still run: aim at a FLOPs budget,
    not a gate count. The FLOPs are measured once, on first use (`branch_costs`).
    """
    gates, means = _batch_means(model)
    mean = torch.stack([m.mean() for m in means])
    if weight == "uniform":
        return mean.mean()
    if weight != "flops":
        raise ValueError(f"weight must be 'uniform' or 'flops', got {weight!r}")
    if any(g.branch_flops.item() < 0 for g in gates):
        from .cost import branch_costs

        branch_costs(model)  # fills each gate's branch_flops
    w = torch.stack([g.branch_flops for g in gates]).to(mean)
    return (w * mean).sum() / w.sum().clamp_min(1)

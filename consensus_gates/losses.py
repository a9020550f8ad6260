"""Step 4: the regularizers that polarize gates (eq. 7) and set how sparse they get (eq. 10)."""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .cost import branch_costs
from .fx.graph_module import require_gated
from .gates.modules import Gate


def _batch_means(model: nn.Module) -> tuple[list[Gate], list[Tensor]]:
    """Each gate's batch-mean decision: a scalar for a layer gate, one per channel otherwise.
    Under torch.distributed (world size > 1) it is the mean over the global batch, all ranks'
    samples, and differentiable with respect to every rank's gates."""
    gates = list(require_gated(model).gates.values())
    missing = [g.name for g in gates if g.decisions is None]
    if missing:
        raise RuntimeError(
            "the gates have no decisions yet: run a forward pass of the gated model before "
            f"computing its losses (gates without decisions: {', '.join(missing[:3])}...)"
        )
    if not gates or not (dist.is_available() and dist.is_initialized()
                         and dist.get_world_size() > 1):  # fmt: skip
        return gates, [g.decisions.float().mean(0) for g in gates]
    # One collective for all gates: their local sums and the local sample count, flattened.
    sums = [g.decisions.float().sum(0) for g in gates]
    count = sums[0].new_tensor([gates[0].decisions.shape[0]])
    # Gradient scale: every rank computes the same R(ḡ) and sends dR/dΣ into the all-reduce,
    # whose backward sums it over the W ranks, so rank r's parameters get W·dR/dΣ·dΣ_r/dθ.
    # DDP divides the sum over ranks by W, leaving Σ_r dR/dΣ·dΣ_r/dθ: the gradient a single
    # process gets on the concatenated batch. So no rescaling here.
    from torch.distributed.nn.functional import all_reduce  # needs a distributed build

    with warnings.catch_warnings():
        # Deprecated in favour of _functional_collectives.all_reduce, which older torch
        # releases this package supports cannot differentiate.
        warnings.simplefilter("ignore", FutureWarning)
        total = all_reduce(torch.cat([s.reshape(-1) for s in sums] + [count]))
    *parts, n = total.split([s.numel() for s in sums] + [1])
    return gates, [p.view_as(s) / n for p, s in zip(parts, sums, strict=True)]


ChannelTerm = Literal["mean", "sum"]
CHANNEL_TERMS = ("mean", "sum")  # eq. 8's mean first


def polarization_loss(model: nn.Module, channels: ChannelTerm = "mean") -> Tensor:
    """Eq. 7: the mean over gates of ``(1 - ḡ) ḡ``, ``ḡ`` being a gate's batch-mean decision
    in the last forward pass; for channel gates eq. 8, the mean over channels first. Zero when
    every gate is open for all samples or closed for all: the consensus sub-network.
    Differentiable through the gate heads.

    ``channels="sum"`` sums a channel gate's terms over its channels instead (a deviation
    from the paper): each channel is then pulled as hard as a layer gate, where eq. 8 pulls
    it 1/C as hard. The value is then no longer within [0, 1/4]; it is never below eq. 8's.

    Under torch.distributed ḡ is the global batch mean, over every rank's shard, so each rank
    gets the same value and, after DistributedDataParallel averages the gradients, the
    gradient of one process on the whole batch."""
    _check_channels(channels)
    _, means = _batch_means(model)
    return _polarization(means, channels)


def activation_loss(model: nn.Module, weight: Literal["uniform", "flops"] = "uniform") -> Tensor:
    """Eq. 10: the mean open rate of the gates in the last forward pass (a channel gate's open
    rate is the mean over its channels). Under torch.distributed the rates are over the global
    batch, as in `polarization_loss`.

    With ``weight="flops"`` each gate counts by the FLOPs its branch costs (fvcore), so the
    value is the expected fraction of the gated FLOPs that still run: aim at a FLOPs budget,
    not a gate count. The FLOPs are measured once, on first use (`branch_costs`).
    """
    gates, means = _batch_means(model)
    return _activation(model, gates, means, weight)


class GateLosses(NamedTuple):
    """The gate losses of one forward pass, from one read of the gates' decisions."""

    polarization: Tensor  # `polarization_loss(model, channels)`: what training minimizes
    activation: Tensor  # `activation_loss(model, weight)`
    r_polar: Tensor  # eq. 7/8's R_polar, detached: `polarization` itself where channels="mean"


def gate_losses(
    model: nn.Module,
    weight: Literal["uniform", "flops"] = "uniform",
    channels: ChannelTerm = "mean",
) -> GateLosses:
    """``(polarization_loss(model, channels), activation_loss(model, weight), R_polar)`` from
    one pass over the gates' decisions (under torch.distributed, one all-reduce instead of
    two or three). ``R_polar`` is the paper's measure whichever ``channels`` trains, so runs
    with either polarizer report the same quantity."""
    _check_channels(channels)
    gates, means = _batch_means(model)
    polar = _polarization(means, channels)
    with torch.no_grad():
        measure = polar if channels == "mean" else _polarization(means, "mean")
    return GateLosses(polar, _activation(model, gates, means, weight), measure.detach())


def _check_channels(channels: str) -> None:
    if channels not in CHANNEL_TERMS:
        raise ValueError(
            f"channels must be 'mean' (eq. 8, the paper's) or 'sum', got {channels!r}"
        )


def _polarization(means: list[Tensor], channels: ChannelTerm) -> Tensor:
    if not means:  # every gate was cut out while training (a 0-d tensor adds to any device)
        return torch.zeros(())
    terms = [(1 - m) * m for m in means]  # a layer gate's is 0-d: its sum is its mean
    reduce = torch.mean if channels == "mean" else torch.sum
    return torch.stack([reduce(t) for t in terms]).mean()


def _activation(model: nn.Module, gates: list[Gate], means: list[Tensor], weight: str) -> Tensor:
    if not means:
        return torch.zeros(())
    mean = torch.stack([m.mean() for m in means])
    if weight == "uniform":
        return mean.mean()
    if weight != "flops":
        raise ValueError(f"weight must be 'uniform' or 'flops', got {weight!r}")
    w = torch.stack([g.branch_flops for g in gates])
    if (w < 0).any():  # one check for all gates: on a GPU, one sync instead of one per gate
        branch_costs(model)  # fills each gate's branch_flops
        w = torch.stack([g.branch_flops for g in gates])
    w = w.to(mean)
    return (w * mean).sum() / w.sum().clamp_min(1)

"""Gating modules: a tiny per-sample MLP on a pooled feature map, ending in a binary head.

A `LayerGate` makes one decision per sample for a whole residual branch; a `ChannelGate`
makes one per channel. Both keep running open rates, like BatchNorm's running statistics,
and can be pinned to fixed decisions.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .heads import make_head

if TYPE_CHECKING:
    from ..config import GateConfig


class Gate(nn.Module):
    """Shared machinery: pool the input over all but batch and `feature_dim`, run the MLP
    (``fc2`` is its output layer; ``fc1``, ``bn``, ``relu`` exist with two FC layers) and the
    head, and return a mask that broadcasts against the gated tensor."""

    units: int  # decisions per sample

    def __init__(
        self,
        name: str,
        channels: int,
        units: int,
        feature_dim: int | None,
        out_ndim: int,
        fc_layers: int,
        config: GateConfig,
    ):
        super().__init__()
        self.name = name
        self.units = units
        self.feature_dim = feature_dim  # None: the input is already (B, C)
        self.out_ndim = out_ndim
        self.momentum = config.momentum
        width = channels
        if fc_layers == 2:
            self.fc1 = nn.Linear(channels, config.hidden)
            self.bn = nn.BatchNorm1d(config.hidden)
            self.relu = nn.ReLU()
            width = config.hidden
        self.fc2 = nn.Linear(width, units)
        nn.init.constant_(self.fc2.bias, config.init_bias)
        shape = self.rate_shape()
        self.head = make_head(config, shape)
        self.register_buffer("running_open_rate", torch.ones(shape))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
        # Marginal fvcore FLOPs of what the gate controls; -1 until `branch_costs` measures it.
        self.register_buffer("branch_flops", torch.full((), -1, dtype=torch.long))
        self.fixed: Any = None  # a pinned decision, see `fix_decisions`
        self.decisions: Tensor | None = None  # this forward's per-sample decisions

    def rate_shape(self) -> tuple[int, ...]:
        return (self.units,)

    def pool(self, x: Tensor) -> Tensor:
        if self.feature_dim is None:
            return x.flatten(1)
        dims = [d for d in range(1, x.dim()) if d != self.feature_dim]
        if not dims:
            return x
        # a sum divided afterwards: mean's backward would divide the whole input gradient
        return x.sum(dim=dims) / math.prod(x.shape[d] for d in dims)

    def logits(self, pooled: Tensor) -> Tensor:
        if hasattr(self, "fc1"):
            pooled = self.relu(self.bn(self.fc1(pooled)))
        return self.fc2(pooled)

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        if self.fixed is not None:
            d = x.new_tensor(self.fixed, dtype=x.dtype).expand(batch, *self.rate_shape())
        else:
            if self.training and batch < 2:
                raise ValueError(
                    f"gate '{self.name}' got a batch of 1 in training mode; its BatchNorm1d "
                    "needs at least 2 samples. Train with larger batches, or call .eval()."
                )
            d = self.head(self.logits(self.pool(x)).reshape(batch, *self.rate_shape()))
            if self.training:
                self._track(d.detach())
        self.decisions = d
        return self.mask(d)

    def mask(self, d: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def _track(self, d: Tensor) -> None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # The global batch's open rate, so every rank keeps the same running rate.
            d = d.float()
            sum_count = torch.cat([d.sum(0).reshape(-1), d.new_tensor([len(d)])])
            dist.all_reduce(sum_count)
            rate = (sum_count[:-1] / sum_count[-1]).view(d.shape[1:])
        else:
            rate = d.float().mean(0)
        rate = rate.to(self.running_open_rate.dtype)
        self.num_batches_tracked += 1
        weight = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
        self.running_open_rate.lerp_(rate, weight)

    def __getstate__(self) -> dict[str, Any]:
        # `decisions` can hold autograd history, which deepcopy and pickle refuse.
        return {**self.__dict__, "decisions": None}


class LayerGate(Gate):
    """Decides, per sample, whether a residual branch runs: ``skip + g(x) * branch``.

    Paper Table 2: global average pool of the block input, Linear(C, 16), BatchNorm1d, ReLU,
    Linear(16, 1), head. ``fixed`` is None, True (open) or False (closed).
    """

    def __init__(
        self, name: str, channels: int, feature_dim: int | None, out_ndim: int, config: GateConfig
    ):
        super().__init__(name, channels, 1, feature_dim, out_ndim, 2, config)

    def rate_shape(self) -> tuple[int, ...]:
        return ()

    def mask(self, d: Tensor) -> Tensor:
        return d.view(d.shape[0], *([1] * (self.out_ndim - 1)))

    def extra_repr(self) -> str:
        fixed = "" if self.fixed is None else f", fixed={'open' if self.fixed else 'closed'}"
        return f"name={self.name!r}{fixed}"


class ChannelGate(Gate):
    """Decides, per sample and channel, which channels of a feature map pass.

    Paper Table 2: pool, then one Linear(C, C) (``fc_layers=1``) or Linear(C, 16),
    BatchNorm1d, ReLU, Linear(16, C) (``fc_layers=2``), head. The mask multiplies the gated
    tensor along `channel_dim`. ``fixed`` is None or a tuple of ``units`` booleans.

    Where a grouped conv produces or reads the channels, they come in `groups` equal groups
    and the gate decides per position within a group (``units = C / groups``): channel
    ``g * units + j`` follows decision ``j``, so every group keeps the same width.
    """

    def __init__(
        self,
        name: str,
        channels: int,
        channel_dim: int,
        out_ndim: int,
        position: str,
        block: str,
        fc_layers: int,
        config: GateConfig,
        groups: int = 1,
    ):
        units = channels // groups
        super().__init__(name, channels, units, channel_dim, out_ndim, fc_layers, config)
        self.channel_dim = channel_dim
        self.position = position  # a `fx.positions.POSITIONS` name: how surgery cuts it
        self.block = block  # the residual branch it belongs to
        self.groups = groups

    def channel_decisions(self, decisions: tuple[bool, ...]) -> tuple[bool, ...]:
        """One decision per unit, spread over every channel."""
        return tuple(decisions) * self.groups

    def mask(self, d: Tensor) -> Tensor:
        shape = [d.shape[0]] + [1] * (self.out_ndim - 1)
        shape[self.channel_dim] = self.units * self.groups
        return d.repeat(1, self.groups).view(shape)

    def extra_repr(self) -> str:
        fixed = "" if self.fixed is None else f", fixed={sum(self.fixed)}/{self.units} open"
        groups = f", groups={self.groups}" if self.groups > 1 else ""
        return f"name={self.name!r}, units={self.units}{groups}{fixed}"

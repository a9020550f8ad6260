"""The gating module: a tiny per-sample MLP on the pooled block input, ending in a binary head."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .config import GateConfig
from .heads import make_head


class LayerGate(nn.Module):
    """Decides, per sample, whether a residual branch runs: ``skip + g(x) * branch``.

    Paper Table 2: global average pool, Linear(C, 16), BatchNorm1d, ReLU, Linear(16, 1), head.
    During training it keeps a running open rate, like BatchNorm's running statistics;
    `consensus` reads it. `fix_decisions` can pin its output to open or closed.
    """

    def __init__(
        self, name: str, channels: int, feature_dim: int | None, out_ndim: int, config: GateConfig
    ):
        super().__init__()
        self.name = name
        self.feature_dim = feature_dim  # None: the input is already (B, C)
        self.out_ndim = out_ndim
        self.momentum = config.momentum
        self.fc1 = nn.Linear(channels, config.hidden)
        self.bn = nn.BatchNorm1d(config.hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(config.hidden, 1)
        nn.init.constant_(self.fc2.bias, config.init_bias)
        self.head = make_head(config)
        self.register_buffer("running_open_rate", torch.ones(()))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
        # Marginal fvcore FLOPs of the branch; -1 until `branch_costs` has measured it.
        self.register_buffer("branch_flops", torch.full((), -1, dtype=torch.long))
        self.fixed: bool | None = None
        self.decisions: Tensor | None = None  # this forward's per-sample decisions, (B,)

    def pool(self, x: Tensor) -> Tensor:
        if self.feature_dim is None:
            return x.flatten(1)
        dims = [d for d in range(1, x.dim()) if d != self.feature_dim]
        return x.mean(dim=dims) if dims else x

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        if self.fixed is not None:
            d = x.new_full((batch,), float(self.fixed))
        else:
            if self.training and batch < 2:
                raise ValueError(
                    f"gate '{self.name}' got a batch of 1 in training mode; its BatchNorm1d "
                    "needs at least 2 samples. Train with larger batches, or call .eval()."
                )
            logit = self.fc2(self.relu(self.bn(self.fc1(self.pool(x))))).squeeze(1)
            d = self.head(logit)
            if self.training:
                self._track(d.detach())
        self.decisions = d
        return d.view(batch, *([1] * (self.out_ndim - 1)))

    @torch.no_grad()
    def _track(self, d: Tensor) -> None:
        rate = d.float().mean().to(self.running_open_rate.dtype)
        self.num_batches_tracked += 1
        weight = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
        self.running_open_rate.lerp_(rate, weight)

    def __getstate__(self) -> dict[str, Any]:
        # `decisions` can hold autograd history, which deepcopy and pickle refuse.
        return {**self.__dict__, "decisions": None}

    def extra_repr(self) -> str:
        fixed = "" if self.fixed is None else f", fixed={'open' if self.fixed else 'closed'}"
        return f"name={self.name!r}{fixed}"

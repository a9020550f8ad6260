"""Gate heads: turn a real-valued logit into a binary decision with a usable gradient."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import GateConfig


class _StraightThrough(torch.autograd.Function):
    """Forward ``x > 0``; backward passes the gradient where ``|x| <= 1`` (hard-tanh STE)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def straight_through(x: Tensor) -> Tensor:
    return _StraightThrough.apply(x)


class SteHead(nn.Module):
    def forward(self, logit: Tensor) -> Tensor:
        return straight_through(logit)


class GumbelHead(nn.Module):
    """Binary concrete: a hard sample forward, the relaxed sample's gradient backward.
    In eval mode there is no noise and the decision is ``logit > 0``."""

    def __init__(self, tau: float):
        super().__init__()
        self.tau = tau

    def forward(self, logit: Tensor) -> Tensor:
        if not self.training:
            return (logit > 0).to(logit.dtype)
        u = torch.rand_like(logit).clamp_(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / self.tau)
        hard = (soft > 0.5).to(soft.dtype)
        return hard + (soft - soft.detach())  # exactly `hard` forward, soft gradient

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


class BernoulliHead(nn.Module):
    """Open when the logit is above its batch mean (per channel for channel gates), with a
    straight-through gradient. Eval mode compares with the running mean of the batch means,
    as BatchNorm does."""

    def __init__(self, momentum: float = 0.1, shape: tuple[int, ...] = ()):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(shape))

    def forward(self, logit: Tensor) -> Tensor:
        if self.training:
            mean = logit.mean(0)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        else:
            mean = self.running_mean
        return straight_through(logit - mean)


def make_head(config: GateConfig, shape: tuple[int, ...] = ()) -> nn.Module:
    """The head `config` names, for decisions of `shape` per sample."""
    if config.head == "gumbel":
        return GumbelHead(config.tau)
    if config.head == "bernoulli":
        return BernoulliHead(config.momentum or 0.1, shape)
    return SteHead()

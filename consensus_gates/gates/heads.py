"""Gate heads: turn a real-valued logit into a binary decision with a usable gradient.

Heads are found by name in `HEADS`, which `register_head` fills; `GateConfig.head` accepts
any registered name. A new head is one class::

    @register_head("sigmoid_ste")
    class SigmoidSteHead(GateHead):
        def forward(self, logit):
            return straight_through(torch.sigmoid(logit) - 0.5)

A head that needs settings reads them from the config in ``from_config(config, shape)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..config import GateConfig

HEADS: dict[str, type[nn.Module]] = {}  # name → head class, filled by `register_head`

H = TypeVar("H", bound=type[nn.Module])


def register_head(name: str) -> Callable[[H], H]:
    """Class decorator: make a head class available as ``GateConfig(head=name)``.

    The class is an `nn.Module` whose forward maps logits of shape ``(B, *shape)`` to
    decisions of the same shape (1 open, 0 closed), and whose classmethod
    ``from_config(config, shape)`` builds it (`GateHead` has one that calls ``cls()``).
    ValueError if `name` is taken: a registered head is never silently replaced.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a head name must be a non-empty string, got {name!r}")

    def register(cls: H) -> H:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_head({name!r}) decorates an nn.Module class, got {cls!r}")
        if not callable(getattr(cls, "from_config", None)):
            raise TypeError(
                f"head {cls.__qualname__} needs a classmethod from_config(config, shape); "
                "subclass consensus_gates.gates.GateHead for one that calls cls()"
            )
        if name in HEADS:
            raise ValueError(
                f"a gate head named {name!r} is already registered ({HEADS[name].__qualname__})"
            )
        HEADS[name] = cls
        return cls

    return register


def make_head(config: GateConfig, shape: tuple[int, ...] = ()) -> nn.Module:
    """The head `config` names, for decisions of `shape` per sample."""
    cls = HEADS.get(config.head)
    if cls is None:
        raise ValueError(f"no gate head named {config.head!r}; registered: {tuple(HEADS)}")
    return cls.from_config(config, shape)


class GateHead(nn.Module):
    """Base class of the heads: builds itself with no arguments."""

    @classmethod
    def from_config(cls, config: GateConfig, shape: tuple[int, ...]) -> GateHead:
        return cls()


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


@register_head("ste")
class SteHead(GateHead):
    """Open where the logit is positive, with the hard-tanh straight-through gradient."""

    def forward(self, logit: Tensor) -> Tensor:
        return straight_through(logit)


@register_head("gumbel")
class GumbelHead(GateHead):
    """Binary concrete: a hard sample forward, the relaxed sample's gradient backward.
    In eval mode there is no noise and the decision is ``logit > 0``."""

    def __init__(self, tau: float):
        super().__init__()
        self.tau = tau

    @classmethod
    def from_config(cls, config: GateConfig, shape: tuple[int, ...]) -> GumbelHead:
        return cls(config.tau)

    def forward(self, logit: Tensor) -> Tensor:
        if not self.training:
            return (logit > 0).to(logit.dtype)
        u = torch.rand_like(logit).clamp_(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / self.tau)
        hard = (soft > 0.5).to(soft.dtype)
        return hard + (soft - soft.detach())  # exactly `hard` forward, soft gradient

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


@register_head("bernoulli")
class BernoulliHead(GateHead):
    """Open when the logit is above its batch mean (per channel for channel gates), with a
    straight-through gradient. Eval mode compares with the running mean of the batch means,
    as BatchNorm does, updated with `momentum` (`GateConfig.bernoulli_momentum`)."""

    def __init__(self, momentum: float = 0.1, shape: tuple[int, ...] = ()):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(shape))

    @classmethod
    def from_config(cls, config: GateConfig, shape: tuple[int, ...]) -> BernoulliHead:
        return cls(config.bernoulli_momentum, shape)

    def forward(self, logit: Tensor) -> Tensor:
        if self.training:
            mean = logit.mean(0)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        else:
            mean = self.running_mean
        return straight_through(logit - mean)

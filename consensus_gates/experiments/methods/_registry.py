"""The method registry: what a method is given, what it returns, and `register_method`.

A method is a function from a `RunContext` to a `MethodResult`, registered under the name a
study's ``method`` key gives, with its options: a frozen dataclass whose fields are the
method's own study keys (``finetune_epochs``, ``density_scale``, ...), their types the TOML
types accepted, checked in its ``__post_init__``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor, nn
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from ..config import RunConfig

TargetRule = Literal["required", "optional", "refused"]
# the metadata of an option a study may give as a list: one run per value, as with `targets`
SWEEP = {"sweep": True}


@dataclass(frozen=True)
class MethodOptions:
    """A method's own settings. Subclass it as a frozen dataclass; each field is a study key
    of the method (a bool, int, float, str, a Literal of them, a tuple, or one of these or
    None) with a default, checked in ``__post_init__``. A field with ``metadata=SWEEP`` may
    be given as a list in a study, one run per value. Methods without settings use this
    class itself."""

    def check(self, run: RunConfig) -> None:
        """Check the options against the rest of the run (its epochs, say); raise ValueError."""

    @property
    def setting(self) -> str:
        """What tells apart runs of one label that have no target: a sweep's value."""
        return ""


@dataclass
class RunContext:
    """What a method works with. `model` is freshly built and untrained, on the run's
    device, as is `example_inputs` (a batch of 2); methods may train and prune it in place.
    ``run.train.seed`` is `seed`. Training outputs (metrics.jsonl, gates.png) of our gates
    go to `work_dir`."""

    run: RunConfig
    seed: int
    model: nn.Module
    train_loader: DataLoader
    example_inputs: Tensor
    cache_dir: Path
    work_dir: Path
    log: Callable[[str], None] = print
    # what `fit` and `dense_model` spent, a reused dense training included: the trainer's
    # count, 3 x the training model's forward FLOPs per sample
    train_flops: float = 0.0

    @property
    def options(self) -> Any:
        """The run's options: an instance of the method's options class."""
        return self.run.options


@dataclass
class MethodResult:
    """The final model and how it was obtained.

    Attributes:
        epochs: training epochs spent in all, those of a reused (cached) model included.
        reused_seconds: training time of cached models this run reused, not spent again.
        flops_ratio, params_ratio: set when the model's dense count is not its cost (random
            weight dropping: the ratios as if zeros were skipped).
        extra: method-specific numbers for the results (R_polar, open ratio, ...).
    """

    model: nn.Module
    epochs: int
    reused_seconds: float = 0.0
    flops_ratio: float | None = None
    params_ratio: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered method: its function, whether a run of it takes a FLOPs target, the
    class of its options, and whether it trains a gated model (`gates`)."""

    name: str
    fn: Callable[[RunContext], MethodResult]
    target: TargetRule
    options: type[MethodOptions] = MethodOptions
    gates: bool = False

    def __call__(self, ctx: RunContext) -> MethodResult:
        return self.fn(ctx)


METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    *,
    target: TargetRule,
    options: type[MethodOptions] = MethodOptions,
    gates: bool = False,
) -> Callable[[Callable[[RunContext], MethodResult]], Callable[[RunContext], MethodResult]]:
    """Register the decorated function as the method `name` of studies.

    Args:
        target: ``"required"``: every run names a FLOPs target; ``"optional"``; ``"refused"``:
            the method's size is set otherwise (by an option, say).
        options: the method's options class, a frozen dataclass subclassing `MethodOptions`.
        gates: the method trains a gated model, so the train keys that only gated training
            knows (``progressive``, ``settle_steps``) reach its runs from ``[base.train]``;
            a method without gates gets them at their defaults.
    """
    if target not in ("required", "optional", "refused"):
        raise ValueError(f"target must be 'required', 'optional' or 'refused', got {target!r}")
    params = vars(options).get("__dataclass_params__") if isinstance(options, type) else None
    if not (params and params.frozen and issubclass(options, MethodOptions)):
        raise TypeError(
            f"options must be a class decorated @dataclass(frozen=True) that subclasses "
            f"MethodOptions, got {options!r}"
        )

    try:
        options()  # what a run of the method gets when a study sets none of its keys
    except (TypeError, ValueError) as e:
        raise TypeError(f"{options.__name__}(): every option needs a valid default ({e})") from e

    def register(fn: Callable[[RunContext], MethodResult]) -> Callable[[RunContext], MethodResult]:
        if name in METHODS:
            raise ValueError(f"a method named {name!r} is registered already")
        METHODS[name] = Method(name, fn, target, options, gates)
        return fn

    return register

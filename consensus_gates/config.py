"""`GateConfig`: how gates are built. One small dataclass, as in torchao's configs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Head = Literal["ste", "gumbel", "bernoulli"]
HEADS = ("ste", "gumbel", "bernoulli")


@dataclass(frozen=True)
class GateConfig:
    """How `insert_gates` builds each gate.

    Attributes:
        mode: ``"layer"``: one gate per residual branch (paper Table 2).
        head: how a logit becomes a binary decision: ``"ste"`` (straight-through),
            ``"gumbel"`` (binary concrete, hard forward, soft gradient) or ``"bernoulli"``
            (open when the logit is above the batch mean).
        hidden: width of the gate MLP: Linear(C, hidden), BatchNorm1d, ReLU, Linear(hidden, 1).
        tau: Gumbel temperature.
        init_bias: initial bias of the last Linear; positive values start gates open.
        momentum: weight of each batch in the running open rate (as in BatchNorm);
            ``None`` keeps a cumulative average.
        exclude: fnmatch patterns of gate names to leave ungated, e.g. ``("layer1.*",)``.
    """

    mode: Literal["layer"] = "layer"
    head: Head = "ste"
    hidden: int = 16
    tau: float = 1.0
    init_bias: float = 0.5
    momentum: float | None = 0.1
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.mode != "layer":
            raise ValueError(f"GateConfig.mode must be 'layer', got {self.mode!r}")
        if self.head not in HEADS:
            raise ValueError(f"GateConfig.head must be one of {HEADS}, got {self.head!r}")
        if self.hidden < 1:
            raise ValueError(f"GateConfig.hidden must be >= 1, got {self.hidden}")
        if self.tau <= 0:
            raise ValueError(f"GateConfig.tau must be > 0, got {self.tau}")
        if self.momentum is not None and not 0 < self.momentum <= 1:
            raise ValueError(f"GateConfig.momentum must be in (0, 1] or None, got {self.momentum}")
        exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        object.__setattr__(self, "exclude", exclude)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateConfig:
        return cls(**d)

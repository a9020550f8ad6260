"""`GateConfig`: how gates are built. One small dataclass, as in torchao's configs.

The names it accepts for ``head`` and ``position`` are those registered in
`gates.heads.HEADS` (`register_head`) and `fx.positions.POSITIONS` (`register_position`) when
a config is made.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .fx.positions import POSITIONS
from .gates.heads import HEADS

Mode = Literal["layer", "channel", "both"]
MODES = ("layer", "channel", "both")
GRANULARITIES = ("branch", "layer")


def _check_name(field_name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"GateConfig.{field_name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class GateConfig:
    """How `insert_gates` builds each gate.

    Attributes:
        mode: ``"layer"``: one gate per residual branch; ``"channel"``: gates that decide per
            channel (paper Table 2); ``"both"``: both kinds on the same blocks.
        position: where channel gates sit: ``"middle"``: the block's internal widths (each
            conv's or linear's output that feeds another conv/linear inside the branch);
            ``"after"``: the branch output, before the residual add; ``"before"``: the block
            input as the branch sees it; or a position added with `register_position`.
        fc_layers: 1 (Linear(C, C)) or 2 (Linear(C, hidden), BN, ReLU, Linear(hidden, C))
            for channel gates. Layer gates always use the paper's two.
        head: how a logit becomes a binary decision: ``"ste"`` (straight-through),
            ``"gumbel"`` (binary concrete, hard forward, soft gradient), ``"bernoulli"``
            (open when the logit is above the batch mean) or a head added with
            `register_head`.
        hidden: width of the gate MLP: Linear(C, hidden), BatchNorm1d, ReLU, Linear(hidden, 1).
        tau: Gumbel temperature.
        init_bias: initial bias of the last Linear; positive values start gates open.
        momentum: weight of each batch in the running open rate (as in BatchNorm);
            ``None`` keeps a cumulative average.
        exclude: fnmatch patterns of gate names to leave ungated, e.g. ``("layer1.*",)``.
        bernoulli_momentum: weight of each batch in the Bernoulli head's running mean of
            the logits, which eval mode compares with; in (0, 1].
        granularity: for Hugging Face models, what one layer gate decides: ``"branch"``,
            each residual branch of a layer (attention, MLP); ``"layer"``, the whole layer
            (ShortGPT's unit), so that a cut only ever removes whole layers and
            `hf.to_transformers` can write it as the original class.
    """

    mode: Mode = "layer"
    position: str = "middle"
    fc_layers: int = 1
    head: str = "ste"
    hidden: int = 16
    tau: float = 1.0
    init_bias: float = 0.5
    momentum: float | None = 0.1
    exclude: tuple[str, ...] = field(default_factory=tuple)
    bernoulli_momentum: float = 0.1
    granularity: str = "branch"

    def __post_init__(self) -> None:
        for name in ("fc_layers", "hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"GateConfig.{name} must be an integer, got {v!r}")
        for name in ("tau", "init_bias", "momentum", "bernoulli_momentum"):
            v = getattr(self, name)
            if v is None and name == "momentum":
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"GateConfig.{name} must be a finite number, got {v!r}")
        exclude = (self.exclude,) if isinstance(self.exclude, str) else self.exclude
        if not isinstance(exclude, (tuple, list)) or not all(isinstance(p, str) for p in exclude):
            raise ValueError(f"GateConfig.exclude takes name patterns (str), got {self.exclude!r}")
        _check_name("mode", self.mode, MODES)
        _check_name("position", self.position, tuple(POSITIONS))
        if self.fc_layers not in (1, 2):
            raise ValueError(f"GateConfig.fc_layers must be 1 or 2, got {self.fc_layers}")
        _check_name("head", self.head, tuple(HEADS))
        _check_name("granularity", self.granularity, GRANULARITIES)
        if self.hidden < 1:
            raise ValueError(f"GateConfig.hidden must be >= 1, got {self.hidden}")
        if self.tau <= 0:
            raise ValueError(f"GateConfig.tau must be > 0, got {self.tau}")
        if self.momentum is not None and not 0 < self.momentum <= 1:
            raise ValueError(f"GateConfig.momentum must be in (0, 1] or None, got {self.momentum}")
        if not 0 < self.bernoulli_momentum <= 1:
            raise ValueError(
                f"GateConfig.bernoulli_momentum must be in (0, 1], got {self.bernoulli_momentum}"
            )
        object.__setattr__(self, "exclude", tuple(exclude))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateConfig:
        """The config `to_dict` wrote; ValueError for a key that is not a field.

        A dict without ``bernoulli_momentum`` comes from before that field, when the
        Bernoulli head used ``momentum or 0.1``; it keeps that value.
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"GateConfig has no field {unknown}; its fields are {names}")
        if "bernoulli_momentum" not in d:
            d = {**d, "bernoulli_momentum": d.get("momentum", 0.1) or 0.1}
        return cls(**d)

"""The training recipe (`TrainConfig`) and its validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from ..losses import CHANNEL_TERMS

SCHEDULES = ("constant", "step", "warmup")


# TrainConfig's number fields (target and target_ramp may be None), and those that may be 0
_NON_NEGATIVE = ("momentum", "weight_decay", "lambda_polar", "lambda_act", "controller_kp",
                 "controller_ki", "lambda_act_max")  # fmt: skip


_NUMBERS = ("lr", "lr_gamma", "target", "target_ramp", *_NON_NEGATIVE)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; defaults are the paper's (SGD 0.1, momentum 0.9, weight decay
    5e-4, learning rate divided by 10 at each milestone, the "λ↑" schedule).

    Attributes:
        epochs: how many epochs to train (a resumed run trains up to this many in all).
        optimizer: ``"sgd"``, the paper's (SGD with `momentum`), or ``"adamw"`` (AdamW with
            its default betas), the usual choice for fine-tuning a transformer.
        lr: the optimizer's initial learning rate.
        momentum: SGD's momentum.
        weight_decay: the optimizer's weight decay (an L2 penalty on every parameter, gates too).
        milestones: epochs at which the learning rate is multiplied by `lr_gamma`; None: at
            1/2 and 3/4 of the epochs.
        lr_gamma: the factor the learning rate is multiplied by at each milestone.
        lambda_polar: the weight of the polarization loss, as `polar_schedule` applies it.
        polar_schedule: λ_polar over epochs. ``"constant"``: `lambda_polar` throughout;
            ``"step"`` (paper's λ↑): 0 until epoch a, `lambda_polar` until b, then 1.5 ×
            `lambda_polar` (0, 2, 3 with the default 2); ``"warmup"``: rises linearly from
            0 to `lambda_polar` over `warmup_epochs`.
        polar_steps: (a, b) for ``"step"``; None: the paper's 125 and 190 of 300 epochs,
            scaled to `epochs`.
        warmup_epochs: the epochs over which ``"warmup"`` raises λ_polar.
        channel_polarizer: how a channel gate's polarization terms combine. ``"mean"``: eq. 8,
            the paper's, the mean over its channels, so each channel is pulled 1/C as hard
            as a layer gate; ``"sum"``: the sum, each channel pulled as hard as a layer gate
            (`polarization_loss`). Records' ``r_polar`` is eq. 8's value either way.
        lambda_act: λ_act, the weight of the activation loss; not used with a `target`.
        act_weight: ``"flops"`` weighs each gate by the FLOPs it controls, ``"uniform"``
            counts gates equally (eq. 10).
        target: a sparsity target. With ``target_kind="flops"``, the sub-network's FLOPs as
            a fraction of the original's; with ``"open"``, the fraction of gate units kept.
            A PI controller then sets λ_act after every step (from 0, within
            ±`lambda_act_max`; `lambda_act` is not used), following a setpoint that moves
            from 1 to the target over the first `target_ramp` of the steps.
        projection: with a `target`, round the gates onto it once the setpoint's ramp is
            over and λ_polar has risen above 0 (at the first such step): every gate unit is
            ranked by its running open rate, the top ones are kept, as many as bring the
            sub-network closest to the target (`project_to_budget`), and every gate is
            pinned to that decision for the rest of the run (with `progressive`, the layer
            gates are cut at once). False: the paper's way, the controller steers λ_act to
            the end and polarization does the rounding, which missed targets by up to 0.23
            of the FLOPs (docs/training.md).
        target_kind: what `target` is a fraction of: ``"flops"``, the original FLOPs, or
            ``"open"``, the gate units.
        controller_kp, controller_ki: the controller's proportional gain and its integral
            gain per step (`SparsityController`).
        target_ramp: the share of the steps over which the controller's setpoint moves from
            1 to `target`; None: three quarters of the epochs before λ_polar first rises
            above 0 (a quarter of the training if it never is 0). Polarized gates stop learning (an
            STE passes no gradient far from 0), so the ramp should end before they polarize.
        lambda_act_max: the bound on λ_act that the controller keeps within, either sign.
        seed: seeds the torch and Python RNGs when training starts (a resumed run restores
            its saved RNG states instead).
        progress: show a progress bar of each epoch's steps (on rank 0).
        progressive: cut decided gates out of the model while it trains
            (`training.progressive`), and go on with the smaller network: with a target,
            every gate at the projection (closed blocks and channels with them); before it,
            or without a target, a layer gate that made the same decision for every sample
            of `settle_steps` consecutive steps, all while λ_polar > 0 (a closed one with
            its branch).
        settle_steps: how many consecutive unanimous steps settle a gate, for `progressive`.
            20 (2,560 samples at batch 128) cut ResNet-20's gates half an epoch sooner than
            50 did on Fashion-MNIST, at the same accuracy (docs/training.md).
    """

    epochs: int = 10
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] | None = None
    lr_gamma: float = 0.1
    lambda_polar: float = 2.0
    polar_schedule: Literal["constant", "step", "warmup"] = "step"
    polar_steps: tuple[int, int] | None = None
    warmup_epochs: int = 1
    channel_polarizer: Literal["mean", "sum"] = "mean"
    lambda_act: float = 0.5
    act_weight: Literal["uniform", "flops"] = "flops"
    target: float | None = None
    target_kind: Literal["flops", "open"] = "flops"
    projection: bool = True
    controller_kp: float = 4.0
    controller_ki: float = 0.05
    target_ramp: float | None = None
    lambda_act_max: float = 10.0
    seed: int = 0
    progress: bool = True
    progressive: bool = False
    settle_steps: int = 20

    def __post_init__(self) -> None:
        for name in _NUMBERS:
            v = getattr(self, name)
            if v is not None and not (_is_number(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        for name in ("epochs", "warmup_epochs", "seed", "settle_steps"):
            if not _is_number(getattr(self, name), int):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.settle_steps < 1:
            raise ValueError(f"settle_steps must be >= 1, got {self.settle_steps}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.polar_schedule not in SCHEDULES:
            raise ValueError(
                f"polar_schedule must be one of {SCHEDULES}, got {self.polar_schedule!r}"
            )
        if self.channel_polarizer not in CHANNEL_TERMS:
            raise ValueError(
                f"channel_polarizer must be 'mean' (eq. 8) or 'sum', got "
                f"{self.channel_polarizer!r}"
            )
        if self.act_weight not in ("uniform", "flops"):
            raise ValueError(f"act_weight must be 'uniform' or 'flops', got {self.act_weight!r}")
        if self.target_kind not in ("flops", "open"):
            raise ValueError(f"target_kind must be 'flops' or 'open', got {self.target_kind!r}")
        if self.target is not None and not 0 < self.target <= 1:
            raise ValueError(f"target must be in (0, 1], got {self.target}")
        if self.target_ramp is not None and not 0 <= self.target_ramp <= 1:
            raise ValueError(f"target_ramp must be in [0, 1], got {self.target_ramp}")
        if self.milestones is not None and not _epochs(self.milestones, strict=True, least=1):
            raise ValueError(
                f"milestones must be increasing epochs >= 1 such as (30, 60), got {self.milestones}"
            )
        steps = self.polar_steps
        if steps is not None and not (_epochs(steps, strict=False, least=0) and len(steps) == 2):
            raise ValueError(f"polar_steps must be (a, b) with 0 <= a <= b, got {steps}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.lr <= 0 or self.lr_gamma <= 0:
            raise ValueError(f"lr must be > 0 and lr_gamma > 0, got {self.lr}, {self.lr_gamma}")
        negative = [n for n in _NON_NEGATIVE if getattr(self, n) < 0]
        if negative:
            values = ", ".join(f"{n}={getattr(self, n)}" for n in negative)
            raise ValueError(f"{' and '.join(negative)} must be >= 0, got {values}")

    def lr_milestones(self) -> list[int]:
        if self.milestones is not None:
            return list(self.milestones)
        return sorted({self.epochs // 2, self.epochs * 3 // 4} - {0})

    def ramp_fraction(self) -> float:
        """`target_ramp`, or its default: the share of epochs before polarization starts."""
        if self.target_ramp is not None:
            return self.target_ramp
        first = next((e for e in range(self.epochs) if self.lambda_polar_at(e) > 0), 0)
        # end early enough that the controller settles before the gates polarize
        return 0.75 * first / self.epochs if first > 0 else 0.25

    def lambda_polar_at(self, epoch: int) -> float:
        """λ_polar for a 0-based epoch."""
        lam = self.lambda_polar
        if self.polar_schedule == "constant":
            return lam
        if self.polar_schedule == "warmup":
            return lam * min(1.0, (epoch + 1) / max(self.warmup_epochs, 1))
        a, b = self.polar_steps or (self.epochs * 125 // 300, self.epochs * 190 // 300)
        return 0.0 if epoch < a else lam if epoch < b else 1.5 * lam


def _is_number(value: Any, types: tuple[type, ...] | type) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)


def _epochs(values: Any, *, strict: bool, least: int) -> bool:
    """Whether `values` is a sequence of integer epochs >= `least`, each greater than the
    last (`strict`) or at least as great."""
    if not isinstance(values, tuple | list) or not all(_is_number(v, int) for v in values):
        return False
    pairs = zip(values, values[1:], strict=False)
    return all(v >= least for v in values) and all(a < b or a == b and not strict
                                                   for a, b in pairs)  # fmt: skip

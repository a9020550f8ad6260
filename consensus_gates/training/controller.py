"""The sparsity controller: λ_act steered towards a sparsity target."""

from __future__ import annotations

import torch

from ..cost import expected_flops_ratio, flops_ratio
from ..fx.graph_module import GatedModel
from .config import TrainConfig


class SparsityController:
    """Proportional-integral control of λ_act towards a sparsity target.

    Closed gates saturate and stop learning (the STE passes no gradient far from 0), so the
    sub-network must approach the target from above, never overshoot it. The setpoint
    therefore moves from the full network (1.0) down to the target over the first
    `ramp_fraction` of the training steps. After each step, with the error ``e`` = the size
    the running open rates describe minus the setpoint, λ_act = kp·e + ki·Σe: positive
    while the sub-network is too large, negative (holding gates open) while too small.
    """

    def __init__(self, model: GatedModel, config: TrainConfig, total_steps: int):
        self.model, self.config = model, config
        self.lam, self.integral, self.steps = 0.0, 0.0, 0
        self.ramp_steps = max(1, round(config.ramp_fraction() * total_steps))
        if config.target_kind == "flops":
            flops_ratio(model)  # measures each gate's FLOPs, once

    def setpoint(self) -> float:
        target = self.config.target
        return 1 - (1 - target) * min(1.0, self.steps / self.ramp_steps)

    def current(self) -> float:
        """The sub-network size now (FLOPs ratio or kept fraction), from the running rates."""
        if self.config.target_kind == "flops":
            return expected_flops_ratio(self.model)
        rates = [g.running_open_rate.float().mean() for g in self.model.gates.values()]
        return float(torch.stack(rates).mean())

    def step(self) -> float:
        self.steps += 1
        error = self.current() - self.setpoint()
        c, limit = self.config, self.config.lambda_act_max
        self.integral += error
        if c.controller_ki > 0:  # anti-windup: the integral term alone stays within the limit
            bound = limit / c.controller_ki
            self.integral = min(max(self.integral, -bound), bound)
        lam = c.controller_kp * error + c.controller_ki * self.integral
        self.lam = min(max(lam, -limit), limit)
        return self.lam

    def state_dict(self) -> dict[str, float]:
        return {"lam": self.lam, "integral": self.integral, "steps": self.steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.lam, self.integral, self.steps = state["lam"], state["integral"], int(state["steps"])

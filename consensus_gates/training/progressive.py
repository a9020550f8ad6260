"""Progressive surgery: cut settled layer gates out of the model while it trains.

Once λ_polar is above 0, `SettleTracker` counts, for each layer gate, the consecutive steps
on which every sample of the global batch got the same decision. A gate unanimous for
``settle_steps`` steps in a row is settled: `cut_settled` removes it with `fx.cut.cut_gates`
(a closed gate with its branch, an open one leaving its branch ungated) and drops the
removed parameters from the optimizer, whose other state (momentum) carries on untouched.

Why unanimity over a window: a gate whose batch mean is exactly 0 or 1 on every step gets
no polarization gradient and, with the STE head far from 0, none from the task either, so
it would not move; the window guards against a gate that only passes through 0 or 1. A
cut gate cannot reopen: what its branch might still have learned is lost, which is why
nothing is cut before polarization starts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..fx.cut import cut_gates
from ..fx.graph_module import GatedModel
from ..gates.modules import LayerGate


class SettleTracker:
    """Consecutive unanimous steps per layer gate, and the decision they agreed on."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.runs: dict[str, int] = {}
        self.values: dict[str, bool] = {}

    def update(self, gated: GatedModel, world: int = 1) -> dict[str, bool]:
        """Count this step's decisions (the gates' last forward pass, over all processes);
        return the gates settled now, with their decisions."""
        gates = [g for g in gated.gates.values() if isinstance(g, LayerGate)]
        if not gates:
            return {}
        sums = torch.stack([g.decisions.detach().float().sum() for g in gates])
        count = torch.tensor(float(gates[0].decisions.shape[0]), device=sums.device)
        totals = torch.cat([sums, count[None]])
        if world > 1:
            dist.all_reduce(totals)
        sums, count = totals[:-1].tolist(), totals[-1].item()
        settled = {}
        for gate, s in zip(gates, sums, strict=True):
            unanimous = s == 0 or s == count
            value = s == count
            if unanimous and self.values.get(gate.name) == value:
                self.runs[gate.name] += 1
            else:
                self.runs[gate.name] = int(unanimous)
                self.values[gate.name] = value
            if self.runs[gate.name] >= self.window:
                settled[gate.name] = value
        return settled

    def forget(self, names: list[str]) -> None:
        for name in names:
            self.runs.pop(name, None)
            self.values.pop(name, None)

    def state_dict(self) -> dict[str, Any]:
        return {"runs": dict(self.runs), "values": dict(self.values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.runs, self.values = dict(state["runs"]), dict(state["values"])


def cut_settled(
    gated: GatedModel, optimizer: torch.optim.Optimizer, decisions: dict[str, bool]
) -> list[str]:
    """Cut the settled gates out of `gated` in place; the optimizer forgets the removed
    parameters and keeps every other one's state. Returns the names of the gates removed."""
    removed = cut_gates(gated, decisions)
    keep_only(optimizer, {id(p) for p in gated.parameters()})
    return removed


def keep_only(optimizer: torch.optim.Optimizer, alive: set[int]) -> None:
    """Drop from `optimizer` every parameter whose id is not in `alive`, with its state."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in alive:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if id(p) in alive]

"""Progressive surgery: cut settled gates out of the model while it trains.

Once λ_polar is above 0, `SettleTracker` counts, for each layer gate, the consecutive steps
on which every sample of the global batch got the same decision. A gate unanimous for
``settle_steps`` steps in a row is settled: `cut_settled` removes it with `fx.cut.cut_gates`
(a closed gate with its branch, an open one leaving its branch ungated) and drops the
removed parameters from the optimizer, whose other state (momentum) carries on untouched.
Channel gates are cut when the projection onto a target decides every gate at once
(`TrainConfig.projection`): their closed channels are cut out of the layers, and the
optimizer's state of those layers is sliced to match.

Why unanimity over a window: a gate whose batch mean is exactly 0 or 1 on every step gets
no polarization gradient and, with the STE head far from 0, none from the task either, so
it would not move; the window guards against a gate that only passes through 0 or 1. A
cut gate cannot reopen: what its branch might still have learned is lost, which is why
nothing is cut before polarization starts."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..consensus import normalize_decision
from ..fx.cut import cut_gates
from ..fx.graph_module import GatedModel
from ..gates.modules import ChannelGate, LayerGate


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
    gated: GatedModel, optimizer: torch.optim.Optimizer, decisions: dict[str, Any]
) -> list[str]:
    """Cut the settled gates out of `gated` in place; the optimizer forgets the removed
    parameters, keeps every other one's state, and, where channels were cut out of a
    parameter, goes on with the new tensor and the same slice of its state (momentum, Adam's
    moments). Returns the names of the gates removed."""
    channels = any(isinstance(gated.gates[n], ChannelGate) for n in decisions)
    kept = _kept_elements(gated, decisions) if channels else {}
    before = dict(gated.named_parameters())
    removed = cut_gates(gated, decisions)
    for name, new in gated.named_parameters():
        old = before.get(name)
        if old is not None and old is not new:
            _replace(optimizer, old, new, kept.get(name))
    keep_only(optimizer, {id(p) for p in gated.parameters()})
    return removed


def _kept_elements(gated: GatedModel, decisions: dict[str, Any]) -> dict[str, torch.Tensor]:
    """For each parameter, the flat indices of its elements that the cut keeps: the same cut
    on a twin whose parameters hold their own element indices. Exact in float32 below 2**24
    elements; a larger or lower-precision parameter gets None (its state starts afresh)."""
    twin = copy.deepcopy(gated)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(torch.arange(p.numel(), dtype=torch.float64).view_as(p))
    cut_gates(twin, decisions)
    originals = dict(gated.named_parameters())
    out = {}
    for name, p in twin.named_parameters():
        original = originals.get(name)
        exact = (
            original is not None
            and original.numel() < 2**24
            and p.dtype in (torch.float32, torch.float64)
        )
        if exact and torch.isfinite(p).all() and p.min() >= 0 and p.max() < original.numel():
            out[name] = p.detach().long()
    return out


def _replace(optimizer: torch.optim.Optimizer, old: torch.Tensor, new: torch.Tensor,
             index: torch.Tensor | None) -> None:  # fmt: skip
    """`new` takes `old`'s place in the optimizer, with the slice `index` (flat indices into
    `old`, shaped like `new`) of its per-element state; without `index`, no state."""
    state = optimizer.state.pop(old, {})
    carried = {}
    for key, value in state.items():
        if not torch.is_tensor(value) or value.dim() == 0:
            carried[key] = value  # a step count
        elif index is not None and value.shape == old.shape and index.shape == new.shape:
            carried[key] = value.reshape(-1)[index.reshape(-1).to(value.device)].view_as(new)
    if carried and len(carried) == len(state):
        optimizer.state[new] = carried
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]


def keep_only(optimizer: torch.optim.Optimizer, alive: set[int]) -> None:
    """Drop from `optimizer` every parameter whose id is not in `alive`, with its state."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in alive:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if id(p) in alive]


def pin_gates(gated: GatedModel, decisions: Mapping[str, Any]) -> None:
    """Pin gates to `decisions` (name → decision) for the rest of the run: each decides so
    for every sample, its running open rate says so too (the consensus reads it), and its
    parameters take no gradient, so that DistributedDataParallel waits for none."""
    for name, value in decisions.items():
        gate = gated.gates[name]
        gate.fixed = normalize_decision(gate, value)
        rate = torch.tensor(gate.fixed, dtype=gate.running_open_rate.dtype)
        gate.running_open_rate.copy_(rate.view_as(gate.running_open_rate))
        gate.requires_grad_(False)

"""Step 5: the consensus that meets a budget, ranked by the gates' running open rates.

Polarization rounds each gate to the side its open rate is nearer, and the sum of those
roundings drifts from any target: 0.59 of the FLOPs for a target of 0.5 at 12 epochs, 0.93
for 0.7 at 4 (docs/training.md). `project_to_budget` rounds with the budget in view
instead: every gate unit (a layer gate, or one channel of a channel gate) is ranked by its
running open rate, and the units ranked highest stay open, as many as bring the sub-network
closest to the target. Training with a target projects once, when the controller's ramp is
over and λ_polar has risen (`TrainConfig.projection`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from .consensus import kept_fraction
from .cost import flops_ratio
from .fx.graph_module import require_gated
from .gates.modules import ChannelGate, LayerGate

Decision = bool | tuple[bool, ...]
SWAPPED = 3  # layer gates each side of the cut tried in every combination (64 in all)
# sizes closer than this count as equally close, and the better-ranked units win: ResNet-20's
# blocks differ by less (elementwise ops on more or fewer elements), and 0.358 vs 0.355 of
# the FLOPs must not keep a block the gates rank 7th over one they rank 2nd
TIE = 0.005


def project_to_budget(
    model: nn.Module, target: float, kind: Literal["flops", "open"] = "flops"
) -> dict[str, Decision]:
    """Decisions for every gate of `model` that bring its sub-network closest to `target`,
    keeping the units the running open rates rank highest: of sub-networks within `TIE`
    of the closest, the one whose units' running open rates sum highest.

    Args:
        model: a model from `insert_gates`.
        target: with ``kind="flops"``, the FLOPs as a fraction of the original model's (the
            `flops_ratio` estimate); with ``"open"``, the mean fraction of each gate's units
            kept (`Consensus.open_ratio`).
        kind: what `target` is a fraction of.

    The units are opened in rank order up to the target. A layer gate's block is a big
    step, so around where that ends the choice is refined: the layer gates ranked nearest
    the cut are tried in every combination (blocks differ in cost), and channels close the
    gap, the next-ranked ones opened below it or the lowest-ranked open ones closed above
    it. A channel gate inside a closed layer gate's branch is decided open: its channels go
    with the branch, and counting them closed as well would count their FLOPs twice. With
    layer gates alone the result is off by at most half a block's share of the FLOPs (0.11
    in ResNet-20), usually less; with channel gates, by about a channel's.
    """
    if not (isinstance(target, int | float) and not isinstance(target, bool) and 0 < target <= 1):
        raise ValueError(f"target must be a number in (0, 1], got {target!r}")
    if kind not in ("flops", "open"):
        raise ValueError(f"kind must be 'flops' or 'open', got {kind!r}")
    gated = require_gated(model)
    if not gated.gates:
        raise ValueError("the model has no gates left to decide (all were cut while training)")
    budget = _Budget(gated, target, kind)
    return budget.decisions(budget.best(budget.candidates()))


Unit = tuple[str, int]  # a gate's name and the index of one of its units


class _Budget:
    """The search: gate units ranked by running open rate, sub-networks sized by them."""

    def __init__(self, gated, target: float, kind: str):
        self.gated, self.gates, self.target, self.kind = gated, gated.gates, target, kind
        units = [(name, i) for name, g in self.gates.items() for i in range(max(g.units, 1))]
        rates = torch.cat([g.running_open_rate.detach().float().cpu().reshape(-1)
                           for g in self.gates.values()])  # fmt: skip
        order = torch.sort(rates, descending=True, stable=True).indices  # ties: gate order
        self.ranked = [units[j] for j in order.tolist()]
        self.rates = dict(zip(units, rates.tolist(), strict=True))

    def decisions(self, opened: list[Unit]) -> dict[str, Decision]:
        keep = set(opened)
        out: dict[str, Decision] = {}
        for name, g in self.gates.items():
            if isinstance(g, ChannelGate):
                out[name] = tuple((name, i) in keep for i in range(g.units))
            else:
                out[name] = (name, 0) in keep
        if self.kind == "flops":  # a closed branch takes its channel gates with it
            for name, g in self.gates.items():
                if isinstance(g, ChannelGate) and out.get(g.block) is False:
                    out[name] = (True,) * g.units
        return out

    def size(self, opened: list[Unit]) -> float:
        d = self.decisions(opened)
        if self.kind == "flops":
            return flops_ratio(self.gated, d)
        return sum(kept_fraction(v) for v in d.values()) / len(d)

    def best(self, candidates: list[list[Unit]]) -> list[Unit]:
        """Of the candidates within `TIE` of the closest to the target, the one whose units
        the gates rank highest: the largest sum of running open rates (first of equals)."""
        misses = [abs(self.size(c) - self.target) for c in candidates]
        close = min(misses) + TIE
        return max((c for c, miss in zip(candidates, misses, strict=True) if miss <= close),
                   key=lambda c: sum(self.rates[u] for u in c))  # fmt: skip

    def candidates(self) -> list[list[Unit]]:
        """The top-ranked units up to the target, and the refinements around where they end
        (`project_to_budget`)."""
        ranked, target = self.ranked, self.target
        k = _fewest(len(ranked), lambda j: self.size(ranked[:j]) >= target)
        below, above = ranked[: max(k - 1, 0)], ranked[:k]
        channel = [u for u in ranked if isinstance(self.gates[u[0]], ChannelGate)]
        # channels close the gap a block leaves: opened below it, or closed above it
        opened_below, opened_above = set(below), set(above)
        fill = [u for u in channel if u not in opened_below]
        trim = [u for u in reversed(channel) if u in opened_above]
        m = _fewest(len(fill), lambda j: self.size(below + fill[:j]) >= target)
        t = _fewest(len(trim), lambda j: self.size(_without(above, trim[:j])) <= target)
        out = [above, below + fill[: max(m - 1, 0)], below + fill[:m],
               _without(above, trim[:t]), _without(above, trim[: max(t - 1, 0)])]  # fmt: skip
        # blocks differ in cost (a downsampling one is cheaper): the layer gates ranked
        # nearest the cut, the last few opened and the first few closed, in every combination
        layers = [i for i, u in enumerate(ranked) if isinstance(self.gates[u[0]], LayerGate)]
        near = [ranked[i] for i in layers if i < k][-SWAPPED:]
        near += [ranked[i] for i in layers if i >= k][:SWAPPED]
        rest = _without(above, near)
        for chosen in itertools.product((False, True), repeat=len(near)):
            out.append(rest + [u for u, c in zip(near, chosen, strict=True) if c])
        return out


def _fewest(n: int, reached: Callable[[int], bool]) -> int:
    """The least ``j`` in [0, n] with ``reached(j)``, for a `reached` that stays true once
    it is (the size grows with each unit opened): bisection."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reached(mid) else (mid + 1, hi)
    return lo


def _without(units: list, dropped: list) -> list:
    gone = set(dropped)
    return [u for u in units if u not in gone]

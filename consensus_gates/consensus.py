"""Step 5: read the consensus sub-network off the gates' running statistics, or pin it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from .insert import require_gated


@dataclass(frozen=True)
class Consensus:
    """The shared decision of every gate: open iff its running open rate ≥ the threshold.

    ``agreement`` is the fraction of samples that agree with that decision,
    ``max(rate, 1 - rate)``: 1.0 for a perfectly polarized gate, 0.5 for a coin toss.
    """

    decisions: dict[str, bool]
    open_rate: dict[str, float]
    agreement: dict[str, float]

    @property
    def open_ratio(self) -> float:
        return sum(self.decisions.values()) / max(len(self.decisions), 1)

    def __str__(self) -> str:
        rows = [f"{'gate':<40} {'decision':>8} {'open rate':>9} {'agreement':>9}"]
        for name, d in self.decisions.items():
            rows.append(
                f"{name:<40} {'open' if d else 'closed':>8} "
                f"{self.open_rate[name]:>9.3f} {self.agreement[name]:>9.3f}"
            )
        rows.append(f"{sum(self.decisions.values())}/{len(self.decisions)} gates open")
        return "\n".join(rows)


def consensus(model: nn.Module, threshold: float = 0.5) -> Consensus:
    """The consensus sub-network: each gate is open iff its running open rate ≥ `threshold`."""
    gates = require_gated(model).gates
    rate = {name: float(g.running_open_rate) for name, g in gates.items()}
    return Consensus(
        decisions={n: r >= threshold for n, r in rate.items()},
        open_rate=rate,
        agreement={n: max(r, 1 - r) for n, r in rate.items()},
    )


def resolve_decisions(
    model: nn.Module, decisions: Mapping[str, bool] | Consensus | None
) -> dict[str, bool]:
    """A full name→bool mapping: given names as given, the others from the consensus."""
    gates = require_gated(model).gates
    if isinstance(decisions, Consensus):
        decisions = decisions.decisions
    given = dict(decisions or {})
    unknown = sorted(set(given) - set(gates))
    if unknown:
        raise KeyError(f"no gate named {unknown}; the gates are {list(gates)}")
    base = consensus(model).decisions
    return {name: bool(given.get(name, base[name])) for name in gates}


def fix_decisions(model: nn.Module, decisions: Mapping[str, bool] | Consensus | None) -> None:
    """Pin every gate's output: open (1) or closed (0) for all samples. Names not given take
    the consensus. ``None`` unpins every gate, so they decide per sample again."""
    gates = require_gated(model).gates
    if decisions is None:
        for g in gates.values():
            g.fixed = None
        return
    for name, d in resolve_decisions(model, decisions).items():
        gates[name].fixed = d

"""Step 5: read the consensus sub-network off the gates' running statistics, or pin it."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .fx.graph_module import cut_decisions, require_gated
from .gates.modules import Gate, LayerGate


@dataclass(frozen=True)
class Consensus:
    """The shared decision of every gate: open iff its running open rate ≥ the threshold.

    A layer gate's decision is a bool; a channel gate's is a tuple of bools, one per channel
    (and its open rate a tuple of floats). ``agreement`` is the fraction of samples that agree
    with the decision, ``max(rate, 1 - rate)`` (averaged over channels): 1.0 for a perfectly
    polarized gate, 0.5 for a coin toss.
    """

    decisions: dict[str, bool | tuple[bool, ...]]
    open_rate: dict[str, float | tuple[float, ...]]
    agreement: dict[str, float]

    @property
    def open_ratio(self) -> float:
        """The mean over gates of the fraction of their units (block or channels) kept."""
        fractions = [kept_fraction(d) for d in self.decisions.values()]
        return sum(fractions) / max(len(fractions), 1)

    def __str__(self) -> str:
        rows = [f"{'gate':<40} {'decision':>10} {'open rate':>9} {'agreement':>9}"]
        for name, d in self.decisions.items():
            rate = self.open_rate[name]
            if isinstance(d, tuple):
                shown, rate = f"{sum(d)}/{len(d)} open", sum(rate) / len(rate)
            else:
                shown = "open" if d else "closed"
            rows.append(f"{name:<40} {shown:>10} {rate:>9.3f} {self.agreement[name]:>9.3f}")
        kept = sum(kept_fraction(d) == 1 for d in self.decisions.values())
        rows.append(
            f"{kept}/{len(self.decisions)} gates fully open, open ratio {self.open_ratio:.3f}"
        )
        return "\n".join(rows)


def kept_fraction(decision: bool | tuple[bool, ...]) -> float:
    return sum(decision) / len(decision) if isinstance(decision, tuple) else float(decision)


def consensus(model: nn.Module, threshold: float = 0.5) -> Consensus:
    """The consensus sub-network: each gate is open iff its running open rate ≥ `threshold`.
    Gates cut out while training (`fx.cut`) come last, with the decision they were cut with
    (open rate 0 or 1, agreement 1)."""
    gated = require_gated(model)
    gates = gated.gates
    decisions, rates, agreement = {}, {}, {}
    for name, g in gates.items():
        r = g.running_open_rate.float().cpu()
        agreement[name] = float(torch.maximum(r, 1 - r).mean())
        if r.dim() == 0:
            rates[name], decisions[name] = float(r), bool(r >= threshold)
        else:
            rates[name] = tuple(r.tolist())
            decisions[name] = tuple(bool(v) for v in (r >= threshold).tolist())
    for name, d in cut_decisions(gated).items():
        decisions[name], agreement[name] = d, 1.0
        rates[name] = tuple(map(float, d)) if isinstance(d, tuple) else float(d)
    return Consensus(decisions, rates, agreement)


def normalize_decision(gate: Gate, value: Any) -> bool | tuple[bool, ...]:
    """A layer gate's decision as a bool; a channel gate's as a tuple of one bool per unit
    (a single bool applies to every unit).

    A decision is a bool or 0/1: a Python bool or int, a numpy or torch bool or integer
    scalar, or a sequence or 1-d array of them of the gate's length (one for a layer gate).
    Anything else (strings, floats, other numbers) raises a ValueError naming the gate.
    """
    if isinstance(gate, LayerGate):  # one unit: a sequence of one decision says the same
        items = _items(value)
        flag = _flag(items[0] if items is not None and len(items) == 1 else value)
        if flag is None:
            raise ValueError(
                f"gate '{gate.name}' is a layer gate: its decision is one bool (True: open, "
                f"False: closed) or 0/1; got {_shown(value)}"
            )
        return flag
    flag = _flag(value)
    if flag is not None:
        return (flag,) * gate.units
    items = _items(value)
    flags = None if items is None else [_flag(v) for v in items]
    per = f" (one per position in each of its {gate.groups} groups)" if gate.groups > 1 else ""
    if flags is None or any(f is None for f in flags):
        raise ValueError(
            f"gate '{gate.name}' takes {gate.units} decisions{per}: a sequence or 1-d array of "
            f"bools or 0/1 (or one bool for all); got {_shown(value)}"
        )
    if len(flags) != gate.units:
        raise ValueError(f"gate '{gate.name}' takes {gate.units} decisions{per}; got {len(flags)}")
    return tuple(flags)


def _flag(value: Any) -> bool | None:
    """`value` as a bool if it is one, or 0 or 1 of an integer type; else None."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim != 0:
            return None
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return None


def _items(value: Any) -> list | None:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist() if value.ndim == 1 else None
    if isinstance(value, (list, tuple)):
        return list(value)
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def resolve_decisions(
    model: nn.Module, decisions: Mapping[str, Any] | Consensus | None
) -> dict[str, bool | tuple[bool, ...]]:
    """A full name→decision mapping: given names as given, the others from the consensus."""
    gates = require_gated(model).gates
    if isinstance(decisions, Consensus):
        decisions = decisions.decisions
    if decisions is not None and not isinstance(decisions, Mapping):
        raise TypeError(
            f"decisions must map gate names to decisions (a dict), a Consensus or None; got "
            f"{type(decisions).__name__}"
        )
    given = dict(decisions or {})
    for name, d in cut_decisions(model).items():  # gone, but a consensus still names them
        if name in given and not _same(given.pop(name), d):
            raise ValueError(f"gate {name} was cut out while training with decision {d}")
    unknown = sorted(set(given) - set(gates))
    if unknown:
        hints = {u: difflib.get_close_matches(str(u), list(gates), n=1) for u in unknown}
        hint = "".join(f"; did you mean '{h[0]}' for '{u}'?" for u, h in hints.items() if h)
        raise KeyError(f"no gate named {unknown}{hint}; the gates are {list(gates)}")
    base = consensus(model).decisions
    return {name: normalize_decision(g, given.get(name, base[name])) for name, g in gates.items()}


def _same(value: Any, decision: bool | tuple[bool, ...]) -> bool:
    try:
        return tuple(np.asarray(value, dtype=bool).reshape(-1)) == tuple(np.reshape(decision, -1))
    except (TypeError, ValueError):
        return False


def fix_decisions(
    model: nn.Module, decisions: Mapping[str, Any] | Consensus | None = None
) -> None:
    """Pin every gate's output: open (1) or closed (0) for all samples. Names left out, or
    ``None``, take the consensus, as in `materialize`; `unfix_decisions` unpins."""
    gates = require_gated(model).gates
    for name, d in resolve_decisions(model, decisions).items():
        gates[name].fixed = d


def unfix_decisions(model: nn.Module) -> None:
    """Unpin every gate, so that each decides per sample again."""
    for g in require_gated(model).gates.values():
        g.fixed = None

"""Cut some gates out of a gated model in place, while it trains (progressive surgery).

`cut_gates` is `materialize` for a subset of the layer gates, done on the model itself: a
closed gate's branch is removed, an open gate's module goes and its branch stays, the other
gates keep gating. The parameters that stay are the same tensors, so an optimizer can go on
with them (`training.progressive` drops the others from it). What was cut is recorded in
``meta["consensus_gates"]["cut"]``, so `save` and `load` rebuild the same network and
`materialize` later records every decision, cut or not; ``"cut_flops"`` there is what the
cuts saved, so that FLOPs ratios stay relative to the original model.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..consensus import normalize_decision
from ..cost import all_open_flops
from ..gates.modules import Gate, LayerGate
from .graph_module import GATES_ATTR, META_KEY, cut_decisions, gate_nodes, require_gated
from .surgery import unwire_layer_gate
from .tracing import eliminate_dead_code


def cut_gates(model: nn.Module, decisions: Mapping[str, bool]) -> list[str]:
    """Cut the layer gates `decisions` names out of `model` (a `GatedModel`), in place.

    A closed gate's branch is removed, with every gate inside it; an open gate is removed and
    its branch runs ungated. In eval mode the model's output is unchanged for inputs on which
    each named gate decides as given. Returns the names of every gate removed (those named,
    and channel gates in removed branches).

    Raises KeyError for a name that is not a gate of the model, and ValueError for a channel
    gate (channel gates are not cut while training) or a decision that is not a bool.
    """
    gated = require_gated(model)
    gates = gated.gates
    resolved = _checked(gates, decisions)
    before = all_open_flops(gated)
    graph = gated.graph
    for node, gate in gate_nodes(gated):
        if gate.name in resolved:
            unwire_layer_gate(graph, node, resolved[gate.name])
    eliminate_dead_code(graph)
    called = {g.name for _, g in gate_nodes(gated)}
    removed = [name for name in gates if name not in called]
    container = getattr(gated, GATES_ATTR)
    for attr, gate in list(container.named_children()):
        if gate.name not in called:
            delattr(container, attr)
    gated.delete_all_unused_submodules()
    gated.recompile()
    meta = gated.meta[META_KEY]
    # A gate inside a removed branch never decides again: record it open, as materialize
    # would be free to (its branch is gone either way).
    meta["cut"] = {**cut_decisions(gated), **{
        n: resolved.get(n, normalize_decision(gates[n], True)) for n in removed
    }}  # fmt: skip
    gated._cg_all_open_flops = None  # the network changed: measure it again
    meta["cut_flops"] = meta.get("cut_flops", 0) + before - all_open_flops(gated)
    return removed


def _checked(gates: Mapping[str, Gate], decisions: Mapping[str, bool]) -> dict[str, bool]:
    unknown = sorted(set(decisions) - set(gates))
    if unknown:
        raise KeyError(f"no gate named {unknown} to cut; the gates are {list(gates)}")
    out = {}
    for name, d in decisions.items():
        if not isinstance(gates[name], LayerGate):
            raise ValueError(f"{name} is a channel gate: only layer gates are cut while training")
        out[name] = normalize_decision(gates[name], d)
    return out


def replay_cuts(model: nn.Module, cut: Mapping[str, bool | tuple[bool, ...]]) -> list[str]:
    """Cut out of `model` again what a spec's or checkpoint's ``cut`` records: its layer
    gates, with `cut_gates` (the channel gates it lists went with their branches)."""
    gates = require_gated(model).gates
    return cut_gates(model, {n: d for n, d in cut.items() if isinstance(gates.get(n), LayerGate)})

"""Cut some gates out of a gated model in place, while it trains (progressive surgery).

`cut_gates` is `materialize` for some of the gates, done on the model itself: a closed
layer gate's branch is removed, an open one's module goes and its branch stays, and the
other gates keep gating. Channel gates are cut with every gate left at once (once all are
decided, as the projection onto a target decides them): torch-pruning removes their closed
channels in place. A parameter that is not cut is the same tensor afterwards, so an
optimizer can go on with it (`training.progressive` drops the others from it, and slices
the state of those whose channels were cut). What was cut is recorded in
``meta["consensus_gates"]["cut"]``, so `save` and `load` rebuild the same network and
`materialize` later records every decision, cut or not; ``"cut_flops"`` there is what the
cuts saved, so that FLOPs ratios stay relative to the original model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx as fx
from torch import nn

from ..consensus import normalize_decision
from ..cost import all_open_flops
from ..gates.modules import ChannelGate, Gate, LayerGate
from .graph_module import GATES_ATTR, META_KEY, cut_decisions, gate_nodes, require_gated
from .surgery import slim_graph_module, unwire_layer_gate
from .tracing import eliminate_dead_code


def cut_gates(model: nn.Module, decisions: Mapping[str, bool]) -> list[str]:
    """Cut the layer gates `decisions` names out of `model` (a `GatedModel`, or a gated
    Hugging Face model, each of whose layers is a graph), in place. A layer left returning
    its input stays in place (and in the KV cache) until `materialize` removes it.

    A closed gate's branch is removed, with every gate inside it; an open gate is removed and
    its branch runs ungated. In eval mode the model's output is unchanged for inputs on which
    each named gate decides as given. Returns the names of every gate removed (those named,
    and channel gates in removed branches).

    With channel gates, `decisions` must name every gate left: the whole surgery is done,
    in place, and every gate goes.

    Raises KeyError for a name that is not a gate of the model, and ValueError for a decision
    that is not one of its gate's, or channel gates named without every other gate.
    """
    gated = require_gated(model)
    gates = gated.gates
    resolved = _checked(gates, decisions)
    before = all_open_flops(gated)
    graphs = gated.graphs()  # the model, or a Hugging Face model's layers
    if any(isinstance(gates[n], ChannelGate) for n in resolved):
        # torch-pruning traces through autograd (as in `materialize`)
        with torch.inference_mode(False), torch.enable_grad():
            _adopt(gated, slim_graph_module(gated, resolved))  # shares, so cuts, its modules
    else:
        for gm in graphs:
            for node, gate in gate_nodes(gm):
                if gate.name in resolved:
                    unwire_layer_gate(gm.graph, node, resolved[gate.name])
            eliminate_dead_code(gm.graph)
    called = {g.name for gm in graphs for _, g in gate_nodes(gm)}
    removed = [name for name in gates if name not in called]
    for gm in graphs:
        container = getattr(gm, GATES_ATTR, None)  # gone from a layer with none left
        for attr, gate in list(container.named_children()) if container is not None else ():
            if gate.name not in called:
                delattr(container, attr)
        gm.delete_all_unused_submodules()
        gm.recompile()
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
    channel = [n for n in decisions if isinstance(gates[n], ChannelGate)]
    left = [n for n in gates if n not in decisions]
    if channel and left:
        raise ValueError(
            f"{channel[0]} is a channel gate: channel gates are cut only together with every "
            f"other gate (not named: {left[:3]}{'...' if len(left) > 3 else ''})"
        )
    return {name: normalize_decision(gates[name], d) for name, d in decisions.items()}


def _adopt(gated: fx.GraphModule, slim: fx.GraphModule) -> None:
    """Make `slim`'s graph `gated`'s. `slim` was built on `gated` and shares its modules;
    what the surgery added to it (index buffers, folded constants, out-of-place copies of
    modules) and the parameters it replaced are set on `gated` under the same names."""
    for node in slim.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        prefix, _, leaf = node.target.rpartition(".")
        owner, value = gated.get_submodule(prefix), _attr(slim, node.target)
        if getattr(owner, leaf, None) is value:
            continue
        if isinstance(value, nn.Module):
            owner.add_module(leaf, value)
        elif isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value)
    gated.graph = slim.graph


def _attr(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def replay_cuts(model: nn.Module, cut: Mapping[str, bool | tuple[bool, ...]]) -> list[str]:
    """Cut out of `model` again what a spec's or checkpoint's ``cut`` records: its layer
    gates first, with `cut_gates` (the channel gates inside the closed branches go with
    them), then the channel gates it lists that are still there, all at once."""
    gated = require_gated(model)
    layers = {n: d for n, d in cut.items() if isinstance(gated.gates.get(n), LayerGate)}
    removed = cut_gates(gated, layers)
    rest = {n: d for n, d in cut.items() if n in gated.gates}
    return removed + (cut_gates(gated, rest) if rest else [])

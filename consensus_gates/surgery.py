"""Step 6: `materialize` cuts closed branches out and removes every gate: a smaller dense model."""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .consensus import Consensus, resolve_decisions
from .insert import META_KEY, gate_nodes, require_gated
from .tracing import eliminate_dead_code

RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
RELU_METHODS = {"relu", "relu_"}


def materialize(
    model: nn.Module, decisions: Mapping[str, bool] | Consensus | None = None
) -> fx.GraphModule:
    """Physically remove closed branches and all gating modules.

    Args:
        model: a model from `insert_gates` (it is not modified).
        decisions: gate name → open; names left out, or ``None``, take the consensus.

    Returns:
        A plain `torch.fx.GraphModule` on the same device and dtype: a closed block becomes
        its shortcut (plus whatever followed the merge), an open one runs its branch ungated.
        No gate code, mask or multiplication by 1 is left. In eval mode its output equals the
        gated model's with `fix_decisions(model, decisions)`.
    """
    gated = require_gated(model)
    resolved = resolve_decisions(gated, decisions)
    slim = slim_graph_module(copy.deepcopy(gated), resolved)
    slim.meta[META_KEY] = {**gated.meta[META_KEY], "kind": "slim", "decisions": resolved}
    return slim


def slim_graph_module(gated: fx.GraphModule, decisions: Mapping[str, bool]) -> fx.GraphModule:
    """The surgery itself. The result shares modules with `gated`: pass a copy to keep both."""
    work = fx.GraphModule(gated, copy.deepcopy(gated.graph))  # shares modules, owns its graph
    graph = work.graph
    for node, gate in gate_nodes(work):
        (scaled,) = node.users  # mul(branch, gate), built by insert_gates
        if decisions[gate.name]:
            scaled.replace_all_uses_with(scaled.args[0])
        else:
            _drop_operand(graph, scaled)
    eliminate_dead_code(graph)
    left = [n.target for n, _ in gate_nodes(work)]
    if left:  # an impure user kept a gate alive: the surgery would be incomplete
        raise RuntimeError(f"internal error: gates {left} are still used after surgery")
    modules = dict(work.named_modules())
    _drop_identities(graph, modules)
    _drop_redundant_relus(graph, modules)
    graph.lint()
    slim = fx.GraphModule(work, graph, class_name=type(gated).__name__.removeprefix("Gated"))
    slim.train(gated.training)
    return slim


def _drop_operand(graph: fx.Graph, scaled: fx.Node) -> None:
    """Replace ``add(skip, scaled)`` by ``skip`` (or ``alpha * skip`` for ``torch.add``)."""
    (merge,) = scaled.users
    skip = merge.args[1] if merge.args[0] is scaled else merge.args[0]
    alpha = merge.kwargs.get("alpha", 1)
    result = skip
    if alpha != 1 and merge.args[1] is skip:  # torch.add(scaled, skip, alpha=a) keeps a * skip
        with graph.inserting_before(merge):
            result = graph.call_function(operator.mul, (skip, alpha))
    merge.replace_all_uses_with(result)
    graph.erase_node(merge)  # an in-place merge (out.add_(x)) would otherwise survive DCE


def _drop_identities(graph: fx.Graph, modules: dict[str, nn.Module]) -> None:
    """Calls of ``nn.Identity`` (a shortcut that is now the whole block) do nothing."""
    for n in list(graph.nodes):
        if n.op == "call_module" and isinstance(modules.get(n.target), nn.Identity):
            n.replace_all_uses_with(n.args[0])
            graph.erase_node(n)


def _is_relu(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return (
        (n.op == "call_function" and n.target in RELU_FUNCTIONS)
        or (n.op == "call_method" and n.target in RELU_METHODS)
        or (n.op == "call_module" and isinstance(modules.get(n.target), nn.ReLU))
    )


def _drop_redundant_relus(graph: fx.Graph, modules: dict[str, nn.Module]) -> None:
    """``relu(relu(x)) == relu(x)``: where a closed block leaves a ReLU on an already
    rectified tensor, drop it (it costs memory traffic that FLOP counts do not show)."""
    for n in list(graph.nodes):
        src = n.args[0] if n.args else None
        if _is_relu(n, modules) and isinstance(src, fx.Node) and _is_relu(src, modules):
            n.replace_all_uses_with(src)
            graph.erase_node(n)

"""Step 6 on a traced graph: cut closed branches and channels out and remove every gate, leaving
a smaller dense graph (`consensus_gates.slimming.materialize` is the verb)."""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..gates.modules import ChannelGate, LayerGate
from .blocks import producer_chain
from .fold import fold_closed_points
from .graph_module import attr_name, example_inputs_of, gate_nodes, merge_of
from .lifetimes import use_deferred_frees
from .positions import position_named
from .tracing import eliminate_dead_code, is_inplace

if TYPE_CHECKING:
    import torch_pruning as tp


def pruning() -> ModuleType:
    """The torch-pruning half of the surgery, imported when channels are first cut: layer
    surgery, and `import consensus_gates`, do without it."""
    from . import pruning

    return pruning


RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
RELU_METHODS = {"relu", "relu_"}


def slim_graph_module(gated: fx.GraphModule, decisions: Mapping[str, bool]) -> fx.GraphModule:
    """The surgery itself. The result shares modules with `gated`: pass a copy to keep both."""
    work = fx.GraphModule(gated, copy.deepcopy(gated.graph))  # shares modules, owns its graph
    graph = work.graph
    for node, gate in gate_nodes(work):
        if isinstance(gate, LayerGate):
            unwire_layer_gate(graph, node, decisions[gate.name])
    eliminate_dead_code(graph)
    if any(isinstance(g, ChannelGate) for _, g in gate_nodes(work)):
        _cut_channels(work, decisions, example_inputs_of(gated))
    left = [n.target for n, _ in gate_nodes(work)]
    if left:  # an impure user kept a gate alive: the surgery would be incomplete
        raise RuntimeError(f"internal error: gates {left} are still used after surgery")
    modules = dict(work.named_modules())
    _drop_identities(graph, modules)
    _drop_redundant_relus(graph, modules)
    graph.lint()
    use_deferred_frees(graph)
    slim = fx.GraphModule(work, graph, class_name=type(gated).__name__.removeprefix("Gated"))
    slim.train(gated.training)
    return slim


def unwire_layer_gate(graph: fx.Graph, node: fx.Node, keep_branch: bool) -> None:
    """Take a layer gate's call out of the graph: its branch runs ungated (`keep_branch`) or
    is no longer added (dead code, for `eliminate_dead_code` to remove)."""
    (scaled,) = node.users  # mul(branch, gate), built by insert_gates
    if keep_branch:
        scaled.replace_all_uses_with(scaled.args[0])
    else:
        drop_operand(graph, scaled)


def drop_operand(graph: fx.Graph, scaled: fx.Node) -> None:
    """Replace ``add(skip, scaled)`` by ``skip`` (or ``alpha * skip`` for ``torch.add``)."""
    merge, skip = merge_of(scaled)
    alpha = merge.kwargs.get("alpha", 1)
    result = skip
    if alpha != 1 and merge.args[1] is skip:  # torch.add(scaled, skip, alpha=a) keeps a * skip
        with graph.inserting_before(merge):
            result = graph.call_function(operator.mul, (skip, alpha))
    else:
        _keep_fresh(graph, merge)
    merge.replace_all_uses_with(result)
    graph.erase_node(merge)  # an in-place merge (out.add_(x)) would otherwise survive DCE


def _keep_fresh(graph: fx.Graph, merge: fx.Node) -> None:
    """The merge made a fresh tensor, but the skip that replaces it may be read elsewhere (a
    concat, a head, the model's input): an op that updated the merge in place (a ReLU with
    ``inplace=True``) computes out of place instead, or, if the merge is read after it, on a
    copy."""
    modules = dict(graph.owning_module.named_modules())
    mutating = [u for u in merge.users if u.args and u.args[0] is merge and _mutates(u, modules)]
    if not mutating:
        return
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = all(order[u] <= order[mutating[0]] for u in merge.users)
    if len(mutating) == 1 and last and _out_of_place(mutating[0], modules):
        return
    with graph.inserting_after(merge):
        fresh = graph.call_function(torch.clone, (merge,))
    merge.replace_all_uses_with(fresh, delete_user_cb=lambda n: n is not fresh)


INPLACE_FUNCTIONS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, torch.relu_: torch.relu,
}  # fmt: skip


def _mutates(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `n` updates its first argument in place."""
    if n.op == "call_module":
        return getattr(modules.get(n.target), "inplace", False) is True
    return is_inplace(n) or (
        n.op == "call_function"
        and (n.target in INPLACE_FUNCTIONS or n.kwargs.get("inplace") is True)
    )


def _out_of_place(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Make `n`, an op that updates its first argument in place, return a new tensor
    instead; False if it has no such form (``x.zero_()``)."""
    if n.op == "call_module":  # a copy: the module may be called elsewhere too
        module = copy.copy(modules[n.target])
        module.inplace = False
        n.target = f"{n.target}_out_of_place".replace(".", "_")
        n.graph.owning_module.add_submodule(n.target, module)
    elif n.op == "call_method":
        if not callable(getattr(torch.Tensor, n.target[:-1], None)):
            return False
        n.target = n.target[:-1]
    elif n.target in INPLACE_FUNCTIONS:
        n.target = INPLACE_FUNCTIONS[n.target]
    else:
        n.kwargs = {**n.kwargs, "inplace": False}
    return True


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


def _cut_channels(work: fx.GraphModule, decisions: Mapping, inputs) -> None:
    """Channel surgery, after the layer gates are gone. Each gate's position cuts its point
    (`positions`): "middle" has torch-pruning remove the group with everything coupled to it,
    "after" keeps the add exact with ``index_add``, "before" reads the kept channels with
    ``index_select``. A fully closed "after" gate drops its branch; a fully closed middle or
    before one becomes zeros, folded into constants once the channels are cut (so the
    constants have the cut widths)."""
    modules = dict(work.named_modules())
    groups: list[tuple[nn.Module, list[int]]] = []
    zeros: list[fx.Node] = []
    for node, gate in gate_nodes(work):
        if not isinstance(gate, ChannelGate):
            continue
        keep = gate.channel_decisions(decisions[gate.name])
        cut = ChannelCut(work, modules, node, gate, keep)
        position = position_named(gate.position)
        if not cut.closed:
            cut.bypass()
        elif len(cut.closed) == len(cut.keep):
            position.cut_closed(cut)
        else:
            position.cut_partly(cut)
        groups += cut.groups
        zeros += cut.zeros
    eliminate_dead_code(work.graph)
    work.recompile()
    if groups:
        dg = _dependency_graph(work, inputs)
        for module, closed in groups:
            pruning().cut_out_channels(dg, module, closed)
    if zeros:
        fold_closed_points(work, zeros, inputs)
        eliminate_dead_code(work.graph)


class ChannelCut:
    """The edits a `ChannelPosition` makes to cut one channel gate out of the graph: its
    mask ``masked = point * gate(source)`` and the channels it closed (``closed``, indices
    into ``keep``, one bool per channel)."""

    def __init__(
        self,
        work: fx.GraphModule,
        modules: dict[str, nn.Module],
        node: fx.Node,
        gate: ChannelGate,
        keep: tuple[bool, ...],
    ):
        self.work, self.modules, self.gate, self.keep = work, modules, gate, tuple(keep)
        (self.masked,) = node.users  # mul(point, gate), built by insert_gates
        self.point: fx.Node = self.masked.args[0]
        self.closed = [i for i, k in enumerate(self.keep) if not k]
        self.groups: list[tuple[nn.Module, list[int]]] = []  # cut later, with their dependents
        self.zeros: list[fx.Node] = []  # fully closed points, folded later

    def readers(self) -> list[fx.Node]:
        """The nodes that read the masked channels."""
        return list(self.masked.users)

    def producer_chain(self) -> list[fx.Node]:
        """The point, then the per-channel ops before it, up to the layer that makes it."""
        return producer_chain(self.point, self.modules)

    def bypass(self) -> None:
        """The readers take the point unmasked."""
        self.masked.replace_all_uses_with(self.point)

    def zero(self) -> None:
        """The readers take ``point * 0``, folded into constants after the channel cuts."""
        with self.work.graph.inserting_before(self.masked):
            self.zeros.append(self.work.graph.call_function(operator.mul, (self.point, 0.0)))
        self.masked.replace_all_uses_with(self.zeros[-1])

    def drop_branch(self) -> None:
        """The mask is a residual add's operand: the add becomes its other operand."""
        drop_operand(self.work.graph, self.masked)

    def cut_with_dependents(self, producer: fx.Node) -> None:
        """After every gate is cut, torch-pruning removes the closed output channels of the
        layer `producer` calls, and with them everything coupled to them."""
        self.groups.append((self.modules[producer.target], self.closed))

    def prune(self, node: fx.Node, side: str) -> None:
        """Cut the closed channels of the module `node` calls, its outputs (`side` "out") or
        inputs ("in"), and nothing else; a function call has none."""
        if node.op == "call_module":
            pruning().prune_channels(self.modules[node.target], self.closed, side)

    def scatter_into_skip(self) -> None:
        """The residual add of the (cut) point becomes ``skip.index_add(dim, kept, point)``."""
        _scatter_into_skip(self.work, self.masked, self.point, self.gate, self.keep)

    def select_kept(self) -> None:
        """The readers take ``point.index_select(dim, kept)``."""
        kept = _index_buffer(self.work, self.gate, self.keep)
        graph = self.work.graph
        with graph.inserting_before(self.masked):
            selected = graph.call_function(
                torch.index_select, (self.point, self.gate.channel_dim, kept)
            )
        self.masked.replace_all_uses_with(selected)


def _dependency_graph(work: fx.GraphModule, inputs) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `work`, traced on a twin that shares its modules
    but computes every in-place op out of place: torch-pruning traces through autograd, which
    loses a layer whose output is a view that an in-place op updates (a Linear's output on
    tokens, then ``nn.ReLU(inplace=True)`` or ``out.add_(x)``)."""
    twin = fx.GraphModule(work, copy.deepcopy(work.graph))
    modules = dict(twin.named_modules())
    for n in twin.graph.nodes:
        if _mutates(n, modules):
            _out_of_place(n, modules)
    twin.recompile()
    return pruning().dependency_graph(twin, inputs)


def _index_buffer(work: fx.GraphModule, gate: ChannelGate, keep) -> fx.Node:
    name = "cg_kept_" + attr_name(gate.name)
    device = next(work.parameters()).device
    kept = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=device)
    work.register_buffer(name, kept)
    first = next(n for n in work.graph.nodes if n.op != "placeholder")
    with work.graph.inserting_before(first):
        return work.graph.get_attr(name)


def _scatter_into_skip(work: fx.GraphModule, masked, point, gate: ChannelGate, keep) -> None:
    """``skip + branch`` with some branch channels cut: ``skip.index_add(dim, kept, branch)``."""
    (merge,) = masked.users
    merge = _add_last(work, masked, merge)
    if merge.args[0] is masked and merge.kwargs.get("alpha", 1) != 1:
        raise ValueError(f"gate '{gate.name}': cannot cut channels of a branch that alpha scales")
    skip = _other_operand(merge, masked)
    kept = _index_buffer(work, gate, keep)
    with work.graph.inserting_before(merge):
        scattered = work.graph.call_function(
            torch.index_add, (skip, gate.channel_dim, kept, point), dict(merge.kwargs)
        )
    merge.replace_all_uses_with(scattered)
    work.graph.erase_node(merge)


def _add_last(work: fx.GraphModule, masked: fx.Node, merge: fx.Node) -> fx.Node:
    """In ``(masked + other) + rest``, where `other` is another branch whose channels an
    "after" gate cuts too (``x + f(x) + g(x)``), add `masked` last: ``(other + rest) +
    masked``, so that its channels are scattered into a tensor that keeps all of them."""
    graph, modules = work.graph, dict(work.named_modules())
    while _is_after_mask(other := _other_operand(merge, masked), modules):
        (outer,) = merge.users  # the sum's next add: the block's skip is further up
        rest = _other_operand(outer, merge)
        with graph.inserting_before(outer):
            inner = graph.call_function(operator.add, (other, rest))
            lifted = graph.call_function(operator.add, (inner, masked))
        outer.replace_all_uses_with(lifted)
        graph.erase_node(outer)
        graph.erase_node(merge)
        merge = lifted
    return merge


def _other_operand(add: fx.Node, operand: fx.Node) -> fx.Node:
    return add.args[1] if add.args[0] is operand else add.args[0]


def _is_after_mask(n, modules: dict[str, nn.Module]) -> bool:
    """``branch * gate(...)`` of a channel gate on an add's operand ("after"), not cut yet."""
    gate = n.args[1] if isinstance(n, fx.Node) and n.target is operator.mul else None
    return (
        isinstance(gate, fx.Node)
        and gate.op == "call_module"
        and isinstance(modules.get(gate.target), ChannelGate)
        and position_named(modules[gate.target].position).masks_merge_operand
    )

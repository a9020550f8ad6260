"""Step 3 on a traced graph: a `LayerGate` on each residual branch (``mode="layer"``),
`ChannelGate`s at the branch's channel points (``"channel"``), or both. `insert_gates`
(`fx.insert`) traces a model and calls `gate_graph`; a Hugging Face model's layers are
gated one graph at a time (`hf.gating`)."""

from __future__ import annotations

import dataclasses
import fnmatch
import operator
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

from ..config import GateConfig
from ..gates.modules import ChannelGate, Gate, LayerGate
from .blocks import POOL_MODULES, Branch, Rejected, find_blocks, find_channel_points, is_channelwise
from .graph_module import GATES_ATTR, GatedModel, attr_name
from .positions import ChannelPoint
from .tracing import record_shapes

CHANNEL_FIRST = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, *POOL_MODULES,
)  # fmt: skip


def gate_graph(
    gm: fx.GraphModule,
    inputs: tuple[Any, ...],
    config: GateConfig,
    what: str,
    *,
    num_inputs: int | None = None,
    prefix: str = "",
) -> tuple[GatedModel, list[Rejected]]:
    """Gate the residual branches of a traced graph, run once on `inputs` for its shapes.
    The first `num_inputs` inputs (default: all) can be block inputs; `prefix` goes before
    each gate's name. ValueError if there is no branch to gate."""
    num_inputs = len(inputs) if num_inputs is None else num_inputs
    record_shapes(gm, inputs)
    branches, rejected = find_blocks(gm, num_inputs=num_inputs)
    branches = [dataclasses.replace(b, name=prefix + b.name) for b in branches]
    branches = _not_excluded(what, branches, rejected, config)
    points = _channel_points(what, gm, branches, config, num_inputs)
    _gate_branches(gm, branches, points, config)
    return GatedModel(gm, gm.graph, class_name=f"Gated{what}"), rejected


def gate_whole_graph(
    gm: fx.GraphModule, first_input: Tensor, config: GateConfig, name: str, what: str
) -> GatedModel:
    """One `LayerGate`, named `name`, across the whole graph, as if it were one residual
    branch: ``x + g(x) * (f(x) - x)``, ``x`` the first input and ``f(x)`` the (first)
    output. Closed, the graph returns its input; open, the surgery leaves ``f(x)``."""
    graph = gm.graph
    x = next(n for n in graph.nodes if n.op == "placeholder")
    out = next(n for n in graph.nodes if n.op == "output")
    (result,) = out.args
    tupled = isinstance(result, (tuple, list))
    h = result[0] if tupled and result else result
    if not isinstance(h, fx.Node) or not isinstance(first_input, Tensor):
        raise ValueError(f"{what} does not take and return a tensor first: no whole-layer gate")
    fdim = first_input.dim() - 1 if first_input.dim() > 2 else None
    channels = first_input.shape[-1] if first_input.dim() > 1 else 1
    gates = nn.Module()
    gm.add_module(GATES_ATTR, gates)
    target = _register(gates, LayerGate(name, channels, fdim, first_input.dim(), config))
    with graph.inserting_after(_anchor(graph, x)):
        g = graph.call_module(target, (x,))
    with graph.inserting_before(out):
        branch = graph.call_function(operator.sub, (h, x))
        scaled = graph.call_function(operator.mul, (branch, g))
        merged = graph.call_function(operator.add, (x, scaled))
    if tupled:
        merged = (merged, *result[1:]) if isinstance(result, tuple) else [merged, *result[1:]]
    out.args = (merged,)
    graph.lint()
    return GatedModel(gm, graph, class_name=f"Gated{what}")


def collapse_whole_graph_merge(graph: fx.Graph) -> None:
    """After the surgery kept a whole-graph branch: ``x + (f(x) - x)`` is ``f(x)``."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is operator.add and len(node.args) == 2:
            x, branch = node.args
            if (
                isinstance(branch, fx.Node) and branch.op == "call_function"
                and branch.target is operator.sub and branch.args[1] is x
                and len(branch.users) == 1 and not node.kwargs
            ):  # fmt: skip
                node.replace_all_uses_with(branch.args[0])
                graph.erase_node(node)
                graph.erase_node(branch)


def _not_excluded(
    what: str, branches: list[Branch], rejected: list[Rejected], config: GateConfig
) -> list[Branch]:
    """The branches `config.exclude` leaves; ValueError, with what was refused, if none."""
    branches = [b for b in branches if not any(fnmatch.fnmatch(b.name, p) for p in config.exclude)]
    if not branches:
        why = "".join(f"\n  - {r.node} in '{r.module}': {r.reason}" for r in rejected)
        raise ValueError(
            f"{what} has no residual merge to gate (an add of a block's input "
            "and a branch computed from it)"
            + (f"; sums that were considered and refused:{why}" if why else "")
            + (
                f"; GateConfig.exclude={config.exclude} removed every candidate"
                if config.exclude
                else ""
            )
        )
    return branches


def _channel_points(
    what: str, gm: fx.GraphModule, branches: list[Branch], config: GateConfig, n: int
) -> dict[str, list[ChannelPoint]]:
    """Each branch's channel points at `config.position`; none in mode "layer"."""
    if config.mode == "layer":
        return {}
    points = find_channel_points(gm, branches, config.position, n)
    if config.mode == "channel" and not any(points.values()):
        raise ValueError(
            f"no channel of {what} can be gated at position="
            f"'{config.position}' and cut exactly (a dense conv or linear must produce or "
            "consume it); try another position, or mode='layer'"
        )
    return points


def _gate_branches(
    gm: fx.GraphModule,
    branches: list[Branch],
    points: dict[str, list[ChannelPoint]],
    config: GateConfig,
) -> None:
    """Put each branch's gates into the graph, registered under ``gm.gate_modules`` branch by
    branch: its channel gates, then its layer gate."""
    gates = nn.Module()
    gm.add_module(GATES_ATTR, gates)
    for b in branches:
        output = b.output
        # made first: it reads the layout off the branch's first layers, which a channel
        # gate on the block input then reads through its mask
        layer = _make_gate(gm, b, config) if config.mode != "channel" else None
        for p in points.get(b.name, []):
            gate = _make_channel_gate(p, b.name, config)
            masked = _wire_channel(gm.graph, p, _register(gates, gate))
            if p.point is output:  # on the branch output: the layer gate scales the masked one
                output = masked
        if layer is not None:
            _wire(gm.graph, b, _register(gates, layer), output)
    gm.graph.lint()


def match_model(gated: GatedModel, model: nn.Module, fallback: Tensor) -> None:
    """The gates on the model's device and dtype (`fallback`'s if it has no parameters), and
    the model's train or eval mode."""
    ref = next((t for t in model.parameters()), fallback)
    gates = getattr(gated, GATES_ATTR)
    gates.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    gated.train(model.training)


def _feature_dim(gm: fx.GraphModule, b: Branch, ndim: int) -> int | None:
    """Which dim of the block input holds channels: 1 for conv layouts, last for tokens, as
    the branch's first layer reads it (past per-channel ops, and a transpose of the two)."""
    if ndim <= 2:
        return None
    modules = dict(gm.named_modules())
    node, swapped = b.input, False
    while True:
        users = [u for u in node.users if u in b.nodes]
        first = [modules[u.target] for u in users if u.op == "call_module"]
        if any(isinstance(m, CHANNEL_FIRST) for m in first):
            return ndim - 1 if swapped else 1
        if any(isinstance(m, (nn.Linear, nn.LayerNorm)) for m in first):
            return 1 if swapped else ndim - 1
        onward = [u for u in users if is_channelwise(u, modules) or _swaps_channels(u, ndim)]
        if len(onward) != 1:
            return 1 if ndim >= 4 else ndim - 1
        node, swapped = onward[0], swapped != _swaps_channels(onward[0], ndim)


def _swaps_channels(n: fx.Node, ndim: int) -> bool:
    """``x.transpose(1, -1)`` and the like: dim 1 and the last trade places."""
    dims = n.args[1:] if n.op == "call_method" and n.target == "transpose" else ()
    return (
        len(dims) == 2
        and all(isinstance(d, int) for d in dims)
        and {d % ndim for d in dims} == {1, ndim - 1}
    )


def _make_gate(gm: fx.GraphModule, b: Branch, config: GateConfig) -> LayerGate:
    in_shape, out_shape = b.input.meta["cg_shape"], b.output.meta["cg_shape"]
    if not isinstance(in_shape, tuple) or not isinstance(out_shape, tuple):
        raise ValueError(f"block '{b.name}': gates need tensor inputs and outputs")
    fdim = _feature_dim(gm, b, len(in_shape))
    channels = in_shape[fdim] if fdim is not None else (in_shape[1] if len(in_shape) > 1 else 1)
    return LayerGate(b.name, channels, fdim, len(out_shape), config)


def _anchor(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """Where to insert code that reads `node`: right after it, but after every placeholder."""
    if node.op != "placeholder":
        return node
    return [n for n in graph.nodes if n.op == "placeholder"][-1]


def _register(gates: nn.Module, gate: Gate) -> str:
    attr = attr_name(gate.name)
    gates.add_module(attr, gate)
    return f"{GATES_ATTR}.{attr}"


def _make_channel_gate(p: ChannelPoint, block: str, config: GateConfig) -> ChannelGate:
    shape = p.point.meta["cg_shape"]
    return ChannelGate(
        p.name, shape[p.channel_dim], p.channel_dim, len(shape), config.position, block,
        config.fc_layers, config, p.groups,
    )  # fmt: skip


def _wire_channel(graph: fx.Graph, p: ChannelPoint, target: str) -> fx.Node:
    """Mask the point's channels for its users: ``users(point * gate(source))``."""
    with graph.inserting_after(_anchor(graph, p.point)):
        gate = graph.call_module(target, (p.source,))
    with graph.inserting_after(gate):
        masked = graph.call_function(operator.mul, (p.point, gate))
    for user in p.users:
        user.replace_input_with(p.point, masked)
    return masked


def _wire(graph: fx.Graph, b: Branch, target: str, output: fx.Node) -> None:
    """Compute the gate right after the block input, then scale the branch before the merge."""
    with graph.inserting_after(_anchor(graph, b.input)):
        g = graph.call_module(target, (b.input,))
    with graph.inserting_before(b.merge):
        scaled = graph.call_function(operator.mul, (output, g))
    b.merge.replace_input_with(output, scaled)

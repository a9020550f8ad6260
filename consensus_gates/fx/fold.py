"""Part of step 6: fold what a fully closed channel gate turns into constants.

A middle or before gate with every channel closed feeds zeros to the layers after it. All
that is computed from those zeros alone (the constant region) no longer depends on the
input's values, only, at most, on its size: a conv's bias, an SE's scale. The region is
replaced at its boundary by constants, reduced to the dims they vary along (one value per
channel, as a rule), so the slim model stays exact at every input size and its buffers have
the same shapes whatever the weights, which `load` relies on.

Which dims a value varies along is decided on a copy with random weights, at two input
sizes: trained weights may make a value uniform by accident (a zero bias) and a rebuilt
model would then disagree about the buffer's shape.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from .tracing import is_inplace

BROADCASTING = {
    operator.add, operator.sub, operator.mul, operator.truediv,
    torch.add, torch.sub, torch.mul, torch.div,
}  # fmt: skip
BROADCASTING_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}



def fold_closed_points(work: fx.GraphModule, zeros: list[fx.Node], inputs: tuple[Tensor, ...]):
    """Replace what `zeros` (``point * 0``, a fully closed channel gate) determine by
    constants."""
    graph = work.graph
    region = _constant_region(graph, zeros)
    probes = _probes(work, graph, region, inputs)
    values = _capture(work, graph, region, probes[0][0])
    order = {n: i for i, n in enumerate(graph.nodes)}
    live = _live_outside(graph, region)
    foldable = {n for n in region if _foldable(n, probes, values)}
    while True:  # a boundary value that cannot be given its full shape is computed instead
        boundary = [n for n in graph.nodes if n in foldable and _readers(n, foldable)]
        refs = {n: _size_reference(n, _readers(n, foldable), probes, live, order)
                for n in boundary}  # fmt: skip
        stuck = {n for n, ref in refs.items() if ref is False}
        if not stuck:
            break
        foldable -= stuck
    for i, n in enumerate(boundary):
        value = values[n][0]
        for d in _uniform_dims(n, probes):
            value = value.narrow(d, 0, 1)
        readers = _readers(n, foldable)
        _replace(work, n, readers, value.contiguous().clone(), refs[n], f"cg_const_{i}")
    _erase_unused(graph, region)


def _constant_region(graph: fx.Graph, zeros: list[fx.Node]) -> set[fx.Node]:
    """`zeros` and every node computed from them and from parameters only."""
    region, data = set(zeros), set()
    for n in graph.nodes:
        if n in region or n.op == "output":
            continue
        inputs = n.all_input_nodes
        if n.op == "placeholder" or any(a in data for a in inputs):
            data.add(n)
        elif any(a in region for a in inputs):
            region.add(n)
    return region


Probe = tuple[tuple[Tensor, ...], dict[fx.Node, tuple[Tensor | None, tuple | None]]]


def _probes(work: fx.GraphModule, graph: fx.Graph, region: set[fx.Node], inputs) -> list[Probe]:
    """The region's values on a copy with random weights (so that no value is uniform by the
    accident of its weights, e.g. a zero bias), at batch 2 and the example size, and at batch
    3 and a larger size where the model takes one. The weights are positive and running
    means negative, so that the zeros stay positive after norms and a ReLU never zeroes
    them all by chance."""
    twin = copy.deepcopy(work)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in [*twin.named_parameters(), *twin.named_buffers()]:
            if t.is_floating_point():
                fresh = torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.5
                t.copy_((-fresh if name.endswith("running_mean") else fresh).to(t.dtype))
    first = _sized(inputs, 2, set())
    probes = [(first, _capture(twin, graph, region, first))]
    ndim = inputs[0].dim()
    larger = ([set(range(2, ndim))] if ndim > 2 else []) + ([{1}] if ndim == 3 else [])
    for grow in larger:
        second = _sized(inputs, 3, grow)
        try:
            return [*probes, (second, _capture(twin, graph, region, second))]
        except Exception:  # noqa: BLE001 - the model takes one size only: try the next
            continue
    second = _sized(inputs, 3, set())
    return [*probes, (second, _capture(twin, graph, region, second))]


def _sized(inputs: tuple[Tensor, ...], batch: int, grow: set[int]) -> tuple[Tensor, ...]:
    out = []
    for t in inputs:
        shape = [batch] + [s + 2 * max(1, s // 4) + 2 * d if d in grow else s
                           for d, s in enumerate(t.shape) if d > 0]  # fmt: skip
        make = torch.randn if t.is_floating_point() else torch.zeros
        out.append(make(shape, dtype=t.dtype, device=t.device))
    return tuple(out)


class _Capture(fx.Interpreter):
    def __init__(self, module: nn.Module, graph: fx.Graph, keep: set[fx.Node]):
        super().__init__(module, graph=graph)
        self.keep: set[fx.Node] = keep
        self.seen: dict[fx.Node, tuple[Tensor | None, tuple | None]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, Tensor):
            self.seen[n] = (out.detach().clone() if n in self.keep else None, tuple(out.shape))
        return out


def _capture(module: nn.Module, graph: fx.Graph, region: set[fx.Node], inputs) -> dict:
    """Each region node's value, and every tensor node's shape, on `inputs` in eval mode."""
    was_training = module.training
    try:
        with torch.no_grad():
            c = _Capture(module.eval(), graph, region)
            c.run(*inputs)
    finally:
        module.train(was_training)
    return {n: c.seen.get(n, (None, None)) for n in graph.nodes}


def _uniform_dims(n: fx.Node, probes: list[Probe]) -> list[int] | None:
    """The dims along which `n`'s value is uniform at every probe, if what is left is the
    same at every probe: then one small constant stands for `n` at every size."""
    values = [seen[n][0] for _, seen in probes]
    if any(v is None for v in values):
        return None
    dims = [d for d in range(values[0].dim()) if all(_uniform(v, d) for v in values)]
    left = []
    for v in values:
        for d in dims:
            v = v.narrow(d, 0, 1)
        left.append(v)
    if any(v.shape != left[0].shape or not torch.equal(v, left[0]) for v in left[1:]):
        return None
    return dims


def _foldable(n: fx.Node, probes: list[Probe], values: dict) -> bool:
    """Uniform as the random-weight probes say, and so in the real weights' values too (a
    safeguard: folding then stays exact whatever the probes missed)."""
    dims = _uniform_dims(n, probes)
    return dims is not None and all(_uniform(values[n][0], d) for d in dims)


def _uniform(t: Tensor, d: int) -> bool:
    return d < t.dim() and (t.shape[d] == 1 or torch.equal(t.narrow(d, 0, 1).expand_as(t), t))


def _readers(n: fx.Node, foldable: set[fx.Node]) -> list[fx.Node]:
    """The nodes outside the folded part that read `n`."""
    return [u for u in n.users if u not in foldable]


def _live_outside(graph: fx.Graph, region: set[fx.Node]) -> set[fx.Node]:
    """Nodes outside `region` that stay computed once the region is folded."""
    live, stack = set(), [n for n in graph.nodes if n.op == "output"]
    while stack:
        n = stack.pop()
        if n in live or n in region:
            continue
        live.add(n)
        stack.extend(n.all_input_nodes)
    return live


def _size_reference(n, readers, probes, live, order) -> dict[int, tuple] | None | bool:
    """None where every reader broadcasts a small constant to the full shape itself; else,
    for each dim the constant is uniform along and `n` is larger than 1, a live node
    computed before the first reader, and its dim, of that size at every probe (the batch
    and spatial sizes of a block input, say), to expand the constant with; False if some
    dim has none."""
    if all(_broadcasts(u, n, probes) for u in readers):
        return None
    first = min(order[u] for u in readers)
    before = [m for m in sorted(live, key=order.__getitem__) if order[m] < first]
    later = [m for m in sorted(live, key=order.__getitem__) if order[m] >= first
             and _late_ancestors(m, first, order, live) is not None]  # fmt: skip
    candidates = before + later
    sizes = {}
    for d in _uniform_dims(n, probes):
        wanted = [seen[n][1][d] for _, seen in probes]
        if all(w == 1 for w in wanted):
            continue
        found = _dim_of_size(candidates, wanted, d, probes)
        if found is None:
            return False
        sizes[d] = found
    return sizes


def _late_ancestors(m: fx.Node, first: int, order: dict, live: set) -> list[fx.Node] | None:
    """`m` and what it needs from position `first` on, in order, if they can all move before
    that position: live, pure nodes (a shortcut conv that the graph computes after the
    branch); else None."""
    needed, stack = set(), [m]
    while stack:
        n = stack.pop()
        if n in needed or order[n] < first:
            continue
        if n not in live or n.op not in ("get_attr", "call_module", "call_function",
                                         "call_method") or is_inplace(n) or n.is_impure():
            return None
        needed.add(n)
        stack.extend(n.all_input_nodes)
    return sorted(needed, key=order.__getitem__)


def _dim_of_size(candidates, wanted: list[int], prefer: int, probes) -> tuple | None:
    """A candidate node and a dim of it whose size is `wanted` at every probe, the same dim
    `prefer` first."""
    for same_dim in (True, False):
        for m in candidates:
            shapes = [seen[m][1] for _, seen in probes]
            if any(s is None for s in shapes):
                continue
            dims = [prefer] if same_dim else range(len(shapes[0]))
            for e in dims:
                if all(e < len(s) and s[e] == w for s, w in zip(shapes, wanted, strict=True)):
                    return m, e
    return None


def _broadcasts(user: fx.Node, n: fx.Node, probes: list[Probe]) -> bool:
    """An elementwise op whose other operand already has the result's full shape."""
    elementwise = (user.op == "call_function" and user.target in BROADCASTING) or (
        user.op == "call_method" and user.target in BROADCASTING_METHODS
    )
    others = [a for a in user.args[:2] if isinstance(a, fx.Node) and a is not n]
    return elementwise and any(
        all(seen[a][1] == seen[user][1] for _, seen in probes) for a in others
    )


def _replace(work: fx.GraphModule, n: fx.Node, readers: list[fx.Node], value: Tensor,
             sizes: dict[int, tuple] | None, name: str) -> None:  # fmt: skip
    """`readers` read the constant `value` instead of `n`, expanded along `sizes`' dims to
    the sizes of the (node, dim) each names."""
    while hasattr(work, name):
        name += "_"
    work.register_buffer(name, value)
    graph = work.graph
    order = {m: i for i, m in enumerate(graph.nodes)}
    first = min(readers, key=order.__getitem__)
    live = set(graph.nodes)
    for ref in dict.fromkeys(ref for ref, _ in (sizes or {}).values()):
        order = {m: i for i, m in enumerate(graph.nodes)}
        for m in _late_ancestors(ref, order[first], order, live) or []:
            first.prepend(m)  # computed later in the graph: move it up
    with graph.inserting_before(first):
        const = graph.get_attr(name)
        if sizes:
            shape = [graph.call_method("size", sizes[d]) if d in sizes else -1
                     for d in range(value.dim())]  # fmt: skip
            const = graph.call_method("expand", (const, *shape))
    for user in readers:
        user.replace_input_with(n, const)
        if is_inplace(user) and user.args[0] is const:  # never update a constant in place
            user.target = user.target[:-1]


def _erase_unused(graph: fx.Graph, region: set[fx.Node]) -> None:
    """Region nodes nothing reads any more, in-place ones included (they only update the
    region's own values)."""
    for n in reversed(list(graph.nodes)):
        if n in region and not n.users:
            graph.erase_node(n)

"""Part of step 6: fold what a fully closed channel gate turns into constants.

A middle or before gate with every channel closed feeds zeros to the layers after it. All
that is computed from those zeros alone (the constant region) no longer depends on the
input's values, only, at most, on its size: a conv's bias, an SE's scale. The region is
replaced at its boundary by constants, reduced to the dims they vary along (one value per
channel, as a rule), so the slim model stays exact at every input size and its buffers have
the same shapes whatever the weights, which `load` relies on.

Which dims a value varies along is decided on a copy with two draws of random weights, at
two input sizes, and never on the real weights: they may make a value uniform by accident
(a zero bias), or not quite (a sigmoid's vectorized tail rounds differently), and `load`,
which replays the surgery on fresh weights, would then cut and fold otherwise.
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
    probes = _probes(work, graph, region, zeros, inputs)
    values = _capture(work, graph, region, zeros, probes[0][1])
    order = {n: i for i, n in enumerate(graph.nodes)}
    live = _live_outside(graph, region)
    foldable = {n for n in region if _uniform_dims(n, probes) is not None}
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
            if not _uniform(value, d, probe=False):
                raise RuntimeError(
                    f"internal error: folding '{n.name}', uniform along dim {d} with random "
                    "weights but not with the model's"
                )
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


Probe = tuple[int, tuple[Tensor, ...], dict[fx.Node, tuple[Tensor | None, tuple | None]]]


def _probes(work: fx.GraphModule, graph: fx.Graph, region: set[fx.Node], zeros, inputs):
    """The region's values on a copy with random weights (so that no value is uniform by the
    accident of its weights, e.g. a zero bias), at batch 2 and the example size, and at batch
    3 and a larger size where the model takes one; each `(draw, inputs, seen)`. Two draws:
    positive weights and negative running means, so that the zeros stay positive after norms
    and a ReLU never zeroes them all by chance; and signed ones, where a sigmoid that the
    first draw's large values saturate to 1 still varies."""
    twin = copy.deepcopy(work)
    g = torch.Generator().manual_seed(0)
    first = _sized(inputs, 2, set(), g)
    ndim = inputs[0].dim()
    larger = ([set(range(2, ndim))] if ndim > 2 else []) + ([{1}] if ndim == 3 else [])
    sizes = [_sized(inputs, 3, grow, g) for grow in larger] + [_sized(inputs, 3, set(), g)]
    probes = []
    for draw in (0, 1):
        _draw_weights(twin, draw, g)
        probes.append((draw, first, _capture(twin, graph, region, zeros, first)))
        for i, second in enumerate(sizes):
            try:
                probes.append((draw, second, _capture(twin, graph, region, zeros, second)))
            except Exception:  # noqa: BLE001 - the model takes one size only: try the next
                if i == len(sizes) - 1:
                    raise
                continue
            sizes = [second]  # the size it takes, for the next draw
            break
    return probes


def _draw_weights(twin: nn.Module, draw: int, g: torch.Generator) -> None:
    """Every float parameter and buffer of `twin` drawn anew from `g`; a layer's weight is
    scaled by its fan-in, so that values neither overflow nor saturate along a branch."""
    with torch.no_grad():
        for name, t in [*twin.named_parameters(), *twin.named_buffers()]:
            if not t.is_floating_point():
                continue
            if draw == 0 or name.endswith("running_var"):
                fresh = torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.5
                fresh = -fresh if draw == 0 and name.endswith("running_mean") else fresh
            else:
                fresh = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if t.dim() >= 2 and t.numel():
                fresh = fresh / (t.numel() // t.shape[0]) ** (1.0 if draw == 0 else 0.5)
            t.copy_(fresh.to(t.dtype))


def _sized(inputs: tuple[Tensor, ...], batch: int, grow: set[int], g) -> tuple[Tensor, ...]:
    out = []
    for t in inputs:
        shape = [batch] + [s + 2 * max(1, s // 4) + 2 * d if d in grow else s
                           for d, s in enumerate(t.shape) if d > 0]  # fmt: skip
        if t.is_floating_point():  # seeded: the surgery leaves the global RNG alone
            out.append(torch.randn(shape, generator=g).to(t.dtype).to(t.device))
        else:
            out.append(torch.zeros(shape, dtype=t.dtype, device=t.device))
    return tuple(out)


class _Capture(fx.Interpreter):
    def __init__(self, module: nn.Module, graph: fx.Graph, keep: set[fx.Node], zeros):
        super().__init__(module, graph=graph)
        self.keep: set[fx.Node] = keep
        self.zeros: set[fx.Node] = set(zeros)
        self.seen: dict[fx.Node, tuple[Tensor | None, tuple | None]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.zeros:  # not ``inf * 0``: a probe's positive weights may overflow
            out = torch.zeros_like(out)
        if isinstance(out, Tensor):
            self.seen[n] = (out.detach().clone() if n in self.keep else None, tuple(out.shape))
        return out


def _capture(module: nn.Module, graph: fx.Graph, region: set[fx.Node], zeros, inputs) -> dict:
    """Each region node's value, and every tensor node's shape, on `inputs` in eval mode."""
    was_training = module.training
    try:
        with torch.no_grad():
            c = _Capture(module.eval(), graph, region, zeros)
            c.run(*inputs)
    finally:
        module.train(was_training)
    return {n: c.seen.get(n, (None, None)) for n in graph.nodes}


def _uniform_dims(n: fx.Node, probes: list[Probe]) -> list[int] | None:
    """The dims along which `n`'s value is uniform at every probe, if what is left is the
    same at every probe: then one small constant stands for `n` at every size."""
    values = [seen[n][0] for *_, seen in probes]
    if any(v is None for v in values):
        return None
    dims = [d for d in range(values[0].dim()) if all(_uniform(v, d) for v in values)]
    left: dict[int, list[Tensor]] = {}
    for (draw, *_), v in zip(probes, values, strict=True):
        for d in dims:
            v = v.narrow(d, 0, 1)
        left.setdefault(draw, []).append(v)
    if any(not _close(same[0], v) for same in left.values() for v in same[1:]):
        return None
    return dims


def _uniform(t: Tensor, d: int, probe: bool = True) -> bool:
    return d < t.dim() and (t.shape[d] == 1 or _close(t, t.narrow(d, 0, 1).expand_as(t), probe))


def _close(a: Tensor, b: Tensor, probe: bool = True) -> bool:
    """Equal up to rounding, relative to `a`'s largest finite magnitude: one value computed
    at two places may differ in its last bits (a vectorized kernel's scalar tail, the
    blocking of another batch size), and what is uniform must not hang on them. A `probe`
    that overflowed proves nothing: it is never close."""
    if a.shape != b.shape:
        return False
    if not a.is_floating_point() or not a.numel():
        return torch.equal(a, b)
    if probe and not (a.isfinite().all() and b.isfinite().all()):
        return False
    scale = a.detach().abs().nan_to_num(0.0, 0.0, 0.0).amax().item()
    eps = torch.finfo(a.dtype).eps
    # the model's own values only check the probes: no failure for rounding near zero
    tol = min(eps**0.5, 2**10 * eps) * scale if probe else eps**0.5 * max(scale, 1.0)
    return torch.allclose(a, b, rtol=0.0, atol=tol, equal_nan=not probe)


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
        wanted = [seen[n][1][d] for *_, seen in probes]
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
        if (
            n not in live
            or n.op not in ("get_attr", "call_module", "call_function", "call_method")
            or is_inplace(n)
            or n.is_impure()
        ):
            return None
        needed.add(n)
        stack.extend(n.all_input_nodes)
    return sorted(needed, key=order.__getitem__)


def _dim_of_size(candidates, wanted: list[int], prefer: int, probes) -> tuple | None:
    """A candidate node and a dim of it whose size is `wanted` at every probe, the same dim
    `prefer` first."""
    for same_dim in (True, False):
        for m in candidates:
            shapes = [seen[m][1] for *_, seen in probes]
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
        all(seen[a][1] == seen[user][1] for *_, seen in probes) for a in others
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

"""Step 2: find residual merges in a traced graph, and the channel points in their branches.

A residual merge is a sum whose operands split, at the sum's immediate dominator S (the block
input), into a shortcut (S itself, or a short projection of S) and one or more branches
computed only from S. ../docs/block-finding.md lists the rules and the traps they avoid.
Where channel gates go inside a branch is up to a `positions.ChannelPosition`, which reads
the graph through `ChannelFacts`.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .positions import ChannelPoint, ChannelPosition, position_named
from .tracing import input_placeholders


@dataclass
class OpTable:
    """The ops that play one role in block finding, by how the graph calls them: module
    types (`call_module`), functions (`call_function`) and method names (`call_method`)."""

    modules: tuple[type[nn.Module], ...] = ()
    functions: set = field(default_factory=set)
    methods: set[str] = field(default_factory=set)

    def matches(self, n: fx.Node, modules: dict[str, nn.Module]) -> bool:
        if n.op == "call_module":
            return isinstance(modules[n.target], self.modules)
        if n.op == "call_method":
            return n.target in self.methods
        return n.op == "call_function" and n.target in self.functions

    def add(self, op: type[nn.Module] | Callable | str) -> None:
        if isinstance(op, str):
            self.methods.add(op)
        elif isinstance(op, type) and issubclass(op, nn.Module):
            self.modules = (*self.modules, op)
        elif callable(op):
            self.functions.add(op)
        else:
            raise TypeError(f"an op is an nn.Module class, a function or a method name, not {op!r}")


ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}

# Ops whose tensor output depends on their input's shape only.
SHAPE_ONLY_FUNCTIONS = {
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
    torch.rand_like, torch.randn_like, torch.randint_like,
}  # fmt: skip
SHAPE_ONLY_METHODS = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}

CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear}
POOL_FUNCTIONS = {
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool2d,
}  # fmt: skip
POOL_MODULES = (
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)  # fmt: skip

# Ops that mix information across channels, positions or tokens: a branch needs one. A
# module mixes too when it holds a weight matrix (conv, linear, attention).
MIXING = OpTable(
    modules=POOL_MODULES,
    functions=CONV_FUNCTIONS | POOL_FUNCTIONS | {
        F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.bilinear,
        torch.matmul, torch.bmm, torch.mm, torch.einsum, torch.baddbmm, torch.addmm,
        torch.addbmm, operator.matmul, F.scaled_dot_product_attention,
    },
    methods={"matmul", "bmm", "mm", "__matmul__"},
)  # fmt: skip
ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.addcmul, torch.addcdiv, torch.where,
}  # fmt: skip

# What a projection shortcut may be made of: conv/linear, norm, pooling, resampling, padding,
# slicing and reshaping (ResNet-B/D, CIFAR option A, GhostNet, RegNet, ...).
SHORTCUT = OpTable(
    modules=(
        nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm,
        nn.GroupNorm, nn.Identity, nn.Upsample, nn.Flatten, nn.modules.dropout._DropoutNd,
        *POOL_MODULES,
    ),
    functions=CONV_FUNCTIONS | POOL_FUNCTIONS | {
        F.pad, operator.getitem, torch.cat, torch.flatten, F.interpolate, F.batch_norm,
        F.layer_norm, F.group_norm, F.pixel_unshuffle,
    },
    methods={
        "view", "reshape", "permute", "transpose", "contiguous", "flatten", "to", "type_as",
        "float", "half", "bfloat16", "expand", "repeat", "__getitem__",
    },
)  # fmt: skip
MAX_SHORTCUT_OPS = 4


@dataclass(frozen=True)
class Branch:
    """One gateable residual branch: ``merge`` adds ``output`` onto a shortcut of ``input``."""

    name: str
    input: fx.Node
    output: fx.Node
    merge: fx.Node  # the add node that takes `output` as an argument
    nodes: frozenset[fx.Node]


@dataclass(frozen=True)
class Rejected:
    """A sum that looked like a merge but is not a residual block, and why."""

    node: str
    module: str
    reason: str


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ADD_METHODS
    )


def _tensor_valued(node: fx.Node) -> bool:
    """Whether the node's recorded value is one tensor (its shape a tuple of sizes)."""
    shape = node.meta.get("cg_shape")
    return isinstance(shape, tuple) and all(isinstance(d, int) for d in shape)


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


class _Graph:
    """Data-flow facts about a traced graph: which nodes carry input data, and dominators."""

    def __init__(self, gm: fx.GraphModule, num_inputs: int):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        inputs = set(input_placeholders(gm)[:num_inputs])
        self.data: set[fx.Node] = set()
        for n in gm.graph.nodes:
            if n in inputs or (
                n.meta.get("cg_tensor")
                and not self._shape_only(n)
                and any(a in self.data for a in n.all_input_nodes)
            ):
                self.data.add(n)
        self.idom: dict[fx.Node, fx.Node | None] = {}
        for n in gm.graph.nodes:  # one pass suffices on a DAG in topological order
            if n not in self.data:
                continue
            preds = [a for a in n.all_input_nodes if a in self.data]
            dom = None
            if preds:
                dom = preds[0]
                for p in preds[1:]:
                    dom = self._intersect(dom, p)
            self.idom[n] = dom

    @staticmethod
    def _shape_only(n: fx.Node) -> bool:
        return (n.op == "call_function" and n.target in SHAPE_ONLY_FUNCTIONS) or (
            n.op == "call_method" and n.target in SHAPE_ONLY_METHODS
        )

    def _intersect(self, a: fx.Node | None, b: fx.Node | None) -> fx.Node | None:
        while a is not b:
            if a is None or b is None:
                return None
            while a is not None and b is not None and self.order[a] > self.order[b]:
                a = self.idom[a]
            while a is not None and b is not None and self.order[b] > self.order[a]:
                b = self.idom[b]
        return a

    def arm(self, operand: fx.Node, start: fx.Node) -> set[fx.Node]:
        """Data nodes on the paths from `start` (excluded) to `operand` (included)."""
        found, stack = set(), [operand]
        while stack:
            n = stack.pop()
            if n is start or n in found:
                continue
            found.add(n)
            stack.extend(a for a in n.all_input_nodes if a in self.data)
        return found

    def escapes(self, nodes: set[fx.Node], inside: set[fx.Node]) -> bool:
        """Whether a value of `nodes` is used outside `inside`, also through shape-only users."""
        seen: set[fx.Node] = set()
        stack = [u for n in nodes for u in n.users]
        while stack:
            u = stack.pop()
            if u in inside or u in seen:
                continue
            seen.add(u)
            if u in self.data or u.op == "output":
                return True
            stack.extend(u.users)  # a shape or size read: follow it to its data users
        return False

    def mixes(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            m = self.modules[n.target]
            return isinstance(m, MIXING.modules) or any(p.dim() >= 2 for p in m.parameters())
        if MIXING.matches(n, self.modules):
            return True
        if n.op != "call_function":
            return False
        # e.g. a wrapped attention function fed with a weight matrix
        return n.target not in ELEMENTWISE_FUNCTIONS and any(
            a.op == "get_attr" and _is_matrix(operator.attrgetter(a.target)(self.gm))
            for a in n.all_input_nodes
        )

    def through_identity(self, n: fx.Node) -> fx.Node:
        """What `n` passes on unchanged: ``nn.Identity()(x)`` is ``x`` (timm's shortcuts)."""
        while n.op == "call_module" and isinstance(self.modules[n.target], nn.Identity):
            n = n.args[0]
        return n

    def shortcut_op(self, n: fx.Node) -> bool:
        return SHORTCUT.matches(n, self.modules)


def _is_matrix(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 2


def _flatten_sum(
    root: fx.Node, absorbed: set[fx.Node]
) -> tuple[list[tuple[fx.Node, fx.Node]], set]:
    """Operands of a chain of adds as (holder add, operand) pairs, and the adds in the chain."""
    operands, adds, stack = [], {root}, [root]
    while stack:
        add = stack.pop()
        for a in add.args[:2]:
            if isinstance(a, fx.Node) and a in absorbed:
                adds.add(a)
                stack.append(a)
            elif isinstance(a, fx.Node):
                operands.append((add, a))
    return operands, adds


def find_blocks(gm: fx.GraphModule, num_inputs: int = 1) -> tuple[list[Branch], list[Rejected]]:
    """Residual branches of a traced graph whose nodes carry ``cg_shape`` (see `record_shapes`)."""
    g = _Graph(gm, num_inputs)
    # of tensors: ``(hidden,) + outputs[1:]`` is an add node too (UMT5)
    adds = [n for n in gm.graph.nodes if is_add(n) and n in g.data and _tensor_valued(n)]
    # An add whose only user is another add (with no `alpha`) is one term of a larger sum.
    tensor_adds = set(adds)
    absorbed = {
        n
        for n in adds
        if len(n.users) == 1 and not n.kwargs and next(iter(n.users)) in tensor_adds
    }
    found: list[tuple[str, fx.Node, fx.Node, fx.Node, set]] = []
    rejected: list[Rejected] = []
    for root in adds:
        if root in absorbed:
            continue
        operands, sum_nodes = _flatten_sum(root, absorbed)
        data_ops = [(h, o) for h, o in operands if o in g.data]
        if len(data_ops) < 2:
            continue  # adds a parameter, constant or shape-derived tensor: not a merge
        reason, branches = _classify(g, root, data_ops, sum_nodes)
        if reason:
            rejected.append(Rejected(root.name, _module_path(root), reason))
        else:
            found.extend((_module_path(root), g.idom[root], h, o, arm) for h, o, arm in branches)
    return _name_branches(g, found), rejected


def _classify(g: _Graph, root: fx.Node, data_ops, sum_nodes):
    if any(
        u.op == "call_function" and u.target is operator.setitem for a in sum_nodes for u in a.users
    ):
        return "slice-assignment residual (x[:, :C] += ...): not supported", []
    if any(
        h.op == "call_method"
        and h.target == "add_"
        and h.args[0].op == "call_function"
        and h.args[0].target is operator.getitem
        for h in sum_nodes
    ):
        return "in-place add into a slice: not supported", []
    start = g.idom[root]
    if start is None:
        return "the operands share no block input", []
    operands = [o for _, o in data_ops]
    if len(set(operands)) != len(operands):
        return "the same value is added twice", []
    arms = [g.arm(o, start) if o is not start else set() for o in operands]
    for arm in arms:
        if g.escapes(arm, set().union(*arms) | sum_nodes):
            return "a value inside the block is also used outside it", []
    identity = [i for i, o in enumerate(operands) if g.through_identity(o) is start]
    if len(operands) > 2 and len(identity) != 1:
        return (
            f"a sum of {len(operands)} parallel branches without a bare identity (RepVGG-style)",
            [],
        )
    if identity:
        skip = identity[0]
    else:  # two operands: the shortcut is the short, projection-only one
        skip = min(range(2), key=lambda i: len(arms[i]))
        other = 1 - skip
        if len(arms[skip]) >= len(arms[other]):
            return "two parallel branches of equal length, neither is a shortcut", []
        if len(arms[skip]) > MAX_SHORTCUT_OPS or not all(g.shortcut_op(n) for n in arms[skip]):
            return "neither operand is the block input or a projection shortcut of it", []
    branches = [(data_ops[i][0], operands[i], arms[i]) for i in range(len(operands)) if i != skip]
    if arms[skip] & set().union(*(arm for _, _, arm in branches)):
        return "the shortcut and a branch share nodes (a block with two inputs)", []
    if not all(any(g.mixes(n) for n in arm) for _, _, arm in branches):
        return "a branch has no conv, linear, attention or pooling (a norm or embedding add)", []
    return None, sorted(branches, key=lambda b: g.order[b[1]])


def _name_branches(g: _Graph, found) -> list[Branch]:
    """Name each branch by the module whose forward does the merge (``layer2.3``); blocks with
    several merges (a transformer's attention and MLP) add the branch's heaviest child module."""
    by_path = defaultdict(int)
    for path, *_ in found:
        by_path[path] += 1
    names: list[str] = []
    for path, _, _, _, arm in found:
        name = path
        if by_path[path] > 1 or not path:
            child = _heaviest_child(g, path, arm)
            name = f"{path}.{child}" if path and child else (child or path)
        names.append(name or "block")
    counts: dict[str, int] = defaultdict(int)
    branches = []
    for name, (_, start, holder, output, arm) in zip(names, found, strict=True):
        counts[name] += 1
        if names.count(name) > 1:
            name = f"{name}#{counts[name]}"
        branches.append(Branch(name, start, output, holder, frozenset(arm)))
    return branches


def _heaviest_child(g: _Graph, path: str, arm: set[fx.Node]) -> str:
    """The child of module `path` that holds most of the branch's parameters."""
    prefix = f"{path}." if path else ""
    targets = {n.target for n in arm if n.op == "call_module"}
    targets |= {a.target for n in arm for a in n.all_input_nodes if a.op == "get_attr"}
    children = {t[len(prefix) :].split(".")[0] for t in targets if t.startswith(prefix)}

    def size(child: str) -> int:
        m = g.modules.get(prefix + child)
        return sum(p.numel() for p in m.parameters()) if m is not None else 0

    return max(sorted(children), key=size, default="")


# Per-channel ops: channel c of the output depends on channel c of the input only.
CHANNELWISE = OpTable(
    modules=(
        nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish,
        nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardtanh,
        nn.Identity, nn.modules.dropout._DropoutNd,
    ),
    functions={
        F.relu, torch.relu, F.relu6, F.hardtanh, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
        torch.sigmoid, F.sigmoid, torch.tanh, F.leaky_relu, F.elu, F.mish, F.dropout,
    },
    methods={"relu", "relu_", "sigmoid", "tanh"},
)  # fmt: skip
# Ops after which a zeroed channel is still zero (not BN, sigmoid or a conv with a bias).
ZERO_KEEPING = OpTable(
    modules=(
        nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Tanh, nn.LeakyReLU, nn.ELU,
        nn.Mish, nn.Hardtanh, nn.Identity, nn.Flatten, nn.modules.dropout._DropoutNd,
        *POOL_MODULES,
    ),
    functions=POOL_FUNCTIONS | {
        F.relu, torch.relu, F.relu6, F.hardtanh, F.gelu, F.silu, F.hardswish, torch.tanh,
        F.leaky_relu, F.elu, F.mish, F.dropout, torch.flatten,
    },
    methods={"relu", "relu_", "tanh", "flatten"},
)  # fmt: skip
OP_ROLES = {
    "shortcut": SHORTCUT, "mixing": MIXING, "channelwise": CHANNELWISE,
    "zero_keeping": ZERO_KEEPING,
}  # fmt: skip


def register_op(op: type[nn.Module] | Callable | str, *roles: str) -> None:
    """Teach block finding about an op: an `nn.Module` class (kept whole with
    ``leaf_modules=[...]``), a function, or a method name.

    Roles: ``"shortcut"`` (it may form a projection shortcut), ``"mixing"`` (a branch made of
    it is worth gating), ``"channelwise"`` (output channel c reads input channel c only: a
    channel gate may sit before it) and ``"zero_keeping"`` (a zeroed channel stays zero).
    """
    unknown = [r for r in roles if r not in OP_ROLES]
    if unknown or not roles:
        raise ValueError(f"register_op takes roles from {sorted(OP_ROLES)}, got {roles!r}")
    for role in roles:
        OP_ROLES[role].add(op)


def _is_depthwise(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.in_channels == m.out_channels > 1
    )


def is_dense_layer(m: nn.Module | None) -> bool:
    """A layer whose channels torch-pruning can cut: a Linear or a conv that is not depthwise
    (a grouped conv only with the same positions cut in every group, see `layer_groups`)."""
    return isinstance(m, nn.Linear) or (
        isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and not _is_depthwise(m)
    )


def layer_groups(m: nn.Module | None) -> int:
    """1, or a grouped conv's group count: its channels stay in equal groups only when a cut
    removes the same positions from every group, which is what torch-pruning assumes."""
    return m.groups if isinstance(m, nn.modules.conv._ConvNd) else 1


def is_channelwise(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if n.op == "call_module":
        m = modules[n.target]
        return isinstance(m, CHANNELWISE.modules) or _is_depthwise(m)
    return CHANNELWISE.matches(n, modules)


def producer_chain(node: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node] | None:
    """`node`, then the per-channel ops before it, up to the dense layer (conv or linear)
    whose output channels reach `node`; None if something else is on the way."""
    chain = []
    while True:
        chain.append(node)
        if node.op == "call_module" and is_dense_layer(modules[node.target]):
            return chain
        if not is_channelwise(node, modules) or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]


class ChannelFacts(_Graph):
    """What a `ChannelPosition` asks about a traced graph to find its channel points."""

    def module(self, n: fx.Node) -> nn.Module | None:
        return self.modules.get(n.target) if n.op == "call_module" else None

    def is_dense(self, n: fx.Node) -> bool:
        """`n` calls a conv or linear whose channels can be cut (`is_dense_layer`)."""
        return is_dense_layer(self.module(n))

    def producer_chain(self, n: fx.Node) -> list[fx.Node] | None:
        return producer_chain(n, self.modules)

    def channelwise(self, n: fx.Node) -> bool:
        return is_channelwise(n, self.modules)

    def dominates(self, a: fx.Node, n: fx.Node | None) -> bool:
        while n is not None:
            if n is a:
                return True
            n = self.idom.get(n)
        return False

    def dense_readers(self, node: fx.Node, point: fx.Node, inside: frozenset[fx.Node]):
        """The dense layers inside the branch that read `node`'s channels (masked at `point`),
        followed through ops that keep a zeroed channel zero; None if a channel reaches
        anything else (a norm, the merge), where cutting it would not equal zeroing it."""
        if not node.users:
            return None
        found = []
        for user in node.users:
            if user not in inside:
                return None
            if is_dense_layer(self.module(user)):
                found.append(user)
                continue
            further = self.keeps_zero(user, node, point) and self.dense_readers(user, point, inside)
            if not further:
                return None
            found += further
        return found

    def keeps_zero(self, n: fx.Node, via: fx.Node, point: fx.Node) -> bool:
        """A zero channel of `via` stays zero in `n`: an activation with f(0) = 0, pooling,
        flatten, or a product with a value computed from `point` (an SE scale)."""
        m = self.module(n)
        if m is not None:
            return isinstance(m, ZERO_KEEPING.modules) or (_is_depthwise(m) and m.bias is None)
        if n.op == "call_method":
            return n.target in ZERO_KEEPING.methods
        if n.op != "call_function":
            return False
        factors = [a for a in n.args if a is not via]
        return n.target in ZERO_KEEPING.functions or (
            n.target in (operator.mul, torch.mul)
            and all(isinstance(a, fx.Node) and a in self.data and self.dominates(point, a)
                    for a in factors)
        )  # fmt: skip

    def chain_end(self, producer: fx.Node, inside: frozenset[fx.Node]) -> fx.Node:
        """Follow single-use per-channel ops (BN, activations, depthwise convs) from a layer."""
        end = producer
        while len(end.users) == 1:
            (user,) = end.users
            if user not in inside or not self.channelwise(user):
                break
            end = user
        return end

    def groups(self, *layers: fx.Node) -> int:
        """The period a channel pattern needs to cut every grouped conv among `layers`."""
        return math.lcm(*(layer_groups(self.module(n)) for n in layers))

    def channel_dim(self, layer: fx.Node, ndim: int) -> int:
        return ndim - 1 if isinstance(self.module(layer), nn.Linear) else 1


def find_channel_points(
    gm: fx.GraphModule,
    branches: list[Branch],
    position: str | ChannelPosition,
    num_inputs: int = 1,
) -> dict[str, list[ChannelPoint]]:
    """Channel-gate points of each branch at `position` (a `positions.POSITIONS` name, see
    `GateConfig.position`); blocks where no point can be cut exactly get none."""
    where = position_named(position) if isinstance(position, str) else position
    facts = ChannelFacts(gm, num_inputs)
    return {b.name: where.find(facts, b) for b in branches}

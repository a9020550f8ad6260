"""Step 1 of the pipeline: trace a model into a torch.fx graph and record every node's shape."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..errors import InputError, TracingError

# Stochastic-depth modules read `self.training` at run time; traced through, their mode
# would be frozen into the graph, so they stay leaves by default.
DEFAULT_LEAF_CLASS_NAMES = frozenset({"StochasticDepth", "DropPath", "DropBlock2d"})

LeafSpec = Sequence["type[nn.Module] | str"]


def as_input_tuple(example_inputs: Any) -> tuple[Tensor, ...]:
    """Normalise a tensor or a tuple/list of tensors to a tuple."""
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else example_inputs
    if (
        not isinstance(inputs, (tuple, list))
        or not inputs
        or not all(isinstance(t, Tensor) for t in inputs)
    ):
        raise InputError(
            "example_inputs must be a tensor or a tuple of tensors, for example "
            f"torch.randn(2, 3, 32, 32); got {type(example_inputs).__name__}"
        )
    return tuple(inputs)


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...], leaf_names: set[str]):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.user_leaves: set[str] = set()
        self.failed_module: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            self.user_leaves.add(module_qualified_name)
            return True
        if type(m).__name__ in DEFAULT_LEAF_CLASS_NAMES:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module fails first
                self.failed_module = (self.path_of_module(m), type(m).__name__)
            raise


def trace(model: nn.Module, leaf_modules: LeafSpec = ()) -> tuple[fx.GraphModule, list[str]]:
    """Trace a deep copy of `model` in eval mode (so inference semantics are exact).

    Returns the graph module and the qualified names of the modules kept as user leaves.
    """
    if isinstance(leaf_modules, (str, type)):
        leaf_modules = [leaf_modules]
    leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
    leaf_names = {x for x in leaf_modules if isinstance(x, str)}
    if len(leaf_types) + len(leaf_names) != len(leaf_modules):
        raise TypeError("leaf_modules takes nn.Module classes or qualified module names (str)")
    names = dict(model.named_modules())
    unknown = sorted(leaf_names - names.keys())
    if unknown:
        raise ValueError(f"leaf_modules names modules the model does not have: {unknown}")

    model = copy.deepcopy(model).eval()
    tracer = _Tracer(leaf_types, leaf_names)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise TracingError(_trace_failure_message(model, tracer, e)) from e
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    make_inplace_explicit(gm.graph)
    eliminate_dead_code(gm.graph)
    gm.recompile()
    return gm, sorted(tracer.user_leaves)


def is_inplace(n: fx.Node) -> bool:
    """`x.add_(y)` and friends: methods that mutate and return their first argument."""
    return n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("__")


def make_inplace_explicit(graph: fx.Graph) -> None:
    """Point the readers of a tensor that come after an in-place method at that method's node.

    fx records ``out.add_(x); return relu(out)`` with ``relu`` reading ``out`` and the ``add_``
    node unused. The method returns the same tensor, so rewiring changes nothing at run time,
    but it makes the merge visible to the block finder and keeps it alive under DCE.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in list(graph.nodes):
        if is_inplace(n) and isinstance(n.args[0], fx.Node):
            target = n.args[0]
            for user in list(target.users):
                if order[user] > order[n]:
                    user.replace_input_with(target, n)


def eliminate_dead_code(graph: fx.Graph) -> None:
    """fx's DCE, except that in-place methods (which may update state) are kept."""
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or is_inplace(n))


def _trace_failure_message(model: nn.Module, tracer: _Tracer, error: Exception) -> str:
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if tracer.failed_module is None:
        return (
            f"torch.fx could not trace the forward of {type(model).__name__} itself: {cause}. "
            "The top-level forward cannot be a leaf: move the untraceable code (for example "
            "data-dependent `if`/`for` on tensor values) into a submodule and pass that "
            "submodule's name in leaf_modules=[...]."
        )
    path, cls = tracer.failed_module
    return (
        f"torch.fx could not trace module '{path}' ({cls}): {cause}. Mark it as a leaf so it "
        f"is called as a black box: insert_gates(model, example_inputs, leaf_modules=['{path}']) "
        f"or leaf_modules=[{cls}] for every module of that class. No gate is placed inside a leaf."
    )


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once and stores each node's output shape in ``node.meta['cg_shape']``."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as e:
            raise _NodeFailure(n, e) from e
        n.meta["cg_shape"] = fx.node.map_aggregate(
            out, lambda v: tuple(v.shape) if isinstance(v, Tensor) else None
        )
        n.meta["cg_tensor"] = _contains_tensor(out)
        return out


def _contains_tensor(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_contains_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_contains_tensor(v) for v in value.values())
    return False


class _NodeFailure(Exception):
    def __init__(self, node: fx.Node, error: Exception):
        super().__init__(str(error))
        self.node, self.error = node, error


def input_placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def record_shapes(gm: fx.GraphModule, example_inputs: tuple[Tensor, ...]) -> None:
    """Run `gm` on the example inputs. A mismatch raises an `InputError` that names the
    expected shape."""
    placeholders = input_placeholders(gm)
    required = [p for p in placeholders if not p.args]  # no default value
    if not len(required) <= len(example_inputs) <= len(placeholders):
        raise InputError(
            f"the model's forward takes {len(required)}"
            + (f" to {len(placeholders)}" if len(placeholders) > len(required) else "")
            + f" input(s) ({', '.join(p.name for p in placeholders)}); "
            f"example_inputs has {len(example_inputs)}"
        )
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*example_inputs)
    except _NodeFailure as f:
        for placeholder, t in zip(placeholders, example_inputs, strict=False):
            layer = first_layer(gm, placeholder)
            if layer is not None and layer[1].weight.dtype != t.dtype:
                name, module = layer
                raise InputError(
                    f"example input '{placeholder.name}' has dtype {t.dtype}, but its first "
                    f"layer '{name}' ({type(module).__name__}) has {module.weight.dtype} "
                    f"weights: pass {module.weight.dtype} inputs (for example "
                    f"x.to({module.weight.dtype})), or convert the model with "
                    f"model.to({t.dtype})"
                ) from f.error
        got = ", ".join(str(tuple(t.shape)) for t in example_inputs)
        expected = expected_input_shape(gm, placeholders[0])
        where = f"module '{f.node.target}'" if f.node.op == "call_module" else f"'{f.node.name}'"
        first_line = (str(f.error).strip().splitlines() or [type(f.error).__name__])[0]
        raise InputError(
            f"example_inputs do not fit the model: got {got}"
            + (f", expected {expected}" if expected else "")
            + f". The model failed at {where}: {first_line}"
        ) from f.error
    finally:
        gm.train(was_training)


def first_layer(gm: fx.GraphModule, placeholder: fx.Node) -> tuple[str, nn.Module] | None:
    """The first conv or linear layer that reads `placeholder` (breadth-first, through no
    other layer with weights), by name."""
    modules = dict(gm.named_modules())
    frontier, seen = list(placeholder.users), set()
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        m = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            return node.target, m
        if m is None or not any(True for _ in m.parameters()):  # not past an embedding
            frontier.extend(node.users)
    return None


def expected_input_shape(gm: fx.GraphModule, placeholder: fx.Node) -> str | None:
    """Describe the input shape the first layer that reads `placeholder` expects."""
    layer = first_layer(gm, placeholder)
    if layer is None:
        return None
    name, m = layer
    if isinstance(m, nn.Linear):
        return f"(N, ..., {m.in_features}) for '{name}' (Linear)"
    spatial = {1: "L", 2: "H, W", 3: "D, H, W"}[len(m.kernel_size)]
    return f"(N, {m.in_channels}, {spatial}) for '{name}' ({type(m).__name__})"

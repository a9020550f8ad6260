"""Step 1 for Hugging Face models: trace each transformer layer on its own.

A `PreTrainedModel`'s top-level forward defeats torch.fx (decorators, ``**kwargs``, cache
objects), but its layers, the `GradientCheckpointingLayer`s, trace once the call the parent
really makes is known. `capture_calls` records that call; `trace_layer` traces a forward with
an explicit signature, keeping every argument a graph input where the layer's code allows
and baking in (with a guard) only those its code branches on.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import itertools
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx._symbolic_trace import _maybe_revert_all_patches

from ..errors import InputError, TracingError
from ..fx.tracing import DEFAULT_LEAF_CLASS_NAMES, eliminate_dead_code, make_inplace_explicit
from .cache_calls import as_cache_functions

DROPOUT_FUNCTIONS = {F.dropout, torch.dropout}
MAX_LEAF_RETRIES = 8
# Flags that request extra outputs: False or None asks for nothing, as leaving them out does
# (generate() passes them to an encoder's layers).
OFF_FLAGS = frozenset({"output_attentions", "output_hidden_states", "return_dict"})
# Read by the loss only, but passed down to every layer with the model's **kwargs (the
# Trainer passes it whenever it accumulates gradients over a token count)
LOSS_ONLY = frozenset({"num_items_in_batch"})


def transformer_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's innermost `GradientCheckpointingLayer`s, by qualified name (Swin's
    stages hold its blocks: the blocks are the layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]
    inner = [(n, m) for n, m in found if not any(o.startswith(n + ".") for o, _ in found)]
    config = getattr(model, "config", None)
    groups, layers = (getattr(config, k, None) for k in ("num_hidden_groups", "num_hidden_layers"))
    if isinstance(groups, int) and isinstance(layers, int) and groups < layers:
        raise TracingError(
            f"{type(model).__name__} runs {groups} group(s) of layer weights "
            f"{layers} times (num_hidden_groups={groups}): its layers share weights, so no "
            "layer can be cut without cutting every layer that shares it; it is not supported"
        )
    if not inner:
        raise TracingError(
            f"{type(model).__name__} has no transformer layers that consensus_gates can find "
            "(transformers.modeling_layers.GradientCheckpointingLayer instances). Trace it "
            "whole instead: wrap it in an nn.Module whose forward(x) returns "
            "self.hf(pixel_values=x).logits (or your input), and call insert_gates(wrapper, "
            "x, leaf_modules=[...]) with the modules fx cannot trace (HF ConvNeXt: "
            "leaf_modules=['hf.convnext.embeddings'])"
        )
    return inner


def capture_calls(
    model: nn.Module, inputs: Mapping[str, Any], layers: list[tuple[str, nn.Module]]
) -> dict[str, tuple[tuple, dict[str, Any]]]:
    """The positional and keyword arguments each layer gets in one eval-mode forward of
    ``model(**inputs)``, copied as they arrive (the parent may reuse its tensors)."""
    calls: dict[str, tuple[tuple, dict[str, Any]]] = {}

    def hook(name: str):
        def record(_module, args, kwargs):
            calls.setdefault(name, copy.deepcopy((args, kwargs)))

        return record

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in layers]
    if "use_cache" in inspect.signature(model.forward).parameters:
        # traced with a cache, a layer runs with and without one; traced without, the
        # cache it never saw would be refused
        inputs = {**inputs, "use_cache": True}
    try:
        with torch.no_grad():
            model(**inputs)
    except (ValueError, TypeError, RuntimeError, IndexError) as e:
        raise InputError(
            f"{type(model).__name__} failed on the example inputs ({', '.join(inputs)}): "
            f"{_first_line(e)}"
        ) from e
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, _ in layers if n not in calls]
    if missing:
        raise TracingError(
            f"layers {missing} of {type(model).__name__} were not called by a forward of the "
            f"example inputs ({', '.join(inputs)}); pass inputs that run every layer (an "
            "encoder-decoder needs decoder_input_ids or labels)"
        )
    return calls


@dataclass
class LayerCall:
    """How the parent calls a layer and how its graph takes the call: ``names`` are the
    forward's parameters in order (``**kwargs`` entries last), ``inputs`` those that are
    graph inputs, ``concrete`` the rest with the values baked into the graph."""

    positional: list[str]
    names: list[str]
    inputs: list[str]
    concrete: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)

    def values(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every argument of a call by name, the forward's defaults filled in."""
        return {**self.defaults, **dict(zip(self.positional, args, strict=False)), **kwargs}

    def bind(self, layer: str, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
        """The graph's inputs for a call ``layer(*args, **kwargs)``; a call the graph was not
        traced for is refused, naming the argument."""
        if len(args) > len(self.positional):
            raise TypeError(f"layer '{layer}' takes {len(self.positional)} positional arguments")
        values = self.values(args, kwargs)
        unknown = sorted(
            k for k in set(values) - set(self.names) - LOSS_ONLY
            if not (k in OFF_FLAGS and not values[k])
        )
        if unknown:
            raise TypeError(
                f"layer '{layer}' was traced without the arguments {unknown}, so its graph "
                "cannot pass them on; call insert_gates with example inputs whose forward "
                "passes them"
            )
        for name, baked in self.concrete.items():
            if not _same_constant(values.get(name, baked), baked):
                raise TypeError(
                    f"layer '{layer}' was traced with {name}={_shown(baked)}, and its code "
                    f"branches on it; this call passes {_shown(values.get(name))}. Call "
                    "insert_gates with example inputs that make the parent pass the same"
                )
        return [values.get(n) for n in self.inputs]


def _same_constant(value: Any, baked: Any) -> bool:
    if baked is None or value is None:
        return value is baked
    return type(value) is type(baked) and value == baked


def _shown(value: Any) -> str:
    return repr(value) if value is None or isinstance(value, (bool, int, tuple)) else (
        f"a {type(value).__name__}"
    )


def _is_graph_input(value: Any) -> bool:
    """Tensors, tuples of them and cache objects always flow in as graph inputs."""
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return bool(value) and all(isinstance(v, Tensor) for v in value)
    return value is not None and not isinstance(value, (bool, int, float, str, tuple, list))


def layer_signature(layer: nn.Module) -> inspect.Signature:
    return inspect.signature(inspect.unwrap(type(layer).forward))


def signature_defaults(layer: nn.Module) -> dict[str, Any]:
    """The default value of each of the layer's forward parameters that has one."""
    params = layer_signature(layer).parameters.values()
    return {p.name: p.default for p in params if p.default is not p.empty}


def _bound_call(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> LayerCall:
    sig = layer_signature(layer)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    named = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    extra = [k for k in kwargs if k not in named]
    if extra and not any(p.kind is p.VAR_KEYWORD for p in params):
        raise TracingError(f"{type(layer).__name__} got unexpected arguments {extra}")
    return LayerCall(positional, named + extra, [], {}, signature_defaults(layer))


def trace_layer(
    layer: nn.Module,
    path: str,
    args: tuple,
    kwargs: dict[str, Any],
    hint: frozenset[str] = frozenset(),
    keep: frozenset[str] = frozenset(),
) -> tuple[fx.GraphModule, LayerCall, list[Any]]:
    """Trace one layer for the call ``layer(*args, **kwargs)``.

    Arguments start as graph inputs; if the trace fails or its graph does not reproduce the
    layer exactly, every non-tensor argument is baked in, then each is freed again if the
    graph stays exact. `hint`: the arguments a layer of the same class needed baked, tried
    first. `keep`: modules traced as leaves from the start. Returns the graph module
    (sharing the layer's modules), the call and the graph's example inputs.
    """
    call = _bound_call(layer, args, kwargs)
    values = call.values(args, kwargs)
    expected = _run_eager(layer, args, kwargs)
    free = [n for n in call.names if not _is_graph_input(values.get(n))]
    errors: list[str] = []
    attempts = [frozenset(hint), frozenset(), frozenset(free)] if hint else [
        frozenset(), frozenset(free)
    ]
    for baked in dict.fromkeys(attempts):
        # leaves start afresh: a module that failed only with an argument left free
        # (DeBERTa's attention, on `query_states is None`) traces once it is baked
        leaves = set(keep)
        gm = _exact_trace(layer, path, call, values, baked, leaves, expected, errors)
        if gm is not None:
            break
    else:
        raise TracingError(
            f"torch.fx could not trace layer '{path}' ({type(layer).__name__}) exactly: "
            f"{errors[-1]}. Try insert_gates(..., leaf_modules=[...]) with the module that "
            "fails, or gate this layer's class as a plain nn.Module"
        )
    for name in sorted(baked):  # free what the code does not branch on
        more = set(leaves)  # freed, an argument must not cost a larger leaf
        trial = _exact_trace(layer, path, call, values, baked - {name}, more, expected, [])
        if trial is not None and more == leaves:
            gm, baked = trial, baked - {name}
    call.inputs = [n for n in call.names if n not in baked]
    call.concrete = {n: values.get(n) for n in call.names if n in baked}
    if not values.get("output_attentions"):
        _drop_attention_weights(gm, expected)
    return gm, call, [values.get(n) for n in call.inputs]


SOFTMAX = {F.softmax, torch.softmax, torch.nn.functional.softmax}
# what may stand between a softmax and the attention weights a layer returns
_PASSING = {F.dropout, torch.dropout, "to", "type_as", "contiguous", "float", "dropout"}


def _drop_attention_weights(gm: fx.GraphModule, expected: Any) -> None:
    """A layer that returns its attention weights beside the hidden states (GPT-Neo, Bloom,
    MPT) returns None there instead, when the call did not ask for them: the parent reads
    them only with ``output_attentions`` (which `LayerCall.bind` refuses), and returned,
    they would make the attention branch's values escape its block, so that it could not
    be gated."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    result = output.args[0]
    if not isinstance(result, (tuple, list)) or len(result) < 2:
        return
    kept = [result[0]] + [
        None if _attention_weights(r) and _probabilities(expected[i]) else r
        for i, r in enumerate(result[1:], 1)
    ]
    if kept != list(result):
        output.args = (type(result)(kept),)
        eliminate_dead_code(gm.graph)
        gm.recompile()


def _attention_weights(value: Any) -> bool:
    """Whether `value` is a node computed by a softmax, or a second output of an attention
    module run as a leaf (its weights), through dropout and casts."""
    while isinstance(value, fx.Node):
        if value.op == "call_function" and value.target in SOFTMAX:
            return True
        if value.op == "call_method" and value.target == "softmax":
            return True
        if value.op == "call_function" and value.target is operator.getitem:
            source, index = value.args
            return (isinstance(source, fx.Node) and source.op == "call_module"
                    and index != 0 and "attention" in _class_of(source).lower())  # fmt: skip
        passing = value.target in _PASSING or (
            value.op == "call_module" and _class_of(value) == "Dropout"
        )  # fmt: skip
        if not passing or not value.args:
            return False
        value = value.args[0]
    return False


def _probabilities(value: Any) -> bool:
    """Whether the layer returned attention probabilities there, [batch, heads, queries,
    keys] rows that sum to 1, and not, say, T5's position bias, which later layers read."""
    return (isinstance(value, Tensor) and value.dim() == 4 and value.is_floating_point()
            and bool((value >= 0).all())
            and torch.allclose(value.sum(-1), value.new_ones(()), atol=1e-3))  # fmt: skip


def _class_of(node: fx.Node) -> str:
    return type(node.graph.owning_module.get_submodule(node.target)).__name__


def _run_eager(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    was = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            return layer(*copy.deepcopy(args), **copy.deepcopy(kwargs))
    finally:
        layer.train(was)


def _exact_trace(
    layer: nn.Module,
    path: str,
    call: LayerCall,
    values: dict[str, Any],
    baked: frozenset[str],
    leaves: set[str],
    expected: Any,
    errors: list[str],
) -> fx.GraphModule | None:
    """A trace with `baked` arguments concrete that reproduces `expected` exactly, adding
    the innermost failing module to `leaves` and retrying; None (with the reason appended
    to `errors`) if there is none."""
    for _ in range(MAX_LEAF_RETRIES):
        tracer = _LayerTracer(leaves, values)
        try:
            gm = _trace(tracer, layer, call, {n: values.get(n) for n in baked})
        except Exception as e:
            failed = tracer.failed_module
            if failed and failed not in leaves:
                leaves.add(failed)
                continue
            errors.append(_first_line(e))
            return None
        as_cache_functions(gm, values)
        inputs = [values.get(n) for n in call.names if n not in baked]
        try:
            # a failing GraphModule prints its generated code to stderr before raising;
            # this is a trial, and its failure is reported (or retried) here
            with contextlib.redirect_stderr(io.StringIO()):
                got = _run_eager(gm, tuple(inputs), {})
        except Exception as e:
            errors.append(f"its graph fails on the traced call: {_first_line(e)}")
            return None
        if not _equal(got, expected):
            errors.append("its graph computes something else than the layer")
            return None
        return gm
    errors.append(f"still failing with {sorted(leaves)} as leaves")
    return None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(
            torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) or a is b


class _LayerTracer(fx.Tracer):
    """fx's tracer with the given leaves, which remembers the innermost module that failed.

    It also runs every op on the traced call's real values beside the trace, so that a
    tensor's ``.dtype`` is concrete: layers branch on it (``if x.dtype == torch.float16``)
    and fx alone cannot decide that. Shapes stay symbolic.
    """

    def __init__(self, leaves: set[str], values: dict[str, Any]):
        super().__init__()
        self.leaves = leaves
        self.values = copy.deepcopy(values)  # leaves may update a cache in place
        self.node_values: dict[fx.Node, Any] = {}
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return (
            qualified_name in self.leaves
            or type(m).__name__ in DEFAULT_LEAF_CLASS_NAMES
            or super().is_leaf_module(m, qualified_name)
        )

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = self.path_of_module(m)
            raise

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, *rest, **options):
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **options)
        try:
            with _maybe_revert_all_patches():  # run the real modules, not the tracer's hooks
                self.node_values[proxy.node] = self._run(kind, target, args, kwargs)
        except Exception:  # unknown: `.dtype` is then traced as usual
            pass
        return proxy

    def _run(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "placeholder":
            return self.values[target]
        args, kwargs = fx.node.map_aggregate((args, kwargs), self._value)
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            return self.root.get_submodule(target)(*args, **kwargs)
        if kind == "get_attr":
            return fx.graph_module._get_attr(self.root, target)
        raise KeyError(kind)

    def _value(self, a: Any) -> Any:
        if isinstance(a, fx.Proxy):
            return self.node_values[a.node]
        return self.node_values[a] if isinstance(a, fx.Node) else a


class _ValueProxy(fx.Proxy):
    def __getattr__(self, k: str) -> Any:
        if k == "dtype":
            value = self.tracer.node_values.get(self.node)
            if isinstance(value, Tensor):
                return value.dtype
        return super().__getattr__(k)


def _trace(
    tracer: _LayerTracer, layer: nn.Module, call: LayerCall, concrete: dict[str, Any]
) -> fx.GraphModule:
    """Trace a shell of `layer` (its modules shared, the layer itself untouched) whose
    forward has an explicit signature, then make dropout follow train/eval again."""
    shell = copy.copy(layer)
    shell._modules, shell._parameters, shell._buffers = (
        dict(layer._modules), dict(layer._parameters), dict(layer._buffers),
    )  # fmt: skip
    forward = _explicit(call, concrete)
    shell.__class__ = type(type(layer).__name__, (type(layer),), {"forward": forward})
    shell.eval()
    graph = tracer.trace(shell)
    gm = fx.GraphModule(tracer.root, graph, class_name=type(layer).__name__)
    _none_outputs_of_leaves(gm.graph, tracer.node_values)
    make_inplace_explicit(gm.graph)
    _live_dropout(gm)
    eliminate_dead_code(gm.graph)
    gm.recompile()
    return gm


def _none_outputs_of_leaves(graph: fx.Graph, values: dict[fx.Node, Any]) -> None:
    """An output of a leaf that was None on the traced call (attention weights, which SDPA
    never computes) is None in the graph: passed on as a value of the leaf, it would keep
    a closed attention branch alive for nothing."""
    for node in list(graph.nodes):
        source = node.args[0] if node.args else None
        if (
            node.op == "call_function" and node.target is operator.getitem
            and isinstance(source, fx.Node) and source.op == "call_module"
            and node in values and values[node] is None
        ):  # fmt: skip
            node.replace_all_uses_with(None)
            graph.erase_node(node)


def _explicit(call: LayerCall, baked: dict[str, Any]):
    """``forward(self, a, b)`` calling the layer's own forward by keyword with the `baked`
    arguments bound: fx needs a real code object with the parameter names (decorators and
    ``**kwargs`` defeat it), and values it never sees as inputs need no guard in the graph
    (`LayerCall.bind` checks them)."""
    namespace: dict[str, Any] = {"_inner": _call_original, "_baked": baked}
    params = ", ".join(n for n in call.names if n not in baked)
    passed = ", ".join(
        f"{n}=_baked[{n!r}]" if n in baked else f"{n}={n}" for n in call.names
    )
    # the names are the layer class's own parameter names: identifiers from its source
    exec(f"def forward(self, {params}):\n    return _inner(self, {passed})\n", namespace)  # noqa: S102
    return namespace["forward"]


def _call_original(shell: nn.Module, **kwargs: Any) -> Any:
    return inspect.unwrap(type(shell).__mro__[1].forward)(shell, **kwargs)


def _live_dropout(gm: fx.GraphModule) -> None:
    """``F.dropout(x, p, training=self.training)`` was traced in eval mode, its mode baked in:
    call an `nn.Dropout(p)` instead, which follows ``model.train()``."""
    counter = itertools.count()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in DROPOUT_FUNCTIONS:
            continue
        params = dict(zip(("input", "p", "training", "inplace"), node.args, strict=False))
        params.update(node.kwargs)
        name = f"cg_dropout_{next(counter)}"
        gm.add_submodule(name, nn.Dropout(float(params.get("p", 0.5))))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (params["input"],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)

"""Step 3 for Hugging Face models: gate the attention and MLP branch of every layer.

The result is still an instance of the model's class (a subclass made once per class, as
`GatedModel` is one per traced model), with each layer replaced by its gated graph.
"""

from __future__ import annotations

import copy
import operator
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..config import GateConfig
from ..fx.gating import gate_graph, gate_whole_graph, match_model
from ..fx.graph_module import META_KEY, Gated, gate_nodes, merge_of
from ..gates.modules import Gate
from .layer import TracedLayer, plain_attributes, traced_layer
from .outputs import install_recording_hooks, kept_modules, recorded_classes, retype
from .tracing import capture_calls, trace_layer, transformer_layers

_CLASSES: dict[tuple[type, type], type] = {}


class TransformerFile:
    """Shared by gated and cut Hugging Face models: `save_pretrained` would write a folder
    that `from_pretrained` fills with random weights, so it refuses."""

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} has gates or cut layers, which from_pretrained() would "
            "rebuild with random weights; save it with consensus_gates.save(model, "
            "'model.safetensors') and load it with consensus_gates.load()"
        )

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        self.save_pretrained()


class GatedTransformer(TransformerFile, Gated):
    """A Hugging Face model whose layers run their gated graphs."""

    def example_inputs(self) -> dict[str, Tensor]:
        return random_inputs(self, self.meta[META_KEY]["inputs"])

    def graphs(self) -> list[TracedLayer]:
        return [layer for _, layer in traced_layers(self)]



def transformer_class(cls: type, role: type) -> type:
    """``Gated<cls>`` or ``Slim<cls>``: `cls` with `role` mixed in, made once."""
    base = getattr(cls, "_cg_original_class", cls)
    if (base, role) not in _CLASSES:
        prefix = "Gated" if role is GatedTransformer else "Slim"
        made = type(f"{prefix}{base.__name__}", (role, base), {"_cg_original_class": base})
        made.__module__ = role.__module__
        _CLASSES[base, role] = made
    return _CLASSES[base, role]


def original_class(model: nn.Module) -> type:
    return getattr(type(model), "_cg_original_class", type(model))


def insert_transformer_gates(
    model: nn.Module, example_inputs: Any, config: GateConfig, leaf_modules: Any = ()
) -> nn.Module:
    """`insert_gates` for a `transformers.PreTrainedModel`: trace each layer for the call
    its parent makes on `example_inputs`, gate its residual branches (named by layer, e.g.
    ``model.layers.3.self_attn``), and put it back. The model is not modified."""
    from .inputs import as_input_dict

    if config.mode != "layer":
        raise ValueError(
            f"GateConfig(mode={config.mode!r}) is not supported for Hugging Face models yet: "
            "their attention and MLP branches take layer gates, mode='layer'"
        )
    if leaf_modules:
        raise ValueError(
            "leaf_modules is for models traced whole; a Hugging Face model's layers are traced "
            "one by one, and the module that fails becomes a leaf by itself"
        )
    inputs = as_input_dict(model, example_inputs)
    gated = copy.deepcopy(model)
    was_training = gated.training
    gated.eval()
    install_recording_hooks(gated)  # on the original layers, carried to the traced ones
    layers = transformer_layers(gated)
    calls = capture_calls(gated, inputs, layers)
    hints: dict[type, frozenset[str]] = {}
    recorded = recorded_classes(gated)
    rejected: list[dict[str, str]] = []
    for path, layer in layers:
        args, kwargs = calls[path]
        hint = hints.get(type(layer), frozenset())
        keep = kept_modules(layer, recorded)
        gm, call, layer_inputs = trace_layer(layer, path, args, kwargs, hint, keep)
        hints[type(layer)] = frozenset(call.concrete)
        what = f"layer '{path}' ({type(layer).__name__})"
        if config.granularity == "layer":
            layer_gated = gate_whole_graph(gm, layer_inputs[0], config, path, what)
        else:
            layer_gated, refused = gate_graph(
                gm, tuple(layer_inputs), config, what, num_inputs=1, prefix=f"{path}."
            )
            rejected += [{**r.__dict__, "module": f"{path}.{r.module}"} for r in refused]
            rejected += _stream_leaves(layer_gated, path)
        match_model(layer_gated, layer, layer_inputs[0])
        name, attributes = type(layer).__name__, plain_attributes(layer)
        set_module(gated, path, traced_layer(layer_gated, call, path, name, attributes, layer))
    _warn_ungated(list(gated_names(gated)), rejected)
    retype(gated, transformer_class(type(gated), GatedTransformer))
    gated.meta = {META_KEY: _meta(gated, inputs, config, rejected)}
    gated.train(was_training)
    return gated


def _stream_leaves(gm: torch.fx.GraphModule, path: str) -> list[dict[str, str]]:
    """Modules run whole (leaves) that take the layer's hidden states and give back the
    stream a gated branch is added to: their own residual addition is inside them, where
    no gate can go (Canine's local attention)."""
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    found = []
    for node, _ in gate_nodes(gm):
        (scaled,) = node.users
        _, skip = merge_of(scaled)
        if getattr(skip, "target", None) is operator.getitem:
            skip = skip.args[0]
        if (isinstance(skip, torch.fx.Node) and skip.op == "call_module" and skip.args
                and skip.args[0] is first  # not an nn.Identity or a dropout:
                and any(True for _ in gm.get_submodule(skip.target).parameters())):  # fmt: skip
            found.append({"node": skip.name, "module": f"{path}.{skip.target}",
                          "reason": "a module run whole (fx cannot trace it) adds its own "
                                    "residual inside"})  # fmt: skip
    return found


def gated_names(model: nn.Module) -> list[str]:
    return [m.name for m in model.modules() if isinstance(m, Gate)]


def _warn_ungated(gates: list[str], rejected: list[dict[str, str]]) -> None:
    """One warning, a line per reason, naming the residual additions left without a gate;
    an addition inside a gated branch (GELU's tanh formula) is the branch's own, not one."""
    ungated: dict[str, list[str]] = {}
    for r in rejected:
        module = r["module"].rstrip(".")
        if not any(module == g or module.startswith(g + ".") for g in gates):
            ungated.setdefault(r["reason"], []).append(f"{module} ({r['node']})")
    if ungated:
        lines = [f"  {reason}: {', '.join(places)}" for reason, places in ungated.items()]
        warnings.warn("insert_gates left residual additions without a gate (cgates inspect "
                      "lists them):\n" + "\n".join(lines), stacklevel=3)  # fmt: skip


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    owner = model.get_submodule(parent)
    if isinstance(owner, nn.ModuleList):
        owner[int(name)] = module
    else:
        setattr(owner, name, module)


def _meta(
    model: nn.Module, inputs: dict[str, Any], config: GateConfig, rejected: list
) -> dict[str, Any]:
    import transformers

    return {
        "kind": "gated",
        "source": None,
        "transformers": {
            "class": original_class(model).__name__,
            "config": model.config.to_dict(),
            "version": transformers.__version__,
            "layers": [p for p, _ in traced_layers(model)],
        },
        "inputs": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in inputs.items()
            if isinstance(v, Tensor)
        },
        "config": config.to_dict(),
        "leaf_modules": [],
        "rejected": rejected,
    }


MAX_EXAMPLE_LENGTH = 512  # tokens


def random_inputs(model: nn.Module, spec: dict[str, dict[str, Any]]) -> dict[str, Tensor]:
    """Inputs of the recorded shapes at batch size 1: token ids drawn from the vocabulary,
    masks of ones, floats from a normal distribution. A sequence of integers (ids, a mask)
    is at most `MAX_EXAMPLE_LENGTH` long: these inputs are traced and counted with, and
    counting attention takes time quadratic in the length, which a file sets."""
    device = next(model.parameters()).device
    vocab = getattr(model.config.get_text_config(), "vocab_size", None) or 2
    out = {}
    for name, s in spec.items():
        shape, dtype = (1, *s["shape"][1:]), getattr(torch, s["dtype"])
        if len(shape) == 2 and not dtype.is_floating_point:
            shape = (1, min(shape[1], MAX_EXAMPLE_LENGTH))
        if dtype.is_floating_point:
            out[name] = torch.randn(shape, dtype=dtype, device=device)
        elif "mask" in name:
            out[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            out[name] = torch.randint(0, vocab, shape, dtype=dtype, device=device)
    return out


def traced_layers(model: nn.Module) -> list[tuple[str, TracedLayer]]:
    """The model's layers that run their graphs (none, once every layer is cut), by path."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TracedLayer)]

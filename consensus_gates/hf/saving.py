"""Step 7 for Hugging Face models: the spec `save` writes for a gated or cut transformer, and
how `load` rebuilds one from it without tracing and without the network.

The spec holds the model's class and ``config.to_dict()``, and for each layer its graph as
JSON data (`fx.graph_json`, which calls and imports only what it allows), the call it was
traced for, and the modules the graph adds (gates, dropouts, tensor constants). Loading
builds the class from the config, puts each layer's graph in place over the fresh layer's
own modules, drops the layers that were cut, and `saving.files.load` loads the weights
strictly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..config import GateConfig
from ..errors import ModelFileError, file_step
from ..fx.graph_json import graph_from_json, graph_to_json
from ..fx.graph_module import GATES_ATTR, META_KEY
from ..gates.modules import Gate, LayerGate
from ..saving.bounds import check_elements
from .files import build_config, meta_model, model_class
from .gating import GatedTransformer, set_module, traced_layers, transformer_class
from .layer import CALL_KEY, TracedLayer, plain_attributes, traced_layer
from .outputs import install_recording_hooks, retype
from .surgery import SlimTransformer, drop_layers
from .tracing import LayerCall, layer_signature, signature_defaults, transformer_layers

DROPOUT_PREFIX = "cg_dropout_"


def transformer_spec(model: nn.Module) -> dict[str, Any]:
    """What `save` writes for a gated or cut Hugging Face model, beside its weights."""
    meta = model.meta[META_KEY]
    spec = dict(meta)
    # batch 1 is all `example_inputs` needs
    spec["inputs"] = {k: {**v, "shape": [1, *v["shape"][1:]]} for k, v in meta["inputs"].items()}
    layers = traced_layers(model)
    spec["layers"] = {layer.layer_path: _layer_record(layer) for _, layer in layers}
    kept = {layer.layer_path for _, layer in layers}
    spec["removed_layers"] = [p for p in meta["transformers"]["layers"] if p not in kept]
    if spec["kind"] == "gated":
        spec["fixed"] = {n: g.fixed for n, g in model.gates.items() if g.fixed is not None}
    return spec


def _layer_record(layer: TracedLayer) -> dict[str, Any]:
    call = layer.layer_call
    modules = dict(layer.named_modules())
    gates, dropouts, constants = {}, {}, {}
    for node in layer.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], Gate):
            g = modules[node.target]
            gates[node.target] = {
                "name": g.name, "channels": g.fc1.in_features, "feature_dim": g.feature_dim,
                "out_ndim": g.out_ndim,
            }  # fmt: skip
        elif node.op == "call_module" and node.target.startswith(DROPOUT_PREFIX):
            dropouts[node.target] = modules[node.target].p
        elif node.op == "get_attr" and "_tensor_constant" in node.target:
            t = fx.graph_module._get_attr(layer, node.target)
            constants[node.target] = {"shape": list(t.shape), "dtype": str(t.dtype)[6:]}
    return {
        "class": layer.__class__.__name__,
        "call": {
            "positional": call.positional, "names": call.names, "inputs": call.inputs,
            "concrete": call.concrete,
        },  # fmt: skip
        "attributes": layer.meta[CALL_KEY]["attributes"],
        "graph": graph_to_json(layer.graph),
        "gates": gates,
        "dropouts": dropouts,
        "constants": constants,
    }


def rebuild_transformer(spec: dict[str, Any], what: str) -> nn.Module:
    """The model a gated or slim spec describes, with fresh weights (`load` fills them).
    Each step is checked against the freshly built model, and anything the spec gets wrong
    is a ModelFileError naming the file and the step."""
    model = _fresh_model(spec, what)
    install_recording_hooks(model)  # on the fresh layers, carried to the rebuilt ones
    config = file_step(what, "build its GateConfig", GateConfig.from_dict, spec["config"])
    layers = _check_layer_paths(model, spec, what)
    for path, record in spec["layers"].items():
        layer = file_step(
            what, f"rebuild layer {path!r}", _rebuild_layer, layers[path], path, record, config,
            what,
        )  # fmt: skip
        set_module(model, path, layer)
    if spec["kind"] == "slim":
        file_step(what, "drop the layers it removed", drop_layers, model, spec["removed_layers"])
    role = SlimTransformer if spec["kind"] == "slim" else GatedTransformer
    retype(model, transformer_class(type(model), role))
    model.meta = {META_KEY: {k: v for k, v in spec.items() if k not in ("layers", "fixed")}}
    if spec["kind"] == "gated":
        for name, d in _fixed(spec, model, what).items():
            model.gates[name].fixed = d
    return model


def _check_layer_paths(model: nn.Module, spec: dict[str, Any], what: str) -> dict[str, nn.Module]:
    """The model's layers by path, once the spec's layers are checked against them: each
    one the model has, as many as it has, each kept (with a graph) or removed, not both."""
    layers = dict(file_step(what, "find its layers", transformer_layers, model))
    recorded = spec["transformers"]["layers"]
    kept, removed = list(spec["layers"]), spec["removed_layers"]
    if recorded != list(layers):
        raise ModelFileError(
            f"{what} records the layers {recorded[:4]}... but its {type(model).__name__} has "
            f"{list(layers)[:4]}... ({len(recorded)} against {len(layers)})"
        )
    if spec["kind"] == "gated" and removed:
        raise ModelFileError(f"{what}: a gated model has no removed layers, got {removed[:4]}")
    if sorted(kept + removed) != sorted(recorded):
        unknown = sorted(set(kept + removed) - set(recorded))
        raise ModelFileError(
            f"{what}: its kept and removed layers must be the model's layers, each once "
            f"(unknown: {unknown[:4]}; kept {len(kept)} + removed {len(removed)}, the model has "
            f"{len(recorded)})"
        )
    return layers


def _fixed(spec: dict[str, Any], model: nn.Module, what: str) -> dict[str, bool]:
    fixed = spec.get("fixed") or {}
    unknown = sorted(set(fixed) - set(model.gates))
    if unknown:
        raise ModelFileError(f"{what}: fixed names gates the model does not have: {unknown[:4]}")
    for name, d in fixed.items():
        if type(d) is not bool:
            raise ModelFileError(f"{what}: fixed.{name} must be true or false, got {d!r:.80}")
    return fixed


def gated_from_spec(spec: dict[str, Any], what: str) -> nn.Module:
    """The gated model a gated or slim spec comes from, with fresh weights: traced again
    on random inputs of the saved shapes (for `cgates inspect`, which shows what a cut
    removed; `load` never traces)."""
    from .gating import insert_transformer_gates, random_inputs

    model = _fresh_model(spec, what)
    config = GateConfig.from_dict(spec["config"])
    return insert_transformer_gates(model, random_inputs(model, spec["inputs"]), config)


def _fresh_model(spec: dict[str, Any], what: str) -> nn.Module:
    info = spec["transformers"]
    cls = model_class(info["class"], f"{what} (saved with transformers {info['version']})")
    config = build_config(cls, info["config"], what)
    meta = meta_model(cls, config, what)  # count first: nothing is allocated
    check_elements(sum(t.numel() for t in meta.state_dict().values()), what)
    model = file_step(what, f"build its {cls.__name__}", cls, config)
    if spec.get("dtype"):
        model = model.to(getattr(torch, spec["dtype"]))
    return model


def _rebuild_layer(
    fresh: nn.Module, path: str, record: dict[str, Any], config: GateConfig, what: str
) -> TracedLayer:
    """A layer's graph over the modules of `fresh`, the newly built original layer."""
    where = f"{what}, layer {path!r}"
    graph = graph_from_json(record["graph"], where)
    if not record["class"].isidentifier():
        raise ModelFileError(f"{where}: class {record['class']!r:.80} is not an identifier")
    plain = plain_attributes(fresh)
    unknown = sorted(set(record["attributes"]) - set(plain))
    if unknown:
        raise ModelFileError(
            f"{where}: attributes {unknown[:4]} are not plain attributes of its "
            f"{type(fresh).__name__} (those are {sorted(plain)[:8]})"
        )
    ref = next(fresh.parameters(), None)
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in root:
            root[node.target] = _target(fresh, node, record, config, where)
            if isinstance(root[node.target], Gate) and ref is not None:
                root[node.target].to(device=ref.device, dtype=ref.dtype)
    gm = fx.GraphModule(root, graph, class_name=record["class"])
    call = record["call"]
    _check_call(call, graph, fresh, where)
    concrete = {k: tuple(v) if isinstance(v, list) else v for k, v in call["concrete"].items()}
    layer_call = LayerCall(
        call["positional"], call["names"], call["inputs"], concrete, signature_defaults(fresh)
    )
    return traced_layer(gm, layer_call, path, record["class"], record["attributes"], fresh)


def _check_call(call: dict[str, Any], graph: fx.Graph, fresh: nn.Module, where: str) -> None:
    """The recorded call fits the fresh layer's forward and the graph: `LayerCall.bind`
    hands the graph its ``inputs``, in order, from the arguments named ``names``."""
    params = layer_signature(fresh).parameters.values()
    accepted = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    names, inputs, concrete = call["names"], call["inputs"], call["concrete"]
    placeholders = [n.target.lstrip("*") for n in graph.nodes if n.op == "placeholder"]
    problems = [
        len(set(names)) != len(names) and "its argument names repeat",
        not all(n.isidentifier() and n != "self" for n in names) and "an argument name is not one",
        not takes_any and not set(names) <= accepted and f"the forward takes {sorted(accepted)}",
        not set(call["positional"]) <= set(names) and "positional arguments outside its names",
        inputs != placeholders and f"inputs {inputs[:6]} are not the graph's {placeholders[:6]}",
        not set(concrete) <= set(names) - set(inputs) and "baked arguments outside its names",
    ]
    problem = next((p for p in problems if p), None)
    if problem:
        raise ModelFileError(f"{where}: the recorded call does not fit the layer: {problem}")


def _target(
    fresh: nn.Module, node: fx.Node, record: dict[str, Any], config: GateConfig, where: str
) -> nn.Module | Tensor:
    """What a call_module or get_attr node names: a gate, dropout or constant the graph
    added, or one of the original layer's modules, parameters or buffers, nothing else."""
    target = node.target
    if node.op == "call_module" and target in record["gates"]:
        g = record["gates"][target]
        return LayerGate(g["name"], g["channels"], g["feature_dim"], g["out_ndim"], config)
    if node.op == "call_module" and target in record["dropouts"]:
        return nn.Dropout(float(record["dropouts"][target]))
    if node.op == "get_attr" and target in record["constants"]:
        c = record["constants"][target]
        return torch.zeros(c["shape"], dtype=getattr(torch, c["dtype"]))
    try:
        if node.op == "call_module" and not target.startswith(GATES_ATTR):
            return fresh.get_submodule(target)
        if node.op == "get_attr":
            value = fx.graph_module._get_attr(fresh, target)
            if isinstance(value, Tensor):
                return value
    except AttributeError:
        pass
    raise ModelFileError(
        f"{where}: {node.op} node {node.name!r} names {target!r}, which is not a module or "
        "tensor of the layer"
    )

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
from ..errors import ModelFileError
from ..fx.graph_json import graph_from_json, graph_to_json
from ..fx.graph_module import GATES_ATTR, META_KEY
from ..gates.modules import Gate, LayerGate
from .gating import GatedTransformer, set_module, traced_layers, transformer_class
from .layer import CALL_KEY, TracedLayer, traced_layer
from .surgery import SlimTransformer, drop_layers
from .tracing import LayerCall, signature_defaults

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
    """The model a gated or slim spec describes, with fresh weights (`load` fills them)."""
    model = _fresh_model(spec, what)
    config = GateConfig.from_dict(spec["config"])
    for path, record in spec["layers"].items():
        try:
            fresh = model.get_submodule(path)
        except AttributeError:
            raise ModelFileError(f"{what}: the model has no layer {path!r}") from None
        set_module(model, path, _rebuild_layer(fresh, path, record, config, what))
    removed = spec["removed_layers"]
    if spec["kind"] == "slim":
        drop_layers(model, removed)
    elif removed:
        raise ModelFileError(f"{what}: a gated model has no removed layers, got {removed}")
    role = SlimTransformer if spec["kind"] == "slim" else GatedTransformer
    model.__class__ = transformer_class(type(model), role)
    model.meta = {META_KEY: {k: v for k, v in spec.items() if k not in ("layers", "fixed")}}
    for name, d in (spec.get("fixed") or {}).items():
        model.gates[name].fixed = d
    return model


def gated_from_spec(spec: dict[str, Any], what: str) -> nn.Module:
    """The gated model a gated or slim spec comes from, with fresh weights: traced again
    on random inputs of the saved shapes (for `cgates inspect`, which shows what a cut
    removed; `load` never traces)."""
    from .gating import insert_transformer_gates, random_inputs

    model = _fresh_model(spec, what)
    config = GateConfig.from_dict(spec["config"])
    return insert_transformer_gates(model, random_inputs(model, spec["inputs"]), config)


def _fresh_model(spec: dict[str, Any], what: str) -> nn.Module:
    import transformers

    info = spec["transformers"]
    cls = getattr(transformers, info["class"], None) if info["class"].isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelFileError(
            f"{what} was saved from {info['class']!r}, which is not a model class of "
            f"transformers {transformers.__version__} (saved with {info['version']})"
        )
    try:
        config = cls.config_class.from_dict(info["config"])
        with torch.device("meta"):  # count first: nothing is allocated
            size = sum(t.numel() for t in cls(config).state_dict().values())
    except Exception as e:  # noqa: BLE001 - a config from a file can fail in many ways
        raise ModelFileError(f"{what}: its {info['class']} config does not build ({e})") from e
    from ..saving.spec import MAX_PARAMETERS

    if size > MAX_PARAMETERS:
        raise ModelFileError(f"{what} asks for a model of {size:,} parameters and buffers")
    model = cls(config)
    if spec.get("dtype"):
        model = model.to(getattr(torch, spec["dtype"]))
    return model


def _rebuild_layer(
    fresh: nn.Module, path: str, record: dict[str, Any], config: GateConfig, what: str
) -> TracedLayer:
    """A layer's graph over the modules of `fresh`, the newly built original layer."""
    where = f"{what}, layer {path!r}"
    graph = graph_from_json(record["graph"], where)
    ref = next(fresh.parameters(), None)
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in root:
            root[node.target] = _target(fresh, node, record, config, where)
            if isinstance(root[node.target], Gate) and ref is not None:
                root[node.target].to(device=ref.device, dtype=ref.dtype)
    gm = fx.GraphModule(root, graph, class_name=record["class"])
    call = record["call"]
    concrete = {k: tuple(v) if isinstance(v, list) else v for k, v in call["concrete"].items()}
    layer_call = LayerCall(
        call["positional"], call["names"], call["inputs"], concrete, signature_defaults(fresh)
    )
    return traced_layer(gm, layer_call, path, record["class"], record["attributes"])


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

"""Step 6 for Hugging Face models: cut closed branches out of each layer's graph, and drop
the layers left with nothing to compute, so the KV cache loses their entries too."""

from __future__ import annotations

import copy
from typing import Any

import torch.fx as fx
from torch import nn

from ..fx.gating import collapse_whole_graph_merge
from ..fx.surgery import slim_graph_module
from .gating import TransformerFile, set_module, traced_layers, transformer_class
from .layer import plain_attributes, traced_layer
from .outputs import retype

COUNT_FIELDS = {  # where a config counts a stack's layers, by the stack's role
    "decoder": ("decoder_layers", "num_decoder_layers", "num_hidden_layers", "n_layer"),
    "encoder": ("encoder_layers", "num_layers", "num_hidden_layers", "n_layer"),
    "": ("num_hidden_layers", "n_layer", "num_layers"),
}


class SlimTransformer(TransformerFile):
    """A Hugging Face model cut by `materialize`: its class, with smaller layers."""


def cut_transformer(gated: nn.Module, decisions: dict[str, Any], share: bool) -> nn.Module:
    """The model with `decisions` applied to every layer's graph and the gates gone. With
    `share`, a quick copy for measuring: modules shared with `gated`, identity layers kept.
    Otherwise an independent model in which identity layers are removed and the rest
    renumbered."""
    slim = _path_copy(gated, [p for p, _ in traced_layers(gated)]) if share else copy.deepcopy(
        gated
    )
    for path, layer in traced_layers(slim):
        cut = slim_graph_module(layer, decisions)
        collapse_whole_graph_merge(cut.graph)
        cut.recompile()
        name, attributes = cut.__class__.__name__, plain_attributes(layer)
        # a copied graph module has lost the hooks: take them from the layer it copies
        source = gated.get_submodule(path)
        set_module(slim, path, traced_layer(cut, layer.layer_call, path, name, attributes, source))
    if not share:
        drop_identity_layers(slim)
    retype(slim, transformer_class(type(gated), SlimTransformer))
    return slim


def _path_copy(model: nn.Module, paths: list[str]) -> nn.Module:
    """A shallow copy of `model` and of every module on the way to `paths`, so that setting
    a module at a path leaves `model` as it was."""
    top = copy.copy(model)
    top._modules = dict(model._modules)
    for path in paths:
        owner = top
        for name in path.split(".")[:-1]:
            child = copy.copy(owner._modules[name])
            child._modules = dict(child._modules)
            owner._modules[name] = child
            owner = child
    return top


def is_identity(layer: fx.GraphModule) -> bool:
    """Whether a cut layer returns its first input unchanged (alone, or alone in a tuple)."""
    nodes = list(layer.graph.nodes)
    first = next(n for n in nodes if n.op == "placeholder")
    (result,) = nodes[-1].args
    return result is first or (isinstance(result, (tuple, list)) and list(result) == [first])


def drop_identity_layers(model: nn.Module) -> list[str]:
    """`drop_layers` on every traced layer that computes nothing; returns their paths."""
    paths = [p for p, layer in traced_layers(model) if is_identity(layer)]
    drop_layers(model, paths)
    return paths


def drop_layers(model: nn.Module, paths: list[str]) -> None:
    """Remove the layers at `paths` from their `nn.ModuleList`s, renumber the rest
    (``layer_idx``, which indexes the KV cache) and shrink the config's layer count."""
    stacks: dict[str, set[int]] = {}
    for path in paths:
        parent, _, index = path.rpartition(".")
        if not (index.isdigit() and isinstance(model.get_submodule(parent), nn.ModuleList)):
            raise ValueError(f"{path!r} is not a layer in a list of layers")
        stacks.setdefault(parent, set()).add(int(index))
    for parent, drop in stacks.items():
        owner = model.get_submodule(parent)
        keep = [i for i in range(len(owner)) if i not in drop]
        kept = [owner[i] for i in keep]
        _renumber(kept)
        _shrink_config(model, parent, len(owner), keep)
        _replace_list(model, parent, nn.ModuleList(kept))


def _replace_list(model: nn.Module, path: str, new: nn.ModuleList) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def _renumber(layers: list[nn.Module]) -> None:
    for index, layer in enumerate(layers):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = index
        if isinstance(getattr(layer, "layer_idx", None), int):
            layer.layer_idx = index


def _shrink_config(model: nn.Module, stack: str, old: int, keep: list[int]) -> None:
    """Set the layer count of the config nearest to the stack (``model.config`` at worst),
    and keep the kept layers' entries of its per-layer lists (``layer_types`` and the
    like). A larger count would only size caches too big; the renumbered ``layer_idx`` is
    what keeps the cache right, and `to_transformers` needs both."""
    role = "decoder" if "decoder" in stack else "encoder" if "encoder" in stack else ""
    config = model.config
    parts = stack.split(".")
    for i in range(len(parts) - 1, 0, -1):
        holder = model.get_submodule(".".join(parts[:i]))
        if getattr(holder, "config", None) is not None:
            config = holder.config
            break
    for name in COUNT_FIELDS[role]:
        if getattr(config, name, None) == old:
            setattr(config, name, len(keep))
            break
    # one entry per layer: layer_types, mlp_layer_types, no_rope_layers, ..._per_layer
    for name, value in list(vars(config).items()):
        if "layer" in name and isinstance(value, (list, tuple)) and len(value) == old:
            setattr(config, name, type(value)(value[i] for i in keep))

"""The module that takes a transformer layer's place: the layer's traced graph (gated, or
cut), called exactly as the parent calls the original layer."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from .outputs import carry_hooks
from .tracing import LayerCall

CALL_KEY = "consensus_gates_layer"
PLAIN = (bool, int, float, str, type(None))


class TracedLayer(fx.GraphModule):
    """A layer's graph module. Its parameters keep the original layer's names (``self_attn.
    q_proj.weight``), and `LayerCall.bind` maps each call's arguments onto the graph's
    inputs, refusing a call the graph was not traced for."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        path, call = self.layer_path, self.layer_call
        return super().__call__(*call.bind(path, args, kwargs))

    @property
    def layer_call(self) -> LayerCall:
        return self.meta[CALL_KEY]["call"]

    @property
    def layer_path(self) -> str:
        return self.meta[CALL_KEY]["path"]


def traced_layer(
    gm: fx.GraphModule,
    call: LayerCall,
    path: str,
    class_name: str,
    attributes: dict[str, Any],
    replaces: nn.Module,
) -> TracedLayer:
    """`gm` (its modules, graph and meta) as the layer at `path`, with the original layer's
    plain `attributes`, which parents read (``layer.attention_type`` picks the mask), and
    the forward hooks of the module it `replaces` (transformers' output recorders)."""
    layer = TracedLayer(gm, gm.graph, class_name=class_name)
    carry_hooks(replaces, layer)
    layer.meta.update(gm.meta)
    layer.meta[CALL_KEY] = {"call": call, "path": path, "attributes": attributes}
    for name, value in attributes.items():
        setattr(layer, name, value)
    layer.train(gm.training)
    return layer


def plain_attributes(layer: nn.Module) -> dict[str, Any]:
    """The layer's public attributes that are plain values (not modules or tensors)."""
    if isinstance(layer, TracedLayer):
        return dict(layer.meta[CALL_KEY]["attributes"])
    return {
        k: v
        for k, v in vars(layer).items()
        if not k.startswith("_") and k != "training" and isinstance(v, PLAIN)
        and not hasattr(TracedLayer, k)
    }

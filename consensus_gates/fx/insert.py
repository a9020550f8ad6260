"""Step 3: `insert_gates` traces a model and gates it (`fx.gating`): a `LayerGate` on each
residual branch (``mode="layer"``), `ChannelGate`s at the branch's channel points
(``"channel"``), or both. A Hugging Face model is gated layer by layer (`hf.gating`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .._utils import unwrap
from ..config import GateConfig
from ..hf.inputs import is_transformer
from ..models.registry import SOURCE_ATTR
from .blocks import Rejected
from .gating import gate_graph, match_model
from .graph_module import META_KEY, Gated, GatedModel
from .tracing import LeafSpec, as_input_tuple, trace


def insert_gates(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...],
    config: GateConfig | None = None,
    *,
    leaf_modules: LeafSpec = (),
) -> GatedModel:
    """Trace `model` with torch.fx and gate every residual branch.

    The model itself is not modified: the result is a traced copy in which each residual
    merge computes ``skip + g(x) * branch``, ``g`` being a per-sample binary gate (with
    ``GateConfig(mode="channel")``, per-channel gates inside the branch instead). With all
    gates open it computes exactly what the original does.

    Args:
        model: any network with residual connections (its code is not touched).
        example_inputs: a tensor or tuple of tensors the model accepts, e.g.
            ``torch.randn(2, 3, 32, 32)``; used to trace and to size the gates.
        config: how to build the gates (`GateConfig`).
        leaf_modules: module classes or qualified names to call as black boxes, for code
            torch.fx cannot trace. No gate is placed inside a leaf.

    Raises:
        ValueError: the model has no residual merge.
        TracingError: torch.fx cannot trace a module (the message names it).
        InputError: `example_inputs` does not fit the model.
    """
    model = _ungated(model)
    config = config or GateConfig()
    if is_transformer(model):
        from ..hf.gating import insert_transformer_gates

        return insert_transformer_gates(model, example_inputs, config, leaf_modules)
    if config.granularity != "branch":
        raise ValueError(
            f"GateConfig(granularity={config.granularity!r}) is for Hugging Face models, whose "
            "layers hold several branches; a residual network's branches are its blocks"
        )
    inputs = as_input_tuple(example_inputs)
    gm, user_leaves = trace(model, leaf_modules)
    gated, rejected = gate_graph(gm, inputs, config, type(model).__name__)
    match_model(gated, model, inputs[0])
    gated.meta[META_KEY] = _meta(model, inputs, config, user_leaves, rejected)
    return gated


def _ungated(model: nn.Module) -> nn.Module:
    model = unwrap(model)
    if isinstance(model, Gated):
        raise ValueError("this model already has gates; call insert_gates on the original model")
    return model


def _meta(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    config: GateConfig,
    user_leaves: list[str],
    rejected: list[Rejected],
) -> dict[str, Any]:
    """What `GatedModel.spec` reports and `save` writes: how the model was made."""
    return {
        "kind": "gated",
        "source": getattr(model, SOURCE_ATTR, None),
        "inputs": [
            {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in inputs
        ],
        "config": config.to_dict(),
        "leaf_modules": user_leaves,
        "rejected": [r.__dict__ for r in rejected],
    }

"""A cut transformer out of consensus_gates: a plain Hugging Face model, or a program.

When a cut removed only whole layers, the slim model is the original architecture with
fewer layers: `to_transformers` builds the original class from the slim model's config
(whose layer count and per-layer lists `materialize` already shrank) and loads the kept
weights into it, so that its ``save_pretrained`` folder needs neither consensus_gates nor
any code of ours to load. `export_call` is what `consensus_gates.export` writes to a
``.pt2`` or ``.onnx`` file: the forward without its cache, every size of it dynamic.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import atomic_folder
from .gating import original_class, traced_layers
from .inputs import TensorCall, as_traceable_call
from .layer import CALL_KEY, plain_attributes
from .surgery import SlimTransformer
from .tracing import transformer_layers


def to_transformers(model: nn.Module) -> nn.Module:
    """An instance of the model's original class (``LlamaForCausalLM``, not
    ``SlimLlamaForCausalLM``) with the cut model's weights, for a cut that removed only
    whole layers. Its config counts the kept layers, and its ``save_pretrained`` folder
    loads with plain ``from_pretrained``.

    A ValueError names the layers that keep only part of their blocks (attention without
    its MLP, or the reverse), which the original class cannot express.
    """
    if not isinstance(model, SlimTransformer):
        raise TypeError(
            f"to_transformers takes a cut Hugging Face model (materialize(gated)), got a "
            f"{type(model).__name__}"
        )
    cls, config = original_class(model), copy.deepcopy(model.config)
    with torch.device("meta"):
        fresh = cls(config)
    _check_layers(model, fresh)
    ref = next(model.parameters())
    with torch.device(ref.device):
        plain = cls(config).to(ref.dtype)
    state = model.state_dict()
    plain.load_state_dict({k: state[k] for k in plain.state_dict()}, strict=True)
    # generate()'s settings are the model's, not what a config would give a fresh one (a
    # Trainer sets config.use_cache=False, and a fresh generation config follows it)
    if getattr(model, "generation_config", None) is not None:  # a model that generates
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.train(model.training)


def save_folder(model: nn.Module, path: str | os.PathLike) -> None:
    """``model.save_pretrained`` into `path` atomically (a folder there is replaced only
    once the new one is complete), without transformers' progress bars."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with atomic_folder(path) as tmp:
            model.save_pretrained(tmp)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def export_call(
    model: nn.Module, example_inputs: Any
) -> tuple[TensorCall, tuple[Tensor, ...], tuple[tuple[dict, ...]]]:
    """What `consensus_gates.export` exports of a Hugging Face model, from the inputs
    `insert_gates` took (a dict, or the main input): its forward over their tensors without
    the KV cache, returning the main output (logits, or the task head's); the tensors; and
    the dynamic shapes, every dimension `Dim.AUTO`, so that batch and sequence length (and
    an image's size where the model allows) stay free. A tensor is given positionally,
    hence the shapes of ``*tensors`` as one tuple."""
    call, tensors = as_traceable_call(model, example_inputs, main=True)
    auto = torch.export.Dim.AUTO
    return call, tensors, (tuple(dict.fromkeys(range(t.dim()), auto) for t in tensors),)


def _check_layers(slim: nn.Module, fresh: nn.Module) -> None:
    """Each kept layer holds every weight of the original layer, and the layers of the
    original class built from the shrunk config are those kept, in order and of the same
    kind (``attention_type``, sliding windows)."""
    kept = dict(traced_layers(slim))
    layers = dict(transformer_layers(fresh))
    if list(kept) != list(layers):
        raise ValueError(
            f"the cut {type(slim).__name__} has the layers {list(kept)[:4]}..., but its config "
            f"builds {list(layers)[:4]}...: this cut cannot be written as a "
            f"{type(fresh).__name__}"
        )
    partial = []
    for path, layer in kept.items():
        have = layer.state_dict()
        missing = [k for k in layers[path].state_dict() if k not in have]
        if missing:
            partial.append(f"{path} (without {missing[0].rsplit('.', 2)[0]})")
        elif plain_attributes(layers[path]) != layer.meta[CALL_KEY]["attributes"]:
            raise ValueError(
                f"layer {path} of the cut model is of another kind than the config builds "
                f"there ({layer.meta[CALL_KEY]['attributes']} against "
                f"{plain_attributes(layers[path])}): a per-layer setting of the config did "
                "not follow the removed layers"
            )
    if partial:
        raise ValueError(
            f"{len(partial)} layers keep only part of their blocks, which "
            f"{type(fresh).__name__} cannot express: {', '.join(partial[:4])}. Gate whole "
            "layers with GateConfig(granularity='layer') to cut only what it can"
        )

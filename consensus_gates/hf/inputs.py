"""A Hugging Face model's inputs: recognising one, its example inputs as a dict, the traceable
call over them, and what FLOPs and timings count per token."""


from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn


def is_transformer(model: nn.Module) -> bool:
    """Whether `model` is a `transformers.PreTrainedModel` (without importing transformers:
    if it is not imported, no model can be one)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def as_input_dict(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    """A model's inputs as keyword arguments: a dict as given, or a tensor as its main input
    (``input_ids``, ``pixel_values``)."""
    if isinstance(example_inputs, Tensor):
        return {model.main_input_name: example_inputs}
    if isinstance(example_inputs, Mapping) and example_inputs:
        return dict(example_inputs)
    from ..errors import InputError

    raise InputError(
        f"example inputs for {type(model).__name__} are a tensor ({model.main_input_name}) or "
        f"a dict of the model's inputs, e.g. {{'input_ids': ids, 'attention_mask': mask}}; "
        f"got {type(example_inputs).__name__}"
    )


class _TensorCall(nn.Module):
    """``model(**inputs)`` as a function of tensors to a tuple of tensors: what fvcore's
    jit trace needs. No cache is built, since a forward with one would count nothing else."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names
        params = inspect.signature(model.forward).parameters
        self.extra = {"use_cache": False} if "use_cache" in params else {}

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        out = self.model(**dict(zip(self.names, tensors, strict=True)), **self.extra)
        values = out.values() if isinstance(out, Mapping) else out
        return tuple(v for v in values if isinstance(v, Tensor))


def as_traceable_call(model: nn.Module, example_inputs: Any) -> tuple[nn.Module, tuple]:
    inputs = {k: v for k, v in as_input_dict(model, example_inputs).items() if v is not None}
    return _TensorCall(model, list(inputs)), tuple(inputs.values())


def per_token_divisor(model: nn.Module, example_inputs: Any) -> int:
    """What `cost.flops` divides by: the number of ``input_ids`` tokens for a Hugging Face
    text model, else 1."""
    if not is_transformer(model):
        return 1
    ids = as_input_dict(model, example_inputs).get("input_ids")
    return ids.numel() if isinstance(ids, Tensor) and ids.numel() else 1


def token_vocabulary(model: nn.Module) -> int | None:
    """The vocabulary size of a Hugging Face model that reads token ids, else None."""
    if not is_transformer(model) or model.main_input_name != "input_ids":
        return None
    return model.config.get_text_config().vocab_size


def saved_input_shape(inputs: Any) -> tuple[int, ...] | None:
    """One sample's shape of the main input a spec records: the first of a list, or a
    transformer's ``input_ids`` (its length) or ``pixel_values``."""
    if isinstance(inputs, Mapping):
        main = inputs.get("input_ids") or inputs.get("pixel_values") or next(iter(inputs.values()))
        return tuple(main["shape"][1:])
    return tuple(inputs[0]["shape"][1:]) if inputs else None


def main_output(model: nn.Module, inputs: Any) -> Tensor:
    """`model`'s main output on `inputs`: a Hugging Face model's logits (or last hidden
    state) for a dict of inputs, else ``model(*inputs)``."""
    if not isinstance(inputs, Mapping):
        return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
    out = model(**inputs)
    for name in ("logits", "last_hidden_state"):
        if isinstance(getattr(out, name, None), Tensor):
            return getattr(out, name)
    return next(v for v in (out.values() if isinstance(out, Mapping) else out)
                if isinstance(v, Tensor))  # fmt: skip


def repeat_rows(inputs: Any, rows: int) -> Any:
    """A batch of `rows` from a batch of one: each tensor's first row repeated (a dict of
    Hugging Face inputs), or fresh random samples of the same shapes (a tuple of tensors)."""
    import torch

    if isinstance(inputs, Mapping):
        return {k: v[:1].expand(rows, *v.shape[1:]).clone() for k, v in inputs.items()}
    return tuple(torch.randn(rows, *t.shape[1:], dtype=t.dtype) for t in inputs)

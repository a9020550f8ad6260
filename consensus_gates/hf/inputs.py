"""A Hugging Face model's inputs: recognising one, its example inputs as a dict, the traceable
call over them, and what FLOPs and timings count per token."""


from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Mapping
from typing import Any

import torch
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


class TensorCall(nn.Module):
    """``model(**inputs)`` as a function of tensors: what fvcore's jit trace, torch.export
    and ONNX take. It returns every output tensor, or with `main` only the main one
    (`main_output`). No cache is built: it is state beside the function, not its result."""

    def __init__(self, model: nn.Module, names: list[str], main: bool = False):
        super().__init__()
        self.model, self.names, self.main = model, names, main
        self.train(model.training)  # what eval_mode restores is the model's mode
        params = inspect.signature(model.forward).parameters
        self.extra = {"use_cache": False} if "use_cache" in params else {}

    def forward(self, *tensors: Tensor) -> Tensor | tuple[Tensor, ...]:
        out = self.model(**dict(zip(self.names, tensors, strict=True)), **self.extra)
        if self.main:
            return _main_tensor(out)
        values = out.values() if isinstance(out, Mapping) else out
        return tuple(v for v in values if isinstance(v, Tensor))


def as_traceable_call(
    model: nn.Module, example_inputs: Any, main: bool = False
) -> tuple[TensorCall, tuple[Tensor, ...]]:
    """`TensorCall` over the tensors of `example_inputs`, and those tensors."""
    inputs = {k: v for k, v in as_input_dict(model, example_inputs).items() if v is not None}
    return TensorCall(model, list(inputs), main), tuple(inputs.values())


def per_token_divisor(model: nn.Module, example_inputs: Any) -> int:
    """What `cost.flops` divides by: the number of ``input_ids`` tokens for a Hugging Face
    text model, else 1."""
    if isinstance(model, TokenProgram):
        ids = example_inputs
    elif not is_transformer(model):
        return 1
    else:
        ids = as_input_dict(model, example_inputs).get("input_ids")
    return ids.numel() if isinstance(ids, Tensor) and ids.numel() else 1


def token_vocabulary(model: nn.Module) -> int | None:
    """The vocabulary size of a Hugging Face model (or an exported one, `TokenProgram`) that
    reads token ids, else None."""
    if isinstance(model, TokenProgram):
        return model.vocabulary
    if not is_transformer(model) or model.main_input_name != "input_ids":
        return None
    return model.config.get_text_config().vocab_size


# what an exported language model may take besides its token ids, made from them to time it
_FROM_IDS = {
    "input_ids": lambda ids: ids,
    "attention_mask": torch.ones_like,
    "token_type_ids": torch.zeros_like,
    "position_ids": lambda ids: torch.arange(ids.shape[1], device=ids.device).expand_as(ids),
    "decoder_input_ids": lambda ids: ids,
    "decoder_attention_mask": torch.ones_like,
}
TOKENS_KEY = "consensus_gates.token_inputs"  # the metadata `TokenProgram.describe` writes


class TokenProgram(nn.Module):
    """An exported language model (a ``.pt2`` program or an ``.onnx`` file run by
    onnxruntime) called on token ids alone, as `cgates bench` times a model: an unpadded
    attention mask, zero token types and positions 0..n-1 are made from them."""

    def __init__(self, program: nn.Module, names: list[str], vocabulary: int):
        super().__init__()
        self.program, self.names, self.vocabulary = program, names, vocabulary

    def forward(self, ids: Tensor) -> Tensor:
        return self.program(*(_FROM_IDS[n](ids) for n in self.names))

    @staticmethod
    def describe(model: nn.Module, names: list[str]) -> str | None:
        """The metadata an export of `model` over inputs `names` records for `read`: None
        for a model that does not read token ids."""
        vocabulary = token_vocabulary(model)
        return None if vocabulary is None else json.dumps(
            {"names": names, "vocabulary": vocabulary}
        )

    @classmethod
    def read(cls, program: nn.Module, text: str | None, what: str) -> nn.Module:
        """`program` fed token ids, as `text` (what `describe` wrote, or None: then the
        program as it is) says; a file's metadata is checked, never trusted."""
        if text is None:
            return program
        from ..errors import ModelFileError

        try:
            about = json.loads(text)
            names, vocabulary = about["names"], about["vocabulary"]
        except (ValueError, TypeError, KeyError) as e:
            raise ModelFileError(f"{what} has unreadable {TOKENS_KEY} metadata ({e})") from e
        if not (isinstance(names, list) and "input_ids" in names
                and all(isinstance(n, str) and n in _FROM_IDS for n in names)
                and type(vocabulary) is int and 0 < vocabulary < 2**31):  # fmt: skip
            raise ModelFileError(
                f"{what}: its {TOKENS_KEY} metadata names inputs {str(names)[:200]} and a "
                f"vocabulary of {str(vocabulary)[:20]}; only token ids and what is made from "
                f"them ({', '.join(_FROM_IDS)}) can be timed"
            )
        return cls(program, names, vocabulary)


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
    return _main_tensor(model(**inputs))


def _main_tensor(out: Any) -> Tensor:
    for name in ("logits", "last_hidden_state"):
        if isinstance(getattr(out, name, None), Tensor):
            return getattr(out, name)
    return next(v for v in (out.values() if isinstance(out, Mapping) else out)
                if isinstance(v, Tensor))  # fmt: skip


def repeat_rows(inputs: Any, rows: int) -> Any:
    """A batch of `rows` from a batch of one: each tensor's first row repeated (a dict of
    Hugging Face inputs), or fresh random samples of the same shapes (a tuple of tensors)."""
    if isinstance(inputs, Mapping):
        return {k: v[:1].expand(rows, *v.shape[1:]).clone() for k, v in inputs.items()}
    return tuple(torch.randn(rows, *t.shape[1:], dtype=t.dtype) for t in inputs)

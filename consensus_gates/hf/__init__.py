"""Hugging Face transformers: gate and cut the attention and MLP blocks of each layer.

`insert_gates` and `materialize` send a `transformers.PreTrainedModel` here. Each layer is
traced on its own (`tracing`), gated and cut with the same steps as any graph (`gating`,
`surgery`), and run in place of the original layer (`layer`), so the model keeps its class,
its loss, `generate()` and its cache. transformers is imported only when such a model is
given: it is an optional extra.
"""

from .export import to_transformers
from .inputs import (
    as_input_dict,
    as_traceable_call,
    is_transformer,
    main_output,
    per_token_divisor,
    repeat_rows,
    saved_input_shape,
    token_vocabulary,
)

__all__ = [
    "as_input_dict",
    "as_traceable_call",
    "is_transformer",
    "main_output",
    "per_token_divisor",
    "repeat_rows",
    "saved_input_shape",
    "to_transformers",
    "token_vocabulary",
]

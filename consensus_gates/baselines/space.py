"""What the channel baselines may cut: the internal widths of the residual branches.

These are the points of the ``middle`` channel gates: a conv (or linear) layer inside a branch
whose output, through per-channel ops (BN, ReLU), is read only by other layers of the same
branch (conv1's outputs, conv2's inputs in a basic block). Cutting them never touches the
residual stream, so the shortcuts, the option-A zero padding included, stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..fx.blocks import find_blocks, find_channel_points, producer_chain
from ..fx.tracing import as_input_tuple, record_shapes, trace


@dataclass(frozen=True)
class InnerLayer:
    """A prunable internal width: ``producer`` makes its channels, ``reader`` is the first
    module that reads them after the per-channel ops (None if only functions do)."""

    producer: str
    reader: str | None
    channel_dim: int


def inner_layers(model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...]) -> list[InnerLayer]:
    """The internal widths of `model`'s residual branches, in graph order (qualified module
    names of `model`). Grouped convs are left out: their channels cannot be cut one by one."""
    inputs = as_input_tuple(example_inputs)
    gm, _ = trace(model)
    record_shapes(gm, inputs)
    branches, _ = find_blocks(gm, num_inputs=len(inputs))
    modules = dict(gm.named_modules())
    layers = []
    for points in find_channel_points(gm, branches, "middle", len(inputs)).values():
        for p in points:
            if p.groups != 1:
                continue
            readers = [u.target for u in p.users if u.op == "call_module"]
            producer = producer_chain(p.point, modules)[-1].target
            layers.append(InnerLayer(producer, readers[0] if readers else None, p.channel_dim))
    return layers

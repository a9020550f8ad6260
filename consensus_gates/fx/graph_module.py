"""The gated model type that `insert_gates` returns and every later step reads.

Its state (source model, example input shapes, config) lives in ``model.meta[META_KEY]``, as
torch.ao's observed GraphModules keep theirs; `require_gated` refuses any other model.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .._utils import unwrap
from ..gates import Gate

META_KEY = "consensus_gates"
GATES_ATTR = "gate_modules"


class Gated:
    """What every model `insert_gates` returns offers: its gates, by stable name, and how
    it was made (``meta[META_KEY]``). `GatedModel` is one; a gated Hugging Face model,
    still an instance of its own class, is the other."""

    meta: dict[str, Any]

    @property
    def gates(self) -> OrderedDict[str, Gate]:
        return OrderedDict((m.name, m) for m in self.modules() if isinstance(m, Gate))

    @property
    def spec(self) -> dict[str, Any]:
        """How this model was made: source model, example input shapes, config, leaves."""
        return self.meta[META_KEY]

    def graphs(self) -> list[fx.GraphModule]:
        """The graph modules that call the gates: the model itself, or a Hugging Face
        model's traced layers."""
        raise NotImplementedError

    def example_inputs(self) -> Any:
        """Random inputs of the shapes given to `insert_gates`, batch size 1."""
        spec = self.meta[META_KEY]["inputs"]
        ref = next(self.parameters())
        return tuple(
            torch.randn(1, *s["shape"][1:], dtype=getattr(torch, s["dtype"]), device=ref.device)
            for s in spec
        )


class GatedModel(Gated, fx.GraphModule):
    """A traced copy of a model with a gate on each residual branch.

    Call it like the original model. ``gates`` maps stable names (``"layer2.3"``) to gates.
    """

    def graphs(self) -> list[fx.GraphModule]:
        return [self]


def require_gated(model: nn.Module) -> Gated:
    model = unwrap(model)
    if not isinstance(model, Gated):
        raise TypeError(
            f"expected a model returned by insert_gates(), got {type(model).__name__}; "
            "call consensus_gates.insert_gates(model, example_inputs) first"
        )
    return model


def example_inputs_of(model: nn.Module) -> Any:
    """Random inputs of the shapes given to `insert_gates`, batch size 1: a tuple of tensors,
    or a dict of them for a Hugging Face model."""
    return require_gated(model).example_inputs()


def cut_decisions(model: nn.Module) -> dict[str, bool | tuple[bool, ...]]:
    """The decisions of the gates cut out of `model` while training (`fx.cut`), none for a
    model never cut; a channel gate's as a tuple (a spec read from JSON holds lists)."""
    cut = require_gated(model).meta[META_KEY].get("cut", {})
    return {n: tuple(d) if isinstance(d, list) else d for n, d in cut.items()}


def gate_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, Gate]]:
    """The graph's gate calls, in graph order."""
    modules = dict(gm.named_modules())
    return [
        (n, modules[n.target])
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(modules.get(n.target), Gate)
    ]


def merge_of(scaled: fx.Node) -> tuple[fx.Node, Any]:
    """The addition that merges a gated branch (`scaled`, its product with the gate) into
    the stream, and that addition's other operand, the skip, as insert_gates builds them."""
    (merge,) = scaled.users
    return merge, merge.args[1] if merge.args[0] is scaled else merge.args[0]


def attr_name(name: str) -> str:
    """A gate or block name as a module attribute name (no '.', '#' or '/')."""
    return name.replace(".", "_").replace("#", "_").replace("/", "__")

"""Step 6: `materialize` cuts closed branches out and removes every gate: a smaller dense model.

The surgery itself is per graph (`fx.surgery`); a Hugging Face model has one graph per layer
and loses the layers left empty (`hf.surgery`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .consensus import Consensus, resolve_decisions
from .fx.graph_module import META_KEY, Gated, GatedModel, cut_decisions, require_gated
from .fx.surgery import slim_graph_module
from .gates.modules import LayerGate
from .hf.surgery import cut_transformer


def materialize(
    model: nn.Module, decisions: Mapping[str, bool] | Consensus | None = None
) -> nn.Module:
    """Physically remove closed branches and all gating modules.

    Args:
        model: a model from `insert_gates` (it is not modified).
        decisions: gate name → open; names left out, or ``None``, take the consensus.

    Returns:
        A plain `torch.fx.GraphModule` on the same device and dtype: a closed block becomes
        its shortcut (plus whatever followed the merge), an open one runs its branch ungated.
        No gate code, mask or multiplication by 1 is left. In eval mode its output equals the
        gated model's with `fix_decisions(model, decisions)`. It works inside
        `torch.no_grad()` and `torch.inference_mode()` too. For a Hugging Face model: an
        instance of its class, each layer cut, and a layer whose branches all closed
        removed, with its KV cache entry (the rest renumbered).
    """
    gated = require_gated(model)
    resolved = resolve_decisions(gated, decisions)
    # torch-pruning traces dependencies through autograd, and tensors copied in inference
    # mode could never train again: do the surgery with both back on.
    with torch.inference_mode(False), torch.enable_grad():
        slim = slimmed(gated, resolved, share=False)
    meta = {k: v for k, v in gated.meta[META_KEY].items() if k not in ("cut", "cut_flops")}
    # every gate's decision, those cut while training too: `load` replays them all at once
    decisions = {**cut_decisions(gated), **resolved}
    slim.meta[META_KEY] = {**meta, "kind": "slim", "decisions": decisions}
    return slim


def slimmed(gated: Gated, decisions: dict[str, Any], share: bool) -> nn.Module:
    """The network with `decisions` (one per gate) applied and the gates gone: the surgery
    without `materialize`'s bookkeeping. With `share`, for a measurement, it may share (and
    a layer cut may rewire) the gated model's modules; channel cuts prune weights in place,
    so they always work on a copy."""
    if not isinstance(gated, GatedModel):
        return cut_transformer(gated, decisions, share=share)
    layers_only = all(isinstance(g, LayerGate) for g in gated.gates.values())
    return slim_graph_module(gated if share and layers_only else copy.deepcopy(gated), decisions)

"""FLOPs (fvcore) and parameter counts, for whole models and for each gated branch."""

from __future__ import annotations

import copy
import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .consensus import normalize_decision
from .gates import LayerGate
from .insert import example_inputs_of, require_gated
from .surgery import slim_graph_module
from .tracing import as_input_tuple

with warnings.catch_warnings():  # fvcore's import calls the deprecated torch.jit.script
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis


@dataclass(frozen=True)
class Cost:
    """fvcore FLOPs (one multiply-add counts 1, fvcore's convention) and parameters."""

    flops: int
    params: int

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.flops - other.flops, self.params - other.params)

    def __str__(self) -> str:
        return f"{self.flops / 1e6:,.2f} MFLOPs, {self.params / 1e6:,.3f} M params"


def flops(model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...]) -> Cost:
    """Count a model's FLOPs with fvcore (in eval mode, without gradients) and its parameters.

    FLOPs scale with the batch size of `example_inputs`; use a batch of 1 for per-image numbers.
    """
    inputs = as_input_tuple(example_inputs)
    was_training = model.training
    model.eval()
    logger = logging.getLogger("fvcore")
    level = logger.level
    logger.setLevel(logging.ERROR)  # fvcore warns about every op it does not count
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(model, inputs)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            total = int(analysis.total())
    finally:
        logger.setLevel(level)
        model.train(was_training)
    return Cost(total, sum(p.numel() for p in model.parameters()))


def branch_costs(model: nn.Module, example_inputs=None) -> OrderedDict[str, Cost]:
    """What each gate controls: the drop in FLOPs and parameters when it alone is closed (a
    channel gate: all its channels).

    Measured with fvcore on the materialized model (per sample unless `example_inputs` says
    otherwise), so for layer gates ``flops(materialize(g, d))`` equals the all-open count minus
    the closed branches' costs. Also stores each gate's FLOPs in its ``branch_flops`` buffer.
    """
    gated = require_gated(model)
    inputs = (
        as_input_tuple(example_inputs) if example_inputs is not None else example_inputs_of(gated)
    )
    gates = gated.gates
    all_open = {n: normalize_decision(g, True) for n, g in gates.items()}
    # channel cuts prune weights in place, so they work on a copy; layer cuts only rewire
    share = all(isinstance(g, LayerGate) for g in gates.values())

    def cost(decisions: dict) -> Cost:
        return flops(slim_graph_module(gated if share else copy.deepcopy(gated), decisions), inputs)

    base = cost(all_open)
    costs = OrderedDict()
    for name, gate in gates.items():
        costs[name] = base - cost({**all_open, name: normalize_decision(gate, False)})
        gate.branch_flops.fill_(costs[name].flops)
    return costs

"""FLOPs (fvcore) and parameter counts, for whole models and for each gated branch."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._utils import set_training
from .consensus import kept_fraction, normalize_decision, resolve_decisions
from .fx.graph_module import META_KEY, example_inputs_of, require_gated
from .fx.tracing import as_input_tuple
from .gates.modules import LayerGate
from .hf.inputs import as_traceable_call, is_transformer, per_token_divisor
from .slimming import slimmed

with warnings.catch_warnings():  # fvcore's import calls the deprecated torch.jit.script
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape


class Cost(NamedTuple):
    """fvcore FLOPs (one multiply-add counts 1, fvcore's convention) and parameters; unpacks
    as ``flops, params = cg.flops(model, x)``, like Torch-Pruning's ``count_ops_and_params``."""

    flops: int
    params: int

    def __sub__(self, other: Cost) -> Cost:  # type: ignore[override]
        return Cost(self.flops - other.flops, self.params - other.params)

    def __str__(self) -> str:
        return f"{self.flops / 1e6:,.2f} MFLOPs, {self.params / 1e6:,.3f} M params"


def flops(model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...] | Mapping) -> Cost:
    """Count a model's FLOPs with fvcore (in eval mode, without gradients) and its parameters.

    FLOPs scale with the batch size of `example_inputs`; use a batch of 1 for per-image numbers.
    A Hugging Face model takes its inputs as a dict (or its main input as a tensor), and
    its FLOPs are per token of ``input_ids`` when it has them: attention's share grows with
    the sequence length, so compare counts at one length.
    """
    cost = total_cost(model, example_inputs)
    tokens = per_token_divisor(model, example_inputs)
    return cost if tokens == 1 else Cost(round(cost.flops / tokens), cost.params)


def total_cost(model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...] | Mapping) -> Cost:
    """`flops` of the whole forward, never per token."""
    with _analysis(model, example_inputs) as analysis:
        total = int(analysis.total())
    return Cost(total, sum(p.numel() for p in model.parameters()))


def module_flops(model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...]) -> dict[str, int]:
    """fvcore's FLOPs of every module by qualified name (``""``: the whole model), as `flops`
    counts them."""
    with _analysis(model, example_inputs) as analysis:
        return {name: int(n) for name, n in analysis.by_module().items()}


@contextlib.contextmanager
def _analysis(model: nn.Module, example_inputs) -> Iterator[FlopCountAnalysis]:
    """A quiet fvcore analysis of `model` in eval mode, without gradients; fvcore counts
    lazily, so read it inside the block."""
    was_training = model.training
    set_training(model, False)
    if is_transformer(model):  # fvcore's jit trace needs a function of tensors
        traced, inputs = as_traceable_call(model, example_inputs)
    else:
        traced, inputs = model, as_input_tuple(example_inputs)
    logger = logging.getLogger("fvcore")
    level = logger.level
    logger.setLevel(logging.ERROR)  # fvcore warns about every op it does not count
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(traced, inputs)
            analysis.set_op_handle("aten::scaled_dot_product_attention", _attention_flops)
            yield analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    finally:
        logger.setLevel(level)
        set_training(model, was_training)


def _attention_flops(inputs: list, outputs: list) -> int:
    """fvcore counts no fused attention: Q·Kᵀ and the weighted sum of V, one multiply-add
    per term, as for matmul."""
    q, k, v = (get_shape(i) for i in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def branch_costs(model: nn.Module, example_inputs=None) -> OrderedDict[str, Cost]:
    """What each gate controls: the drop in FLOPs and parameters when it alone is closed (a
    channel gate: the drop when half its units close, times two, which is what
    `flops_ratio`'s per-unit estimate needs).

    Measured with fvcore on the materialized model (per sample unless `example_inputs` says
    otherwise), so for layer gates ``flops(materialize(g, d))`` equals the all-open count minus
    the closed branches' costs. Also stores each gate's FLOPs in its ``branch_flops`` buffer.
    """
    gated = require_gated(model)
    if example_inputs is None:
        inputs = example_inputs_of(gated)
    else:  # a Hugging Face model's dict as it is
        inputs = example_inputs if is_transformer(gated) else as_input_tuple(example_inputs)
    gates = gated.gates
    all_open = {n: normalize_decision(g, True) for n, g in gates.items()}

    def cost(decisions: dict) -> Cost:
        return total_cost(slimmed(gated, decisions, share=True), inputs)

    base = cost(all_open)
    costs = OrderedDict()
    for name, gate in gates.items():
        closed, scale = normalize_decision(gate, False), 1.0
        if not isinstance(gate, LayerGate) and gate.units > 1:
            # half the units closed, scaled up: what partly closing the gate saves per unit.
            # Closing all of them can differ: a branch left constant is folded away, unless
            # its constant depends on the input size (a padded conv), when it stays.
            half = gate.units // 2
            closed, scale = tuple(i >= half for i in range(gate.units)), gate.units / half
        drop = base - cost({**all_open, name: closed})
        costs[name] = Cost(round(drop.flops * scale), round(drop.params * scale))
        gate.branch_flops.fill_(costs[name].flops)
    return costs


def flops_ratio(model: nn.Module, decisions: Mapping | None = None) -> float:
    """FLOPs of the sub-network `decisions` (default: the consensus) over the original's,
    estimated from each gate's branch FLOPs: closing a fraction of a gate's units removes
    that fraction of its branch. Exact for layer gates; a channel gate counts only what its
    own cut saves. Cheap after the first call, which measures the costs (`branch_costs`)."""
    gated = require_gated(model)
    kept = [kept_fraction(d) for d in resolve_decisions(gated, decisions).values()]
    return _ratio(gated, torch.tensor(kept, dtype=torch.float64))


def expected_flops_ratio(model: nn.Module) -> float:
    """`flops_ratio` with each gate's units open at their running open rates: the expected
    size of the sub-network while training, before the gates have polarized."""
    gated = require_gated(model)
    rates = [g.running_open_rate.float().mean() for g in gated.gates.values()]
    return _ratio(gated, torch.stack(rates).double() if rates else torch.zeros(0).double())


def _ratio(gated, kept: Tensor) -> float:
    """1 - Σ (1 - kept) · branch FLOPs / original FLOPs, `kept` in gate order. The original
    is the model before any gate was cut out while training (`fx.cut`): what those cuts
    saved counts as closed."""
    gates = list(gated.gates.values())
    branch = torch.stack([g.branch_flops for g in gates]) if gates else torch.zeros(0)
    # a gate's branch cost outlives cuts of other gates: only the all-open total changes
    if bool((branch < 0).any()):
        branch_costs(gated, _fixed_example(gated))
        branch = torch.stack([g.branch_flops for g in gates])
    saved = ((1 - kept.to(branch.device)) * branch.double()).sum().item()
    cut = gated.meta[META_KEY].get("cut_flops", 0)
    return 1 - (saved + cut) / (all_open_flops(gated) + cut)


def _fixed_example(gated) -> tuple[Tensor, ...]:
    devices = [p.device for p in gated.parameters() if p.is_cuda][:1]
    with torch.random.fork_rng(devices=devices):  # a resumed run must draw the same numbers
        return example_inputs_of(gated)


def all_open_flops(model: nn.Module) -> int:
    """FLOPs per example input of the gated model's network with every gate open (no gate
    overhead), measured once and kept until `fx.cut` changes the network."""
    gated = require_gated(model)
    if getattr(gated, "_cg_all_open_flops", None) is None:
        inputs = _fixed_example(gated)
        all_open = {n: normalize_decision(g, True) for n, g in gated.gates.items()}
        total = total_cost(slimmed(gated, all_open, share=False), inputs).flops
        gated._cg_all_open_flops = total  # a plain attribute: not a weight, not in the spec
    return gated._cg_all_open_flops

"""Depth-pruning heuristics: which residual branches or whole layers to drop, decided from
calibration data with no training, the baselines for ours on language models.

Each returns a decision for every gate of a gated model (`insert_gates`; whole layers with
``GateConfig(granularity="layer")``, attention and MLP branches by default) at a FLOPs
target, so that `materialize` cuts them exactly as it cuts ours. The gated model is only
run with its gates fixed, open but for those a heuristic tries closed:

- `block_influence` (ShortGPT, Men et al. 2024): a gate's Block Influence is 1 - cos(x,
  y), the cosine of each token's hidden state before and after its merge (a sample's
  features, for an image model), averaged; the least influential go first. With branch
  gates it is LLM-Drop's similarity per attention and per MLP (He et al. 2024).
- `removal_loss` (Shortened LLaMA, Kim et al. 2024): the calibration loss with each gate
  closed alone; the least harmful go first, ranked once.
- `greedy_removal` (FinerCut, Zhang et al. 2024): close, one at a time, the gate whose
  closing raises the calibration loss least, the others tried again after each.
- `random_order`: gates closed in a seeded random order (the paper's Fig. 2).

All close gates in their order until the FLOPs ratio reaches the target, and keep whichever
of the last two states is closer to it (`close_to_target`).
"""

from __future__ import annotations

import contextlib
import operator
import random
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..consensus import fix_decisions
from ..cost import flops_ratio
from ..fx.graph_module import Gated, gate_nodes, merge_of, require_gated

Decisions = dict[str, bool]
# the similarities `_observe` adds up while `block_influence` runs the calibration batches
_SUMS: ContextVar[dict[str, list[float]] | None] = ContextVar("block_influence", default=None)


def close_to_target(gated: nn.Module, order: Sequence[str], target: float) -> Decisions:
    """Every gate open, then those of `order` closed one by one until the FLOPs ratio is at
    most `target`; of the last two states, the closer to it. A ValueError if closing every
    gate of `order` cannot reach it."""
    gated = require_gated(gated)
    decisions = dict.fromkeys(gated.gates, True)
    floor = flops_ratio(gated, {**decisions, **dict.fromkeys(order, False)})
    if target < floor:
        raise ValueError(
            f"target {target} is out of reach: closing all {len(order)} gates leaves a FLOPs "
            f"ratio of {floor:.3f}"
        )
    states = [(1.0, decisions)]
    for name in order:
        ratio, decisions = states[-1]
        if ratio <= target:
            break
        closed = {**decisions, name: False}
        states.append((flops_ratio(gated, closed), closed))
    return min(states[-2:], key=lambda state: abs(state[0] - target))[1]


def random_order(gated: nn.Module, target: float, seed: int = 0) -> Decisions:
    """Gates closed in a random order (seeded) down to the FLOPs `target`."""
    order = list(require_gated(gated).gates)
    random.Random(seed).shuffle(order)
    return close_to_target(gated, order, target)


def block_influence(gated: nn.Module, calibrate: Callable[[nn.Module], Any],
                    target: float) -> Decisions:  # fmt: skip
    """Gates closed in the order of their Block Influence, lowest first, down to `target`.
    `calibrate(model)` runs the calibration batches through the model (gradients off)."""
    scores = influences(gated, calibrate)
    return close_to_target(gated, sorted(scores, key=scores.__getitem__), target)


def influences(gated: nn.Module, calibrate: Callable[[nn.Module], Any]) -> dict[str, float]:
    """Each gate's Block Influence, 1 - mean cos(before, after its merge), every gate open."""
    gated = require_gated(gated)
    sums: dict[str, list[float]] = {name: [0.0, 0.0] for name in gated.gates}
    token = _SUMS.set(sums)
    try:
        with _observing(gated), _all_open(gated), torch.no_grad():
            calibrate(gated)
    finally:
        _SUMS.reset(token)
    missing = [n for n, (_, count) in sums.items() if count == 0]
    if missing:
        raise ValueError(f"the calibration did not run the gates {missing[:4]}")
    return {name: 1 - total / count for name, (total, count) in sums.items()}


def removal_loss(gated: nn.Module, loss: Callable[[nn.Module], float],
                 target: float) -> Decisions:  # fmt: skip
    """Gates closed in the order of the calibration loss with each closed alone, lowest
    first, down to `target`. `loss(model)` is the model's calibration loss."""
    gated = require_gated(gated)
    scores = {n: _loss_with(gated, loss, {n: False}) for n in gated.gates}
    return close_to_target(gated, sorted(scores, key=scores.__getitem__), target)


def greedy_removal(gated: nn.Module, loss: Callable[[nn.Module], float],
                   target: float) -> Decisions:  # fmt: skip
    """Close, one at a time, the gate whose closing (with those closed so far) gives the
    lowest calibration loss, until the FLOPs ratio reaches `target`."""
    gated = require_gated(gated)
    closed: list[str] = []
    while flops_ratio(gated, {**dict.fromkeys(gated.gates, True),
                              **dict.fromkeys(closed, False)}) > target:  # fmt: skip
        left = [n for n in gated.gates if n not in closed]
        if not left:
            break
        shut = dict.fromkeys(closed, False)
        closed.append(min(left, key=lambda n: _loss_with(gated, loss, {**shut, n: False})))
    return close_to_target(gated, closed, target)


def _loss_with(gated: Gated, loss: Callable[[nn.Module], float], closed: Decisions) -> float:
    with _all_open(gated, closed), torch.no_grad():
        return float(loss(gated))


@contextlib.contextmanager
def _all_open(gated: Gated, closed: Decisions | None = None) -> Iterator[None]:
    """Every gate fixed open (but those in `closed`), as it was fixed before afterwards."""
    before = {n: g.fixed for n, g in gated.gates.items()}
    fix_decisions(gated, {**dict.fromkeys(gated.gates, True), **(closed or {})})
    try:
        yield
    finally:
        for name, fixed in before.items():
            gated.gates[name].fixed = fixed


def _observe(name: str, before: Tensor, after: Tensor) -> Tensor:
    """Add the mean cosine of `before` and `after` (per token of a [batch, tokens,
    features] tensor, else per sample) to `name`'s sums; `after` passes through."""
    sums = _SUMS.get()
    if sums is not None and before.shape == after.shape:
        dims = (0, 1) if before.dim() == 3 else (1, -1)  # [batch, tokens, features]: a token
        a, b = before.float().flatten(*dims), after.float().flatten(*dims)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        sums[name][0] += float(cos.sum())
        sums[name][1] += cos.numel()
    return after


@contextlib.contextmanager
def _observing(gated: Gated) -> Iterator[None]:
    """Each gate's merge ``add(skip, scaled)`` reported to `_observe`, in every graph of the
    model, for the time of the block."""
    added: list[tuple[fx.GraphModule, fx.Node]] = []
    for gm in gated.graphs():
        for node, gate in gate_nodes(gm):
            (scaled,) = node.users  # mul(branch, gate), as insert_gates builds it
            merge, skip = merge_of(scaled)
            if merge.target is not operator.add:
                continue
            with gm.graph.inserting_after(merge):
                added.append((gm, gm.graph.call_function(_observe, (gate.name, skip, merge))))
    for gm in {id(g): g for g, _ in added}.values():
        gm.recompile()
    try:
        yield
    finally:
        for gm, node in added:
            gm.graph.erase_node(node)
        for gm in {id(g): g for g, _ in added}.values():
            gm.recompile()

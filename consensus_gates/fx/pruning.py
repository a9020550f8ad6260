"""Dependency-aware channel removal with torch-pruning, for the surgery and the baselines.

Imported only where channels are cut, so that `import consensus_gates` does not load it.
"""

from __future__ import annotations

import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning import ops as tp_ops
from torch_pruning.pruner import function as tp_function


def dependency_graph(model: nn.Module, inputs: tuple[Tensor, ...]) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model`, with the parameters outside known
    layers declared (`unwrapped_parameters`)."""
    dg = tp.DependencyGraph()
    return dg.build_dependency(
        model, example_inputs=inputs, unwrapped_parameters=unwrapped_parameters(dg, model)
    )


def unwrapped_parameters(
    dg: tp.DependencyGraph, model: nn.Module
) -> list[tuple[nn.Parameter, int]]:
    """Parameters outside the layers torch-pruning knows (ConvNeXt's layer scale, a class
    token), each with the dim a channel cut removes: its last dim larger than 1, the channel
    dim of a ``(C, 1, 1)`` scale and of a ``(1, N, C)`` token table alike. Passing them
    explicitly keeps torch-pruning from warning about its guess on every cut."""
    known = set(dg.REGISTERED_PRUNERS) - {tp_ops.OPTYPE.ELEMENTWISE}
    wrapped = {id(p) for m in model.modules() if tp_ops.module2type(m) in known
               for p in m.parameters()}  # fmt: skip
    found = []
    for p in model.parameters():
        dims = [d for d, s in enumerate(p.shape) if s > 1]
        if id(p) not in wrapped and dims:
            found.append((p, dims[-1]))
    return found


def cut_out_channels(dg: tp.DependencyGraph, module: nn.Module, idxs: list[int]) -> None:
    """Remove output channels `idxs` of a conv or linear layer with torch-pruning, and with
    them everything coupled to them in `dg` (norms, the next layer's inputs)."""
    linear = isinstance(module, nn.Linear)
    fn = tp.prune_linear_out_channels if linear else tp.prune_conv_out_channels
    dg.get_pruning_group(module, fn, idxs).prune()


def prune_channels(module: nn.Module, idxs: list[int], side: str) -> None:
    """Cut channels `idxs` of one layer alone: its outputs (`side` "out") or inputs ("in")."""
    if not any(True for _ in module.parameters()):
        return  # activations and dropout have nothing to cut
    pruner = tp_function.PrunerBox[tp_ops.module2type(module)]
    (pruner.prune_out_channels if side == "out" else pruner.prune_in_channels)(module, idxs)

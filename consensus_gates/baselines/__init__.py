"""Baseline pruning methods, each producing a smaller model to set beside the consensus
sub-network at a matched FLOPs ratio.

- `naive`: the paper's Fig. 2, weights (`drop_weights`) or residual branches (`drop_layers`)
  dropped at random from a trained network.
- `pruners`: Torch-Pruning's magnitude, BN-scale and Taylor pruners (`prune_to_flops`), for
  train, prune, fine-tune.
- `density`: activation-density pruning during training (`DensityPruning`, an `epoch_end`
  for the trainer's `train`).
- `depth`: the depth pruners of language models, ShortGPT's Block Influence, LLM-Drop,
  Shortened LLaMA's removal loss and FinerCut's greedy search (`block_influence`,
  `removal_loss`, `greedy_removal`), as decisions for a gated model's gates.
- `space`: what the channel baselines may cut, the internal widths of the residual branches
  (`inner_layers`).

Fine-tuning a pruned model is `train(pruned, ...)`: the trainer takes plain models too. The
study methods that run these at an equal budget are in `consensus_gates.experiments.methods`.
"""

from .density import DensityPruning, activation_density
from .depth import block_influence, greedy_removal, influences, random_order, removal_loss
from .naive import drop_layers, drop_weights, sparse_flops_ratio
from .pruners import IMPORTANCES, prune_to_flops

__all__ = [
    "IMPORTANCES",
    "DensityPruning",
    "activation_density",
    "block_influence",
    "greedy_removal",
    "influences",
    "random_order",
    "removal_loss",
    "drop_layers",
    "drop_weights",
    "prune_to_flops",
    "sparse_flops_ratio",
]

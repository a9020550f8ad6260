"""The one-pass trainer and what surrounds it.

`config` (the recipe, `TrainConfig`), `trainer` (`train`, `evaluate`, `evaluate_loss`),
`hf_trainer` (`GatesTrainer`, the same for `transformers.Trainer`),
`controller` (λ_act towards a sparsity target), `runs` (the output folder), `checkpoint`,
`data` (data sets and loaders) and `plots`.
"""

from .config import TrainConfig
from .trainer import evaluate, evaluate_loss, train

__all__ = ["TrainConfig", "evaluate", "evaluate_loss", "train"]

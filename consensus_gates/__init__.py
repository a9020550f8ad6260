"""consensus-gates: find a consensus sub-network of a residual network in one training run,
then cut it out for real.

The pipeline, as README's table and docs/architecture.md give it:

1. trace            `fx.tracing`: torch.fx, with each node's shape
2. find blocks      `fx.blocks`, `fx.positions`: residual branches and channel points
3. insert gates     `fx.insert` (`insert_gates`, `GateConfig`), `fx.graph_module`
                    (`GatedModel`), `gates` (gate modules and their heads)
4. losses, training `losses` (polarization, activation); `training` (`train`, `TrainConfig`)
5. consensus        `consensus`: read or pin each gate's shared decision; `budget`: the
                    one that meets a FLOPs target (`project_to_budget`)
6. surgery          `fx.surgery` (`materialize`): closed branches, channels and gates cut out
7. save, export     `saving`: save / load without pickle, and torch.export
8. cost, speed      `cost` (fvcore FLOPs), `bench` (latency, throughput, memory)

Around it: `models` (the zoo, `create_model`), `experiments` and `baselines` (studies against
other pruning methods) and `cli` (the `cgates` command). The core, everything but
`training`, `bench`, `experiments`, `baselines` and `cli`, never imports those.
"""

from .budget import project_to_budget
from .config import GateConfig
from .consensus import Consensus, consensus, fix_decisions, unfix_decisions
from .cost import Cost, branch_costs, flops, flops_ratio
from .errors import (
    CompilerNotFound,
    DataError,
    InputError,
    ModelFileError,
    TracingError,
    TrainingDiverged,
)
from .fx.graph_module import GatedModel
from .fx.insert import insert_gates
from .fx.positions import register_position
from .gates import ChannelGate, Gate, LayerGate, register_head
from .losses import GateLosses, activation_loss, gate_losses, polarization_loss
from .models import create_model, list_models, register_model
from .saving import export, load, save
from .slimming import materialize

__version__ = "0.1.0"

# The trainer pulls in tqdm and matplotlib: imported on first use, not with the core.
_LAZY = {
    "TrainConfig": "training",
    "train": "training",
    "evaluate": "training",
    "evaluate_loss": "training",
    "GatesTrainer": "training.hf_trainer",  # needs transformers, the `hf` extra
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "ChannelGate",
    "Consensus",
    "Cost",
    "CompilerNotFound",
    "DataError",
    "Gate",
    "GateConfig",
    "GateLosses",
    "GatedModel",
    "GatesTrainer",
    "InputError",
    "LayerGate",
    "ModelFileError",
    "TracingError",
    "TrainConfig",
    "TrainingDiverged",
    "activation_loss",
    "branch_costs",
    "consensus",
    "create_model",
    "evaluate",
    "evaluate_loss",
    "export",
    "fix_decisions",
    "flops",
    "flops_ratio",
    "gate_losses",
    "insert_gates",
    "list_models",
    "load",
    "materialize",
    "polarization_loss",
    "project_to_budget",
    "register_head",
    "register_model",
    "register_position",
    "save",
    "train",
    "unfix_decisions",
]

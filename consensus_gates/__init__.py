"""consensus-gates: find a consensus sub-network of a residual network in one training run,
then cut it out for real.

The pipeline (docs/architecture.md):

1. `fx.tracing`, `fx.blocks`  trace the model with torch.fx; find residual branches and
   channel points
2. `fx.insert`     put gates on them (`insert_gates`, `GateConfig`); `gates` holds the gate
   modules and their heads
3. `losses`        polarization and activation regularizers
4. `training`      the one-pass trainer (`train`, `TrainConfig`), data, checkpoints, plots
5. `consensus`     read (or pin) the shared open/closed decision of each gate
6. `fx.surgery`    cut closed branches, channels and all gates out (`materialize`)
7. `saving`        save / load without pickle, and torch.export
8. `bench`         latency, throughput and memory, slim against original

Around it: `cost` (fvcore FLOPs), `models` (the zoo and `create_model`), `baselines` and
`experiments` (comparisons with other pruning methods) and `cli` (the `cgates` command).
The core (steps 1-3 and 5-7) imports none of training, bench, experiments or cli.
"""

from .config import GateConfig
from .consensus import Consensus, consensus, fix_decisions, unfix_decisions
from .cost import Cost, branch_costs, flops, flops_ratio
from .errors import DataError, InputError, ModelFileError, TracingError, TrainingDiverged
from .fx.graph_module import GatedModel
from .fx.insert import insert_gates
from .fx.surgery import materialize
from .gates import ChannelGate, Gate, LayerGate
from .losses import activation_loss, gate_losses, polarization_loss
from .models import create_model, list_models, register_model
from .saving import export, load, save

__version__ = "0.1.0"

# The trainer pulls in tqdm and matplotlib: imported on first use, not with the core.
_LAZY = {"TrainConfig": "training", "train": "training", "evaluate": "training"}


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
    "DataError",
    "Gate",
    "GateConfig",
    "GatedModel",
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
    "register_model",
    "save",
    "train",
    "unfix_decisions",
]

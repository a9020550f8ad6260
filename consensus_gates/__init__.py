"""consensus-gates: find a consensus sub-network of a residual network in one training run,
then cut it out for real.

The pipeline, one module per step:

1. `tracing`   trace the model with torch.fx and record shapes
2. `blocks`    find the residual merges
3. `insert`    put a gate on every residual branch (`insert_gates`, `GateConfig`)
4. `losses`    polarization and activation regularizers
5. `consensus` read (or pin) the shared open/closed decision of each gate
6. `surgery`   cut closed branches and all gates out (`materialize`)
7. `saving`    save / load without pickle, and torch.export
8. `bench`     latency, throughput and memory, slim against original

Training: `train` (the one-pass trainer), `data` (data sets and loaders), `checkpoint`,
`plots`. Also `cost` (fvcore FLOPs), `models` (the zoo and `create_model`) and `cli`.
"""

from .config import GateConfig
from .consensus import Consensus, consensus, fix_decisions, unfix_decisions
from .cost import Cost, branch_costs, flops, flops_ratio
from .errors import DataError, InputError, ModelFileError, TracingError, TrainingDiverged
from .gates import ChannelGate, Gate, LayerGate
from .insert import GatedModel, insert_gates
from .losses import activation_loss, gate_losses, polarization_loss
from .models import create_model, list_models, register_model
from .saving import export, load, save
from .surgery import materialize

__version__ = "0.1.0"

# The trainer pulls in tqdm and matplotlib: imported on first use, not with the core.
_LAZY = {"TrainConfig": "train"}  # the trainer itself: consensus_gates.train.train


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
    "export",
    "fix_decisions",
    "gate_losses",
    "flops",
    "flops_ratio",
    "insert_gates",
    "list_models",
    "load",
    "materialize",
    "polarization_loss",
    "register_model",
    "save",
    "unfix_decisions",
]

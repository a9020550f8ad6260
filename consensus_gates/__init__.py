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
and `cost` (fvcore FLOPs), `models` (the zoo and `create_model`).
"""

from .config import GateConfig
from .consensus import Consensus, consensus, fix_decisions
from .cost import Cost, branch_costs, flops
from .errors import InputError, ModelFileError, TracingError
from .gates import ChannelGate, Gate, LayerGate
from .insert import GatedModel, insert_gates
from .losses import activation_loss, polarization_loss
from .models import create_model, list_models, register_model
from .saving import export, load, save
from .surgery import materialize

__version__ = "0.1.0"

__all__ = [
    "ChannelGate",
    "Consensus",
    "Cost",
    "Gate",
    "GateConfig",
    "GatedModel",
    "InputError",
    "LayerGate",
    "ModelFileError",
    "TracingError",
    "activation_loss",
    "branch_costs",
    "consensus",
    "create_model",
    "export",
    "fix_decisions",
    "flops",
    "insert_gates",
    "list_models",
    "load",
    "materialize",
    "polarization_loss",
    "register_model",
    "save",
]

"""`GatesTrainer`: fine-tune a gated Hugging Face model with `transformers.Trainer`.

The Trainer keeps its loop, optimizer, accelerate and torchrun; this adds what `train` adds
to a loop: the polarization and activation terms in the loss, λ_polar's schedule and the
sparsity controller per optimizer step, the projection onto the target, the gate statistics
in the logs, and checkpoints in consensus-gates' format (a gated model's `save_pretrained`
folder would be rebuilt with random weights).

transformers is an optional extra: importing this module imports it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import transformers
from safetensors.torch import load_model
from torch import Tensor, nn

from .._utils import atomic_path
from ..budget import project_to_budget
from ..consensus import consensus
from ..cost import flops_ratio
from ..errors import ModelFileError
from ..fx.cut import replay_cuts
from ..fx.graph_module import Gated
from ..hf.inputs import is_transformer
from ..losses import gate_losses
from ..saving.files import model_spec, read_spec, save
from .config import TrainConfig
from .controller import SparsityController
from .progressive import SettleTracker, cut_settled, pin_gates

# TrainConfig's fields that GatesTrainer takes as keyword arguments; the rest of the recipe
# (epochs, optimizer, learning rate, seed) is TrainingArguments'
GATE_OPTIONS = ("lambda_polar", "polar_schedule", "polar_steps", "warmup_epochs",
                "channel_polarizer", "lambda_act", "act_weight", "target", "target_kind",
                "projection", "controller_kp", "controller_ki", "target_ramp",
                "lambda_act_max", "progressive", "settle_steps")  # fmt: skip
MODEL_FILE = "gated.safetensors"  # in a checkpoint folder, and what save_model() writes
STATE_FILE = "gates_state.json"  # λ_act, the controller and the projection, beside it

logger = transformers.utils.logging.get_logger(__name__)


@dataclass(eq=False)
class _GateState:
    """What the gates carry between optimizer steps, and what a checkpoint saves of it."""

    lambda_act: float
    controller: SparsityController | None = None
    tracker: SettleTracker | None = None  # with progressive: how long each gate agreed
    projected: bool = False
    lambda_polar: float = 0.0  # this step's, from the schedule
    r_polar: Tensor | None = None  # summed since the last log, on the model's device
    r_polar_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        controller = self.controller.state_dict() if self.controller is not None else None
        tracker = self.tracker.state_dict() if self.tracker is not None else None
        return {"lambda_act": self.lambda_act, "controller": controller,
                "tracker": tracker, "projected": self.projected}  # fmt: skip


class GatesTrainer(transformers.Trainer):
    """A `transformers.Trainer` that trains a gated model's weights and gates together.

    Give it the model from `insert_gates` and the usual Trainer arguments (an unmodified
    `TrainingArguments`, datasets, collator). The gate options are keyword arguments with
    the names and defaults of `TrainConfig`'s fields: ``target``, ``target_kind``,
    ``lambda_polar``, ``polar_schedule``, ``polar_steps``, ``warmup_epochs``,
    ``channel_polarizer``, ``lambda_act``, ``act_weight``, ``projection``,
    ``controller_kp``, ``controller_ki``, ``target_ramp``, ``lambda_act_max``,
    ``progressive`` and ``settle_steps``; epochs, learning rate and optimizer come from the
    `TrainingArguments`.

    - The loss is the model's own loss plus ``λ_polar · polarization_loss + λ_act ·
      activation_loss``, scaled for gradient accumulation as the Trainer scales its own.
      Evaluation reports the model's own loss.
    - λ_polar follows ``polar_schedule`` over the Trainer's epochs (``state.epoch``); with a
      ``target`` the controller sets λ_act after every optimizer step, and the gates are
      projected onto the target once its ramp is over, as in `train`.
    - Under torchrun or accelerate the gate statistics are the global batch's, so every
      process makes the same decisions.
    - Each log adds ``r_polar`` (its mean since the last log), ``open_ratio``,
      ``flops_ratio``, ``lambda_polar`` and ``lambda_act``.
    - Checkpoints (any ``save_strategy``) and `save_model` write the gated model with
      `consensus_gates.save` as ``gated.safetensors``, with ``gates_state.json``; ``train(
      resume_from_checkpoint=...)`` continues from them exactly. Load the result with
      `consensus_gates.load`, cut it with `materialize`.

    Example::

        gated = cg.insert_gates(model, {"input_ids": ids})
        trainer = GatesTrainer(model=gated, args=TrainingArguments("out", num_train_epochs=1),
                               train_dataset=data, target=0.75)
        trainer.train()
        slim = cg.materialize(trainer.model)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in GATE_OPTIONS if k in kwargs}
        gate_config = TrainConfig(**options, progress=False)  # checked before the Trainer starts
        super().__init__(*args, **kwargs)
        _check_model(self.model, gate_config, self.args)
        self.gate_config = gate_config
        tracker = SettleTracker(gate_config.settle_steps) if gate_config.progressive else None
        self.gates = _GateState(lambda_act=gate_config.lambda_act if gate_config.target is None
                                else 0.0, tracker=tracker)  # fmt: skip
        self._resumed: dict[str, Any] | None = None  # a checkpoint's gate state, until `_begin`
        self._pinned: dict[str, Any] = {}  # and the decisions its gates were pinned to
        self.add_callback(_GateSteps(self))

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            loss = loss + self._gate_terms(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _gate_terms(self, num_items_in_batch: Tensor | int | None) -> Tensor:
        """λ_polar · R_polar + λ_act · R_act of the last forward pass, scaled as the Trainer
        will scale the model's loss: divided by the accumulation steps where the Trainer
        does not divide (`training_step`), since the terms are means over this micro-batch.
        Not multiplied by the number of processes: the terms are already the global
        batch's, and their gradient the whole batch's once DDP averages it."""
        c, g = self.gate_config, self.gates
        polar, act, r_polar = gate_losses(self.model, weight=c.act_weight,
                                          channels=c.channel_polarizer)  # fmt: skip
        terms = g.lambda_polar * polar + g.lambda_act * act
        g.r_polar = r_polar.detach() if g.r_polar is None else g.r_polar + r_polar.detach()
        g.r_polar_steps += 1
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None
                      or self.compute_loss_func is not None)  # fmt: skip
        return terms / self.current_gradient_accumulation_steps if scaled else terms

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log, not evaluation's or the final metrics
            logs = {**logs, **self._gate_log()}
        super().log(logs, start_time)

    def _gate_log(self) -> dict[str, float]:
        g = self.gates
        out = {}
        if g.r_polar is not None:
            out["r_polar"] = g.r_polar.item() / g.r_polar_steps
            g.r_polar, g.r_polar_steps = None, 0
        c = consensus(self.model)
        out.update(open_ratio=c.open_ratio, flops_ratio=flops_ratio(self.model, c),
                   lambda_polar=g.lambda_polar, lambda_act=g.lambda_act)  # fmt: skip
        return out

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            folder = Path(output_dir if output_dir is not None else self.args.output_dir)
            logger.warning(
                f"saved the gated model as {folder / MODEL_FILE} (consensus-gates' format, not "
                "save_pretrained's): load it with consensus_gates.load(), cut it with "
                "consensus_gates.materialize()"
            )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Where the Trainer would call `save_pretrained`: our file, and the gate state."""
        if not self.args.should_save:
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        save(self.model, folder / MODEL_FILE)
        with atomic_path(folder / STATE_FILE) as tmp:
            tmp.write_text(json.dumps(self.gates.state_dict()))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(folder))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None
                              ) -> None:  # fmt: skip
        model = self.model if model is None else model
        folder = Path(resume_from_checkpoint)
        path = folder / MODEL_FILE
        if not path.is_file() or not (folder / STATE_FILE).is_file():
            raise ValueError(
                f"{folder} is not a GatesTrainer checkpoint: it needs {MODEL_FILE} and "
                f"{STATE_FILE}; resume from a checkpoint this trainer wrote"
            )
        # pinned at `_begin`, once the optimizer is built over the parameters the run began
        # with (a pinned gate's take no gradient, and the Trainer leaves those out)
        self._pinned = _load_weights(model, path)
        try:
            self._resumed = json.loads((folder / STATE_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ModelFileError(f"{folder / STATE_FILE} is not readable JSON ({e})") from e

    def _load_best_model(self) -> None:
        pin_gates(
            self.model,
            _load_weights(self.model, Path(self.state.best_model_checkpoint) / MODEL_FILE),
        )

    def _begin(self, state: transformers.TrainerState) -> None:
        """At the start of `train`: the schedule over this run's epochs, a controller over
        its optimizer steps, and what a resumed checkpoint held."""
        epochs = max(1, math.ceil(state.num_train_epochs or 1))
        self.gate_config = replace(self.gate_config, epochs=epochs)
        g = self.gates
        if self.gate_config.target is not None:
            g.controller = SparsityController(self.model, self.gate_config, state.max_steps)
        if self._resumed is not None:
            _restore(g, self._resumed)
            pin_gates(self.model, self._pinned)
            self._resumed, self._pinned = None, {}

    def _before_step(self, state: transformers.TrainerState) -> None:
        g, c = self.gates, self.gate_config
        g.lambda_polar = c.lambda_polar_at(int(state.epoch or 0))
        k = g.controller
        if (k is not None and c.projection and not g.projected and g.lambda_polar > 0
                and k.steps >= k.ramp_steps):  # fmt: skip
            decisions = project_to_budget(self.model, c.target, c.target_kind)
            if c.progressive:
                self._cut(state, decisions)
            else:
                pin_gates(self.model, decisions)
            g.projected, g.lambda_act = True, 0.0
            logger.info(f"step {state.global_step + 1}: gates projected onto the target "
                        f"{c.target:g}")  # fmt: skip

    def _after_step(self, state: transformers.TrainerState) -> None:
        g = self.gates
        if g.tracker is not None and g.lambda_polar > 0 and self.model.gates:
            settled = g.tracker.update(self.model, self.args.world_size)
            if settled:
                self._cut(state, settled)
        if g.controller is not None and not g.projected:
            g.lambda_act = g.controller.step()

    def _cut(self, state: transformers.TrainerState, decisions: dict[str, Any]) -> None:
        """Progressive surgery: the gates in `decisions` leave the model, with the
        branches they close; the optimizer goes on with the parameters left."""
        removed = cut_settled(self.model, self.optimizer, decisions)
        self.gates.tracker.forget(removed)
        shut = sum(not d for d in decisions.values())
        logger.info(f"step {state.global_step + 1}: cut {len(decisions)} settled gates out, "
                    f"{shut} closed with their branches")  # fmt: skip


class _GateSteps(transformers.TrainerCallback):
    """Calls the trainer's gate steps at the Trainer's step boundaries: `on_step_begin` at
    the first micro-batch of an optimizer step, `on_step_end` after the optimizer step."""

    def __init__(self, trainer: GatesTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._begin(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._before_step(state)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._after_step(state)


def _check_model(model: nn.Module | None, config: TrainConfig, args: Any) -> None:
    if not (isinstance(model, Gated) and is_transformer(model)):
        raise ValueError(
            f"GatesTrainer trains a Hugging Face model from insert_gates, got "
            f"{type(model).__name__}; gate it first (consensus_gates.insert_gates(model, "
            "example_inputs)), or use transformers.Trainer for a plain one"
        )
    if config.progressive and args.load_best_model_at_end:
        raise ValueError(
            "progressive=True cuts gates out of the model as it trains, so an earlier (best) "
            "checkpoint no longer fits it at the end: set load_best_model_at_end=False, or "
            "progressive=False"
        )
    if args.ddp_find_unused_parameters is False:
        raise ValueError(
            "ddp_find_unused_parameters=False: a pinned or closed gate leaves parameters "
            "without gradient, which DistributedDataParallel then waits for; leave it unset"
        )


def _load_weights(model: nn.Module, path: Path) -> dict[str, Any]:
    """`path`'s weights into `model`, which must be the same gated architecture (once the
    gates the file's run had cut out while training are cut out of it too); returns the
    decisions its gates were pinned to."""
    spec = read_spec(path)
    cut = {n: d for n, d in spec.get("cut", {}).items() if n in model.gates}
    if cut:
        replay_cuts(model, cut)
    mine = json.loads(json.dumps(model_spec(model)))  # as the file holds it: lists, str keys
    if {k: v for k, v in spec.items() if k != "fixed"} != {k: v for k, v in mine.items()
                                                           if k != "fixed"}:  # fmt: skip
        raise ModelFileError(
            f"{path} holds another gated model than the trainer's (another architecture, "
            "config or gate options): resume with the model that wrote it"
        )
    load_model(model, str(path), strict=True)
    return spec.get("fixed", {})


def _restore(g: _GateState, state: dict[str, Any]) -> None:
    try:
        g.lambda_act, g.projected = float(state["lambda_act"]), bool(state["projected"])
        if g.controller is not None:
            g.controller.load_state_dict(state["controller"])
        if g.tracker is not None:
            g.tracker.load_state_dict(state["tracker"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"the checkpoint's {STATE_FILE} is incomplete ({e!r})") from e


__all__ = ["GATE_OPTIONS", "GatesTrainer", "MODEL_FILE", "STATE_FILE"]

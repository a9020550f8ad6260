"""The methods a study compares: one file each, registered with `register_method` in `METHODS`.

Every method gets a `RunContext` (an untrained model, the loaders, the run's settings, the
seed) and returns a `MethodResult`: the final model, which the runner then evaluates, counts
and times, and the epochs it spent. How each spends the run's ``epochs`` budget E:

- ``dense`` (`dense.py`): trains the plain model for E epochs.
- ``gates`` (`gates.py`, ours): inserts gates, trains weights and gates for E epochs in one
  pass (with the FLOPs ``target`` reached by the trainer's controller), cuts the consensus
  out.
- ``dropout``, ``layer-drop`` (`naive.py`): the dense model of E epochs, then weights or
  residual branches removed at random, with no further training (paper Fig. 2).
- ``tp-magnitude``, ``tp-bn-scale``, ``tp-taylor`` (`torch_pruning.py`): dense pretraining
  for E - F epochs, torch-pruning to the target, fine-tuning for F = ``finetune_epochs``: E
  in all, the budget of our one pass. ``extra_finetune_epochs`` adds fine-tuning beyond it,
  and the results count it.
- ``density`` (`density.py`): trains for E epochs while the model shrinks to
  ``density_scale`` × its layers' activation densities every ``density_every`` epochs; set by
  the scale, not by a FLOPs target.

Dense trainings are cached per (model, data, recipe, epochs, seed) under the output folder
and shared by the methods and targets that start from them; the training time of a reused
model is added to the run's wall time, so cached and uncached runs report the same cost.

A method's own study keys are the fields of its options dataclass: a study file's keys are
checked against their names and types, its ``__post_init__`` checks their values, and the
run holds an instance as ``run.options`` (``ctx.options``). To add a method, write one file
here, e.g. ``my_method.py``, and add it to the import of the built-ins below::

    from dataclasses import dataclass

    from ._registry import MethodOptions, MethodResult, RunContext, register_method
    from ._training import dense_model, fit

    @dataclass(frozen=True)
    class MyOptions(MethodOptions):
        my_epochs: int = 1  # `my_epochs = 2` in a study's [base] or in a run

        def __post_init__(self) -> None:
            if self.my_epochs < 1:
                raise ValueError(f"my_epochs must be >= 1, got {self.my_epochs}")

    @register_method("my-method", target="required", options=MyOptions)
    def my_method(ctx: RunContext) -> MethodResult:
        model, reused = dense_model(ctx, ctx.run.epochs - ctx.options.my_epochs)
        ...  # prune `model` to ctx.run.target
        fit(ctx, model, epochs=ctx.options.my_epochs)
        return MethodResult(model, ctx.run.epochs, reused)

A method that trains a gated model registers with ``gates=True``: then ``progressive`` and
``settle_steps`` of a study's ``[base.train]`` reach its runs (a method without gates gets
them at their defaults). Checks that need the rest of the run (its epochs, say) go in the
options' ``check(run)``;
an option a study may list, one run per value, is declared with
``field(default=..., metadata=SWEEP)``. The test goes beside the built-ins' in
``tests/test_experiments.py``.
"""

from ._registry import (
    METHODS,
    SWEEP,
    Method,
    MethodOptions,
    MethodResult,
    RunContext,
    TargetRule,
    register_method,
)
from ._training import dense_model, fit

# isort: off
# The built-in methods register themselves, in the order error messages list them.
from . import dense, gates, naive, torch_pruning, density  # noqa: F401, E402
# isort: on

__all__ = [
    "METHODS",
    "SWEEP",
    "Method",
    "MethodOptions",
    "MethodResult",
    "RunContext",
    "TargetRule",
    "dense_model",
    "fit",
    "register_method",
]

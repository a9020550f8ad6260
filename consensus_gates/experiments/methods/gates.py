"""``gates``: ours. Gates inserted, weights and gates trained for the whole budget in one pass
(the FLOPs target, if any, met by the trainer's controller and projection), the consensus cut
out."""

from __future__ import annotations

from ...consensus import consensus
from ...fx.insert import insert_gates
from ...slimming import materialize
from ._registry import MethodResult, RunContext, register_method
from ._training import fit


@register_method("gates", target="optional", gates=True)
def gates(ctx: RunContext) -> MethodResult:
    """Ours: gates on every residual branch, one pass of training, the consensus cut out."""
    run = ctx.run
    gated = insert_gates(ctx.model, ctx.example_inputs, run.gates)
    records = fit(ctx, gated, target=run.target, out_dir=ctx.work_dir)
    c = consensus(gated)
    extra = {
        "r_polar": records[-1]["r_polar"],  # the last epoch's mean: 0 = fully unified
        "open_ratio": c.open_ratio,
        "gates": len(c.decisions),
        "lambda_act": records[-1]["lambda_act"],
    }
    return MethodResult(materialize(gated, c), run.epochs, extra=extra)

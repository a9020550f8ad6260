"""``dropout`` and ``layer-drop``: the paper's naive baselines (Fig. 2), the dense model of the
whole budget with weights or residual branches removed at random, and no further training."""

from __future__ import annotations

from ...baselines import drop_layers, drop_weights, sparse_flops_ratio
from ...baselines.naive import WEIGHTED
from ._registry import MethodResult, RunContext, register_method
from ._training import dense_model


@register_method("dropout", target="required")
def dropout(ctx: RunContext) -> MethodResult:
    """Naive dropout: the dense model with 1 - target of its conv and linear weights zeroed
    at random. Its structure and latency are unchanged; its FLOPs and parameter ratios are
    those if the zeros were skipped."""
    run = ctx.run
    model, reused = dense_model(ctx, run.epochs)
    dropped = drop_weights(model, 1 - run.target, seed=ctx.seed)
    zeros = sum(
        m.weight.numel() - int(m.weight.count_nonzero())
        for m in dropped.modules()
        if isinstance(m, WEIGHTED)
    )
    return MethodResult(
        dropped,
        run.epochs,
        reused,
        flops_ratio=sparse_flops_ratio(dropped, model, ctx.example_inputs),
        params_ratio=1 - zeros / sum(p.numel() for p in model.parameters()),
        extra={"fraction_dropped": 1 - run.target},
    )


@register_method("layer-drop", target="required")
def layer_drop(ctx: RunContext) -> MethodResult:
    """Naive layer drop: random residual branches of the dense model removed to the target."""
    model, reused = dense_model(ctx, ctx.run.epochs)
    slim = drop_layers(model, ctx.example_inputs, ctx.run.target, seed=ctx.seed)
    return MethodResult(slim, ctx.run.epochs, reused)

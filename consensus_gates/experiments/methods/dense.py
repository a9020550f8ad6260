"""``dense``: the unpruned reference, the plain model trained for the whole budget."""

from __future__ import annotations

from ._registry import MethodResult, RunContext, register_method
from ._training import dense_model


@register_method("dense", target="refused")
def dense(ctx: RunContext) -> MethodResult:
    """The unpruned reference: plain training for the whole budget."""
    model, reused = dense_model(ctx, ctx.run.epochs)
    return MethodResult(model, ctx.run.epochs, reused)

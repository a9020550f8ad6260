"""What several methods share: training on the run's data with its recipe, and dense models
cached per (model, data, recipe, epochs, seed) under the output folder."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..._utils import atomic_path
from ...saving.files import load, save
from ...training.trainer import train
from ._registry import RunContext


def fit(
    ctx: RunContext,
    model: nn.Module,
    *,
    out_dir: Path | None = None,
    epoch_end: Callable[[nn.Module, int], bool] | None = None,
    **recipe: Any,
) -> list[dict[str, Any]]:
    """`train` on the run's data and device with its recipe, `recipe` overriding fields of
    the `TrainConfig`. No test set: the runner evaluates the final model once. A run without
    a results file starts again from scratch, so its `out_dir` is overwritten."""
    config = replace(ctx.run.train, **recipe)
    records = train(model, ctx.train_loader, None, config, out_dir=out_dir,
                    device=ctx.run.device, overwrite=True, log=ctx.log,
                    epoch_end=epoch_end)  # fmt: skip
    ctx.train_flops += records[-1]["train_flops"] if records else 0.0
    return records


def dense_model(ctx: RunContext, epochs: int) -> tuple[nn.Module, float]:
    """The plain model trained for `epochs`, and the seconds of training it saved: loaded
    from the cache if this model, data, recipe and seed were trained before (then the saved
    time of that training), else trained now and cached (0)."""
    run, recipe = ctx.run, ctx.run.train
    key = {
        "model": run.model,
        "model_args": dict(run.model_args),
        "dataset": run.dataset,
        "data_root": str(Path(run.data_root).resolve()),
        "train_subset": run.train_subset,
        "batch_size": run.batch_size,
        "epochs": epochs,
        "seed": ctx.seed,
        "recipe": {
            k: asdict(recipe)[k]
            for k in ("lr", "momentum", "weight_decay", "milestones", "lr_gamma")
        },
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = ctx.cache_dir / f"dense-{run.model}-e{epochs}-s{ctx.seed}-{digest}.safetensors"
    info = path.with_suffix(".json")
    cached = json.loads(info.read_text()) if path.is_file() and info.is_file() else {}
    if "train_flops" in cached:  # older caches did not count them: trained again
        seconds = cached["seconds"]
        ctx.log(f"  reusing the dense model of {epochs} epochs in {path} ({seconds:.0f} s)")
        ctx.train_flops += cached["train_flops"]
        return load(path, device=run.device).train(), seconds
    began = time.perf_counter()
    # A hit draws no random numbers; keep a miss from drawing any either, so a run gives the
    # same numbers whichever run trained the cached model first.
    state = ctx.train_loader.generator.get_state() if ctx.train_loader.generator else None
    spent = ctx.train_flops
    with torch.random.fork_rng():
        fit(ctx, ctx.model, epochs=epochs)
    if state is not None:
        ctx.train_loader.generator.set_state(state)
    save(ctx.model, path)
    cost = {"seconds": time.perf_counter() - began, "train_flops": ctx.train_flops - spent}
    with atomic_path(info) as tmp:
        tmp.write_text(json.dumps({**key, **cost}, indent=2))
    return ctx.model, 0.0

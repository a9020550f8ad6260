"""Training checkpoints: everything `train` needs to continue exactly, in one ``.pt`` file
that is read with ``torch.load(weights_only=True)``, so opening one never runs code.

The model's architecture is stored as the same JSON spec that `save` writes, and rebuilt
from it (`rebuild`); the rest is tensors, numbers and strings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils import atomic_path, unwrap
from ..errors import ModelFileError
from ..saving.files import model_spec, rebuild
from ..saving.spec import parse_spec

FORMAT = "consensus-gates-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, model: nn.Module, /, **state: Any) -> None:
    """Write the model (spec and weights: a gated model, or a plain one `save` can describe)
    and `state` (tensors, numbers, strings and containers of them) atomically. `train` gives
    its `RunState.state_dict()`: the model's weights (the same as `model`'s), optimizer,
    scheduler, RNG states, records..."""
    model = unwrap(model)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "spec": json.dumps(model_spec(model)),
        "model": model.state_dict(),
        **state,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (no unpickling of code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds on a damaged or foreign file
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelFileError(
            f"{path} is not a readable consensus-gates checkpoint ({reason}); "
            "it may be truncated, or a file of another kind (slim models are .safetensors)"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(
            f"{path} is a torch file but not a consensus-gates training checkpoint "
            "(written by `cgates train` or consensus_gates.training.train)"
        )
    version = payload.get("version")
    if type(version) is not int or version < 1:
        raise ModelFileError(f"{path} has no valid checkpoint version ({version!r})")
    if version > VERSION:
        raise ModelFileError(
            f"{path} is checkpoint version {version}; this consensus-gates reads up "
            f"to {VERSION}: upgrade consensus-gates"
        )
    missing = [k for k in ("spec", "model") if k not in payload]
    if missing or not isinstance(payload["spec"], str) or not isinstance(payload["model"], dict):
        raise ModelFileError(
            f"{path} is an incomplete checkpoint: it needs a model spec (JSON text) and the "
            f"model's weights{f'; missing {missing}' if missing else ''}"
        )
    parse_spec(payload["spec"], str(path))
    return payload


def model_from_checkpoint(
    checkpoint: dict[str, Any] | str | os.PathLike, model: nn.Module | None = None
) -> nn.Module:
    """The model of a checkpoint (rebuilt, or plain for a plain run), with its trained weights
    and gate statistics.

    `model` is an instance of the original architecture, needed only for models that
    `create_model` does not know.
    """
    what = "the checkpoint"
    if not isinstance(checkpoint, dict):
        what, checkpoint = str(checkpoint), load_checkpoint(checkpoint)
    stored = {k: tuple(t.shape) for k, t in checkpoint["model"].items()}
    rebuilt = rebuild(parse_spec(checkpoint["spec"], what), model, what=what, stored=stored)
    try:
        rebuilt.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise ModelFileError(
            f"the weights in {what} do not match the rebuilt model: {str(e)[:600]}"
        ) from e
    return rebuilt

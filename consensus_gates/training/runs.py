"""A run's output folder: which files make a run, never overwriting one, and resuming only
the same recipe."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from .._utils import unwrap
from ..saving.files import model_spec
from ..saving.spec import parse_spec
from .checkpoint import load_checkpoint
from .config import TrainConfig

CHECKPOINT = "checkpoint.pt"


METRICS = "metrics.jsonl"


RUN = "run.json"  # what `cgates train` trained, for people reading the folder later


RUN_FILES = (CHECKPOINT, METRICS, RUN)  # any of them in a folder: it holds a run


def check_folder(path: str | Path) -> Path:
    """`path` as a Path; ValueError if it cannot be a folder: it, or a folder above it, is a
    file."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                why = "is a file" if p == path else f"cannot be a folder: {p} is a file"
                raise ValueError(f"{path} {why}; choose another output folder")
            break
    return path


def run_files(out: str | Path) -> list[str]:
    """The files of a run that the folder `out` already holds (`RUN_FILES`)."""
    return [name for name in RUN_FILES if (Path(out) / name).exists()]


def check_resume(
    out_dir: str | Path,
    model: nn.Module,
    config: TrainConfig,
    identity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint in `out_dir`, if `model`, `config` and `identity` (see `train`) are
    those it was trained with: only `epochs` may differ. Raises ValueError listing every
    difference, FileNotFoundError or ModelFileError for a missing or unreadable checkpoint."""
    ckpt = load_checkpoint(Path(out_dir) / CHECKPOINT)
    changed = _changed(_model_identity(parse_spec(ckpt["spec"], str(out_dir))),
                       _model_identity(model_spec(unwrap(model))))  # fmt: skip
    saved = json.loads(ckpt.get("identity", "null"))
    if saved is not None and identity is not None:
        changed += _changed(saved, _jsonable(identity))
    recipe = _jsonable(asdict(config))
    # a field added since the checkpoint was written had its default then
    saved_recipe = {**_jsonable(asdict(TrainConfig())), **json.loads(ckpt["train_config"])}
    changed += _changed(saved_recipe, recipe, skip=("epochs", "progress"))
    if changed:
        raise ValueError(
            f"--resume with a different recipe than the checkpoint's ({', '.join(changed)}); "
            "resume with the same model, data and settings (only --epochs may change), or "
            "start a new run in a new --out"
        )
    return ckpt


def _jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples as lists), to compare with a saved one."""
    return json.loads(json.dumps(value))


def _changed(saved: Mapping[str, Any], now: Mapping[str, Any], skip: tuple = ()) -> list[str]:
    """``"key: saved -> now"`` for each key whose value differs."""
    keys = [k for k in dict.fromkeys([*saved, *now]) if k not in skip]
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def _model_identity(spec: dict[str, Any]) -> dict[str, Any]:
    """What a resumed model must share with the checkpoint's, from its spec: the source model
    and its kwargs, the gate config (one key per field, so a difference names it), the
    example inputs less their batch size, and the rest of the spec but its format version and
    the gates a user fixed."""
    spec = _jsonable(spec)
    source, config = spec.pop("source", None) or {}, spec.pop("config", None) or {}
    inputs = spec.get("inputs") or []
    for t in inputs.values() if isinstance(inputs, dict) else inputs:  # a transformer's: named
        t["shape"] = t["shape"][1:]
    # a transformer's spec holds its layers' graphs, which a cut while training changed
    skip = ("format", "version", "fixed", "cut", "cut_flops", "layers", "removed_layers")
    rest = {k: v for k, v in spec.items() if k not in skip}
    gates = {f"gates.{k}": v for k, v in config.items()}
    return {"model": source.get("name"), "model_args": source.get("kwargs"), **gates, **rest}


def claim_folder(out: Path, resume: bool, overwrite: bool, rank: int) -> None:
    """Refuse to train over the run `out` holds unless resuming or replacing it; on
    replacing, delete the files `train` writes (rank 0), so none of the old run is kept."""
    found = run_files(out)
    if found and not (resume or overwrite):
        raise ValueError(
            f"{out} already holds a run ({', '.join(found)}); continue it with resume=True, "
            "replace it with overwrite=True, or train into another out_dir"
        )
    if overwrite and rank == 0:
        for name in (CHECKPOINT, METRICS, "gates.png", "curves.png"):
            (out / name).unlink(missing_ok=True)

"""Run a study: every run × seed, each ending in one results JSON.

For each run and seed: seed everything, build the loaders and the model, let the method
train and prune (`METHODS`), then measure the final model against the untrained original:
test accuracy, fvcore FLOPs and parameters, and the CPU latency of both exported to .pt2 and
timed each in its own process (`bench.compare`). The results go to
``OUT/<study>/<label>[-<target or scale>]-s<seed>.json``, written atomically as the run's
last step, so a study interrupted at any point resumes where it stopped: runs whose JSON
exists are skipped unless ``force``. Dense models shared between runs are cached in
``OUT/cache/``.

Timing needs a quiet machine, training does not: with ``latency=False`` each run keeps its
final model (``OUT/<study>/<run id>/final.pt2``), and `time_study` measures them later.
"""

from __future__ import annotations

import copy
import json
import random
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import atomic_path
from ..bench.compare import compare, ratios
from ..cost import flops
from ..errors import DataError
from ..models.registry import create_model_for
from ..saving.files import export
from ..training.data import DataInfo, dataset_info, make_loaders
from ..training.trainer import evaluate
from .config import LatencyConfig, RunConfig, StudyConfig
from .methods import METHODS, RunContext

CACHE = "cache"
FINAL = "final.pt2"  # the final model of a run, in its work folder


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and Python's `random`, so a run's model and draws repeat."""
    torch.manual_seed(seed)
    random.seed(seed)


def measure_latency(
    original: nn.Module, final: str | Path, example_inputs: Tensor, config: LatencyConfig
) -> dict[str, Any]:
    """CPU latency of the exported `final` model against `original` (exported here): each
    timed in its own process over alternating rounds; the ratio of the medians."""
    batch = config.batch
    with tempfile.TemporaryDirectory() as tmp:
        files = {"original": Path(tmp) / "original.pt2", "final": Path(final)}
        export(original, example_inputs, files["original"])
        results = compare(
            files, example_inputs.shape[1:], [batch], config.bench_config(), rounds=config.rounds
        )
    ms = {m.model: m.median_ms for m in results}
    return {
        "latency_ratio": ratios(results, "original")[("final", batch)]["latency"],
        "latency": {
            "batch": batch,
            "threads": results[0].threads,
            "rounds": config.rounds,
            "runs": config.runs,
            "keep_freed_memory": config.keep_freed_memory,
            "original_ms": ms["original"],
            "final_ms": ms["final"],
        },
    }


def _first(value: float | None, default: float) -> float:
    return default if value is None else value


def _work_dir(out: Path, study: StudyConfig, run: RunConfig, seed: int) -> Path:
    """Where a run keeps its training outputs and its final model."""
    return out / study.name / run.run_id(seed)


def _results_path(out: Path, study: StudyConfig, run: RunConfig, seed: int) -> Path:
    work = _work_dir(out, study, run, seed)
    return work.with_name(f"{work.name}.json")  # not with_suffix: run ids hold dots (0.7)


def _write_record(path: Path, record: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def _original(run: RunConfig, info: DataInfo) -> tuple[nn.Module, Tensor]:
    """The untrained network every ratio is taken to, and example inputs for it."""
    model = create_model_for(run.model, info.num_classes, info.in_channels, dict(run.model_args))
    return model, torch.randn(2, info.in_channels, info.image_size, info.image_size)


def run_one(
    study: StudyConfig,
    run: RunConfig,
    seed: int,
    out: Path,
    *,
    latency: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train, prune and measure one run with one seed; return its results record."""
    order = study.runs.index(run)  # the summary lists rows in the study's order
    run = replace(run, train=replace(run.train, seed=seed))
    seed_everything(seed)
    train_loader, test_loader, info = make_loaders(
        run.dataset,
        run.data_root,
        batch_size=run.batch_size,
        workers=run.workers,
        subset=run.train_subset,
        test_subset=run.test_subset,
        seed=seed,
    )
    model, x = _original(run, info)
    original = copy.deepcopy(model).eval()
    ctx = RunContext(
        run=run,
        seed=seed,
        model=model.to(run.device),
        train_loader=train_loader,
        example_inputs=x.to(run.device),
        cache_dir=out / CACHE,
        work_dir=_work_dir(out, study, run, seed),
        log=log,
    )
    began = time.perf_counter()
    result = METHODS[run.method](ctx)
    seconds = time.perf_counter() - began  # training and pruning; evaluation and timing apart
    final = result.model.eval()
    accuracy = evaluate(final, test_loader, run.device)
    final = final.cpu()
    before, after = flops(original, x[:1]), flops(final, x[:1])
    record: dict[str, Any] = {
        "study": study.name,
        "title": study.title,
        "config_file": study.path,
        "label": run.label,
        "order": order,
        "method": run.method,
        "target": run.target,
        "setting": run.setting,
        "seed": seed,
        "accuracy": accuracy,
        "flops": after.flops,
        "params": after.params,
        "flops_ratio": _first(result.flops_ratio, after.flops / before.flops),
        "params_ratio": _first(result.params_ratio, after.params / before.params),
        "latency_ratio": None,
        "latency": None,
        "epochs_total": result.epochs,
        "wall_seconds": seconds + result.reused_seconds,
        "reused_seconds": result.reused_seconds,
        "train_flops": ctx.train_flops,
        # to training the dense network for the run's epochs; drop_last: full batches only
        "train_flops_ratio": ctx.train_flops
        / (3 * before.flops * len(train_loader) * train_loader.batch_size * run.epochs),
        **result.extra,
    }
    if run.latency.enabled:
        export(final, x, ctx.work_dir / FINAL)  # to time now, or later with `time_study`
        if latency:
            record |= measure_latency(original, ctx.work_dir / FINAL, x, run.latency)
    record["run"] = json.loads(json.dumps(run.as_record()))  # tuples as lists, as read back
    record["torch"] = torch.__version__
    return record


def _jobs(
    config: StudyConfig, seeds: Iterable[int] | None, only: Iterable[str] | None
) -> list[tuple[RunConfig, int]]:
    """(run, seed) pairs of the study, its own seeds unless `seeds`, the labels in `only`."""
    seeds = list(seeds) if seeds is not None else list(config.seeds)
    runs = list(config.runs)
    if only is not None:
        only = list(only)
        unknown = [label for label in only if label not in config.labels]
        if unknown:
            raise ValueError(
                f"{config.name} has no run labelled {', '.join(map(repr, unknown))}; its "
                f"labels: {', '.join(map(repr, config.labels))}"
            )
        runs = [r for r in runs if r.label in only]
    return [(run, seed) for run in runs for seed in seeds]


def check_study(
    config: StudyConfig,
    out_dir: str | Path,
    *,
    seeds: Iterable[int] | None = None,
    only: Iterable[str] | None = None,
    force: bool = False,
) -> None:
    """Build the untrained model of every run still to train (its data set, model name and
    model_args), so that a mistake in the last run stops the study before the first trains.
    Raises ValueError (DataError for a missing data folder) naming the run."""
    out, checked = Path(out_dir), set()
    for run, seed in _jobs(config, seeds, only):
        key = json.dumps([run.model, dict(run.model_args), run.dataset, run.data_root])
        if key in checked or not force and _results_path(out, config, run, seed).is_file():
            continue
        checked.add(key)
        try:
            _original(run, dataset_info(run.dataset, run.data_root))
        except (ValueError, DataError) as e:
            kind = DataError if isinstance(e, DataError) else ValueError
            raise kind(f"run {run.label!r}: {e}") from e


def run_study(
    config: StudyConfig,
    out_dir: str | Path,
    *,
    seeds: Iterable[int] | None = None,
    only: Iterable[str] | None = None,
    force: bool = False,
    latency: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every run of `config` with every seed; return the results records.

    Args:
        out_dir: results go to ``out_dir/<study name>/<run id>.json``, dense models shared
            between runs to ``out_dir/cache/``.
        seeds: instead of the study's seeds.
        only: run only the runs with these labels.
        force: rerun runs whose results file exists (otherwise they are read back).
        latency: False skips the timing even where the study asks for it.
        log: receives progress lines and the trainer's per-epoch lines.

    Every run still to train is checked first (`check_study`).
    """
    out = Path(out_dir)
    check_study(config, out, seeds=seeds, only=only, force=force)
    jobs = _jobs(config, seeds, only)
    records = []
    for i, (run, seed) in enumerate(jobs, 1):
        path = _results_path(out, config, run, seed)
        head = f"[{config.name} {i}/{len(jobs)}] {run.run_id(seed)} ({run.method})"
        if path.is_file() and not force:
            log(f"{head}: done before, reading {path}")
            records.append(json.loads(path.read_text()))
            continue
        log(f"{head}: a budget of {run.epochs} epoch(s) on {run.dataset}")
        record = run_one(config, run, seed, out, latency=latency, log=log)
        _write_record(path, record)
        lat = record["latency_ratio"]
        log(
            f"{head}: accuracy {record['accuracy']:.4f}, FLOPs ratio {record['flops_ratio']:.3f}"
            f", latency ratio {'-' if lat is None else f'{lat:.3f}'}, "
            f"{record['wall_seconds']:.0f} s -> {path}"
        )
        records.append(record)
    return records


def time_study(
    config: StudyConfig,
    out_dir: str | Path,
    *,
    seeds: Iterable[int] | None = None,
    only: Iterable[str] | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Measure the latency of runs trained with ``latency=False``, from their saved final
    models, and add it to their results files; runs already timed are kept unless `force`.
    Run it on a quiet machine: the trainings may share one, the timings should not."""
    out = Path(out_dir)
    records = []
    for run, seed in _jobs(config, seeds, only):
        path = _results_path(out, config, run, seed)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run the study before timing it")
        record = json.loads(path.read_text())
        final = _work_dir(out, config, run, seed) / FINAL
        if run.latency.enabled and (record["latency_ratio"] is None or force):
            if not final.is_file():
                raise FileNotFoundError(f"{final} does not exist: rerun {path.stem} with --force")
            seed_everything(seed)
            original, x = _original(run, dataset_info(run.dataset, run.data_root))
            record |= measure_latency(original.eval(), final, x, run.latency)
            _write_record(path, record)
            log(f"[{config.name}] {path.stem}: latency ratio {record['latency_ratio']:.3f}")
        records.append(record)
    return records

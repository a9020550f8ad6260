"""Plots of a training run, drawn from the trainer's per-epoch `metrics.jsonl` records.

- `plot_gates`: the paper's Fig. 6, a heat map of each gate's open rate over the epochs.
- `plot_curves`: accuracy above, consensus FLOPs ratio and open ratio below.

Figures are `matplotlib.figure.Figure` objects, not pyplot ones, so plotting needs no display,
touches no global state and is safe inside a training loop. Files are written atomically, so a
viewer refreshing `gates.png` mid-run never sees half an image.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .._utils import atomic_path

MAX_EPOCH_TICKS = 20  # label at most this many heat-map columns; a 200-epoch axis stays legible
ROW_INCHES = 0.22  # heat-map height per gate: 9 gates and 54 gates both get readable labels


def read_records(path: str | Path) -> list[dict]:
    """Parse a `metrics.jsonl` file: one JSON object per line, blank lines skipped.

    Raises ValueError naming the file and 1-based line number of a line that is not a JSON
    object.
    """
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON record: {e.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                )
            records.append(record)
    return records


def _check(records: Sequence[dict]) -> None:
    if not records:
        raise ValueError("no metrics records to plot: the run has not finished an epoch yet")
    for i, r in enumerate(records):
        if "epoch" not in r:
            raise ValueError(f"metrics record {i} has no 'epoch' key")


def _rate(value: float | list[float] | None) -> float:
    """One number per gate and epoch: a channel gate is summarised by its mean over channels."""
    if value is None:
        return math.nan
    if isinstance(value, list):
        return float(np.mean(value)) if value else math.nan
    return float(value)


def gate_matrix(records: Sequence[dict]) -> tuple[list[str], list[int], np.ndarray]:
    """The heat map's data: gate names, epochs, and a (gates x epochs) matrix of open rates.

    Names are the union over the records in first-seen order (so the first record's order
    leads); a gate absent from an epoch's `open_rate` gets NaN there. A channel gate's entry is
    its mean open rate over channels.
    """
    _check(records)
    names: dict[str, None] = {}  # an insertion-ordered set
    for r in records:
        names.update(dict.fromkeys(r.get("open_rate", {})))
    matrix = np.full((len(names), len(records)), np.nan)
    for j, r in enumerate(records):
        for i, name in enumerate(names):
            matrix[i, j] = _rate(r.get("open_rate", {}).get(name))
    return list(names), [r["epoch"] for r in records], matrix


def _gate_labels(records: Sequence[dict], names: list[str]) -> list[str]:
    """Y tick labels: a channel gate's label says its row is a mean, and over how many."""
    labels = []
    for name in names:
        value = next(r["open_rate"][name] for r in records if name in r.get("open_rate", {}))
        labels.append(f"{name} (mean of {len(value)})" if isinstance(value, list) else name)
    return labels


def gates_figure(records: Sequence[dict]) -> Figure:
    """Build the gate heat map (see `plot_gates`) without saving it."""
    names, epochs, matrix = gate_matrix(records)
    if not names:
        raise ValueError("no gates to plot: every record's 'open_rate' is empty or missing")
    width = 5 + 0.2 * min(len(epochs), 40)
    fig = Figure(figsize=(width, 1.8 + ROW_INCHES * len(names)), layout="constrained")
    ax = fig.add_subplot()
    # missing cells (a gate absent that epoch) are masked and drawn in the "bad" colour
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(
        np.ma.masked_invalid(matrix),
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        aspect="auto",
        interpolation="nearest",
    )
    step = math.ceil(len(epochs) / MAX_EPOCH_TICKS)
    columns = range(0, len(epochs), step)
    ax.set_xticks(list(columns), [str(epochs[j]) for j in columns])
    ax.set_yticks(range(len(names)), _gate_labels(records, names), fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("gate")
    ax.set_title("Gate open rate per epoch")
    fig.colorbar(image, ax=ax, label="open rate")
    return fig


def plot_gates(records: Sequence[dict], path: str | Path) -> Path:
    """Save the paper's Fig. 6 to `path`: one row per gate, one column per epoch, colour = open
    rate in [0, 1] (a channel gate's row is its mean over channels). Returns the path."""
    return save_figure(gates_figure(records), path)


def _plot_series(ax: Axes, records: Sequence[dict], key: str, label: str) -> None:
    kept = [r for r in records if r.get(key) is not None]
    if kept:  # an all-null series (test set always skipped) gets no empty legend entry
        x = [r["epoch"] for r in kept]
        ax.plot(x, [r[key] for r in kept], marker="o", markersize=3, label=label)


def curves_figure(records: Sequence[dict]) -> Figure:
    """Build the training curves (see `plot_curves`) without saving them."""
    _check(records)
    fig = Figure(figsize=(7, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    _plot_series(top, records, "train_acc", "train accuracy")
    _plot_series(top, records, "test_acc", "test accuracy")
    _plot_series(bottom, records, "flops_ratio", "consensus FLOPs ratio")
    _plot_series(bottom, records, "open_ratio", "open ratio")
    top.set_title("Training curves")
    top.set_ylabel("accuracy")
    bottom.set_ylabel("ratio")
    bottom.set_xlabel("epoch")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (top, bottom):
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    return fig


def plot_curves(records: Sequence[dict], path: str | Path) -> Path:
    """Save two stacked panels sharing the epoch axis to `path`: train and test accuracy (null
    test values skipped) above, consensus FLOPs ratio and open ratio below. Returns the path."""
    return save_figure(curves_figure(records), path)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` to `path` atomically (the format follows the suffix); returns the path."""
    path = Path(path)
    # the temp file keeps the suffix, so savefig picks the format from it as it would from path
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    return path

"""Tables and Pareto plots from the runner's results JSON files.

`load_results` reads every results file under some folders; `aggregate` groups them by
(study, label, setting), the setting being the target or a density run's scale, into mean ±
std over seeds; `write_summary` writes a markdown file with one table per study and, for
each study comparing several methods, a PNG of accuracy against FLOPs ratio, against
measured latency ratio (the paper's Figs. 2–3) and against training compute: training FLOPs,
and wall time as a ratio to the dense run of the same study and seed.
"""

from __future__ import annotations

import itertools
import json
import statistics
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..bench.reports import write_sections
from ..training.plots import save_figure

# what marks a runner's results file (the cache's JSON files lack them)
_RESULT_KEYS = {"study", "label", "method", "seed", "accuracy", "flops_ratio"}
MARKERS = "osD^vP*Xph<>"  # one per label, so lines stay apart without colour
_MEASURES = (
    "accuracy",
    "flops_ratio",
    "params_ratio",
    "latency_ratio",
    "epochs_total",
    "wall_seconds",
    "train_flops_ratio",
    "train_time_ratio",
    "r_polar",
)
# the Pareto plot's x axes, in order, each where a row measured it
_PANELS = (
    ("flops_ratio", "FLOPs ratio (pruned / original)"),
    ("latency_ratio", "CPU latency ratio (pruned / original)"),
    ("train_flops_ratio", "training FLOPs (to dense training)"),
    ("train_time_ratio", "training wall time (to dense training)"),
)


@dataclass(frozen=True)
class Stat:
    """A measure over seeds: mean, sample standard deviation (None for one seed), count."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, len(values))

    def format(self, digits: int, scale: float = 1.0) -> str:
        mean = f"{self.mean * scale:.{digits}f}"
        return mean if self.std is None else f"{mean} ± {self.std * scale:.{digits}f}"


@dataclass(frozen=True)
class Row:
    """One (study, label, setting) over its seeds; `stats` holds the measures present."""

    study: str
    title: str
    label: str
    method: str
    setting: str
    order: int
    seeds: tuple[int, ...]
    stats: dict[str, Stat]


def load_results(dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every results record in the JSON files under `dirs` (searched recursively)."""
    records = []
    for d in dirs:
        for path in sorted(Path(d).rglob("*.json")):
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            if isinstance(record, dict) and record.keys() >= _RESULT_KEYS:
                records.append(record)
    return records


def _with_time_ratios(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records, each with ``train_time_ratio`` where its study has a dense run of the
    same seed: its wall time over that run's, so that a study's times compare within it."""
    records = list(records)
    dense = {(r["study"], r["seed"]): r.get("wall_seconds") for r in records
             if r["method"] == "dense"}  # fmt: skip
    out = []
    for r in records:
        base = dense.get((r["study"], r["seed"]))
        ratio = r["wall_seconds"] / base if base and r.get("wall_seconds") is not None else None
        out.append({**r, "train_time_ratio": ratio})
    return out


def aggregate(records: Iterable[dict[str, Any]]) -> list[Row]:
    """Group by (study, label, setting), in study order then run order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in _with_time_ratios(records):
        groups.setdefault((r["study"], r["label"], r.get("setting", "")), []).append(r)
    rows = []
    for (study, label, setting), group in groups.items():
        stats = {}
        for key in _MEASURES:
            values = [r[key] for r in group if r.get(key) is not None]
            if values:
                stats[key] = Stat.of(values)
        first = group[0]
        rows.append(Row(
            study=study, title=first.get("title") or study, label=label, method=first["method"],
            setting=setting, order=first.get("order", 0),
            seeds=tuple(sorted(r["seed"] for r in group)), stats=stats,
        ))  # fmt: skip
    return sorted(rows, key=lambda row: (row.study, row.order))


def _cell(row: Row, key: str, digits: int, scale: float = 1.0) -> str:
    stat = row.stats.get(key)
    return "–" if stat is None else stat.format(digits, scale)


def markdown_table(rows: Sequence[Row]) -> str:
    """One study's rows as a markdown table (accuracy in %, times in minutes)."""
    polar = any("r_polar" in r.stats for r in rows)
    compute = any("train_flops_ratio" in r.stats for r in rows)
    times = any("train_time_ratio" in r.stats for r in rows)
    head = [
        "method",
        "label",
        "target",  # the FLOPs target, or a density run's scale
        "n",
        "accuracy (%)",
        "FLOPs ratio",
        "params ratio",
        "latency ratio",
        "total epochs",
        "train time (min)",
    ]
    head += ["train FLOPs ratio"] * compute + ["train time ratio"] * times
    head += ["final R_polar"] * polar
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.method,
            r.label,
            r.setting or "–",
            str(len(r.seeds)),
            _cell(r, "accuracy", 2, 100),
            _cell(r, "flops_ratio", 3),
            _cell(r, "params_ratio", 3),
            _cell(r, "latency_ratio", 3),
            _cell(r, "epochs_total", 0),
            _cell(r, "wall_seconds", 1, 1 / 60),
        ]
        cells += [_cell(r, "train_flops_ratio", 3)] * compute
        cells += [_cell(r, "train_time_ratio", 3)] * times
        cells += [_cell(r, "r_polar", 4)] * polar
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto_figure(rows: Sequence[Row], zoom: float = 20.0) -> Figure:
    """Accuracy against FLOPs ratio and, where measured, against latency ratio and training
    compute (FLOPs, wall time): one line per label through its settings (targets), error
    bars over seeds; two panels a row.

    The accuracy axis keeps to `zoom` points below the best mean, so that a naive baseline
    at chance level does not flatten the comparison that matters; a label with every point
    below that is named in the legend with its accuracy range instead.
    """
    panels = [(k, x) for k, x in _PANELS if any(k in r.stats for r in rows)]
    cols, lines = min(len(panels), 2), -(-len(panels) // 2)
    fig = Figure(figsize=(6 * cols, 4.5 * lines), layout="constrained")
    grid = fig.subplots(lines, cols, squeeze=False).flat
    axes = [next(grid) for _ in panels]
    for ax in grid:  # an odd number of panels leaves one over
        ax.remove()
    labels = list(dict.fromkeys(r.label for r in rows))
    accuracy = {label: [r.stats["accuracy"].mean * 100 for r in rows if r.label == label]
                for label in labels}  # fmt: skip
    floor = max(max(a) for a in accuracy.values()) - zoom
    clipped = min(min(a) for a in accuracy.values()) < floor
    shown = {label: label if max(a) >= floor else f"{label} (off scale: {min(a):.0f}–{max(a):.0f}%)"
             for label, a in accuracy.items()}  # fmt: skip
    for ax, (key, xlabel) in zip(axes, panels, strict=True):
        for label, marker in zip(labels, itertools.cycle(MARKERS)):
            points = sorted(
                (r for r in rows if r.label == label and key in r.stats),
                key=lambda r: r.stats[key].mean,
            )
            if not points:
                continue
            ax.errorbar(
                [p.stats[key].mean for p in points],
                [p.stats["accuracy"].mean * 100 for p in points],
                xerr=[p.stats[key].std or 0 for p in points],
                yerr=[(p.stats["accuracy"].std or 0) * 100 for p in points],
                marker=marker,
                capsize=3,
                label=shown[label],
            )
        if clipped:
            ax.set_ylim(bottom=floor)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(textwrap.fill(rows[0].title, 70 * cols), fontsize=10)
    return fig


def _rows(dirs: list[str | Path]) -> list[Row]:
    rows = aggregate(load_results(dirs))
    if not rows:
        raise ValueError(f"no results files under {', '.join(map(str, dirs))}")
    return rows


def _plots(rows: Sequence[Row], out: Path) -> dict[str, Path]:
    """Study → its Pareto plot beside `out`, for the studies that compare methods."""
    studies = dict.fromkeys(r.study for r in rows)
    return {s: out.with_name(f"{out.stem}-{s}.png") for s in studies
            if len({r.method for r in rows if r.study == s}) > 1}  # fmt: skip


def summary_files(dirs: Iterable[str | Path], out: str | Path) -> list[Path]:
    """The files `write_summary` would write for these results: `out` and its plots."""
    out = Path(out)
    return [out, *_plots(_rows(list(dirs)), out).values()]


def write_summary(dirs: Iterable[str | Path], out: str | Path) -> list[Path]:
    """Write the tables of the results under `dirs` into the markdown file `out`, one
    section per study, and one Pareto plot per study with several methods beside it
    (``<out stem>-<study>.png``); return the files written (`summary_files` says which
    they will be).

    Each study's section sits between ``<!-- begin STUDY -->`` and ``<!-- end STUDY -->``:
    in a hand-written doc that has them, only those spans change (`reports.write_sections`).
    """
    out, dirs = Path(out), list(dirs)
    rows = _rows(dirs)
    plots = _plots(rows, out)
    written, sections = [], {}
    for study in dict.fromkeys(r.study for r in rows):
        group = [r for r in rows if r.study == study]
        seeds = sorted({s for r in group for s in r.seeds})
        sections[study] = (
            f"### {group[0].title}\n\nStudy `{study}`, seeds {seeds}; mean ± sample std over "
            "seeds where n > 1.\n\n" + markdown_table(group)
        )
        if study in plots:
            written.append(save_figure(pareto_figure(group), plots[study]))
            sections[study] += f"\n![{group[0].title}]({plots[study].name})\n"
    write_sections(out, sections, title="Results")
    return [out, *written]

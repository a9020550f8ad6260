"""plots: metrics.jsonl parsing, the heat map's data, and valid, atomically written PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

from consensus_gates.training import plots
from consensus_gates.training.plots import gate_matrix, plot_curves, plot_gates, read_records

LAYERS = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]  # 9 layer gates
CHANNEL = "layer1.0/conv1"
EPOCHS = [1, 2, 3, 4, 5]


def _record(j: int, epoch: int) -> dict:
    """Epoch `epoch` at column `j`: quarter-step rates, so every mean is exact in binary."""
    open_rate: dict = {name: ((i + j) % 5) / 4 for i, name in enumerate(LAYERS)}
    open_rate[CHANNEL] = [0.0, j / 4, 1.0, 1.0]
    return {
        "epoch": epoch,
        "lr": 0.1,
        "lambda_polar": 2.0,
        "lambda_act": 0.5,
        "loss": {"total": 1.2, "task": 0.9, "polar": 0.01, "act": 0.6},
        "train_acc": 0.5 + 0.1 * j,
        "test_acc": None if j == 2 else 0.55 + 0.1 * j,  # the test set skipped one epoch
        "r_polar": 0.004,
        "open_rate": open_rate,
        "open_ratio": 1.0 - 0.1 * j,
        "flops_ratio": 1.0 - 0.08 * j,
        "seconds": 41.0,
    }


@pytest.fixture
def records() -> list[dict]:
    return [_record(j, epoch) for j, epoch in enumerate(EPOCHS)]


def _check_png(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # not blank or uniform


# --------------------------------------------------------------------------------------
# read_records
# --------------------------------------------------------------------------------------


def test_read_records_round_trip(tmp_path, records):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(r) for r in records]
    lines.insert(2, "   ")  # blank lines are skipped
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    assert read_records(path) == records
    assert read_records(str(path)) == records


def test_read_records_malformed_line(tmp_path, records):
    path = tmp_path / "metrics.jsonl"
    path.write_text(f"{json.dumps(records[0])}\n\n" + '{"epoch": 2, "lr"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: malformed JSON"):
        read_records(path)


def test_read_records_non_object_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1: expected a JSON object, got list"):
        read_records(path)


# --------------------------------------------------------------------------------------
# gate_matrix
# --------------------------------------------------------------------------------------


def test_gate_matrix_values(records):
    names, epochs, matrix = gate_matrix(records)
    assert names == [*LAYERS, CHANNEL]
    assert epochs == EPOCHS
    assert matrix.shape == (10, 5)
    expected_layers = [[((i + j) % 5) / 4 for j in range(5)] for i in range(9)]
    np.testing.assert_array_equal(matrix[:9], expected_layers)
    # channel gate row = mean over its 4 channels
    np.testing.assert_array_equal(matrix[9], [0.5, 0.5625, 0.625, 0.6875, 0.75])


def test_gate_matrix_gates_appear_and_disappear(records):
    del records[1]["open_rate"]["layer1.1"]  # gone in epoch 2
    records[3]["open_rate"]["late"] = 0.25  # first seen in epoch 4
    names, _, matrix = gate_matrix(records)
    assert names == [*LAYERS, CHANNEL, "late"]  # union, first-seen order
    assert math.isnan(matrix[1, 1])
    assert np.isnan(matrix[1]).sum() == 1
    np.testing.assert_array_equal(matrix[10], [np.nan, np.nan, np.nan, 0.25, np.nan])


@pytest.mark.parametrize("fn", [gate_matrix, plots.gates_figure, plots.curves_figure])
def test_empty_records(fn):
    with pytest.raises(ValueError, match="no metrics records"):
        fn([])


def test_no_gates():
    with pytest.raises(ValueError, match="no gates to plot"):
        plots.gates_figure([{"epoch": 1, "open_rate": {}}])


# --------------------------------------------------------------------------------------
# Figures and files
# --------------------------------------------------------------------------------------


def test_gates_figure_labels(records):
    fig = plots.gates_figure(records)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [*LAYERS, f"{CHANNEL} (mean of 4)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(e) for e in EPOCHS]
    assert ax.get_xlabel() == "epoch" and ax.get_title()
    assert fig.axes[1].get_ylabel() == "open rate"  # the colorbar


def test_gates_figure_height_scales():
    def height(n: int) -> float:
        fig: Figure = plots.gates_figure(
            [{"epoch": 0, "open_rate": dict.fromkeys(map(str, range(n)), 0.5)}]
        )
        return fig.get_size_inches()[1]

    assert height(54) > 2 * height(9)


def test_plot_gates_png(tmp_path, records):
    path = plot_gates(records, tmp_path / "gates.png")
    assert path == tmp_path / "gates.png"
    _check_png(path)


def test_plot_curves_png(tmp_path, records):
    path = plot_curves(records, str(tmp_path / "curves.png"))
    assert path == tmp_path / "curves.png"
    _check_png(path)


def test_curves_figure_content(records):
    top, bottom = plots.curves_figure(records).axes
    test_line = top.get_lines()[1]
    assert list(test_line.get_xdata()) == [1, 2, 4, 5]  # the null test value is skipped
    assert [t.get_text() for t in bottom.get_legend().get_texts()] == [
        "consensus FLOPs ratio",
        "open ratio",
    ]
    assert top.get_ylim() == bottom.get_ylim() == (0, 1.05)
    assert bottom.get_xlabel() == "epoch"


def test_atomic_write_leaves_only_the_outputs(tmp_path, records):
    plot_gates(records, tmp_path / "gates.png")
    plot_curves(records, tmp_path / "curves.png")
    plot_gates(records, tmp_path / "gates.png")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "gates.png"]


def test_failed_write_keeps_old_file(tmp_path, records, monkeypatch):
    path = plot_gates(records, tmp_path / "gates.png")
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(OSError, match="disk full"):
        plot_gates(records[:2], path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["gates.png"]

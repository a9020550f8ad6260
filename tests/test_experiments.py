"""The experiment runner: study configs, `run_study` end to end, the summary, the CLI."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from consensus_gates.cli import main
from consensus_gates.experiments import (
    METHODS,
    ConfigError,
    MethodOptions,
    MethodResult,
    RunConfig,
    load_study,
    register_method,
    run_study,
    time_study,
    write_summary,
)
from consensus_gates.experiments.methods.density import DensityOptions
from consensus_gates.experiments.methods.torch_pruning import TorchPruningOptions
from consensus_gates.experiments.summary import (
    aggregate,
    load_results,
    markdown_table,
    pareto_figure,
)

from conftest import fake_fashion_mnist

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]

BASE = """
name = "tiny"
title = "A tiny study"
seeds = [0]

[base]
model = "resnet20"
model_args = { in_channels = 1 }
dataset = "fashion_mnist"
data_root = "DATA"
batch_size = 32
epochs = 1
method = "gates"

[base.gates]
head = "gumbel"

[base.train]
lambda_polar = 3.0
progress = false

[base.latency]
enabled = false
"""


def _study(tmp_path: Path, runs: str, base: str = BASE) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(base + runs)
    return path


def test_runs_merge_over_base_and_targets_expand(tmp_path):
    study = load_study(_study(tmp_path, """
[[runs]]
label = "ours"
targets = [0.4, 0.7]
gates = { mode = "channel", fc_layers = 2 }
train = { polar_schedule = "constant" }

[[runs]]
label = "dense"
method = "dense"
epochs = 3

[[runs]]
label = "density"
method = "density"
density_scale = [0.8, 1.2]
"""))  # fmt: skip
    assert study.name == "tiny" and study.seeds == (0,) and study.labels == [
        "ours", "dense", "density"]  # fmt: skip
    ours = [r for r in study.runs if r.label == "ours"]
    assert [r.target for r in ours] == [0.4, 0.7]
    for r in ours:  # the run's table merged key by key over [base.gates] / [base.train]
        assert (r.gates.mode, r.gates.fc_layers, r.gates.head) == ("channel", 2, "gumbel")
        assert (r.train.polar_schedule, r.train.lambda_polar) == ("constant", 3.0)
        assert r.train.epochs == 1 and dict(r.model_args) == {"in_channels": 1}
    (dense,) = [r for r in study.runs if r.label == "dense"]
    assert dense.epochs == dense.train.epochs == 3 and dense.target is None
    assert dense.gates.head == "gumbel"  # base applies to every run
    density = [r for r in study.runs if r.method == "density"]
    assert [r.options.density_scale for r in density] == [0.8, 1.2]
    assert [r.run_id(1) for r in study.runs] == [
        "ours-0.4-s1", "ours-0.7-s1", "dense-s1", "density-scale-0.8-s1",
        "density-scale-1.2-s1",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ('label = "ours"\nepoch = 2', r"run 'ours': unknown key 'epoch' \(did you mean 'epochs'"),
        ('label = "ours"\ntrain = { lamda_polar = 1.0 }',
         r"run 'ours' \[train\]: unknown key 'lamda_polar' \(did you mean 'lambda_polar'"),
        ('label = "ours"\ngates = { head = "sigmoid" }',
         r"run 'ours' \[gates\]: GateConfig.head must be one of"),
        ('label = "ours"\ntrain = { lr = -1.0 }', r"run 'ours' \[train\]: lr must be > 0"),
        ('label = "ours"\ntrain = { epochs = 3 }',
         r"run 'ours' \[train\]: 'epochs' is not set here: set 'epochs' on the run"),
        ('label = "ours"\nepochs = "3"', r"run 'ours': 'epochs' must be an integer, got '3'"),
        ('label = "d"\nmethod = "dense"\ntarget = 0.5', r"run 'd': method 'dense' takes no"),
        ('label = "x"\nmethod = "layer-drop"', r"run 'x': method 'layer-drop' needs a FLOPs"),
        ('label = "x"\nmethod = "tp-taylor"\ntarget = 0.5',
         r"run 'x': finetune_epochs must be between 1 and epochs - 1 = 0"),
        ('label = "x"\nmethod = "prune"', r"run 'x': method 'prune' is not one of dense, gates"),
        ('label = "ours"\ntargets = [0.5, 1.5]', r"run 'ours': target must be in \(0, 1\]"),
        ('label = "ours"\nlatency = { threads = 0 }',
         r"run 'ours' \[latency\]: threads must be >= 1"),
        # a method's own keys: its options' fields, their types and their checks
        ('label = "x"\nmethod = "tp-taylor"\nepochs = 2\ntarget = 0.5\nfinetune_epoch = 1',
         r"run 'x': unknown key 'finetune_epoch' \(did you mean 'finetune_epochs'"),
        ('label = "x"\nmethod = "tp-taylor"\nepochs = 2\ntarget = 0.5\nfinetune_lr = "a"',
         r"run 'x': 'finetune_lr' must be a number, got 'a'"),
        ('label = "x"\nmethod = "tp-taylor"\nepochs = 2\ntarget = 0.5\nextra_finetune_epochs = -1',
         r"run 'x': extra_finetune_epochs must be >= 0, got -1"),
        ('label = "ours"\nfinetune_epochs = 2',
         r"run 'ours': unknown key 'finetune_epochs' for method 'gates' \(an option of "
         r"tp-magnitude, tp-bn-scale, tp-taylor\)"),
        ('label = "d"\nmethod = "density"\ndensity_scale = []',
         r"run 'd': 'density_scale' must be a non-empty list of numbers"),
        ('label = "d"\nmethod = "density"\ndensity_scale = [0.8, "x"]',
         r"run 'd': 'density_scale' must be a number, got 'x'"),
        ('label = "d"\nmethod = "density"\ndensity_every = 0',
         r"run 'd': density_every must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_config_errors_name_the_file_the_run_and_the_key(tmp_path, runs, message):
    path = _study(tmp_path, f"\n[[runs]]\n{runs}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: {message}"):
        load_study(path)


def test_an_option_in_base_applies_to_the_runs_of_its_methods(tmp_path):
    base = BASE.replace("epochs = 1", "epochs = 3\nfinetune_epochs = 2")
    runs = '\n[[runs]]\nlabel = "ours"\n\n[[runs]]\nlabel = "tp"\nmethod = "tp-magnitude"\n'
    runs += "target = 0.5\n"
    ours, tp = load_study(_study(tmp_path, runs, base=base)).runs
    assert ours.options == MethodOptions() and tp.options == TorchPruningOptions(2)
    # the results record every method's options, at their defaults where they do not apply
    assert (ours.as_record()["finetune_epochs"], tp.as_record()["finetune_epochs"]) == (1, 2)
    assert list(tp.as_record())[12:19] == [
        "target", "finetune_epochs", "extra_finetune_epochs", "finetune_lr", "density_every",
        "density_scale", "gates"]  # fmt: skip
    path = _study(tmp_path, runs, base=base.replace("finetune_epochs = 2", "finetune_epochs = 0.5"))
    with pytest.raises(ConfigError, match=rf"^{path}: \[base\]: 'finetune_epochs' must be an int"):
        load_study(path)


BUILT_IN = {
    "dense": MethodOptions,
    "gates": MethodOptions,
    "dropout": MethodOptions,
    "layer-drop": MethodOptions,
    "tp-magnitude": TorchPruningOptions,
    "tp-bn-scale": TorchPruningOptions,
    "tp-taylor": TorchPruningOptions,
    "density": DensityOptions,
}
BAD_OPTIONS = {
    TorchPruningOptions: [{"extra_finetune_epochs": -1}, {"finetune_lr": 0.0}],
    DensityOptions: [{"density_every": 0}, {"density_scale": -0.5}],
}


def test_every_built_in_method_is_registered_with_its_options():
    assert list(METHODS) == list(BUILT_IN)  # the order error messages list them in
    for name, options in BUILT_IN.items():
        method = METHODS[name]
        assert (method.name, method.options) == (name, options)
        assert method.target == ("refused" if name in ("dense", "density") else
                                 "optional" if name == "gates" else "required")  # fmt: skip
        if options is MethodOptions:
            assert dataclasses.fields(options) == ()
    for options, bad in BAD_OPTIONS.items():
        for values in bad:
            with pytest.raises(ValueError, match=f"{next(iter(values))} must be"):
                options(**values)
    run = {"label": "r", "model": "resnet20", "dataset": "fashion_mnist", "epochs": 2}
    assert RunConfig(**run, method="density").options == DensityOptions()  # the defaults
    with pytest.raises(ValueError, match="method 'density' takes DensityOptions options, got"):
        RunConfig(**run, method="density", options=TorchPruningOptions())


@dataclass(frozen=True)
class SketchOptions(MethodOptions):
    sketch_rounds: int = 1

    def __post_init__(self) -> None:
        if self.sketch_rounds < 1:
            raise ValueError(f"sketch_rounds must be >= 1, got {self.sketch_rounds}")


@pytest.fixture
def sketch():
    """A method registered for one test, as a newcomer's file would, and removed after."""

    @register_method("sketch", target="optional", options=SketchOptions)
    def sketch(ctx):
        return MethodResult(ctx.model, ctx.run.epochs)

    try:
        yield METHODS["sketch"]
    finally:
        del METHODS["sketch"]


def test_a_registered_method_has_its_keys_checked_from_its_options(tmp_path, sketch):
    runs = '\n[[runs]]\nlabel = "s"\nmethod = "sketch"\n'
    (run,) = load_study(_study(tmp_path, runs + "sketch_rounds = 3\n")).runs
    assert run.options == SketchOptions(3) and run.as_record()["sketch_rounds"] == 3
    (run,) = load_study(_study(tmp_path, runs)).runs
    assert run.options == SketchOptions()
    for text, message in [
        ("sketch_round = 3", r"unknown key 'sketch_round' \(did you mean 'sketch_rounds'"),
        ("sketch_rounds = 1.5", r"'sketch_rounds' must be an integer, got 1.5"),
        ("sketch_rounds = 0", r"sketch_rounds must be >= 1, got 0"),
    ]:
        path = _study(tmp_path, runs + text + "\n")
        with pytest.raises(ConfigError, match=rf"^{path}: run 's': {message}"):
            load_study(path)
    path = _study(tmp_path, '\n[[runs]]\nlabel = "ours"\nsketch_rounds = 2\n')
    with pytest.raises(ConfigError, match="unknown key 'sketch_rounds' for method 'gates'"):
        load_study(path)
    with pytest.raises(ValueError, match="'sketch' is registered already"):
        register_method("sketch", target="optional")(lambda ctx: None)


def test_register_method_refuses_options_it_cannot_check():
    class Plain(MethodOptions):  # not a dataclass of its own: its fields would be unseen
        rounds: int = 1

    @dataclass(frozen=True)
    class NoDefault(MethodOptions):
        rounds: int

    for options in (Plain, NoDefault, dict):
        with pytest.raises(TypeError):
            register_method("never", target="required", options=options)
    with pytest.raises(ValueError, match="target must be"):
        register_method("never", target="sometimes")
    assert "never" not in METHODS


def test_config_errors_outside_runs(tmp_path):
    path = _study(tmp_path, '\n[[runs]]\nlabel = "a"\n', base=BASE.replace("seeds", "seed"))
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key 'seed' \(did you mean 'seeds'"):
        load_study(path)
    path = _study(
        tmp_path,
        '\n[[runs]]\nlabel = "a"\n',
        base=BASE.replace("epochs", "dataset_root = 'x'\nepochs"),
    )
    with pytest.raises(ConfigError, match=rf"^{path}: \[base\]: unknown key 'dataset_root'"):
        load_study(path)
    path = _study(tmp_path, '\n[[runs]]\nlabel = "a"\n[[runs]]\nlabel = "a"\n')
    with pytest.raises(ConfigError, match="run 'a': the label is used twice"):
        load_study(path)
    path.write_text("name = 'x\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid TOML"):
        load_study(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_study(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "path", sorted((ROOT / "examples" / "experiments").rglob("*.toml")), ids=lambda p: p.name
)
def test_shipped_studies_are_valid(path):
    study = load_study(path)
    assert study.runs and study.name == path.stem
    if path.parent.name != "full":  # the CPU-scale studies run on the real Fashion-MNIST
        assert {r.data_root for r in study.runs} == {"../shared/data"}


def _record(study, label, setting, seed, accuracy, flops, method="gates", **extra):
    return {"study": study, "title": study.upper(), "label": label, "method": method,
            "setting": setting, "target": None, "order": 0, "seed": seed,
            "accuracy": accuracy, "flops_ratio": flops, "params_ratio": flops,
            "latency_ratio": flops + 0.1, "epochs_total": 4, "wall_seconds": 120.0,
            **extra}  # fmt: skip


def test_pareto_plot_keeps_to_the_competitive_range_and_names_what_falls_off():
    rows = aggregate([
        _record("s", "ours", "0.5", 0, 0.80, 0.50),
        _record("s", "ours", "0.7", 0, 0.84, 0.70),
        _record("s", "pruner", "0.5", 0, 0.60, 0.50, method="tp"),  # 24 points below: shown
        _record("s", "naive", "0.5", 0, 0.10, 0.50, method="dropout"),
        _record("s", "naive", "0.7", 0, 0.12, 0.70, method="dropout"),
    ])  # fmt: skip
    flops_ax, latency_ax = pareto_figure(rows, zoom=25).axes
    for ax in (flops_ax, latency_ax):
        assert ax.get_ylim()[0] == pytest.approx(84 - 25)
    names = [t.get_text() for t in flops_ax.get_legend().get_texts()]
    assert names == ["ours", "pruner", "naive (off scale: 10–12%)"]
    ax = pareto_figure(rows, zoom=100).axes[0]  # nothing off scale: every point shows
    assert ax.get_ylim()[0] < 10 and "naive" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_training_compute_gets_panels_columns_and_time_ratios_to_dense():
    records = [
        _record("s", "dense", "", 0, 0.90, 1.0, method="dense", train_flops_ratio=1.0),
        _record("s", "dense", "", 1, 0.91, 1.0, method="dense", train_flops_ratio=1.0,
                wall_seconds=100.0),
        _record("s", "ours", "0.5", 0, 0.80, 0.5, train_flops_ratio=0.7, wall_seconds=90.0),
        _record("s", "ours", "0.5", 1, 0.82, 0.5, train_flops_ratio=0.7, wall_seconds=80.0),
        _record("t", "ours", "0.5", 0, 0.80, 0.5, wall_seconds=90.0),  # no dense run in t
    ]  # fmt: skip
    rows = aggregate(records)
    ours = next(r for r in rows if r.study == "s" and r.label == "ours")
    assert ours.stats["train_time_ratio"].mean == pytest.approx((90 / 120 + 80 / 100) / 2)
    assert ours.stats["train_flops_ratio"].mean == pytest.approx(0.7)
    assert "train_time_ratio" not in next(r for r in rows if r.study == "t").stats
    fig = pareto_figure([r for r in rows if r.study == "s"])
    assert [ax.get_xlabel() for ax in fig.axes] == [
        "FLOPs ratio (pruned / original)", "CPU latency ratio (pruned / original)",
        "training FLOPs (to dense training)", "training wall time (to dense training)",
    ]  # fmt: skip
    x, _ = fig.axes[3].lines[0].get_data()  # dense at 1 by definition
    assert list(x) == [1.0]
    untimed = [dataclasses.replace(r, stats={k: v for k, v in r.stats.items()
                                             if k != "latency_ratio"})
               for r in rows if r.study == "s"]  # fmt: skip
    assert len(pareto_figure(untimed).axes) == 3  # no empty fourth panel
    table = markdown_table([r for r in rows if r.study == "s"])
    assert "| train FLOPs ratio | train time ratio |" in table
    assert "| 0.700 ± 0.000 | 0.775 ± 0.035 |" in table
    assert "train FLOPs ratio" not in markdown_table([r for r in rows if r.study == "t"])


def test_summary_means_and_stds_over_seeds(tmp_path):
    results = tmp_path / "results" / "s"
    results.mkdir(parents=True)
    records = [
        _record("s", "ours", "0.5", 0, 0.80, 0.50, r_polar=0.0),
        _record("s", "ours", "0.5", 1, 0.82, 0.52, r_polar=0.002),
        _record("s", "dense", "", 0, 0.90, 1.0, method="dense"),
    ]
    for i, r in enumerate(records):
        (results / f"{i}.json").write_text(json.dumps(r))
    (results / "cache.json").write_text(json.dumps({"seconds": 3.0}))  # not a result: ignored
    rows = aggregate(load_results([tmp_path / "results"]))
    assert [(r.label, len(r.seeds)) for r in rows] == [("ours", 2), ("dense", 1)]
    files = write_summary([tmp_path / "results"], tmp_path / "out" / "summary.md")
    md = files[0].read_text()
    assert "### S" in md and "| gates | ours | 0.5 | 2 | 81.00 ± 1.41 | 0.510 ± 0.014 |" in md
    assert "| dense | dense | – | 1 | 90.00 | 1.000 |" in md  # one seed: no std
    assert "final R_polar" in md and "0.0010 ± 0.0014" in md
    (png,) = files[1:]
    assert png.name == "summary-s.png" and png.stat().st_size > 1000 and f"({png.name})" in md
    # into a hand-written doc: only the study's span changes
    doc = tmp_path / "out" / "results.md"
    doc.write_text("# Results\n\nProse.\n\n<!-- begin s -->\nSTALE-ROW\n<!-- end s -->\n\nMore.\n")
    write_summary([tmp_path / "results"], doc)
    text = doc.read_text()
    assert text.startswith("# Results\n\nProse.\n\n<!-- begin s -->\n### S")
    assert "STALE-ROW" not in text
    assert text.endswith("<!-- end s -->\n\nMore.\n") and "81.00 ± 1.41" in text


@pytest.mark.slow
def test_run_study_end_to_end_resumes_and_summarizes(tmp_path):
    """1 epoch on a fake Fashion-MNIST: dense, ours and two baselines; then a rerun that
    trains nothing, the summary, and the CLI on the same folder."""
    data = fake_fashion_mnist(tmp_path / "data", n_train=256, n_test=64)
    config = _study(tmp_path, """
[[runs]]
label = "dense"
method = "dense"

[[runs]]
label = "ours"
target = 0.5
# gates closed from the start, so that one tiny epoch leaves a cut; stage 3 ungated
gates = { head = "ste", init_bias = -0.5, exclude = ["layer3.*"] }
latency = { enabled = true, batch = 4, rounds = 1, runs = 2, warmup = 1, threads = 1 }

[[runs]]
label = "layer drop"
method = "layer-drop"
target = 0.5

[[runs]]
label = "dropout"
method = "dropout"
target = 0.6

[[runs]]
label = "magnitude"
method = "tp-magnitude"
target = 0.5
epochs = 2  # pretraining: the dense epoch above, reused; fine-tuning: 1 + 1 extra
extra_finetune_epochs = 1

[[runs]]
label = "density"
method = "density"
epochs = 2  # resized after the first epoch only
density_scale = 0.5
""".replace("DATA", str(data)), base=BASE.replace("DATA", str(data)))  # fmt: skip
    out, lines, study = tmp_path / "out", [], load_study(config)
    trained = run_study(study, out, latency=False, log=lines.append)  # train now, time later
    assert all(r["latency_ratio"] is None for r in trained)
    assert (out / "tiny" / "ours-0.5-s0" / "final.pt2").is_file()
    records = time_study(study, out, log=lines.append)  # only where the study asks for it
    assert [r["latency_ratio"] is None for r in records] == [True, False] + [True] * 4
    assert [{**r, "latency_ratio": None, "latency": None} for r in records] == trained
    assert [(r["label"], r["method"], r["epochs_total"]) for r in records] == [
        ("dense", "dense", 1), ("ours", "gates", 1), ("layer drop", "layer-drop", 1),
        ("dropout", "dropout", 1), ("magnitude", "tp-magnitude", 3), ("density", "density", 2),
    ]  # fmt: skip
    by_label = {r["label"]: r for r in records}
    for run, r in zip(study.runs, records, strict=True):
        assert r["study"] == "tiny" and r["seed"] == 0
        assert 0 <= r["accuracy"] <= 1 and r["wall_seconds"] > 0
        assert r["run"]["label"] == r["label"] and r["run"]["train"]["seed"] == 0
        assert r["torch"] and json.loads((out / "tiny" / f"{run.run_id(0)}.json").read_text()) == r
    assert by_label["dense"]["flops_ratio"] == 1 and by_label["dense"]["params_ratio"] == 1
    for label in ("ours", "layer drop", "dropout", "magnitude", "density"):
        assert by_label[label]["flops_ratio"] < 0.9, label
    assert abs(by_label["layer drop"]["flops_ratio"] - 0.5) < 0.1
    assert abs(by_label["magnitude"]["flops_ratio"] - 0.5) <= 0.02
    tp = by_label["magnitude"]
    assert (tp["pretrain_epochs"], tp["finetune_epochs"], tp["extra_finetune_epochs"]) == (1, 2, 1)
    assert abs(by_label["dropout"]["flops_ratio"] - 0.6) < 0.05  # as if zeros were skipped
    ours = by_label["ours"]
    assert ours["latency_ratio"] > 0 and ours["latency"]["batch"] == 4
    assert ours["latency"]["keep_freed_memory"]  # timed as a CPU deployment should run
    assert 0 <= ours["r_polar"] <= 0.25 and ours["open_ratio"] < 1 and ours["gates"] == 6
    assert (out / "tiny" / "ours-0.5-s0" / "metrics.jsonl").is_file()
    assert by_label["dense"]["latency_ratio"] is None  # disabled in [base.latency]
    # the baselines reuse the dense model of the same seed, and count its training time
    assert by_label["dense"]["reused_seconds"] == 0
    for label in ("layer drop", "dropout", "magnitude"):
        assert 0 < by_label[label]["reused_seconds"] <= by_label[label]["wall_seconds"]
    assert len(list((out / "cache").glob("*.safetensors"))) == 1
    # training FLOPs against dense training for the run's epochs; each epoch at the size
    # the model had then (a reused dense training counted too)
    for label in ("dense", "layer drop", "dropout"):
        assert by_label[label]["train_flops_ratio"] == pytest.approx(1, rel=1e-12), label
    assert by_label["dense"]["train_flops"] == by_label["dropout"]["train_flops"]
    assert 1 < ours["train_flops_ratio"] < 1.05  # the gates' own FLOPs, nothing cut while training
    assert tp["train_flops_ratio"] == pytest.approx((1 + 2 * tp["flops_ratio"]) / 2, rel=1e-9)
    dens = by_label["density"]  # epoch 1 dense, epoch 2 at the final size
    assert dens["train_flops_ratio"] == pytest.approx((1 + dens["flops_ratio"]) / 2, rel=1e-9)

    files = sorted((out / "tiny").glob("*.json"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = run_study(study, out, log=lines.append)
    assert again == records and [f.stat().st_mtime_ns for f in files] == stamps
    assert sum("done before" in line for line in lines) == len(records)

    runner = CliRunner()
    result = runner.invoke(main, ["experiment", str(config), "--out", str(out), "--only", "ours"])
    assert result.exit_code == 0, result.output
    assert "done before" in result.output and "cgates summary" in result.output
    # timed again on request, from the kept final model; nothing retrained
    args = ["experiment", str(config), "--out", str(out), "--only", "ours", "--time-only"]
    result = runner.invoke(main, [*args, "--force"])
    assert result.exit_code == 0 and "ours-0.5-s0: latency ratio" in result.output, result.output
    assert "epoch" not in result.output
    result = runner.invoke(main, [*args, "--no-latency"])
    assert result.exit_code == 2 and "pick one" in result.output
    result = runner.invoke(main, ["summary", str(out), "-o", str(tmp_path / "r.md")])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "r.md").read_text()
    for label in by_label:
        assert f"| {label} |" in md
    assert (tmp_path / "r-tiny.png").stat().st_size > 1000


def _clean_error(result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error")], result.output
    return result.output


def test_cli_errors(tmp_path):
    runner = CliRunner()
    out = _clean_error(runner.invoke(main, ["experiment", str(tmp_path / "nope.toml")]), 2)
    assert "nope.toml" in out and "does not exist" in out
    bad = _study(tmp_path, '\n[[runs]]\nlabel = "ours"\nepoch = 2\n')
    out = _clean_error(runner.invoke(main, ["experiment", str(bad)]), 1)
    assert f"Error: {bad}: run 'ours': unknown key 'epoch'" in out
    good = _study(tmp_path, '\n[[runs]]\nlabel = "ours"\n')
    out = _clean_error(runner.invoke(main, ["experiment", str(good), "--only", "theirs"]), 2)
    assert "no run is labelled 'theirs'" in out
    out = _clean_error(runner.invoke(main, ["experiment", str(good), "--seeds", "a"]), 2)
    assert "expected seeds such as 0,1,2" in out
    out = _clean_error(runner.invoke(main, ["summary", str(tmp_path), "-o", "x.md"]), 1)
    assert "no results files under" in out


def test_cli_summary_refuses_existing_files_unless_overwrite(tmp_path):
    results = tmp_path / "results" / "s"
    results.mkdir(parents=True)
    records = [_record("s", "ours", "0.5", 0, 0.80, 0.50),
               _record("s", "dense", "", 0, 0.90, 1.0, method="dense")]  # fmt: skip
    for i, r in enumerate(records):
        (results / f"{i}.json").write_text(json.dumps(r))
    md, png = tmp_path / "r.md", tmp_path / "r-s.png"
    argv = ["summary", str(tmp_path / "results"), "-o", str(md)]
    runner = CliRunner()
    png.write_bytes(b"keep me")  # a plot it would write is enough
    out = _clean_error(runner.invoke(main, argv), 1)
    assert f"Error: {png} already exists" in out and "--overwrite" in out
    assert not md.exists() and png.read_bytes() == b"keep me"
    png.unlink()
    result = runner.invoke(main, argv)
    assert result.exit_code == 0, result.output
    md.write_text("# mine\n")
    out = _clean_error(runner.invoke(main, argv), 1)
    assert f"Error: {md}, {png} already exist" in out
    assert md.read_text() == "# mine\n"
    result = runner.invoke(main, [*argv, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert md.read_text().startswith("# mine\n") and "| ours |" in md.read_text()


def test_gate_only_train_keys_of_base_apply_to_the_runs_with_gates_only(tmp_path):
    """`progressive = true` in [base.train] cuts gates out of the gated runs; the dense and
    baseline runs train no gates, and get the rest of [base.train] without it."""
    from consensus_gates.training.config import TrainConfig

    base = BASE.replace("progress = false", "progress = false\nprogressive = true\n"
                        "settle_steps = 5")  # fmt: skip
    runs = """
[[runs]]
label = "dense"
method = "dense"

[[runs]]
label = "ours"
target = 0.5

[[runs]]
label = "tp"
method = "tp-magnitude"
target = 0.5
epochs = 2

[[runs]]
label = "density"
method = "density"
density_scale = 0.5
"""
    by_label = {r.label: r for r in load_study(_study(tmp_path, runs, base=base)).runs}
    ours = by_label.pop("ours").train
    assert (ours.progressive, ours.settle_steps, ours.lambda_polar) == (True, 5, 3.0)
    for label, run in by_label.items():
        assert not run.train.progressive, label
        assert run.train.settle_steps == TrainConfig().settle_steps, label
        assert run.train.lambda_polar == 3.0 and not run.train.progress, label  # the rest
    assert METHODS["gates"].gates and not METHODS["dense"].gates

    # in a gateless run's own [train] it is a mistake, said when the study is read
    path = _study(tmp_path, '\n[[runs]]\nlabel = "d"\nmethod = "dense"\n'
                  "train = { progressive = true }\n")  # fmt: skip
    message = (r"run 'd' \[train\]: 'progressive' is for runs with gates, and method 'dense' "
               r"trains none: remove it")  # fmt: skip
    with pytest.raises(ConfigError, match=rf"^{path}: {message}"):
        load_study(path)

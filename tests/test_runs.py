"""A run is never lost, and what the user asks is checked before anything trains: training
into a folder that holds a run, resuming with another model, gates or data, run.json after a
resume, output folders that cannot be folders, and option, model and study checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import consensus_gates as cg
from consensus_gates.cli import main
from consensus_gates.experiments import ConfigError, load_study, run_study
from consensus_gates.models.registry import create_model_for
from consensus_gates.training.checkpoint import load_checkpoint, save_checkpoint
from consensus_gates.training.config import TrainConfig
from consensus_gates.training.runs import CHECKPOINT, METRICS, RUN, RUN_FILES
from consensus_gates.training.trainer import train

from conftest import fake_fashion_mnist

pytestmark = pytest.mark.usefixtures("one_thread")


class _Tiny(nn.Module):
    """Two residual blocks: all the gates need, at a fraction of resnet20's cost."""

    def __init__(self, num_classes: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
            for _ in range(2)
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.fc(x.mean((2, 3)))


@cg.register_model("test_runs_tiny")
def tiny(num_classes: int = 4, in_channels: int = 1) -> nn.Module:
    return _Tiny(num_classes, in_channels, width=4)


@cg.register_model("test_runs_wider")
def wider(num_classes: int = 4, in_channels: int = 1) -> nn.Module:
    return _Tiny(num_classes, in_channels, width=8)


def _error(result, exit_code: int = 1) -> str:
    """The one 'Error:' line of a command that failed cleanly: no traceback."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    return line


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp("data"), n_train=24, n_test=8)


def _train(out: Path, data: Path, *args: str, model: str = "resnet20"):
    argv = ["train", model, "--data", "fashion_mnist", "--data-root", str(data),
            "--epochs", "1", "--batch-size", "8", "--subset", "16", "--out", str(out),
            "--no-progress", *args]  # fmt: skip
    return CliRunner().invoke(main, argv)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS).read_text().splitlines()]


# --------------------------------------------------------------------------------------
# An existing run is refused, resumed, or replaced on request
# --------------------------------------------------------------------------------------


def test_train_into_a_run_refuses_and_keeps_it_then_overwrites_on_request(tmp_path, data):
    out = tmp_path / "run"
    result = _train(out, data, "--epochs", "2", model="test_runs_tiny")
    assert result.exit_code == 0, result.output
    before = {n: (out / n).read_bytes() for n in RUN_FILES}

    error = _error(_train(out, data, model="test_runs_tiny"))
    assert error == (
        f"Error: {out} already holds a run (checkpoint.pt, metrics.jsonl, run.json): "
        "continue it with --resume, write to another --out, or replace it with --overwrite"
    )
    assert {n: (out / n).read_bytes() for n in RUN_FILES} == before
    assert len(_metrics(out)) == 2

    result = _train(out, data, "--overwrite", model="test_runs_tiny")
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in _metrics(out)] == [1]
    assert load_checkpoint(out / CHECKPOINT)["epoch"] == 1
    assert json.loads((out / RUN).read_text())["train"]["epochs"] == 1


@pytest.mark.parametrize("name", RUN_FILES)
def test_any_file_of_a_run_is_enough_to_refuse(tmp_path, name):
    """Checked first: even before the (here missing) data set is read."""
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("{}")
    error = _error(_train(out, tmp_path / "no-data"))
    assert f"already holds a run ({name})" in error and "--overwrite" in error
    assert sorted(p.name for p in out.iterdir()) == [name]


def test_resume_and_overwrite_together_are_a_usage_error(tmp_path):
    error = _error(_train(tmp_path / "run", tmp_path, "--resume", "--overwrite"), exit_code=2)
    assert "--resume continues the run in --out, --overwrite replaces it" in error


def test_demo_refuses_an_earlier_run_unless_overwrite(tmp_path):
    (tmp_path / CHECKPOINT).write_bytes(b"")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--data-root",
                                       str(tmp_path / "no-data"), "--no-progress"])  # fmt: skip
    error = _error(result)
    assert f"{tmp_path} already holds a run (checkpoint.pt)" in error
    assert "--overwrite" in error and "--resume" not in error  # a demo does not resume


def _toy(head: str = "ste", name: str = "test_runs_tiny") -> cg.GatedModel:
    torch.manual_seed(0)
    model = cg.create_model(name)
    return cg.insert_gates(model, torch.randn(2, 1, 8, 8), cg.GateConfig(head=head))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(16, 1, 8, 8, generator=g), torch.arange(16) % 4)
    return DataLoader(dataset, 8, shuffle=True, drop_last=True, generator=g)


ONE = TrainConfig(epochs=1, progress=False)


def _quiet(_line: str) -> None:
    pass


def test_library_train_refuses_a_run_and_overwrite_replaces_it(tmp_path):
    train(_toy(), _loader(), None, TrainConfig(epochs=2, progress=False), out_dir=tmp_path,
          log=_quiet)  # fmt: skip
    saved = (tmp_path / CHECKPOINT).read_bytes()
    refused = (
        r"already holds a run \(checkpoint.pt, metrics.jsonl\); continue it with resume=True, "
        r"replace it with overwrite=True, or train into another out_dir"
    )
    with pytest.raises(ValueError, match=refused):
        train(_toy(), _loader(), None, ONE, out_dir=tmp_path, log=_quiet)
    assert (tmp_path / CHECKPOINT).read_bytes() == saved
    with pytest.raises(ValueError, match="resume=True continues .* overwrite=True replaces"):
        train(_toy(), _loader(), None, ONE, out_dir=tmp_path, resume=True, overwrite=True)

    # a replaced run that stops before its first epoch ends leaves nothing of the old one
    class Stop(Exception):
        pass

    def stop(_model, _epoch):
        raise Stop

    with pytest.raises(Stop):
        train(_toy(), _loader(), None, ONE, out_dir=tmp_path, overwrite=True, log=_quiet,
              epoch_end=stop)  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    train(_toy(), _loader(), None, ONE, out_dir=tmp_path, overwrite=True, log=_quiet)
    assert [r["epoch"] for r in _metrics(tmp_path)] == [1]


# --------------------------------------------------------------------------------------
# --resume refuses another model, gates or data, and run.json follows a resumed run
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> Path:
    """One epoch of resnet20, which the tests below must leave as it is."""
    out = tmp_path_factory.mktemp("runs") / "run"
    result = _train(out, data, "--test-subset", "8")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    ("args", "changed"),
    [
        (["resnet32"], "model: 'resnet20' -> 'resnet32'"),
        (["--mode", "channel"], "gates.mode: 'layer' -> 'channel'"),
        (["--position", "after"], "gates.position: 'middle' -> 'after'"),
        (["--head", "gumbel"], "gates.head: 'ste' -> 'gumbel'"),
        (["--fc-layers", "2"], "gates.fc_layers: 1 -> 2"),
        (["--model-arg", "shortcut=B"], "model_args: {'num_classes': 10, 'in_channels': 1} -> "
                                        "{'num_classes': 10, 'shortcut': 'B', 'in_channels': 1}"),
        (["--subset", "8"], "subset: 16 -> 8"),
        (["--test-subset", "4"], "test_subset: 8 -> 4"),
    ],
)  # fmt: skip
def test_resume_refuses_another_model_gates_or_data(run, data, args, changed):
    model = args[0] if not args[0].startswith("-") else "resnet20"
    options = args if model == "resnet20" else args[1:]
    before = {n: (run / n).read_bytes() for n in RUN_FILES}
    argv = ["train", model, "--data", "fashion_mnist", "--data-root", str(data), "--epochs", "2",
            "--batch-size", "8", "--subset", "16", "--test-subset", "8", "--out", str(run),
            "--no-progress", "--resume", *options]  # fmt: skip
    error = _error(CliRunner().invoke(main, argv))
    assert error.startswith("Error: --resume with a different recipe than the checkpoint's")
    assert f"({changed})" in error, error  # exactly this difference, nothing else
    assert {n: (run / n).read_bytes() for n in RUN_FILES} == before


def test_resume_lists_every_change_in_one_message(run, data):
    argv = ["train", "resnet32", "--data", "fashion_mnist", "--data-root", str(data),
            "--batch-size", "8", "--subset", "12", "--mode", "channel", "--lr", "0.05",
            "--out", str(run), "--no-progress", "--resume"]  # fmt: skip
    error = _error(CliRunner().invoke(main, argv))
    for changed in ("model: 'resnet20' -> 'resnet32'", "gates.mode: 'layer' -> 'channel'",
                    "subset: 16 -> 12", "test_subset: 8 -> None", "lr: 0.1 -> 0.05"):  # fmt: skip
        assert changed in error, changed


def test_resume_to_more_epochs_updates_run_json(run, data, tmp_path):
    run = shutil.copytree(run, tmp_path / "run")
    first = json.loads((run / RUN).read_text())
    moved = tmp_path / "moved"  # the data may move: --data-root is not the data's identity
    shutil.copytree(data, moved)
    result = _train(run, moved, "--test-subset", "8", "--epochs", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]
    after = json.loads((run / RUN).read_text())
    assert after["train"]["epochs"] == 2 and first["train"]["epochs"] == 1
    assert after["argv"] == first["argv"] and len(after["resumed"]) == 1
    assert (after["data"], after["subset"], after["test_subset"]) == ("fashion_mnist", 16, 8)
    assert not list(run.glob(".*"))  # written atomically: no temporary file left


def test_library_resume_refuses_another_model_gates_or_identity(tmp_path):
    train(_toy(), _loader(), None, ONE, out_dir=tmp_path, identity={"data": "a"}, log=_quiet)
    cases = [
        (
            _toy(name="test_runs_wider"),
            {"data": "a"},
            "model: 'test_runs_tiny' -> 'test_runs_wider'",
        ),
        (_toy(head="gumbel"), {"data": "a"}, "gates.head: 'ste' -> 'gumbel'"),
        (_toy(), {"data": "b"}, "data: 'a' -> 'b'"),
    ]
    two = TrainConfig(epochs=2, progress=False)
    for model, identity, changed in cases:
        refused = rf"different recipe than the checkpoint's \({changed}\)"
        with pytest.raises(ValueError, match=refused):
            train(model, _loader(), None, two, out_dir=tmp_path, resume=True, identity=identity)
    records = train(_toy(), _loader(), None, two, out_dir=tmp_path, resume=True,
                    identity={"data": "a"}, log=_quiet)  # fmt: skip
    assert [r["epoch"] for r in records] == [1, 2]


# --------------------------------------------------------------------------------------
# Output folders, model arguments and options: one line, never a traceback
# --------------------------------------------------------------------------------------


def test_out_that_cannot_be_a_folder(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    error = _error(_train(file / "run", tmp_path), exit_code=2)
    assert "Invalid value for '--out'" in error
    assert f"{file / 'run'} cannot be a folder: {file} is a file" in error
    error = _error(_train(file, tmp_path), exit_code=2)
    assert f"{file} is a file; choose another output folder" in error


def test_slim_onto_a_file(tmp_path):
    gated = cg.insert_gates(cg.create_model("resnet20", in_channels=1), torch.randn(2, 1, 8, 8))
    save_checkpoint(tmp_path / CHECKPOINT, gated, epoch=1)
    (tmp_path / "taken").write_text("keep me")
    result = CliRunner().invoke(main, ["slim", str(tmp_path / CHECKPOINT), "-o",
                                       str(tmp_path / "taken")])  # fmt: skip
    assert _error(result) == f"Error: {tmp_path / 'taken'} is a file; choose another output folder"
    assert (tmp_path / "taken").read_text() == "keep me"


def test_train_with_a_keyword_the_model_does_not_take(tmp_path, data):
    error = _error(_train(tmp_path / "run", data, "--model-arg", "foo=1"))
    keywords = "num_classes, in_channels, shortcut"
    assert error == f"Error: resnet20 takes no 'foo'; its keywords: {keywords}"
    assert not (tmp_path / "run").exists()


def test_create_model_names_the_model_and_the_keyword():
    with pytest.raises(ValueError, match=r"^resnet20 takes no 'foo', 'bar'; its keywords: num_"):
        cg.create_model("resnet20", foo=1, bar=2)
    with pytest.raises(ValueError, match=r"^resnet18 cannot be built with \{'foo': 1\}: .*'foo'"):
        cg.create_model("resnet18", foo=1)


def test_an_unknown_model_is_unknown_before_its_channels():
    with pytest.raises(ValueError, match=r"^unknown model 'resnet21'\. Did you mean .*resnet20"):
        create_model_for("resnet21", num_classes=10, in_channels=1)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--subset", "0"], 2, "Invalid value for '--subset': 0 is not in the range x>=1"),
        (["--test-subset", "-3"], 2, "Invalid value for '--test-subset': -3 is not in the range"),
        # the configs check their own fields: a usage error naming the option (exit 2)
        (["--warmup-epochs", "-2"], 2, "Invalid value for '--warmup-epochs': warmup_epochs must "
                                       "be >= 0, got -2"),
        (["--milestones", "5,1"], 2, "Invalid value for '--milestones': milestones must be "
                                     "increasing epochs >= 1 such as (30, 60), got (5, 1)"),
        (["--milestones", "0,3"], 2, "milestones must be increasing epochs >= 1"),
        (["--polar-steps", "5"], 2, "polar_steps must be (a, b) with 0 <= a <= b, got (5,)"),
        (["--lr", "nan"], 2, "Invalid value for '--lr': lr must be a finite number, got nan"),
        (["--lambda-polar", "inf"], 2, "lambda_polar must be a finite number, got inf"),
        (["--lr-gamma", "0"], 2, "Invalid value for '--lr-gamma': lr must be > 0 and lr_gamma"),
        (["--polar-schedule", "cosine"], 2, "Invalid value for '--polar-schedule': polar_schedule"
                                            " must be one of"),
        (["--head", "nope"], 2, "Invalid value for '--head': GateConfig.head"),
        (["--tau", "0"], 2, "Invalid value for '--tau': GateConfig.tau must be > 0, got 0.0"),
        (["--gate-momentum", "2"], 2, "Invalid value for '--gate-momentum': GateConfig.momentum"),
        (["--weight-decay", "-1", "--lr", "nan"], 2, "Invalid value for '--lr' / "
                                                     "'--weight-decay': lr must be a finite"),
    ],
)  # fmt: skip
def test_options_checked_before_the_data_is_read(tmp_path, args, code, message):
    """The data root is missing: each mistake must be found before the data is looked for."""
    error = _error(_train(tmp_path / "run", tmp_path / "no-data", *args), exit_code=code)
    assert message in error, error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("milestones", (3, 3), r"milestones must be increasing epochs >= 1"),
        ("milestones", (2.5,), r"milestones must be increasing epochs >= 1"),
        ("warmup_epochs", -1, r"warmup_epochs must be >= 0, got -1"),
        ("lambda_polar", float("nan"), r"lambda_polar must be a finite number, got nan"),
        ("lambda_act", "big", r"lambda_act must be a finite number, got 'big'"),
        ("controller_kp", float("inf"), r"controller_kp must be a finite number, got inf"),
        ("target", float("nan"), r"target must be a finite number, got nan"),
        ("lr_gamma", 0.0, r"lr must be > 0 and lr_gamma > 0, got 0.1, 0.0"),
        ("weight_decay", -1e-4, r"weight_decay must be >= 0, got weight_decay=-0.0001"),
        ("target_ramp", 1.5, r"target_ramp must be in \[0, 1\], got 1.5"),
        ("epochs", 2.0, r"epochs must be an integer, got 2.0"),
    ],
)  # fmt: skip
def test_train_config_refuses(field, value, message):
    with pytest.raises(ValueError, match=rf"^{message}"):
        TrainConfig(**{field: value})


# --------------------------------------------------------------------------------------
# Studies: every key typed, every run checked before the first trains
# --------------------------------------------------------------------------------------

STUDY = """
name = "s"
[base]
model = "test_runs_tiny"
dataset = "fashion_mnist"
data_root = "DATA"
batch_size = 8
train_subset = 16
test_subset = 8
epochs = 1
method = "gates"
[base.train]
progress = false
[base.latency]
enabled = false
"""


def _study(tmp_path: Path, runs: str, data: Path | str = "data") -> Path:
    path = tmp_path / "study.toml"
    path.write_text(STUDY.replace("DATA", str(data)) + runs)
    return path


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('train = { lambda_polar = "big" }',
         r"\[train\]: 'lambda_polar' must be a number, got 'big'"),
        ("train = { lambda_polar = nan }", r"\[train\]: lambda_polar must be a finite number"),
        ("train = { milestones = [5, 1] }", r"\[train\]: milestones must be increasing"),
        ("train = { polar_steps = [1] }",
         r"\[train\]: 'polar_steps' must be a list of 2 integers, got \[1\]"),
        ("train = { warmup_epochs = -2 }", r"\[train\]: warmup_epochs must be >= 0"),
        ('gates = { tau = "hot" }', r"\[gates\]: 'tau' must be a number, got 'hot'"),
        ("gates = { head = 1 }", r"\[gates\]: 'head' must be one of 'ste', 'gumbel', 'bernoulli'"),
        ("latency = { threads = 1.5 }",
         r"\[latency\]: 'threads' must be an integer, got 1.5"),
        ("train_subset = 0", r": train_subset must be >= 1 \(leave it out for every image\)"),
        ("test_subset = -1", r": test_subset must be >= 1"),
    ],
)  # fmt: skip
def test_study_values_name_the_key(tmp_path, entry, message):
    path = _study(tmp_path, f'\n[[runs]]\nlabel = "ours"\n{entry}\n')
    with pytest.raises(ConfigError, match=rf"^{path}: run 'ours' ?{message}"):
        load_study(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("model_args = { foo = 1 }", "run 'late': test_runs_tiny takes no 'foo'; its keywords:"),
        ('dataset = "cifar11"', "run 'late': unknown data set 'cifar11'; choose one of"),
        ('model = "resnet21"', "run 'late': unknown model 'resnet21'. Did you mean"),
    ],
)
def test_study_checks_every_run_before_the_first_trains(tmp_path, data, entry, message):
    path = _study(tmp_path, f'\n[[runs]]\nlabel = "first"\n\n[[runs]]\nlabel = "late"\n{entry}\n',
                  data)  # fmt: skip
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["experiment", str(path), "--out", str(out)])
    assert _error(result).startswith(f"Error: {path}: {message}")
    assert "epoch" not in result.output and not out.exists()  # nothing trained
    with pytest.raises(ValueError, match=f"^{message}"):
        run_study(load_study(path), out, log=_quiet)
    assert not out.exists()


def test_study_reruns_a_run_over_its_unfinished_work_folder(tmp_path, data):
    """A run without a results file is redone from scratch, even where its training wrote a
    checkpoint (the run was stopped before its results were written)."""
    study = load_study(_study(tmp_path, '\n[[runs]]\nlabel = "ours"\n', data))
    out = tmp_path / "out"
    (first,) = run_study(study, out, log=_quiet)
    (out / "s" / "ours-s0.json").unlink()
    assert (out / "s" / "ours-s0" / CHECKPOINT).is_file()
    (again,) = run_study(study, out, log=_quiet)
    assert again["accuracy"] == first["accuracy"] and (out / "s" / "ours-s0.json").is_file()

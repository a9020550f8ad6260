"""`cgates train` then `cgates slim`, end to end on a fake Fashion-MNIST, and their errors."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import consensus_gates as cg
from consensus_gates.cli import main
from consensus_gates.cli.config_options import FieldOption, command_configs
from consensus_gates.cli.train import train_command
from consensus_gates.training.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from consensus_gates.training.config import TrainConfig

from conftest import fake_fashion_mnist, rel_diff

CLOSED = ("layer1.1", "layer2.2", "layer3.0")  # a downsampling block too


pytestmark = pytest.mark.usefixtures("one_thread")


def _clean_failure(result, exit_code: int = 1) -> str:
    """The command failed the way click reports a user's mistake: an exit code and an
    'Error:' line, no traceback (an unhandled exception is kept in result.exception)."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return result.output


@pytest.mark.slow
def test_train_then_slim_end_to_end(tmp_path):
    fake_fashion_mnist(tmp_path / "data", n_train=80, n_test=40)
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(main, [
        "train", "resnet20", "--data", "fashion_mnist", "--data-root", str(tmp_path / "data"),
        "--epochs", "1", "--subset", "64", "--test-subset", "32", "--batch-size", "32",
        "--out", str(out), "--no-progress",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "epoch 1/1" in result.output and "cgates slim" in result.output
    for name in ("metrics.jsonl", "checkpoint.pt", "gates.png", "curves.png", "run.json"):
        assert (out / name).is_file(), name
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1 and len(record["open_rate"]) == 9
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == "resnet20" and run["data"] == "fashion_mnist"
    assert run["train"]["epochs"] == 1 and run["gates"]["mode"] == "layer"

    # One tiny epoch closes nothing; pin three gates shut so that slim has something to cut.
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 1
    gated = model_from_checkpoint(ckpt)
    for name, gate in gated.gates.items():
        gate.running_open_rate.fill_(0.0 if name in CLOSED else 1.0)
    rest = {k: v for k, v in ckpt.items() if k not in ("format", "version", "spec", "model")}
    save_checkpoint(out / "checkpoint.pt", gated, **rest)

    result = runner.invoke(main, ["slim", str(out / "checkpoint.pt"), "-o", str(out / "slim"),
                                  "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    slim_file, pt2_file = out / "slim" / "slim.safetensors", out / "slim" / "slim.pt2"
    assert report["files"] == [str(slim_file), str(pt2_file)]
    assert slim_file.is_file() and pt2_file.is_file()
    assert report["gates"] == 9 and report["gates_fully_open"] == 6
    assert {n for n, d in report["decisions"].items() if not d} == set(CLOSED)
    assert report["input_shape"] == [1, 28, 28] and report["max_rel_diff"] < 1e-5

    x1 = torch.randn(1, 1, 28, 28)
    slim = cg.load(slim_file)
    full = cg.flops(cg.create_model("resnet20", in_channels=1, num_classes=10), x1)
    assert report["flops"][0] == full.flops and report["params"][0] == full.params
    assert report["flops"][1] == cg.flops(slim, x1).flops < report["flops"][0]
    assert report["params"][1] == sum(p.numel() for p in slim.parameters())

    # the slim model computes what the trained gated model does with its consensus pinned
    reference = model_from_checkpoint(out / "checkpoint.pt").eval()
    cg.fix_decisions(reference, cg.consensus(reference))
    exported = torch.export.load(str(pt2_file)).module()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        expected = reference(x)
        assert rel_diff(expected, slim(x)) <= 1e-5
        assert rel_diff(expected, exported(x)) <= 1e-5


def test_slim_refuses_a_slim_model(tmp_path):
    gated = cg.insert_gates(cg.create_model("resnet20", in_channels=1), torch.randn(2, 1, 28, 28))
    path = tmp_path / "slim.safetensors"
    cg.save(cg.materialize(gated, {n: n.endswith(".0") for n in gated.gates}), path)
    result = CliRunner().invoke(main, ["slim", str(path), "-o", str(tmp_path / "out")])
    assert "holds no gates" in _clean_failure(result)
    assert not (tmp_path / "out").exists()


def test_slim_refuses_the_checkpoint_of_a_plain_training(tmp_path):
    from consensus_gates.training.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "checkpoint.pt", cg.create_model("resnet20"), epoch=1)
    result = CliRunner().invoke(main, ["slim", str(tmp_path / "checkpoint.pt")])
    assert "plain CifarResNet, trained without gates" in _clean_failure(result)


@pytest.mark.parametrize(
    "data",
    [b"", b"hello world\n", bytes(range(256)) * 4],
    ids=["empty", "text", "binary"],
)
def test_slim_refuses_a_damaged_checkpoint(tmp_path, data):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(data)
    result = CliRunner().invoke(main, ["slim", str(path)])
    assert "not a readable consensus-gates checkpoint" in _clean_failure(result)


def test_slim_of_a_missing_file_says_so(tmp_path):
    result = CliRunner().invoke(main, ["slim", str(tmp_path / "nothing.pt")])
    assert "nothing.pt" in _clean_failure(result)


def _train(tmp_path: Path, *args: str):
    out = tmp_path / "run"
    argv = ["train", "resnet20", "--epochs", "1", "--out", str(out), "--no-progress", *args]
    return CliRunner().invoke(main, argv), out


def test_train_unknown_data_set(tmp_path):
    result, out = _train(tmp_path, "--data", "imagenet22k", "--data-root", str(tmp_path))
    output = _clean_failure(result)
    assert "unknown data set 'imagenet22k'" in output and "fashion_mnist" in output
    assert len(output.strip().splitlines()) == 1
    assert not out.exists()  # nothing written for a run that never started


def test_train_missing_data_root_suggests_download(tmp_path):
    root = tmp_path / "nowhere"
    result, out = _train(tmp_path, "--data", "fashion_mnist", "--data-root", str(root))
    output = _clean_failure(result)
    assert "Fashion-MNIST could not be loaded" in output and "--download" in output
    assert str(root) in output
    assert not out.exists()


@pytest.mark.parametrize("option", ["--milestones", "--polar-steps"])
def test_train_non_integer_epochs_list(tmp_path, option):
    result, out = _train(tmp_path, "--data", "fashion_mnist", option, "a,b")
    output = _clean_failure(result, exit_code=2)  # a usage error, before any data is read
    (error,) = [line for line in output.splitlines() if line.startswith("Error:")]
    assert "'a,b'" in error and "integers" in error
    assert option in error, "the message should name the option it is about"
    assert not out.exists()


def test_train_resume_without_a_checkpoint(tmp_path):
    fake_fashion_mnist(tmp_path / "data", n_train=8, n_test=4)
    result, out = _train(tmp_path, "--data", "fashion_mnist", "--data-root",
                         str(tmp_path / "data"), "--batch-size", "4", "--resume")  # fmt: skip
    assert "no such checkpoint" in _clean_failure(result)


def test_train_a_saved_model_file_and_refuse_a_slim_one(tmp_path):
    """MODEL may be a file written by `save`: a plain model gets gates and keeps its weights;
    a slim model has nothing left to gate."""
    fake_fashion_mnist(tmp_path / "data", n_train=16, n_test=8)
    plain = cg.create_model("resnet20", in_channels=1, num_classes=10)
    cg.save(plain, tmp_path / "plain.safetensors")
    data = ["--data", "fashion_mnist", "--data-root", str(tmp_path / "data"), "--batch-size", "8"]
    argv = ["train", str(tmp_path / "plain.safetensors"), "--epochs", "1", "--lr", "1e-9",
            "--out", str(tmp_path / "run"), "--no-progress", *data]  # fmt: skip
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    gated = model_from_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert len(gated.gates) == 9
    # lr 1e-9: the trained weights are still the saved ones, to within the tiny update
    assert (
        rel_diff(gated.get_parameter("conv1.weight").detach(), plain.conv1.weight.detach()) < 1e-6
    )

    gated.eval()
    slim = cg.materialize(gated, dict.fromkeys(gated.gates, False))
    cg.save(slim, tmp_path / "slim.safetensors")
    argv[1] = str(tmp_path / "slim.safetensors")
    argv[argv.index("--out") + 1] = str(tmp_path / "run2")  # run/ holds the run above
    assert "already a slim model" in _clean_failure(CliRunner().invoke(main, argv))


# --------------------------------------------------------------------------------------
# The recipe and gate options are the configs' fields
# --------------------------------------------------------------------------------------


def _field_options() -> dict[tuple[type, str], FieldOption]:
    return {(p.config, p.field): p for p in train_command.params if isinstance(p, FieldOption)}


def test_every_config_field_is_an_option_with_the_dataclass_default():
    options = _field_options()
    for config in (TrainConfig, cg.GateConfig):
        for f in dataclasses.fields(config):
            option = options.pop((config, f.name))
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert option.default == default, f.name
            assert option.help, f"{config.__name__}.{f.name} has no docstring entry"
    assert options == {}
    # no option given: the configs are the dataclasses' own defaults
    ctx = train_command.make_context("train", ["resnet20", "--data", "cifar10"])
    assert command_configs(ctx) == (TrainConfig(), cg.GateConfig())


def test_option_names_are_unique_and_the_old_ones_still_work():
    names = [name for p in train_command.params for name in (*p.opts, *p.secondary_opts)]
    assert len(names) == len(set(names))
    for name in ("--epochs", "--lr", "--milestones", "--lambda-polar", "--polar-schedule",
                 "--polar-steps", "--warmup-epochs", "--lambda-act", "--act-weight", "--target",
                 "--target-kind", "--target-ramp", "--seed", "--no-progress", "--mode",
                 "--position", "--head", "--fc-layers", "--momentum", "--weight-decay",
                 "--controller-kp", "--controller-ki", "--tau", "--hidden", "--exclude",
                 "--gate-momentum"):  # fmt: skip
        assert name in names, name
    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    assert "--gate-momentum" in help_text and "running open rate" in help_text


def _configs(*args: str) -> tuple[TrainConfig, cg.GateConfig]:
    return command_configs(train_command.make_context("train", ["m", "--data", "d", *args]))


@pytest.mark.parametrize(
    ("args", "train_changes", "gate_changes"),
    [
        (["--milestones", "2,3"], {"milestones": (2, 3)}, {}),
        (["--milestones", "2", "--milestones", "3"], {"milestones": (2, 3)}, {}),
        (["--milestones", ""], {"milestones": ()}, {}),
        (["--milestones", "none", "--target", "0.5"], {"milestones": None, "target": 0.5}, {}),
        (["--target", "None"], {"target": None}, {}),
        (["--no-progress", "--epochs", "3"], {"progress": False, "epochs": 3}, {}),
        (["--momentum", "0.5"], {"momentum": 0.5}, {}),
        (["--gate-momentum", "none"], {}, {"momentum": None}),
        (["--exclude", "layer1.*,layer2.0", "--exclude", "layer3.*"], {},
         {"exclude": ("layer1.*", "layer2.0", "layer3.*")}),
        (["--head", "gumbel", "--tau", "0.5", "--hidden", "8"], {},
         {"head": "gumbel", "tau": 0.5, "hidden": 8}),
    ],
)  # fmt: skip
def test_options_set_their_fields(args, train_changes, gate_changes):
    train_config, gate_config = _configs(*args)
    assert train_config == dataclasses.replace(TrainConfig(), **train_changes)
    assert gate_config == dataclasses.replace(cg.GateConfig(), **gate_changes)


def test_the_options_reach_the_run(tmp_path, monkeypatch):
    """What the command trains with: the configs `train` gets, and those run.json keeps."""
    fake_fashion_mnist(tmp_path / "data", n_train=8, n_test=4)
    seen = {}

    def fake_train(gated, train_loader, test_loader, config, **kwargs):
        seen.update(gated=gated, config=config)
        return []

    monkeypatch.setattr(importlib.import_module("consensus_gates.cli.train"), "train", fake_train)
    data = ["--data", "fashion_mnist", "--data-root", str(tmp_path / "data"), "--batch-size", "4"]
    result, out = _train(tmp_path, *data, "--weight-decay", "0", "--tau", "2", "--exclude",
                         "layer1.*", "--gate-momentum", "0.3")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen["config"] == TrainConfig(epochs=1, weight_decay=0.0, progress=False)
    gates = seen["gated"].spec["config"]
    assert (gates["tau"], gates["exclude"], gates["momentum"]) == (2.0, ("layer1.*",), 0.3)
    assert len(seen["gated"].gates) == 6
    assert not any(name.startswith("layer1") for name in seen["gated"].gates)
    run = json.loads((out / "run.json").read_text())
    assert run["train"]["weight_decay"] == 0.0 and run["train"]["momentum"] == 0.9
    assert run["gates"] == json.loads(json.dumps(gates))


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--tau", "0"], "--tau"),
        (["--hidden", "0"], "--hidden"),
        (["--head", "nope"], "--head"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--milestones", "none", "--milestones", "3"], "--milestones"),
        (["--target", "zero"], "--target"),
    ],
)
def test_a_refused_value_is_one_line_naming_the_option(tmp_path, args, option):
    result, out = _train(tmp_path, "--data", "fashion_mnist", *args)
    output = _clean_failure(result, exit_code=2)  # before any data is read
    (error,) = [line for line in output.splitlines() if line.startswith("Error:")]
    assert f"Invalid value for '{option}'" in error, error
    assert not out.exists()


# --------------------------------------------------------------------------------------
# Nothing is overwritten without --overwrite
# --------------------------------------------------------------------------------------


def test_slim_refuses_existing_files_before_loading_and_replaces_them_on_request(
    tmp_path, monkeypatch
):
    from conftest import gated_file

    checkpoint, out = gated_file(tmp_path), tmp_path / "slim"
    out.mkdir()
    for name in ("slim.safetensors", "slim.onnx"):
        (out / name).write_bytes(b"keep me")
    slim_cli = importlib.import_module("consensus_gates.cli.slim")
    real = slim_cli.load_gated

    def no_load(path):
        raise AssertionError("loaded before refusing")

    monkeypatch.setattr(slim_cli, "load_gated", no_load)
    output = _clean_failure(CliRunner().invoke(main, ["slim", checkpoint, "-o", str(out),
                                                      "--onnx"]))  # fmt: skip
    (error,) = output.strip().splitlines()
    assert f"{out / 'slim.safetensors'}, {out / 'slim.onnx'} already exist" in error
    assert "--overwrite" in error
    assert all((out / n).read_bytes() == b"keep me" for n in ("slim.safetensors", "slim.onnx"))

    # without --onnx, slim.onnx is not written, and slim.safetensors alone is refused
    output = _clean_failure(CliRunner().invoke(main, ["slim", checkpoint, "-o", str(out)]))
    assert f"{out / 'slim.safetensors'} already exists" in output

    monkeypatch.setattr(slim_cli, "load_gated", real)
    result = CliRunner().invoke(main, ["slim", checkpoint, "-o", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert len(cg.load(out / "slim.safetensors").state_dict()) > 0
    assert (out / "slim.pt2").is_file() and (out / "slim.onnx").read_bytes() == b"keep me"


@pytest.mark.parametrize("name", ["gates.png", "curves.png"])
def test_train_refuses_a_folder_with_the_plots_of_a_run(tmp_path, name):
    """Training writes its plots too: a folder holding one is refused, before any data is
    read (here there is none), and kept."""
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_bytes(b"keep me")
    result, _ = _train(tmp_path, "--data", "fashion_mnist", "--data-root", str(tmp_path / "no"))
    output = _clean_failure(result)
    assert f"already holds a run ({name})" in output and "--overwrite" in output
    assert (out / name).read_bytes() == b"keep me"


@pytest.mark.parametrize("name", ["slim.safetensors", "slim.pt2", "report.json", "gates.png"])
def test_demo_refuses_a_folder_holding_any_file_it_writes(tmp_path, name):
    (tmp_path / name).write_bytes(b"keep me")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--data-root",
                                       str(tmp_path / "no-data"), "--no-progress"])  # fmt: skip
    output = _clean_failure(result)
    assert f"already holds a run ({name})" in output and "--overwrite" in output
    assert (tmp_path / name).read_bytes() == b"keep me"

"""The `cgates` command line: the click group and the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

import consensus_gates
import consensus_gates as cg
from consensus_gates.cli import main


def test_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    assert "consensus" in result.output.lower()
    assert "--version" in result.output


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert consensus_gates.__version__ in result.output
    assert result.output.startswith("cgates")


def test_unknown_option_fails():
    result = CliRunner().invoke(main, ["--no-such-option"])
    assert result.exit_code == 2
    assert "No such option" in result.output


def test_console_script_is_installed():
    bin_dir = Path(sys.executable).parent
    script = bin_dir / "cgates"
    assert script.is_file()
    found = shutil.which("cgates", path=str(bin_dir))
    assert found is not None
    assert Path(found) == script

    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert consensus_gates.__version__ in proc.stdout


def test_inspect_lists_blocks_with_costs_that_add_up():
    result = CliRunner().invoke(main, ["inspect", "resnet20", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [b["name"] for b in report["blocks"]] == [
        f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)
    ]
    model = cg.create_model("resnet20")
    assert report["flops"] == cg.flops(model, torch.randn(1, 3, 32, 32)).flops
    assert report["blocks"][0] == {"name": "layer1.0", "flops": 4_784_128, "params": 4_672}

    table = CliRunner().invoke(main, ["inspect", "resnet20"]).output
    assert "layer3.2" in table and "residual branches hold" in table


def test_inspect_a_saved_slim_model_shows_what_was_kept(tmp_path):
    x = torch.randn(2, 1, 28, 28)
    gated = cg.insert_gates(cg.create_model("resnet20", in_channels=1), x)
    decisions = {n: n.endswith(".0") for n in gated.gates}
    slim = cg.materialize(gated, decisions)
    cg.save(slim, tmp_path / "slim.safetensors")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "slim.safetensors")])
    assert result.exit_code == 0, result.output
    ratio = (
        cg.flops(slim, x[:1]).flops
        / cg.flops(cg.create_model("resnet20", in_channels=1), x[:1]).flops
    )
    assert "kept: 3/9 blocks" in result.output
    assert f"({ratio:.3f} of the full model)" in result.output


def test_inspect_errors_are_one_clear_line():
    runner = CliRunner()
    no_residual = runner.invoke(main, ["inspect", "vgg11", "--input-shape", "3,32,32"])
    assert no_residual.exit_code == 1 and "has no residual merge" in no_residual.output
    unknown = runner.invoke(main, ["inspect", "resnet5O"])
    assert unknown.exit_code == 1 and "Did you mean" in unknown.output
    bad_arg = runner.invoke(main, ["inspect", "resnet20", "--model-arg", "oops"])
    assert bad_arg.exit_code == 2 and "KEY=VALUE" in bad_arg.output
    bad_shape = runner.invoke(main, ["inspect", "resnet20", "--input-shape", "3xx"])
    assert bad_shape.exit_code == 2 and "C,H,W" in bad_shape.output


def test_a_bug_in_our_code_keeps_its_traceback_a_bad_file_is_one_line(tmp_path, monkeypatch):
    """The commands catch the library's errors for bad input, nothing wider: a TypeError
    from inside is a bug, and shows as one."""
    import importlib

    inspect_cli = importlib.import_module("consensus_gates.cli.inspect")

    def broken(*args, **kwargs):
        raise TypeError("a bug in our own code")

    monkeypatch.setattr(inspect_cli, "branch_costs", broken)
    result = CliRunner().invoke(main, ["inspect", "resnet20"])
    assert type(result.exception) is TypeError and result.exit_code == 1
    assert "a bug in our own code" in str(result.exception)
    monkeypatch.undo()

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    result = CliRunner().invoke(main, ["inspect", str(bad)])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and str(bad) in line and "Traceback" not in result.output


def test_no_command_catches_what_hides_bugs():
    """Every `except` in consensus_gates/cli names library errors, ValueError, OSError or
    ModuleNotFoundError: never Exception, TypeError, RuntimeError, AttributeError, KeyError."""
    import ast

    cli = Path(consensus_gates.__file__).parent / "cli"
    allowed = {"ValueError", "OSError", "FileNotFoundError", "ModuleNotFoundError",
               "ModelFileError", "InputError", "DataError", "TrainingDiverged",
               "CompilerNotFound", "TracingError", "BenchmarkFailed", "ConfigError",
               "JSONDecodeError", "BadParameter", "USER_ERRORS"}  # fmt: skip
    for path in sorted(cli.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler):
                assert node.type is not None, f"{path.name}:{node.lineno}: a bare except"
                kinds = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
                names = {k.attr if isinstance(k, ast.Attribute) else k.id for k in kinds}
                assert names <= allowed, f"{path.name}:{node.lineno} catches {names - allowed}"

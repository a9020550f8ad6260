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

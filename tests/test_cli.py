"""The `cgates` command line: the click group and the installed console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

import consensus_gates
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

"""README's commands and code, and the examples, run as written."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import fake_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def test_ci_runs_the_readme_test_command():
    test_cmd = _bash_blocks()[1].strip().split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd == ".venv/bin/python -m pytest"
    assert any(line.strip() == test_cmd for line in ci.splitlines())


def test_readme_main_command_runs_the_demo():
    main_cmd = _bash_blocks()[0]
    assert main_cmd.strip().endswith(".venv/bin/cgates demo --data-root ../shared/data")


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The resnet50 snippet: gate, 3 training steps, consensus, slim, save, export."""
    (code,) = re.findall(r"```python\n(.*?)```", README, re.S)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    cg, gated, slim = namespace["cg"], namespace["gated"], namespace["slim"]
    assert len(gated.gates) == 16
    assert not any(isinstance(m, cg.LayerGate) for m in slim.modules())
    assert (tmp_path / "slim.safetensors").is_file() and (tmp_path / "slim.pt2").is_file()


def test_quickstart_example_end_to_end(tmp_path):
    root = fake_fashion_mnist(tmp_path / "data", n_train=256, n_test=128)
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(ROOT / "examples" / "fashion_mnist_quickstart.py"),
        "--data-root", str(root), "--epochs", "2", "--subset", "0", "--batch", "32",
        "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "MFLOPs per image" in run.stdout and "gates fully open" in run.stdout
    assert (out / "slim.safetensors").is_file() and (out / "slim.pt2").is_file()


def test_quickstart_example_says_where_the_data_should_be(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "fashion_mnist_quickstart.py"),
           "--data-root", str(tmp_path)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "FashionMNIST/raw" in run.stderr and "--data-root" in run.stderr


@pytest.mark.slow
def test_demo_end_to_end_on_a_small_setting(tmp_path):
    """`cgates demo`: train, slim, bench in separate processes, report; files and numbers."""
    root = fake_fashion_mnist(tmp_path / "data", n_train=256, n_test=128)
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "consensus_gates.cli", "demo", "--data-root", str(root),
        "--out", str(out), "--epochs", "1", "--subset", "128", "--rounds", "1", "--batch", "4",
        "--no-progress",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-2000:]
    for row in ("MFLOPs per sample", "parameters (M)", "test accuracy", "latency ms, batch 4"):
        assert row in run.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"][0] == report["accuracy"][1]  # the slim model is the consensus
    assert report["max_rel_diff"] <= 1e-5 and report["latency_ratio"] > 0
    for name in ("checkpoint.pt", "metrics.jsonl", "gates.png", "slim.safetensors", "slim.pt2"):
        assert (out / name).is_file(), name

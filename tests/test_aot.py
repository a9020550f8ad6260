"""AOTInductor: `cgates slim --aot` writes a package that matches the slim model at other
batch sizes; `cgates bench --aot` compiles in the timing process; packages are never loaded
from a file a user hands us; a missing compiler is a clear error."""

from __future__ import annotations

import json

import pytest
import torch
import torch._inductor
from click.testing import CliRunner

import consensus_gates as cg
from consensus_gates.bench.compare import compare, load_for_bench
from consensus_gates.bench.measure import BenchConfig
from consensus_gates.cli import main

from conftest import gated_file, rel_diff


@pytest.fixture(scope="module")
def slim_dir(tmp_path_factory):
    """`cgates slim --aot` on a gated ResNet-20 with two blocks closed: one compile."""
    root = tmp_path_factory.mktemp("aot")
    out = root / "slim"
    result = CliRunner().invoke(main, ["slim", gated_file(root), "-o", str(out), "--aot",
                                       "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["files"] == [
        str(out / f) for f in ("slim.safetensors", "slim.pt2", "slim.aoti.pt2")
    ]
    return out


@pytest.mark.slow
def test_slim_aot_package_matches_the_slim_model_at_other_batches(slim_dir):
    slim = cg.load(slim_dir / "slim.safetensors").eval()
    package = torch._inductor.aoti_load_package(str(slim_dir / "slim.aoti.pt2"))
    with torch.no_grad():
        for batch in (1, 5):
            x = torch.randn(batch, 3, 32, 32)
            assert rel_diff(package(x), slim(x)) < 1e-5


@pytest.mark.slow
def test_a_package_is_refused_as_code_and_bench_aot_compiles_the_program(slim_dir):
    with pytest.raises(cg.ModelFileError, match="AOTInductor package, compiled native code"):
        load_for_bench(slim_dir / "slim.aoti.pt2")
    argv = ["bench", str(slim_dir / "slim.pt2"), "--aot", "--batch", "3", "--json",
            "--input-shape", "3,32,32", "--rounds", "1", "--runs", "2", "--warmup", "1",
            "--threads", "1"]  # fmt: skip
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)["results"]
    assert row["median_ms"] > 0 and row["extra"]["aot_compile_s"] > 0
    assert row["flops"] > 0  # counted on the program, not on the compiled code


def test_without_a_compiler_slim_aot_says_so_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ or clang++ here
    monkeypatch.delenv("CXX", raising=False)
    out = tmp_path / "slim"
    result = CliRunner().invoke(main, ["slim", gated_file(tmp_path), "-o", str(out), "--aot"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "AOTInductor compiles C++ and found no compiler" in result.output
    assert not out.exists()
    result = CliRunner().invoke(main, ["bench", "resnet20", "--aot", "--batch", "1"])
    assert result.exit_code != 0 and "found no compiler" in result.output
    with pytest.raises(cg.CompilerNotFound):
        cg.export(torch.nn.Linear(2, 2), torch.randn(2, 2), tmp_path / "m.aoti.pt2")


def test_aot_cannot_be_combined_with_compile_or_onnx():
    with pytest.raises(ValueError, match="two ways to compile the model: choose one"):
        BenchConfig(compile=True, aot=True)
    with pytest.raises(ValueError, match="drop --dtype, --compile, --aot"):
        compare({"m": "m.onnx"}, (3, 8, 8), config=BenchConfig(aot=True))

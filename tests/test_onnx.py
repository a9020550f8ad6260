"""ONNX: `cg.export` to .onnx matches the slim model under onnxruntime, in every gate mode
and channel position; `cgates slim --onnx` and `cgates bench file.onnx`; bad files refused."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import consensus_gates as cg
from consensus_gates.cli import main
from consensus_gates.saving.onnx_files import OnnxRuntimeModel, check_onnx, example_shapes

from conftest import gated_file, randomize, rel_diff

X = torch.randn(2, 3, 32, 32)


def _slim(mode: str, position: str = "middle") -> torch.nn.Module:
    """ResNet-20 with random decisions in `mode` cut out, some blocks and channels closed."""
    torch.manual_seed(0)
    gated = cg.insert_gates(randomize(cg.create_model("resnet20")), X,
                            cg.GateConfig(mode=mode, position=position))  # fmt: skip
    g = torch.Generator().manual_seed(3)
    decisions = {
        n: bool(torch.rand((), generator=g) > 0.4) if gate.units == 1
        else tuple(bool(v) for v in torch.rand(gate.units, generator=g) > 0.4)
        for n, gate in gated.gates.items()
    }  # fmt: skip
    return cg.materialize(gated, decisions).eval()


@pytest.mark.parametrize(
    "mode,position",
    [("layer", "middle"), ("channel", "middle"), ("channel", "after"), ("channel", "before"),
     ("both", "middle")],
)  # fmt: skip
def test_onnx_matches_the_slim_model_at_other_batches_and_sizes(tmp_path, mode, position):
    slim = _slim(mode, position)
    path = tmp_path / "slim.onnx"
    cg.export(slim, X, path)
    ort_model = OnnxRuntimeModel(path, threads=1)
    for shape in [(1, 3, 32, 32), (5, 3, 32, 32), (3, 3, 40, 24)]:  # batch and spatial dynamic
        x = torch.randn(shape)
        with torch.no_grad():
            ref = slim(x)
        out = ort_model(x)
        assert out.shape == ref.shape and rel_diff(out, ref) < 1e-5, (shape, rel_diff(out, ref))
    proto = check_onnx(path)
    assert example_shapes(proto) == [[2, 3, 32, 32]]
    assert proto.opset_import[0].version == cg.saving.onnx_files.OPSET
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary left


def test_onnx_file_holds_no_gates_and_the_slim_weights(tmp_path):
    """Inference runs the smaller dense network: no gate ops, the slim model's parameters."""
    import onnx.numpy_helper

    slim = _slim("both")
    cg.export(slim, X, tmp_path / "slim.onnx")
    proto = check_onnx(tmp_path / "slim.onnx")
    stored = sum(onnx.numpy_helper.to_array(t).size for t in proto.graph.initializer
                 if onnx.numpy_helper.to_array(t).ndim > 0)  # fmt: skip
    full = sum(p.numel() for p in cg.create_model("resnet20").parameters())
    # batch norm folds into nothing here (eval export keeps its 4 vectors): compare with
    # the slim model's parameters and buffers, and check it is smaller than the original
    expected = sum(t.numel() for t in slim.state_dict().values() if t.dim() > 0)
    assert stored <= expected < full
    assert not any("gate" in n.op_type.lower() or "sigmoid" in n.op_type.lower()
                   for n in proto.graph.node)  # fmt: skip


def test_bad_onnx_files_are_refused_clearly(tmp_path):
    import onnx

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a protobuf at all" * 10)
    with pytest.raises(cg.ModelFileError, match="is not a readable ONNX model"):
        OnnxRuntimeModel(junk)
    cg.export(_slim("layer"), X, tmp_path / "slim.onnx")
    proto = onnx.load(str(tmp_path / "slim.onnx"))
    onnx.save(proto, str(tmp_path / "ext.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)  # fmt: skip
    with pytest.raises(cg.ModelFileError, match="keeps .* weights in external files"):
        OnnxRuntimeModel(tmp_path / "ext.onnx")
    with pytest.raises(ValueError, match=r"export writes .pt2 .*, .onnx or .aoti.pt2 .* got"):
        cg.export(_slim("layer"), X, tmp_path / "slim.tflite")
    with pytest.raises(ValueError, match="takes 1 inputs"):
        OnnxRuntimeModel(tmp_path / "slim.onnx")(X, X)


@pytest.mark.slow
def test_cgates_slim_onnx_then_bench_times_it_with_onnxruntime(tmp_path):
    runner = CliRunner()
    out = tmp_path / "slim"
    result = runner.invoke(main, ["slim", gated_file(tmp_path), "-o", str(out), "--onnx",
                                  "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["files"] == [str(out / f) for f in ("slim.safetensors", "slim.pt2", "slim.onnx")]
    slim = cg.load(out / "slim.safetensors").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert rel_diff(OnnxRuntimeModel(out / "slim.onnx")(x), slim(x)) < 1e-5

    argv = ["bench", str(out / "slim.pt2"), str(out / "slim.onnx"), "--batch", "1,4", "--json",
            "--rounds", "1", "--runs", "2", "--warmup", "1", "--threads", "1"]  # fmt: skip
    result = runner.invoke(main, argv)
    assert result.exit_code == 0, result.output
    bench = json.loads(result.output)
    assert bench["input_shape"] == [3, 32, 32]  # the shape the .onnx file records
    rows = {(m["model"], m["batch"]): m for m in bench["results"]}
    assert set(rows) == {(n, b) for n in ("slim.pt2", "slim.onnx") for b in (1, 4)}
    assert all(m["median_ms"] > 0 and m["threads"] == 1 for m in rows.values())
    assert rows[("slim.onnx", 1)]["flops"] is None  # fvcore counts torch code only


@pytest.mark.parametrize(
    "args,message",
    [(["--dtype", "bfloat16"], "an .onnx file is timed as exported, in float32"),
     (["--compile"], "drop --dtype, --compile, --aot and --channels-last")],
)  # fmt: skip
def test_cgates_bench_and_inspect_refuse_what_onnx_cannot_do_in_one_line(tmp_path, args, message):
    cg.export(_slim("layer"), X, tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "m.onnx"), *args])
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.onnx")])
    assert result.exit_code != 0 and "is an ONNX graph, which keeps no residual blocks" in (
        result.output
    )


def test_without_the_onnx_extra_slim_says_what_to_install_and_writes_nothing(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "onnxscript" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    out = tmp_path / "slim"
    result = CliRunner().invoke(main, ["slim", gated_file(tmp_path), "-o", str(out), "--onnx"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert 'ONNX needs onnxscript: pip install "consensus-gates[onnx]"' in result.output
    assert not out.exists()  # checked before anything is written

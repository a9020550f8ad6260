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
    with pytest.raises(cg.ModelFileError, match="keeps 28 tensor.* in external files"):
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


# Hostile files: tensors anywhere in the graph whose data onnxruntime would read from a
# file beside the .onnx, which the graph then returns.
MARKER = b"SECRET-BYTES-16!"


def _external(name: str, location: str = "secret.bin"):
    from onnx import TensorProto

    t = TensorProto(name=name, data_type=TensorProto.UINT8, dims=[len(MARKER)],
                    data_location=TensorProto.EXTERNAL)  # fmt: skip
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(MARKER)))):
        t.external_data.add(key=key, value=value)
    return t


def _branch(name: str, nodes: list, initializer: list = ()):
    from onnx import TensorProto, helper

    out = helper.make_tensor_value_info(f"{name}_out", TensorProto.UINT8, [len(MARKER)])
    return helper.make_graph(nodes, name, [], [out], initializer=list(initializer))


def _if(output: str, then_branch, else_branch):
    from onnx import TensorProto, helper

    true = helper.make_tensor("c", TensorProto.BOOL, [], [True])
    cond = helper.make_node("Constant", [], [f"{output}_cond"], value=true)
    return [cond, helper.make_node("If", [f"{output}_cond"], [output], then_branch=then_branch,
                                   else_branch=else_branch)]  # fmt: skip


def _leaf(name: str, external: bool):
    """A branch returning a Constant: the marker file's bytes if `external`."""
    from onnx import TensorProto, helper

    value = _external(name) if external else helper.make_tensor(
        name, TensorProto.UINT8, [len(MARKER)], bytes(len(MARKER)), raw=True
    )  # fmt: skip
    return _branch(name, [helper.make_node("Constant", [], [f"{name}_out"], value=value)])


def _hostile_models():
    from onnx import helper

    constant = [helper.make_node("Constant", [], ["Y"], value=_external("c"))]
    branch_init = _branch("then", [helper.make_node("Identity", ["T"], ["then_out"])],
                          initializer=[_external("T")])  # fmt: skip
    in_branch = _if("Y", branch_init, _leaf("else", external=False))
    inner = _branch("outer", _if("outer_out", _leaf("inner", True), _leaf("inner2", False)))
    nested = _if("Y", inner, _leaf("other", external=False))  # an If in an If's branch
    return {
        "a Constant's value": (constant, "node 'Constant' attribute 'value'"),
        "an If branch's initializer": (in_branch, "initializer 'T'"),
        "a Constant two Ifs deep": (
            nested,
            "'then_branch' > graph 'outer' > node 'If' attribute 'then_branch' > graph 'inner'",
        ),
    }


def _write_hostile(folder, nodes):
    import onnx
    from onnx import TensorProto, helper

    (folder / "secret.bin").write_bytes(MARKER)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("Y", TensorProto.UINT8, [len(MARKER)])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])  # fmt: skip
    path = folder / "hostile.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("kind", list(_hostile_models()))
def test_external_data_anywhere_in_the_graph_is_refused_in_one_line(tmp_path, kind):
    import numpy as np
    import onnxruntime as ort

    nodes, where = _hostile_models()[kind]
    path = _write_hostile(tmp_path, nodes)
    # the file is hostile: onnxruntime alone reads the sibling file and returns its bytes
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"X": np.zeros(1, np.float32)})[0].tobytes() == MARKER

    for load in (check_onnx, OnnxRuntimeModel):
        with pytest.raises(cg.ModelFileError, match="in external files") as e:
            load(path)
        assert where in str(e.value) and "self-contained" in str(e.value)
    result = CliRunner().invoke(main, ["bench", str(path), "--batch", "1", "--rounds", "1"])
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert "in external files" in result.output and where in result.output


def test_external_data_in_sparse_tensors_functions_and_lists_is_refused(tmp_path):
    """Every other place a tensor can sit: a sparse initializer, a Constant's sparse_value,
    a TENSORS attribute, a node inside a model-local function, a Loop's GRAPHS-free body."""
    import onnx
    from onnx import TensorProto, helper

    def sparse(name):
        indices = helper.make_tensor(f"{name}_i", TensorProto.INT64, [1], [0])
        return helper.make_sparse_tensor(_external(name), indices, [len(MARKER)])

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("Y", TensorProto.UINT8, [len(MARKER)])
    identity = helper.make_node("Identity", ["X"], ["Y"])
    cases = {
        "sparse initializer 'sp'": {"sparse_initializer": [sparse("sp")]},
        "attribute 'sparse_value'": {"nodes": [helper.make_node("Constant", [], ["Z"],
                                                                sparse_value=sparse("sv"))]},
        "attribute 'list'": {"nodes": [helper.make_node("Custom", [], ["Z"], domain="x",
                                                        list=[_external("l")])]},
        "function 'local.f'": {"function": True},
    }  # fmt: skip
    for where, parts in cases.items():
        graph = helper.make_graph([identity, *parts.get("nodes", [])], "g", [x], [y],
                                  sparse_initializer=parts.get("sparse_initializer"))  # fmt: skip
        functions = []
        if parts.get("function"):
            body = helper.make_node("Constant", [], ["out"], value=_external("fc"))
            functions = [helper.make_function("local", "f", [], ["out"], [body],
                                              [helper.make_opsetid("", 18)])]  # fmt: skip
        model = helper.make_model(graph, functions=functions,
                                  opset_imports=[helper.make_opsetid("", 18)])  # fmt: skip
        onnx.save(model, str(tmp_path / "m.onnx"))
        with pytest.raises(cg.ModelFileError, match="in external files") as e:
            check_onnx(tmp_path / "m.onnx")
        assert where in str(e.value), (where, str(e.value))


def _nested_if_bytes(depth: int, leaf: bytes) -> bytes:
    """A ModelProto, written by hand: If nodes nested `depth` deep (deeper than the protobuf
    library lets one build), `leaf` the innermost GraphProto."""

    def field(number: int, payload: bytes) -> bytes:  # a length-delimited field
        size, n = b"", len(payload)
        while True:
            size += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                break
        return bytes([number << 3 | 2]) + size + payload

    graph = leaf
    for _ in range(depth):  # GraphProto.node=1 > NodeProto.attribute=5 > AttributeProto.g=6
        attribute = field(1, b"then_branch") + bytes([20 << 3, 0x01, 5]) + field(6, graph)
        graph = field(1, field(4, b"If") + field(5, attribute))
    graph += field(11, field(1, b"X"))  # an input, GraphProto.input=11
    return bytes([8, 8]) + field(7, graph)  # ir_version 8, ModelProto.graph=7


def test_a_deeply_nested_graph_is_refused_without_recursion_error(tmp_path):
    """Nesting that protobuf parses is walked without recursion; deeper nesting is not a
    readable model. Either way, one ModelFileError."""
    leaf = _leaf("leaf", external=True).SerializeToString()
    path = tmp_path / "deep.onnx"
    path.write_bytes(_nested_if_bytes(25, leaf))
    with pytest.raises(cg.ModelFileError, match="in external files") as e:
        check_onnx(path)
    assert str(e.value).count("then_branch") == 25
    path.write_bytes(_nested_if_bytes(2_000, leaf))
    with pytest.raises(cg.ModelFileError, match="not a readable ONNX model"):
        check_onnx(path)

"""ONNX: write a model (usually a slim one) for onnxruntime, and run an ``.onnx`` file with it.

Needs the ``onnx`` extra (``pip install "consensus-gates[onnx]"``: onnx, onnxscript and
onnxruntime). An ``.onnx`` file is a protobuf of operators and weights, data that onnxruntime
interprets; a file whose weights live in external files is refused, so that loading reads
only the file it is given.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import atomic_path
from ..errors import ModelFileError
from ..hf.inputs import TOKENS_KEY

OPSET = 18  # torch.onnx's dynamo exporter's own; onnxruntime 1.16+ runs it
SHAPES_KEY = "consensus_gates.example_input_shapes"


def require_onnx(*modules: str) -> None:
    """A clear error, naming the extra to install, where an ONNX package is missing."""
    import importlib.util

    modules = modules or ("onnx", "onnxscript", "onnxruntime")
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f'ONNX needs {", ".join(missing)}: pip install "consensus-gates[onnx]"'
        )


def _dynamic_shapes(inputs: tuple[Tensor, ...], dynamic: bool) -> tuple[dict, ...] | None:
    """The batch and, for images, the spatial sizes left to the exporter: `Dim.AUTO` makes a
    dimension dynamic where the model allows it and keeps it static where it does not."""
    if not dynamic:
        return None
    auto = torch.export.Dim.AUTO
    return tuple({d: auto for d in (0, *range(2, t.dim()))} for t in inputs)


def export_onnx(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    path: str | os.PathLike,
    dynamic: bool = True,
    shapes: Any = None,
    tokens: str | None = None,
) -> Any:
    """Write `model` in eval mode to `path` with torch.onnx's dynamo exporter, at `OPSET`,
    its weights inside the file; return the ``torch.onnx.ONNXProgram``. `shapes` replaces
    the default dynamic dimensions; `tokens` (`TokenProgram.describe`) names the inputs of
    a language model, for `cgates bench`."""
    require_onnx("onnx", "onnxscript")
    names = getattr(model, "names", None)  # a Hugging Face model's inputs, by name
    try:
        program = _onnx_program(model, inputs, shapes or _dynamic_shapes(inputs, dynamic), names)
    except Exception as e:  # noqa: BLE001 - fall back to static shapes, as `export` does
        if not dynamic:
            raise
        warnings.warn(f"ONNX export with dynamic shapes failed ({e}); using static shapes",
                      stacklevel=3)  # fmt: skip
        program = _onnx_program(model, inputs, None, names)

    # the example's shapes, for `cgates bench`: the graph's own are symbolic
    program.model.metadata_props[SHAPES_KEY] = json.dumps([list(t.shape) for t in inputs])
    if tokens is not None:
        program.model.metadata_props[TOKENS_KEY] = tokens
    with atomic_path(path) as tmp:
        program.save(str(tmp), external_data=False)
    return program


def example_shapes(proto: Any) -> list[list[int]] | None:
    """The example input shapes `export_onnx` recorded in a model's metadata, if any."""
    for prop in proto.metadata_props:
        if prop.key == SHAPES_KEY:
            with contextlib.suppress(ValueError):
                shapes = json.loads(prop.value)
                if isinstance(shapes, list) and all(
                    isinstance(s, list) and all(isinstance(d, int) and d > 0 for d in s)
                    for s in shapes
                ):
                    return shapes
    return None


def _onnx_program(
    model: nn.Module, inputs: tuple[Tensor, ...], shapes: Any, names: list[str] | None
) -> Any:
    # the exporter reports its progress on stdout, which is the CLI's and the user's
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(model, inputs, dynamo=True, dynamic_shapes=shapes,
                                 input_names=names, opset_version=OPSET,
                                 verbose=False)  # fmt: skip


def token_metadata(model: OnnxRuntimeModel) -> str | None:
    """What `export_onnx` recorded of a language model's inputs (`TokenProgram.read`), as
    the session read it: the file is not parsed again."""
    return model.session.get_modelmeta().custom_metadata_map.get(TOKENS_KEY)


def check_onnx(path: str | os.PathLike) -> Any:
    """The ``onnx.ModelProto`` in `path`, read without its external data; a clear
    `ModelFileError` for a file that is not ONNX or that points to weights elsewhere."""
    require_onnx("onnx")
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path} is not a readable ONNX model: {e}") from e
    external = _external_tensors(proto)
    if external:
        raise ModelFileError(
            f"{path} keeps {len(external)} tensor(s) in external files, which onnxruntime "
            f"would read from beside it ({external[0]}{', ...' if len(external) > 1 else ''}); "
            "give a self-contained .onnx (onnx.save(model, path, save_as_external_data=False))"
        )
    if not proto.graph.input:
        raise ModelFileError(f"{path} is an ONNX graph without inputs: nothing to run")
    return proto


def _external_tensors(proto: Any) -> list[str]:
    """Where the tensors of `proto` that keep their data in other files sit, anywhere: the
    initializers, node attributes and local functions of the graph and of every subgraph
    (If, Loop, Scan bodies), at any depth, walked without recursion."""
    import onnx

    def external(t: Any) -> bool:
        return t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) > 0

    found: list[str] = []
    # (path, nodes, attributes, tensors): each work item is one graph, function or list
    work: list[tuple[str, Any]] = [("graph" + _named(proto.graph), proto.graph)]
    work += [(f"function '{f.domain}.{f.name}'", f) for f in proto.functions]
    for i, info in enumerate(proto.training_info):
        work += [(f"training_info {i} {part}", getattr(info, part))
                 for part in ("initialization", "algorithm") if info.HasField(part)]  # fmt: skip
    while work:
        where, item = work.pop()
        tensors = [(f"initializer {t.name!r}", t) for t in getattr(item, "initializer", ())]
        for s in getattr(item, "sparse_initializer", ()):
            tensors += [(f"sparse initializer {s.values.name!r}", t) for t in (s.values, s.indices)]
        attributes = [("", a) for a in getattr(item, "attribute_proto", ())]  # a function's
        for node in item.node:
            label = f"node {node.name or node.op_type!r} "
            attributes += [(label, a) for a in node.attribute]
        for label, a in attributes:
            here = f"{label}attribute {a.name!r}"
            values = [a.t] if a.HasField("t") else []
            values += [*a.tensors]
            for s in [a.sparse_tensor] * a.HasField("sparse_tensor") + [*a.sparse_tensors]:
                values += [s.values, s.indices]
            tensors += [(here, t) for t in values]
            graphs = [a.g] * a.HasField("g") + [*a.graphs]
            work += [(f"{where} > {here} > graph{_named(g)}", g) for g in graphs]
        found += [f"{where} > {what}" for what, t in tensors if external(t)]
    return found


def _named(graph: Any) -> str:
    return f" {graph.name!r}" if graph.name else ""


class OnnxRuntimeModel(nn.Module):
    """An ``.onnx`` file run by onnxruntime, called like the module it was exported from:
    tensors in, a tensor (or a tuple of them) out. On ``device="cuda"`` the inputs are bound
    where they lie (no copy to the host) and the outputs come back to the CPU."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None):
        super().__init__()
        check_onnx(path)
        require_onnx("onnxruntime")
        import onnxruntime as ort

        self.device = torch.device(device)
        providers: list = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelFileError(
                    "this onnxruntime has no CUDA execution provider: pip install "
                    "onnxruntime-gpu, or time the .onnx file on the CPU"
                )
            self.device = torch.device("cuda", self.device.index or 0)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index}))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"the ONNX model takes {len(self.input_names)} inputs "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")  # fmt: skip
        outputs = self._run_cuda(inputs) if self.device.type == "cuda" else self._run_cpu(inputs)
        tensors = tuple(torch.from_numpy(o) for o in outputs)
        return tensors[0] if len(tensors) == 1 else tensors

    def _run_cpu(self, inputs: Sequence[Tensor]) -> list:
        feeds = {n: x.detach().cpu().numpy() for n, x in zip(self.input_names, inputs, strict=True)}
        return self.session.run(None, feeds)

    def _run_cuda(self, inputs: Sequence[Tensor]) -> list:
        binding = self.session.io_binding()
        inputs = [x.detach().to(self.device).contiguous() for x in inputs]  # alive until run
        for name, x in zip(self.input_names, inputs, strict=True):
            dtype = torch.empty((), dtype=x.dtype).numpy().dtype
            binding.bind_input(name, "cuda", self.device.index, dtype, tuple(x.shape),
                               x.data_ptr())  # fmt: skip
        for out in self.session.get_outputs():
            binding.bind_output(out.name, "cuda", self.device.index)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

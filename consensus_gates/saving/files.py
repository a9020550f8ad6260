"""Step 7: save and load without pickle (safetensors + a JSON spec), and export for deployment."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from .._utils import atomic_path, set_training, unwrap
from ..config import GateConfig
from ..consensus import normalize_decision
from ..errors import ModelFileError, file_step
from ..fx.cut import replay_cuts
from ..fx.graph_module import META_KEY, GatedModel
from ..fx.insert import insert_gates
from ..fx.tracing import as_input_tuple
from ..gates.modules import LayerGate
from ..hf.export import export_call
from ..hf.gating import TransformerFile
from ..hf.inputs import TokenProgram, is_transformer
from ..hf.saving import gated_from_spec, rebuild_transformer, transformer_spec
from ..models.registry import SOURCE_ATTR, create_model
from ..slimming import materialize
from .aot_package import AOT_SUFFIX, compile_package, require_compiler
from .bounds import Shapes, check_elements, check_matches, module_budget, stored_shapes
from .pt2 import TOKENS_FILE
from .spec import (
    FORMAT,
    MAX_BATCH,
    VERSION,
    architecture_source,
    parse_spec,
    validate_spec,
)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """How `load` rebuilds `model`: source model, example input shapes, config, decisions."""
    meta = getattr(model, "meta", None)
    if isinstance(model, TransformerFile):
        spec = transformer_spec(model)
    elif isinstance(meta, dict) and META_KEY in meta:
        # `load` measures cut_flops again when it replays the cuts
        spec = {k: v for k, v in meta[META_KEY].items() if k not in ("rejected", "cut_flops")}
        # `load` traces the model on these shapes again; it needs no larger batch
        spec["inputs"] = [
            {**s, "shape": [min(s["shape"][0], MAX_BATCH), *s["shape"][1:]]}
            for s in spec["inputs"]
        ]
        if isinstance(model, GatedModel):
            spec["fixed"] = {n: g.fixed for n, g in model.gates.items() if g.fixed is not None}
    elif hasattr(model, SOURCE_ATTR):
        spec = {"kind": "plain", "source": getattr(model, SOURCE_ATTR)}
    else:
        raise ValueError(
            f"save() cannot describe how to rebuild a {type(model).__name__}: build it with "
            "create_model(), insert_gates() or materialize(). For other models, save the "
            "weights with safetensors or the program with consensus_gates.export()."
        )
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return {
        "format": FORMAT,
        "version": VERSION,
        **spec,
        "source": architecture_source(spec["source"]),
        "dtype": str(floating[0]).removeprefix("torch.") if floating else None,
    }


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a plain (`create_model`), gated or slim model to one ``.safetensors`` file.

    The weights go in as tensors; the header holds a JSON spec (source model name and
    kwargs, input shapes, `GateConfig`, decisions) from which `load` rebuilds the module.
    Pretrained-weight kwargs (``weights=...``) are not written: the file holds the weights.
    The file is written atomically.
    """
    model = unwrap(model)
    spec = model_spec(model)
    try:
        header = json.dumps(spec)
    except TypeError as e:
        raise ValueError(
            f"the model's constructor arguments are not JSON-serializable ({e}); pass only "
            "numbers, strings, booleans, lists and dicts to create_model()"
        ) from e
    parse_spec(header, "the model to save")  # never write a file that load() refuses
    with atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata={META_KEY: header})


def read_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON spec in a file written by `save`, validated (`spec.validate_spec`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt"
        ) from e
    if META_KEY not in metadata:
        raise ModelFileError(
            f"{path} is a safetensors file but not one written by consensus_gates.save() "
            "(its header has no model spec)"
        )
    return parse_spec(metadata[META_KEY], str(path))


def rebuild(
    spec: dict[str, Any],
    model: nn.Module | None = None,
    what: str = "the file",
    stored: Shapes | None = None,
) -> nn.Module:
    """The architecture a spec describes, with fresh weights: `create_model` (or `model`, an
    instance of the original architecture), then `insert_gates` and `materialize` as
    recorded. The spec is validated first; anything it gets wrong is a ModelFileError.

    `stored`, the shapes of the tensors the file holds, bounds what is built before it is
    allocated (`saving.bounds`): a transformer is rebuilt on the meta device first and must
    hold exactly those tensors; a source model may not be larger than they are, unless
    a cut made it smaller."""
    validate_spec(spec, what)
    if "transformers" in spec:
        if stored is not None:
            with torch.device("meta"):
                meta = rebuild_transformer(spec, what)
            check_matches(meta, stored, what)
        return rebuild_transformer(spec, what)
    if spec["kind"] == "plain":
        return _source_model(spec, model, what, stored)
    # a cut, at the end or while training, leaves the file smaller than the source model
    shrunk = spec["kind"] == "slim" or bool(spec.get("cut"))
    gated = rebuild_gated(spec, model, what, None if shrunk else stored)
    decisions = decisions_of(spec, gated, what)
    if spec.get("cut"):
        cut = decisions_of(spec, gated, what, field="cut")
        file_step(what, "cut the gates it cut while training", replay_cuts, gated, cut)
    if spec["kind"] == "slim":
        return file_step(what, "materialize its decisions", materialize, gated, decisions)
    for name, d in decisions.items():
        gated.gates[name].fixed = d
    return gated


def rebuild_gated(
    spec: dict[str, Any],
    model: nn.Module | None = None,
    what: str = "the file",
    stored: Shapes | None = None,
) -> GatedModel:
    """The gated model of a gated or slim spec (for a slim one: before the cut), with fresh
    weights and no decisions fixed."""
    validate_spec(spec, what)
    if spec["kind"] == "plain":
        raise ModelFileError(f"{what} holds a plain model, without gates")
    if "transformers" in spec:
        return file_step(what, "trace its layers", gated_from_spec, spec, what)
    net = _source_model(spec, model, what, stored)
    inputs = tuple(
        torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in spec["inputs"]
    )
    config = file_step(what, "build its GateConfig", GateConfig.from_dict, spec["config"])
    return file_step(
        what, "insert its gates", insert_gates, net, inputs, config,
        leaf_modules=spec["leaf_modules"],
    )  # fmt: skip


def _source_model(
    spec: dict[str, Any], model: nn.Module | None, what: str, stored: Shapes | None
) -> nn.Module:
    source = spec["source"]
    if model is None:
        if not source:
            raise ModelFileError(
                f"{what} was saved from a model that is not in the registry; pass an instance "
                "of its architecture, e.g. load(path, model=MyNet(...))"
            )
        model = _create(source, what, stored)
    if spec["dtype"]:
        model = model.to(getattr(torch, spec["dtype"]))
    return model


def _create(source: dict[str, Any], what: str, stored: Shapes | None) -> nn.Module:
    """`create_model` as the spec asks, refusing first a model too large to be real, or
    larger than the weights `stored` in the file."""
    name, kwargs = source["name"], source["kwargs"]
    try:  # on the meta device nothing is allocated; some user constructors need real tensors
        with module_budget(what), torch.device("meta"):
            size = sum(t.numel() for t in create_model(name, **kwargs).state_dict().values())
    except ModelFileError:
        raise
    except Exception:  # noqa: BLE001 - the real build below reports what is wrong
        size = 0
    check_elements(size, f"{what} ({name} with kwargs {kwargs})"[:300], stored)
    return file_step(what, f"build its source model {name!r}", create_model, name, **kwargs)


def decisions_of(
    spec: dict[str, Any], gated: GatedModel, what: str = "the file", field: str | None = None
) -> dict[str, bool | tuple[bool, ...]]:
    """A slim spec's ``decisions`` (one for every gate) or a gated spec's pinned ``fixed``
    ones (or its `field`, such as ``cut``), checked against the gates of `gated`
    (`rebuild_gated(spec)`)."""
    field = field or ("decisions" if spec["kind"] == "slim" else "fixed")
    given, gates = spec.get(field, {}), gated.gates
    unknown = sorted(set(given) - set(gates))
    missing = sorted(set(gates) - set(given)) if field == "decisions" else []
    if unknown or missing:
        raise ModelFileError(
            f"{what} has an invalid model spec: {field} "
            + (f"names gates the model does not have: {unknown}; " if unknown else "")
            + (f"lacks gates: {missing}; " if missing else "")
            + f"its gates are {list(gates)}"
        )
    out = {}
    for name, d in given.items():
        if isinstance(gates[name], LayerGate) and type(d) is not bool:
            raise ModelFileError(
                f"{what} has an invalid model spec: {field}.{name} must be true or false "
                f"(a layer gate), got {d!r:.80}"
            )
        out[name] = file_step(what, f"read {field}.{name}", normalize_decision, gates[name], d)
    return out


def load(
    path: str | os.PathLike, model: nn.Module | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild a model saved by `save`, without unpickling anything or downloading.

    The spec is validated (`consensus_gates.saving.spec`), then the architecture is replayed from
    it: `create_model` (or the `model` you pass, an instance of the original architecture,
    for models outside the registry), then `insert_gates` and `materialize` as recorded.
    Then the weights are loaded strictly.
    """
    spec = read_spec(path)
    model = rebuild(spec, model, what=str(path), stored=stored_shapes([path]))
    try:
        load_model(model, str(path), strict=True)
    except (RuntimeError, SafetensorError) as e:
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ModelFileError(
            f"the weights in {path} do not match the rebuilt model ({detail[:800]}). If you "
            "passed model=..., it must be the architecture the file was saved from."
        ) from e
    return model.to(device).eval()


def export(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...] | Mapping[str, Tensor],
    path: str | os.PathLike,
    dynamic_batch: bool = True,
) -> Any:
    """Write `model` (usually a slim model) for deployment; the format follows the suffix.

    - ``.pt2``: `torch.export`. Load it anywhere with plain torch:
      ``torch.export.load(path).module()``; consensus_gates is not needed. Returns the
      ``ExportedProgram``.
    - ``.onnx``: ONNX at opset `onnx_files.OPSET`, weights inside the file, for onnxruntime
      (``pip install "consensus-gates[onnx]"``); `OnnxRuntimeModel` runs it like a module.
      The spatial sizes of image inputs are dynamic too, where the model allows. Returns the
      ``torch.onnx.ONNXProgram``.
    - ``.aoti.pt2``: an AOTInductor package, the program compiled ahead of time to native
      code for this machine's CPU (or the model's GPU); it needs a C++ compiler and takes
      tens of seconds. Run it with ``torch._inductor.aoti_load_package(path)``. Returns the
      ``ExportedProgram`` it compiled.

    The batch dimension is dynamic unless `dynamic_batch` is False or the model cannot
    support it (then a warning says so). The model is exported in eval mode.

    A Hugging Face model takes the inputs `insert_gates` took (a dict, or its main input).
    What is exported is its forward without the KV cache, on those tensors in that order,
    returning the main output (logits, or the task head's); batch and sequence length are
    dynamic. `generate()` and the cache stay with the torch model.
    """
    model = unwrap(model)
    name = Path(path).name
    if not name.endswith((".pt2", ".onnx")):
        raise ValueError(
            f"export writes .pt2 (torch.export), .onnx or .aoti.pt2 (AOTInductor) files, "
            f"got {str(path)!r}"
        )
    shapes, tokens = None, None
    if is_transformer(model):
        call, inputs, shapes = export_call(model, example_inputs)
        tokens = TokenProgram.describe(model, call.names)
        model, shapes = call, shapes if dynamic_batch else None
    else:
        inputs = as_input_tuple(example_inputs)
    if name.endswith(".onnx"):
        from .onnx_files import export_onnx

        with eval_mode(model):
            return export_onnx(model, inputs, path, dynamic=dynamic_batch, shapes=shapes,
                               tokens=tokens)  # fmt: skip
    if name.endswith(AOT_SUFFIX):
        require_compiler()  # before the export, which takes a while too
    program = export_program(model, inputs, dynamic_batch, shapes)
    if name.endswith(AOT_SUFFIX):
        compile_package(program, path)
    else:
        extra = {} if tokens is None else {TOKENS_FILE: tokens}
        with atomic_path(path) as tmp:
            torch.export.save(program, str(tmp), extra_files=extra)
    return program


def export_program(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    dynamic_batch: bool = True,
    shapes: Any = None,
) -> torch.export.ExportedProgram:
    """`torch.export` of `model` in eval mode, with a dynamic batch where it can (or the
    dynamic `shapes` given)."""
    with eval_mode(model):
        if dynamic_batch:
            shapes = shapes or tuple({0: torch.export.Dim.AUTO} for _ in inputs)
            try:
                return torch.export.export(model, inputs, dynamic_shapes=shapes)
            except Exception as e:  # noqa: BLE001 - fall back to a static batch
                warnings.warn(
                    f"export with dynamic shapes failed ({e}); using static shapes", stacklevel=3
                )
        return torch.export.export(model, inputs)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    set_training(model, False)
    try:
        yield
    finally:
        set_training(model, was_training)

"""Open a `.pt2` someone hands us without running their code.

`torch.export.load` is not safe on an untrusted file: it unpickles the entries the
archive marks ``use_pickle`` (weights, constants, custom objects, and example inputs that
`weights_only` refuses), loads AOTInductor's compiled libraries, evaluates the graph's
symbolic shapes with `sympy.sympify` (Python's `eval`), and turns the program's guards and
attribute names into Python source that it executes. `check_archive` reads the zip and its
JSON first and refuses all of that; what it lets through is tensors as raw bytes and a graph
of torch operators, which is what `torch.export.save` writes for our slim models.
"""

from __future__ import annotations

import ast
import io
import json
import math
import os
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.utils._sympy.functions as sympy_functions

from ..errors import ModelFileError

_SAFE_ENTRIES = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt|extra/[^/]+"
    r"|data/weights/(model_weights_config\.json|weight_\d+)"
    r"|data/constants/(model_constants_config\.json|tensor_\d+)"
)
AOT_REFUSAL = (
    "refusing to load {path}: it is an AOTInductor package, compiled native code that loading "
    "would run. To time that form, pass the .pt2 program it was compiled from with --aot "
    "(`cgates bench slim.pt2 --aot` compiles it in the timing process); to deploy it, load "
    "it with torch._inductor.aoti_load_package where you trust the file"
)
_UNSAFE_ENTRIES = {
    "data/constants/custom_obj_": "a pickled custom object",
    "data/constants/opaque_obj_": "a pickled Python object",
    "data/weights/model.pt": "pickled weights (the legacy weights file)",
    "data/constants/model.pt": "pickled constants (the legacy constants file)",
}
_CONFIGS = {
    "data/weights/model_weights_config.json": "data/weights/",
    "data/constants/model_constants_config.json": "data/constants/",
}
TOKENS_FILE = "consensus_gates_tokens.json"  # `TokenProgram.describe`, in extra/
SAFE_NOTE = (
    "files written by consensus_gates.export() or `cgates slim` contain no pickles "
    "and pass this check; re-export the model with them"
)

_NAME = re.compile(r"[\w.]*", re.ASCII)  # a module path or node name: no quotes, no code
_NAME_KEYS = {"name", "target", "fqn", "parameter_name", "buffer_name", "tensor_constant_name"}
_SYMBOL = re.compile(r"[a-z]+[0-9]{1,6}", re.ASCII)
_LITERAL = re.compile(r"[\w.+\-]*", re.ASCII)  # sympy's Symbol('s0') and Float('1.5') args
_UNQUOTED = re.compile(r"[^'\"\\\x00-\x1f]*")
_SYNTAX = (
    ast.Expression, ast.Call, ast.keyword, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare,
    ast.Subscript, ast.Tuple, ast.Load, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv,
    ast.Mod, ast.USub, ast.UAdd, ast.Not, ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt,
    ast.LtE, ast.Gt, ast.GtE,
)  # fmt: skip
# What torch's serializer writes (sympy.srepr of shapes) may name: sympy's core and torch's
# sympy functions.
_SYMPY_CORE = (
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Max", "Min", "Mod", "Abs",
    "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality",
    "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not",
    "Piecewise", "ExprCondPair", "true", "false", "oo", "zoo", "nan", "Half", "One", "Zero",
    "NegativeOne", "Infinity", "NegativeInfinity", "NaN", "Pow",
)  # fmt: skip
_SYMPY_NAMES = frozenset(_SYMPY_CORE).union(
    n for n, v in vars(sympy_functions).items() if isinstance(v, type)
)
# ... and what the guard code torch executes may name.
_GUARD_NAMES = frozenset(
    {"L", "math", "inf", "IsNonOverlappingAndDenseIndicator", "cast_symbool_to_symint_guardless"}
)
_GUARD_ATTRIBUTES = frozenset({"size", "stride", "storage_offset", "isnan", "inf"})


def _refuse(path: str | os.PathLike, found: str, why: str = "") -> ModelFileError:
    why = f", {why}" if why else ""
    return ModelFileError(f"refusing to load {path}: it holds {found}{why}; {SAFE_NOTE}")


def check_archive(path: str | os.PathLike) -> None:
    """Raise ModelFileError unless `path` is a torch.export archive that loads as tensors and
    a graph of torch operators, without unpickling, native code or Python source from it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            _check_entries(path, archive)
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        raise ModelFileError(
            f"{path} is not a readable .pt2 archive (a zip file written by torch.export.save): "
            f"{e}; it may be truncated or corrupt"
        ) from e


def token_metadata(path: str | os.PathLike) -> str | None:
    """What `consensus_gates.export` recorded in a checked archive of a language model's
    inputs (`TokenProgram.read`), or None."""
    with zipfile.ZipFile(path) as archive:
        info = next((i for i in archive.infolist()
                     if i.filename.endswith(f"/extra/{TOKENS_FILE}")), None)  # fmt: skip
        if info is None:
            return None
        if info.file_size > 64 * 1024:
            raise ModelFileError(f"{path}: its {TOKENS_FILE} entry is too large to be ours")
        return archive.read(info).decode("utf-8", errors="replace")


def load_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """`torch.export.load`, after `check_archive`; any failure is a ModelFileError."""
    check_archive(path)
    try:
        return torch.export.load(str(path))
    except Exception as e:  # torch raises many kinds on a damaged or inconsistent archive
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelFileError(
            f"{path} is not a loadable torch.export program ({type(e).__name__}: {reason[:300]})"
        ) from e


def _check_entries(path: Path, archive: zipfile.ZipFile) -> None:
    infos = archive.infolist()
    roots = {info.filename.split("/", 1)[0] for info in infos}
    if len(roots) != 1 or any("/" not in info.filename for info in infos):
        raise ModelFileError(
            f"{path} is a zip file but not a torch.export archive (its entries are not all in "
            "one folder); it may be of an older torch's format, or of another kind"
        )
    root = roots.pop() + "/"
    entries = {}
    for info in infos:
        name = info.filename.removeprefix(root)
        if name.startswith("data/aotinductor/"):
            raise ModelFileError(AOT_REFUSAL.format(path=path))
        if not _SAFE_ENTRIES.fullmatch(name):
            why = next((w for p, w in _UNSAFE_ENTRIES.items() if name.startswith(p)), None)
            raise _refuse(path, why or f"an entry torch.export.save does not write ({name!r})")
        if name in entries:  # torch's reader might take the other copy than the one checked
            raise ModelFileError(f"{path}: entry {name!r} appears twice in the archive")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ModelFileError(
                f"{path}: entry {name!r} is compressed; torch.export.save stores entries "
                "uncompressed, so this archive was not written by it"
            )
        entries[name] = info
    if "models/model.json" not in entries:
        raise ModelFileError(f"{path} holds no program (models/model.json is missing)")
    for config, folder in _CONFIGS.items():
        if config in entries:
            _check_payloads(path, _json(path, archive, entries[config]), folder, entries)
    if "data/sample_inputs/model.pt" in entries:
        _check_sample_inputs(path, archive.read(entries["data/sample_inputs/model.pt"]))
    _check_program(path, _json(path, archive, entries["models/model.json"]))


def _json(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    try:
        return json.loads(archive.read(info))
    except (ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else e
        raise ModelFileError(f"{path}: {info.filename} is not valid JSON ({reason})") from e


def _check_payloads(path: Path, config: Any, folder: str, entries: dict) -> None:
    """Every weight and constant is raw bytes in an entry of the archive, never a pickle."""
    payloads = config.get("config") if isinstance(config, dict) else None
    if not isinstance(payloads, dict):
        raise ModelFileError(f"{path}: {folder} config has no 'config' mapping")
    for fqn, meta in payloads.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _refuse(
                path,
                f"a pickled tensor ({fqn!r} in {folder}, marked use_pickle)",
                "and unpickling it would run whatever code it names",
            )
        _check_name(path, fqn)
        entry = folder + str(meta.get("path_name"))
        if entry not in entries:
            raise ModelFileError(f"{path}: {fqn!r} in {folder} names no entry of the archive")
        # for an empty record torch allocates zeros of the declared shape
        if entries[entry].file_size == 0 and _numel(meta) != 0:
            raise ModelFileError(f"{path}: {fqn!r} declares a shape its data do not hold")


def _numel(meta: dict) -> int | None:
    tensor = meta.get("tensor_meta")
    sizes = tensor.get("sizes") if isinstance(tensor, dict) else None
    if not isinstance(sizes, list):
        return None
    ints = [s.get("as_int") if isinstance(s, dict) else None for s in sizes]
    return math.prod(ints) if all(type(s) is int for s in ints) else None


def _check_sample_inputs(path: Path, data: bytes) -> None:
    """torch reads them with weights_only=True and, if that fails, unpickles them freely."""
    try:
        with warnings.catch_warnings():  # about the pickle protocol of what is refused anyway
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the restricted unpickler refuses
        raise _refuse(
            path,
            f"example inputs that are not plain tensors ({type(e).__name__})",
            "and torch.export.load would unpickle them without restriction",
        ) from e


def _check_program(path: Path, program: Any) -> None:
    ranges, guards = (program.get(k) if isinstance(program, dict) else None
                      for k in ("range_constraints", "guards_code"))  # fmt: skip
    if not isinstance(ranges, dict) or not isinstance(guards, list):
        raise ModelFileError(f"{path}: models/model.json is not a torch.export program")
    for key in ranges:
        if not _SYMBOL.fullmatch(key):  # torch counts up to the number in an unbacked name
            raise ModelFileError(f"{path}: bad symbol name {key[:50]!r} in range_constraints")
    for guard in guards:
        if not _safe_expression(guard, _GUARD_NAMES, _GUARD_ATTRIBUTES):
            raise _refuse(path, f"guard code torch would execute: {str(guard)[:200]!r}")
    for key, value in _strings(program):
        if key == "expr_str" and not _safe_expression(value, _SYMPY_NAMES, frozenset()):
            raise _refuse(path, f"a shape expression that sympy would eval: {value[:200]!r}")
        if key in _NAME_KEYS:
            _check_name(path, value)
        if key == "as_string" and not _UNQUOTED.fullmatch(value):
            raise _refuse(path, f"a string argument with quotes: {value[:200]!r}")


def _check_name(path: Path, name: str) -> None:
    if not _NAME.fullmatch(name):
        raise _refuse(path, f"a name torch would write into Python source: {name[:200]!r}")


def _strings(tree: Any) -> Iterator[tuple[str | None, str]]:
    """(key, value) of every string in a JSON tree, iteratively (no recursion limit)."""
    stack: list[tuple[str | None, Any]] = [(None, tree)]
    while stack:
        key, node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.items())
        elif isinstance(node, list):
            stack.extend((key, v) for v in node)
        elif isinstance(node, str):
            yield key, node


def _safe_expression(text: Any, names: frozenset[str], attributes: frozenset[str]) -> bool:
    """Whether `text` is an expression of only arithmetic, comparisons and calls of the
    allowed names: nothing that imports, reads attributes or builds code."""
    if not isinstance(text, str) or len(text) > 10_000:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            ok = node.id in names or bool(_SYMBOL.fullmatch(node.id))
        elif isinstance(node, ast.Attribute):
            ok = node.attr in attributes
        elif isinstance(node, ast.Constant):
            v = node.value
            ok = (isinstance(v, str) and bool(_LITERAL.fullmatch(v))) or (
                isinstance(v, (int, float)) and abs(v) < 2**63
            )
        else:
            ok = isinstance(node, _SYNTAX) and (not _calls(node, "Pow") or _small_power(node))
        if not ok:
            return False
    return True


def _calls(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name


def _small_power(node: ast.Call) -> bool:
    """``Pow(Symbol(...), Integer(k))`` with a small k (a mask's n², say): any other power
    could make sympy build a number of unbounded size."""
    if len(node.args) != 2 or node.keywords:
        return False
    base, exponent = node.args
    return (
        _calls(base, "Symbol")
        and _calls(exponent, "Integer")
        and len(exponent.args) == 1
        and isinstance(exponent.args[0], ast.Constant)
        and type(exponent.args[0].value) is int
        and abs(exponent.args[0].value) <= 8
    )

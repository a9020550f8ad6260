"""A torch.fx Graph as plain JSON data, so that a model file can hold one without pickle or code."""

from __future__ import annotations

import functools
import inspect
import keyword
import math
import operator
import re
import types
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError

FORMAT = "consensus_gates.fx_graph"
VERSION = 1
MAX_NODES = 2**16  # one graph's; a transformer layer has a few hundred
MAX_DEPTH = 16  # values nested in args (tuples of slices nest 3 deep)
_OPS = ("placeholder", "get_attr", "call_module", "call_function", "call_method", "output")
_FIELDS = {"name", "op", "target", "args", "kwargs"}
# identifiers, or indices into a ModuleList ("layers.0.mlp"); no dunder segment
_PATH = re.compile(r"(?!__)[A-Za-z_]\w*(\.((?!__)[A-Za-z_]\w*|\d+))*", re.ASCII)
# Never allowed, by name, in any namespace: these call a Python callable they are handed, or
# hand out a storage, whose .type("a.b") imports a module by name.
_DENIED = frozenset(
    {"call", "apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook"}
    | {"lobpcg", "triplet_margin_with_distance_loss", "storage", "untyped_storage"}
)
# getattr may read a tensor's data attributes (x.shape, x.dtype), never a bound method.
_TENSOR_DATA = frozenset(
    n
    for n in dir(torch.Tensor)
    if n[0] != "_" and n != "grad_fn" and not callable(getattr(torch.Tensor, n))
)
# Where call_function targets get their names, in this order (see `_functions`).
_NAMESPACES = {
    "torch": torch,
    "torch.nn.functional": F,
    "torch.linalg": torch.linalg,
    "torch.fft": torch.fft,
    "torch.special": torch.special,
    "torch.Tensor": torch.Tensor,
}


# Tensor factories layers call (Swin's window masks): they only make tensors.
_FACTORIES = ("arange", "zeros", "ones", "full", "empty", "eye", "linspace", "tensor", "as_tensor")


# Functions other steps add by `register_function` (a cache update of transformers' layers).
_REGISTERED: dict[str, Any] = {}


def register_function(name: str, fn: Any) -> None:
    """Let saved graphs call `fn`, under the qualified `name`: for a function of ours that
    takes only graph values and checks them, never one that runs what it is handed."""
    if _REGISTERED.get(name, fn) is not fn:
        raise ValueError(f"{name} is registered already, for another function")
    _REGISTERED[name] = fn
    _functions.cache_clear()
    _names.cache_clear()


class _Bad(Exception):
    """One problem in one value; the callers say which node, and which file."""


@functools.cache
def _functions() -> dict[str, Any]:
    """Qualified name -> function, for every call_function target a saved graph may name."""
    table: dict[str, Any] = {}
    for prefix, ns in (("operator", operator), ("math", math)):
        for name, fn in vars(ns).items():
            if isinstance(fn, types.BuiltinFunctionType) and name[0] != "_" and name not in _DENIED:
                table[f"{prefix}.{name}"] = fn
    for name in _FACTORIES:  # not overridable (no tensor argument), and safe
        table[f"torch.{name}"] = getattr(torch, name)
    table.update(_REGISTERED)
    table["builtins.getattr"] = getattr
    table["torch.fx._symbolic_trace._assert_is_none"] = fx._symbolic_trace._assert_is_none
    overridable = torch.overrides.get_overridable_functions().values()
    allowed = {id(fn) for fns in overridable for fn in fns}
    named: set[int] = set()
    # The first namespace that has a function names it: torch.relu and F.relu differ, and
    # F.conv2d is torch.conv2d, saved under that name.
    for prefix, ns in _NAMESPACES.items():
        members = vars(ns) if ns is not torch.Tensor else {a: getattr(ns, a) for a in dir(ns)}
        for name in sorted(n for n in members if n[0] != "_" and n not in _DENIED):
            if id(members[name]) in allowed and id(members[name]) not in named:
                table[f"{prefix}.{name}"] = members[name]
                named.add(id(members[name]))
    return table


@functools.cache
def _names() -> dict[int, str]:
    return {id(fn): name for name, fn in _functions().items()}


_KINDS = {"dtype": torch.dtype, "memory_format": torch.memory_format, "layout": torch.layout}


@functools.cache
def _constants() -> dict[str, dict[str, Any]]:
    """For each kind, "torch.float32" -> torch.float32 and so on, as torch names them."""
    return {k: {str(v): v for v in vars(torch).values() if type(v) is t} for k, t in _KINDS.items()}


def _identifier(s: Any) -> bool:
    return type(s) is str and s.isidentifier() and not keyword.iskeyword(s)


def _encode(v: Any) -> Any:
    if v is None or type(v) in (bool, int, str):
        return v
    if type(v) is float:
        return v if math.isfinite(v) else {"float": repr(v)}  # JSON has no inf or nan
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if isinstance(v, list):  # fx's immutable_list too
        return [_encode(x) for x in v]
    if type(v) in (tuple, torch.Size):  # fx itself keeps a Size in args as a tuple
        return {"tuple": [_encode(x) for x in v]}
    if isinstance(v, dict) and all(type(k) is str for k in v):
        return {"dict": {k: _encode(x) for k, x in v.items()}}
    if type(v) is slice:
        return {"slice": [_encode(v.start), _encode(v.stop), _encode(v.step)]}
    if v is Ellipsis:
        return {"ellipsis": None}
    if type(v) is torch.device:
        return {"device": str(v)}
    for kind, t in _KINDS.items():
        if type(v) is t and _constants()[kind].get(str(v)) is v:
            return {kind: str(v)}
    raise _Bad(f"cannot store the {type(v).__name__} value {v!r:.80}")


def _decode(v: Any, nodes: dict[str, fx.Node]) -> Any:
    if v is None or type(v) in (bool, int, float, str):
        return v
    if type(v) is list:
        return [_decode(x, nodes) for x in v]
    if type(v) is not dict or len(v) != 1:
        raise _Bad(f"unreadable value {v!r:.80}")
    ((kind, x),) = v.items()
    if kind == "node" and type(x) is str and x in nodes:
        return nodes[x]
    if kind == "node":
        raise _Bad(f"reference to {x!r:.80}, which is not an earlier node")
    if kind == "float" and x in ("inf", "-inf", "nan"):
        return float(x)
    if kind == "tuple" and type(x) is list:
        return tuple(_decode(i, nodes) for i in x)
    if kind == "slice" and type(x) is list and len(x) == 3:
        return slice(*(_decode(i, nodes) for i in x))
    if kind == "dict" and type(x) is dict and all(type(k) is str for k in x):
        return {k: _decode(i, nodes) for k, i in x.items()}
    if kind == "ellipsis" and x is None:
        return ...
    if kind in _constants() and type(x) is str and x in _constants()[kind]:
        return _constants()[kind][x]
    if kind == "device" and type(x) is str:
        try:
            return torch.device(x)
        except (RuntimeError, TypeError, ValueError):
            pass
    raise _Bad(f"unreadable value {v!r:.80}")


def _too_deep(value: Any, limit: int) -> bool:
    """Whether lists and objects nest more than `limit` deep in a JSON value (found
    without recursion)."""
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return True
        children = v.values() if type(v) is dict else v if type(v) is list else ()
        stack.extend((x, d + 1) for x in children)
    return False


def _check_arity(target: Any, args: tuple, kwargs: dict) -> None:
    """The arguments bind to the function's signature, where Python can read one (operator
    and math; torch's builtins have none): fx's code for ``a + b`` indexes both."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        raise _Bad(f"{_names().get(id(target), target)} cannot take these arguments: {e}") from None


def _check(op: Any, target: Any, args: tuple, kwargs: dict) -> None:
    """Refuse what could run anything other than the allowed functions and tensor methods,
    and any node that fx could not write as code."""
    if op not in _OPS:
        raise _Bad(f"unknown op {op!r:.40}; expected one of {', '.join(_OPS)}")
    if not all(_identifier(k) for k in kwargs):  # keyword names become code
        raise _Bad(f"keyword argument names {list(kwargs)!r:.80} are not all identifiers")
    star = type(target) is str and re.fullmatch(r"\*{0,2}(.*)", target)  # "*args", "**kwargs"
    if op == "placeholder" and not (star and _identifier(star[1]) and len(args) <= 1):
        raise _Bad(f"placeholder target {target!r:.80} is not an argument name")
    if op in ("get_attr", "call_module") and not (type(target) is str and _PATH.fullmatch(target)):
        raise _Bad(f"{op} target {target!r:.80} is not a dotted attribute path")
    public = _identifier(target) and target[0] != "_" and target not in _DENIED
    if op == "call_method" and not (public and hasattr(torch.Tensor, target)):
        raise _Bad(f"call_method target {target!r:.80} is not an allowed torch.Tensor method")
    if op == "call_method" and not args:
        raise _Bad(f"call_method {target!r} has no tensor to call it on (no arguments)")
    if op == "call_function" and id(target) in _names():
        _check_arity(target, args, kwargs)
    data_attr = len(args) == 2 and type(args[1]) is str and args[1] in _TENSOR_DATA
    if op == "call_function" and target is getattr and not (data_attr and not kwargs):
        raise _Bad(f"getattr may read only a tensor's data attributes, not {args[1:]!r:.80}")
    if op == "output" and not (target == "output" and len(args) == 1 and not kwargs):
        raise _Bad("the output node must have target 'output' and one argument")


def graph_to_json(graph: fx.Graph) -> dict:
    """The graph as a JSON-ready dict; `ValueError` names the node and value it cannot store."""
    records = []
    for node in graph.nodes:
        try:
            _check(node.op, node.target, node.args, node.kwargs)
            target = node.target
            if node.op == "call_function":
                target = _names().get(id(node.target))
                if target is None:
                    module = getattr(node.target, "__module__", None)
                    name = getattr(node.target, "__qualname__", node.target)
                    raise _Bad(f"call_function target {module}.{name} is not allowed")
            args = [_encode(a) for a in node.args]
            kwargs = {k: _encode(v) for k, v in node.kwargs.items()}
        except _Bad as e:
            raise ValueError(f"cannot save node {node.name!r} of the graph: {e}") from None
        records.append(
            {"name": node.name, "op": node.op, "target": target, "args": args, "kwargs": kwargs}
        )
    return {"format": FORMAT, "version": VERSION, "nodes": records}


def graph_from_json(data: dict, what: str = "the graph", root: nn.Module | None = None) -> fx.Graph:
    """Rebuild a graph `graph_to_json` wrote, calling and importing nothing the file names.

    Raises `ModelFileError` naming ``what`` for anything malformed or not allowed. Pass the
    ``root`` the graph will run on to check that each get_attr names one of its tensors or
    modules, and each call_module one of its modules, not some other attribute (a method).
    """
    try:
        graph = _build(data)
        for node in graph.nodes if root is not None else ():
            if node.op in ("get_attr", "call_module"):
                _check_in_root(node, root)
        return graph
    except _Bad as e:
        raise ModelFileError(f"{what} cannot be loaded: {e}") from None
    except RecursionError:
        raise ModelFileError(f"{what} cannot be loaded: values nested too deeply") from None


def _check_in_root(node: fx.Node, root: nn.Module) -> None:
    value: Any = root
    for name in node.target.split("."):
        value = getattr(value, name, None) if isinstance(value, nn.Module) else None
    kinds = nn.Module if node.op == "call_module" else (nn.Module, torch.Tensor)
    if not isinstance(value, kinds):
        want = "a submodule" if node.op == "call_module" else "a tensor or submodule"
        raise _Bad(f"node {node.name!r}: {node.op} {node.target!r} is not {want} of the model")


def _build(data: Any) -> fx.Graph:
    if type(data) is not dict or data.get("format") != FORMAT:
        raise _Bad(f"it is not a saved torch.fx graph (no 'format': {FORMAT!r})")
    if data.get("version") != VERSION:
        raise _Bad(f"format version {data.get('version')!r:.40} is not {VERSION}, the one known")
    records = data.get("nodes")
    if type(records) is not list or not 0 < len(records) <= MAX_NODES:
        raise _Bad(f"'nodes' is not a list of 1 to {MAX_NODES:,} nodes")
    graph, nodes, params = fx.Graph(), {}, _Parameters()
    for i, record in enumerate(records):
        where = f"node {i}"
        try:
            if type(record) is not dict or set(record) != _FIELDS:
                raise _Bad(f"does not have exactly the fields {', '.join(sorted(_FIELDS))}")
            name, op, target = record["name"], record["op"], record["target"]
            where = f"node {i} ({name!r:.40})"
            if not _identifier(name) or name == "self":
                raise _Bad(f"name {name!r:.40} is not an identifier other than 'self'")
            if name in nodes:
                raise _Bad(f"name {name!r} is not unique")
            if (op == "output") != (i == len(records) - 1):
                raise _Bad("the last node, and only it, must be the output")
            if type(record["args"]) is not list or type(record["kwargs"]) is not dict:
                raise _Bad("args is not a list, or kwargs not an object")
            if _too_deep(record["args"], MAX_DEPTH) or _too_deep(record["kwargs"], MAX_DEPTH):
                raise _Bad(f"its arguments nest more than {MAX_DEPTH} deep")
            args = tuple(_decode(a, nodes) for a in record["args"])
            kwargs = {k: _decode(v, nodes) for k, v in record["kwargs"].items()}
            if op == "call_function":
                if type(target) is not str or target not in _functions():
                    raise _Bad(f"call_function target {target!r:.80} is not allowed")
                target = _functions()[target]
            _check(op, target, args, kwargs)
            if op == "placeholder":
                params.add(target, bool(args))
        except _Bad as e:
            raise _Bad(f"{where}: {e}") from None
        nodes[name] = graph.create_node(op, target, args, kwargs, name=name)
    return graph


class _Parameters:
    """The placeholders in order, as the parameters of the forward fx writes for them: unique,
    never ``self``, and in an order Python accepts (no plain one after a default until a
    ``*args``; ``**kwargs`` last)."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.default = self.star = self.double_star = False

    def add(self, target: str, has_default: bool) -> None:
        name = target.lstrip("*")
        if name in self.names or name == "self":
            raise _Bad(f"placeholder {name!r} is {'self' if name == 'self' else 'a duplicate'}")
        if self.double_star:
            raise _Bad(f"placeholder {target!r} comes after a **kwargs placeholder")
        if target.startswith("**"):
            self.double_star = True
        elif target.startswith("*"):
            if self.star:
                raise _Bad(f"a second *args placeholder {target!r}")
            self.star = True
        elif has_default:
            self.default = True
        elif self.default and not self.star:
            raise _Bad(f"placeholder {target!r} without a default follows one with a default")
        self.names.add(name)

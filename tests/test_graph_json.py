"""graph_json: a torch.fx graph saved as JSON data and rebuilt without tracing."""

from __future__ import annotations

import copy
import functools
import json
import math
import operator
import os
import subprocess
import sys

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from consensus_gates.errors import ModelFileError
from consensus_gates.fx.graph_json import graph_from_json, graph_to_json

pytestmark = pytest.mark.usefixtures("one_thread")


class ResidualMLP(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * d, d)
        self.scale = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x):
        h = self.fc2(self.act(self.fc1(self.norm(x))))
        return x + F.gelu(h, approximate="tanh") * self.scale


class Attention(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape[0], x.size(1), x.shape[-1]
        qkv = self.qkv(x)
        q, k, v = (qkv[..., i * d : (i + 1) * d] for i in range(3))  # slices of nodes
        q, k, v = (y.view(b, t, self.heads, -1).transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(b, t, d)
        return torch.cat([out, x[:, 1:].mean(dim=1, keepdim=True).expand(b, t, d)], dim=-1)


class Constants(nn.Module):
    def forward(self, x, scale=2.0):
        y = x.to(torch.float64) * scale
        y = y.to(dtype=torch.float32, memory_format=torch.contiguous_format)[:, 1:]
        y = y.clamp(min=float("-inf"), max=float("inf"))
        y = y + torch.nan_to_num(y * float("nan"), nan=0.25)
        y = y.reshape(torch.Size([2, -1])).permute((1, 0)).permute([1, 0])
        z = torch.zeros_like(
            x, dtype=torch.float32, device=torch.device("cpu"), layout=torch.strided
        )
        z = z + torch.arange(3.0)  # a tensor constant, read by get_attr
        s = torch.stack((y, y)).sum(dim=(0,), keepdim=True)
        return {"y": y, "pair": (s, z), "list": [y[..., None], scale * 2]}


class OptionalMask(nn.Module):
    def forward(self, x, mask=None):
        if mask is not None:
            x = x + mask
        return torch.tanh(x).rsqrt()


def _round_trip(module: nn.Module, *inputs, **trace_kwargs):
    module.eval()
    traced = fx.symbolic_trace(module, **trace_kwargs)
    data = json.loads(json.dumps(graph_to_json(traced.graph), allow_nan=False))  # real JSON
    rebuilt = fx.GraphModule(module, graph_from_json(data, root=module))
    for node in traced.graph.nodes:  # annotations are not kept
        node.type = None
    traced.recompile()
    assert rebuilt.code == traced.code
    pairs = zip(rebuilt.graph.nodes, traced.graph.nodes, strict=True)
    for new, old in pairs:
        assert (new.op, new.name, new.target) == (old.op, old.name, old.target)
        assert (repr(new.args), repr(new.kwargs)) == (repr(old.args), repr(old.kwargs))
    expected, got = traced(*inputs), rebuilt(*inputs)
    flat_expected, spec = torch.utils._pytree.tree_flatten(expected)
    flat_got, got_spec = torch.utils._pytree.tree_flatten(got)
    assert spec == got_spec
    for a, b in zip(flat_expected, flat_got, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    return rebuilt


@pytest.mark.parametrize(
    "module, shape",
    [(ResidualMLP(), (2, 3, 8)), (Attention(), (2, 4, 8)), (Constants(), (2, 3))],
    ids=["residual-mlp", "attention", "constants"],
)
def test_round_trip_of_traced_modules(module, shape):
    _round_trip(module, torch.randn(shape))


def test_round_trip_keeps_placeholder_defaults():
    rebuilt = _round_trip(Constants(), torch.randn(2, 3))
    assert [n.args for n in rebuilt.graph.nodes if n.op == "placeholder"] == [(), (2.0,)]
    assert "def forward(self, x, scale = 2.0):" in rebuilt.code
    x = torch.randn(2, 3)
    assert torch.equal(rebuilt(x, 3.0)["y"], Constants()(x, 3.0)["y"])


def test_round_trip_of_a_concrete_none_argument():
    rebuilt = _round_trip(OptionalMask(), torch.rand(2, 3) + 0.1, concrete_args={"mask": None})
    assert "_assert_is_none" in rebuilt.code
    with pytest.raises(AssertionError, match="specialized"):
        rebuilt(torch.rand(2, 3), torch.ones(2, 3))


def test_round_trip_of_a_timm_transformer_block():
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    _round_trip(vision_transformer.Block(16, 2, qk_norm=True), torch.randn(2, 5, 16))


def _kinds(v):
    """The value with each leaf's type beside it, so that 1 and 1.0, (1,) and [1] differ."""
    if isinstance(v, (list, tuple)):  # fx stores lists as its immutable_list
        return list if isinstance(v, list) else type(v), [_kinds(x) for x in v]
    if isinstance(v, dict):
        return dict, {k: _kinds(x) for k, x in v.items()}
    if isinstance(v, slice):
        return slice, _kinds((v.start, v.stop, v.step))
    return type(v), str(v)


def test_every_value_kind_round_trips_exactly():
    graph = fx.Graph()
    x = graph.placeholder("x")
    values = (
        *(None, True, 3, -2.5, 1.0, float("inf"), float("-inf"), float("nan"), "s", x),
        (1, [2, (3,)], []),
        {"a": [1], "b": (2.0,), "c": {"d": x}},
        slice(1, None, -1),
        slice(x, None, None),
        ...,
        torch.float16,
        torch.bfloat16,
        torch.device("cpu"),
        torch.device("cuda", 1),
        torch.channels_last,
        torch.sparse_coo,
        torch.Size([2, 3]),
    )
    kwargs = {"alpha": (x, 2), "out": None}
    original = graph.create_node("call_function", torch.add, values, kwargs, name="my_sum")
    graph.output(original)
    rebuilt = graph_from_json(json.loads(json.dumps(graph_to_json(graph))))
    node, output = list(rebuilt.nodes)[1:]
    assert node.name == "my_sum" and output.args == (node,)
    assert _kinds(node.args) == _kinds(original.args)  # as fx keeps them: a Size as a tuple
    assert _kinds(node.args)[1][-1] == (tuple, [(int, "2"), (int, "3")])
    assert repr(node.args) == repr(original.args)  # node references resolve to the same names
    assert node.kwargs == {"alpha": (node.args[9], 2), "out": None}
    assert node.args[9].name == "x" and node.args[9].op == "placeholder"


def test_math_operator_getattr_and_methods_run_after_rebuilding():
    graph = fx.Graph()
    x = graph.placeholder("x")
    n = graph.call_function(getattr, (x, "ndim"))
    root = graph.call_function(math.sqrt, (graph.call_function(operator.add, (n, 2)),))
    y = graph.call_method("mul", (graph.call_method("sum", (x,), {"dim": -1}), root))
    graph.output((y, graph.call_function(getattr, (x, "dtype"))))
    rebuilt = fx.GraphModule(nn.Module(), graph_from_json(graph_to_json(graph)))
    x = torch.randn(2, 3)
    y, dtype = rebuilt(x)
    assert torch.equal(y, x.sum(dim=-1) * 2.0) and dtype is torch.float32


def _call(target, *args, op="call_function", **kwargs) -> fx.Graph:
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.create_node(op, target, (x, *args), kwargs, name="bad"))
    return graph


def _saved(graph: fx.Graph) -> dict:
    return json.loads(json.dumps(graph_to_json(graph)))


def _crafted(target, *args, op="call_function", kwargs=None) -> dict:
    """A saved graph with one call of `target`, written the way a hostile file would."""
    data = _saved(_call(torch.add))
    data["nodes"][1].update(op=op, target=target, args=[{"node": "x"}, *args], kwargs=kwargs or {})
    return data


DANGEROUS = {
    "torch.load": torch.load,
    "torch.save": torch.save,
    "os.system": os.system,
    "builtins.eval": eval,
    "torch.hub.load": torch.hub.load,
    "subprocess.run": subprocess.run,
    "builtins.__import__": __import__,
    "operator.call": getattr(operator, "call", operator.methodcaller),
    "torch.Tensor.apply_": torch.Tensor.apply_,
    "torch.Tensor.untyped_storage": torch.Tensor.untyped_storage,
    "torch.lobpcg": torch.lobpcg,
}


@pytest.mark.parametrize("name", DANGEROUS)
def test_dangerous_functions_are_refused_at_save(name):
    with pytest.raises(ValueError, match=r"node 'bad'.*call_function target .* is not allowed"):
        graph_to_json(_call(DANGEROUS[name]))


@pytest.mark.parametrize("name", [*DANGEROUS, "importlib.import_module", "torch.nn.Module"])
def test_dangerous_functions_are_refused_at_load(name):
    with pytest.raises(
        ModelFileError,
        match=rf"^layer 3 cannot be loaded: node 1 \('bad'\): .*"
        rf"target '{name}' is not allowed",
    ):
        graph_from_json(_crafted(name), "layer 3")


def test_loading_imports_nothing_the_file_names():
    assert "antigravity" not in sys.modules
    with pytest.raises(ModelFileError, match="not allowed"):
        graph_from_json(_crafted("antigravity.fly"))
    for op in ("call_module", "get_attr"):
        graph_from_json(_crafted("antigravity.fly", op=op))  # a path, resolved by torch.fx later
    assert "antigravity" not in sys.modules


@pytest.mark.parametrize(
    "target, args",
    [
        ("__class__", []),
        ("__reduce_ex__", [2]),
        ("_is_view", []),
        ("apply_", [{"node": "x"}]),
        ("register_hook", [{"node": "x"}]),
        ("untyped_storage", []),
        ("system", ["ls"]),
        ("view(1); import os; x.view", [1]),
        (None, []),
    ],
)
def test_call_method_must_be_a_public_tensor_method(target, args):
    with pytest.raises(ModelFileError, match="not an allowed torch.Tensor method"):
        graph_from_json(_crafted(target, *args, op="call_method"))
    if isinstance(target, str):
        with pytest.raises(ValueError, match="not an allowed torch.Tensor method"):
            graph_to_json(_call(target, *args, op="call_method"))


@pytest.mark.parametrize("attr", ["__globals__", "_modules", "__class__", "view", "grad_fn", 3])
def test_getattr_reads_only_tensor_data_attributes(attr):
    with pytest.raises(ModelFileError, match="getattr may read only a tensor's data attributes"):
        graph_from_json(_crafted("builtins.getattr", attr))
    with pytest.raises(ValueError, match="getattr may read only"):
        graph_to_json(_call(getattr, attr))


def test_getattr_takes_no_default():
    graph_from_json(_crafted("builtins.getattr", "shape"))
    with pytest.raises(ModelFileError, match="getattr may read only"):
        graph_from_json(_crafted("builtins.getattr", "shape", "default"))


def test_keyword_names_must_be_identifiers():
    data = _crafted("torch.add", 1, kwargs={"alpha=__import__('os').system('ls'),out": 1})
    with pytest.raises(ModelFileError, match="keyword argument names"):
        graph_from_json(data)
    with pytest.raises(ValueError, match="keyword argument names"):
        graph_to_json(_call(torch.add, 1, **{"a b": 1}))


@pytest.mark.parametrize("op", ["get_attr", "call_module"])
@pytest.mark.parametrize("target", ["a.__class__", "__dict__", "a b", "a..b", "1.a", "", 3])
def test_attribute_paths_are_identifiers_without_dunders(op, target):
    with pytest.raises(ModelFileError, match="is not a dotted attribute path"):
        graph_from_json(_crafted(target, op=op))


@pytest.mark.parametrize("op", ["get_attr", "call_module"])
def test_attribute_paths_may_index_module_lists(op):
    graph = graph_from_json(_crafted("layer.0.norm", op=op))
    assert [n.target for n in graph.nodes if n.op == op] == ["layer.0.norm"]


def test_attribute_paths_must_name_tensors_or_modules_of_the_root():
    root = ResidualMLP()
    ok = graph_from_json(_crafted("fc1.weight", op="get_attr"), root=root)
    assert fx.GraphModule(root, ok).get_parameter("fc1.weight") is root.fc1.weight
    graph_from_json(_crafted("fc1", op="call_module"), root=root)
    refusals = [("get_attr", "fc1.forward"), ("get_attr", "training"), ("get_attr", "nope")]
    refusals += [("call_module", "fc1.weight"), ("call_module", "fc1.forward.x")]
    for op, target in refusals:
        with pytest.raises(ModelFileError, match=rf"{op} '{target}' is not a .* of the model"):
            graph_from_json(_crafted(target, op=op), "the block", root=root)


@pytest.mark.parametrize(
    "value",
    [object(), torch.ones(2), nn.Linear(1, 1), {1: 2}, lambda: 0, 1j, torch.int64.__class__],
    ids=["object", "tensor", "module", "int-key", "lambda", "complex", "type"],
)
def test_unstorable_constants_are_refused_at_save(value):
    with pytest.raises(ValueError, match=r"cannot save node 'bad' .*cannot store the \w+ value"):
        graph_to_json(_call(torch.add, value))


def _valid() -> dict:
    return _saved(_call(torch.add, 1, alpha=2))


def _set(path, value):
    def edit(data):
        *keys, last = path
        for key in keys:
            data = data[key]
        data[last] = value

    return edit


MALFORMED = {
    "not a dict": (lambda d: d.clear() or d.update(nodes=[]), "not a saved torch.fx graph"),
    "wrong format": (_set(["format"], "pickle"), "not a saved torch.fx graph"),
    "wrong version": (_set(["version"], 99), "format version 99 is not 1"),
    "no nodes": (_set(["nodes"], []), "'nodes' is not a list of 1 to 65,536 nodes"),
    "missing field": (lambda d: d["nodes"][1].pop("kwargs"), "does not have exactly the fields"),
    "extra field": (_set(["nodes", 1, "code"], "x"), "does not have exactly the fields"),
    "node not a dict": (_set(["nodes", 1], ["add"]), "does not have exactly the fields"),
    "unknown op": (_set(["nodes", 1, "op"], "call_python"), "unknown op 'call_python'"),
    "dangling reference": (_set(["nodes", 1, "args", 0], {"node": "y"}), "reference to 'y'"),
    "forward reference": (_set(["nodes", 1, "args", 0], {"node": "bad"}), "not an earlier node"),
    "duplicate name": (_set(["nodes", 1, "name"], "x"), "name 'x' is not unique"),
    "non-identifier name": (_set(["nodes", 1, "name"], "a-b"), "is not an identifier"),
    "keyword name": (_set(["nodes", 1, "name"], "class"), "is not an identifier"),
    "name not a string": (_set(["nodes", 1, "name"], 7), "is not an identifier"),
    "name a list": (_set(["nodes", 1, "name"], ["x"]), "is not an identifier"),
    "op a list": (_set(["nodes", 1, "op"], ["call_method"]), "unknown op"),
    "target a list": (_set(["nodes", 1, "target"], ["torch.add"]), "target .* is not allowed"),
    "no output": (lambda d: d["nodes"].pop(), "the last node, and only it, must be the output"),
    "output not last": (
        lambda d: d["nodes"].append(copy.deepcopy(d["nodes"][1]) | {"name": "z"}),
        "node 2 \\('output'\\): the last node",
    ),
    "output with two args": (_set(["nodes", 2, "args"], [1, 2]), "output node must have"),
    "args not a list": (_set(["nodes", 1, "args"], {"a": 1}), "args is not a list"),
    "kwargs not an object": (_set(["nodes", 1, "kwargs"], [1]), "kwargs not an object"),
    "placeholder target": (_set(["nodes", 0, "target"], "x=print()"), "not an argument name"),
    "placeholder two defaults": (_set(["nodes", 0, "args"], [1, 2]), "not an argument name"),
    "value with two keys": (_set(["nodes", 1, "args", 1], {"tuple": [], "a": 1}), "unreadable"),
    "unknown value kind": (_set(["nodes", 1, "args", 1], {"pickle": "x"}), "unreadable value"),
    "bad float": (_set(["nodes", 1, "args", 1], {"float": "1e999"}), "unreadable value"),
    "bad dtype": (_set(["nodes", 1, "args", 1], {"dtype": "torch.load"}), "unreadable value"),
    "dtype a list": (_set(["nodes", 1, "args", 1], {"dtype": ["x"]}), "unreadable value"),
    "node a list": (_set(["nodes", 1, "args", 1], {"node": ["x"]}), "not an earlier node"),
    "float a list": (_set(["nodes", 1, "args", 1], {"float": ["inf"]}), "unreadable value"),
    "bad device": (_set(["nodes", 1, "args", 1], {"device": "gpu:x"}), "unreadable value"),
    "bad slice": (_set(["nodes", 1, "args", 1], {"slice": [1]}), "unreadable value"),
    "tuple not a list": (_set(["nodes", 1, "args", 1], {"tuple": "ab"}), "unreadable value"),
    "deep nesting": (
        _set(["nodes", 1, "args", 1], functools.reduce(lambda v, _: [v], range(10**5), [])),
        "its arguments nest more than 16 deep",
    ),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_files_raise_model_file_error(case):
    edit, message = MALFORMED[case]
    data = _valid()
    graph_from_json(copy.deepcopy(data))  # the unedited file loads
    edit(data)
    with pytest.raises(ModelFileError, match=rf"^model\.cg's graph cannot be loaded: .*{message}"):
        graph_from_json(data, "model.cg's graph")


def test_a_non_dict_file_raises_model_file_error():
    for data in (None, [], "graph", 3):
        with pytest.raises(ModelFileError, match="the graph cannot be loaded: it is not"):
            graph_from_json(data)

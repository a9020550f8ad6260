"""The slim model's generated code frees a merge's inputs one node later; nothing else changes."""

from __future__ import annotations

import copy
import re

import torch
import torch.fx as fx

import consensus_gates as cg
from consensus_gates.fx.lifetimes import DeferredFreesCodeGen, defer_merge_frees, use_deferred_frees

FREES = re.compile(r";  ((?:\w+ = )+)None$")

SOURCE = """

def forward(self, x):
    a = f(x);  x = None
    b = g(a)
    add = a + b;  a = b = None
    r = h(add);  add = None
    c = k(r)
    add_1 = c + r;  c = r = None
    return add_1
    """


def freed(src: str) -> list[list[str]]:
    """The names each line frees, line by line."""
    return [m[1].split(" = ")[:-1] if (m := FREES.search(line)) else [] for line in src.split("\n")]


def test_frees_of_a_merge_move_to_the_next_node_and_lines_stay():
    out = defer_merge_frees(SOURCE)
    assert len(out.split("\n")) == len(SOURCE.split("\n"))  # fx's line-number map holds
    lines = out.split("\n")
    assert lines[5] == "    add = a + b"
    assert lines[6] == "    r = h(add);  a = b = add = None"  # carried first, then its own
    assert lines[7] == "    c = k(r)"
    assert lines[8] == "    add_1 = c + r"  # the frame's exit frees c and r after the return
    assert freed(out)[3] == ["x"]  # a single free stays where it was


def slim_resnet(**config) -> tuple[cg.GatedModel, fx.GraphModule, dict]:
    torch.manual_seed(0)
    model = cg.create_model("resnet20").eval()
    gated = cg.insert_gates(model, torch.randn(2, 3, 32, 32), cg.GateConfig(**config))
    decisions = {
        n: i % 2 == 0 if g.units == 1 else tuple(j % 3 != 0 for j in range(g.units))
        for i, (n, g) in enumerate(gated.gates.items())
    }
    return gated, cg.materialize(gated, decisions).eval(), decisions


def test_slim_code_frees_every_value_once_and_merges_later():
    gated, slim, _ = slim_resnet()
    default = fx.graph.CodeGen()
    plain = copy.deepcopy(slim.graph)
    plain.set_codegen(default)
    before, after = plain.python_code("self").src, slim.code
    adds = [i for i, line in enumerate(after.split("\n")) if re.match(r"\s+add(_\d+)? = ", line)]
    assert len(adds) == 5  # the five open blocks of nine; the closed ones lost their merge
    for i in adds:
        assert freed(after)[i] == [] and len(freed(before)[i]) == 2
        assert freed(before)[i] == freed(after)[i + 1][:2]
    flat = [n for names in freed(after) for n in names]
    assert len(flat) == len(set(flat))
    assert set(flat) <= {n for names in freed(before) for n in names}


def test_slim_outputs_unchanged_in_every_mode():
    x = torch.randn(5, 3, 40, 24)
    for config in ({}, {"mode": "channel"}, {"mode": "both"}):
        gated, slim, decisions = slim_resnet(**config)
        assert isinstance(slim.graph._codegen, DeferredFreesCodeGen)
        cg.fix_decisions(gated, decisions)
        with torch.no_grad():
            torch.testing.assert_close(slim(x), gated.eval()(x), rtol=1e-5, atol=1e-5)


def test_kept_by_load_and_deepcopy(tmp_path):
    _, slim, _ = slim_resnet()
    cg.save(slim, tmp_path / "slim.safetensors")
    loaded = cg.load(tmp_path / "slim.safetensors")
    for m in (loaded, copy.deepcopy(slim)):
        assert isinstance(m.graph._codegen, DeferredFreesCodeGen)
        assert m.code == slim.code


def test_training_through_the_slim_model_gives_the_same_gradients():
    _, slim, _ = slim_resnet()
    plain = copy.deepcopy(slim)
    plain.graph.set_codegen(fx.graph.CodeGen())
    plain.recompile()
    assert plain.code != slim.code
    x = torch.randn(4, 3, 32, 32)
    for m in (slim, plain):
        m.train().zero_grad()
        m(x).square().sum().backward()
    for (name, p), q in zip(slim.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_a_graph_with_its_own_code_generation_keeps_it():
    class PyTree(torch.nn.Module):
        def forward(self, d):
            return {"y": d["a"] + d["b"]}

    gm = fx.symbolic_trace(PyTree(), concrete_args={"d": {"a": fx.PH, "b": fx.PH}})
    codegen = gm.graph._codegen
    assert type(codegen) is not fx.graph.CodeGen
    use_deferred_frees(gm.graph)
    assert gm.graph._codegen is codegen

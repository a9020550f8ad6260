"""materialize: exact against the fixed-decision gated model, on every supported network."""

import random

import pytest
import torch
import torch.fx as fx

import consensus_gates as cg

from conftest import randomize, rel_diff

TOL = 1e-5  # max abs difference relative to the output's max abs


def _patterns(names, n_random):
    stages = sorted({name.rsplit(".", 1)[0] for name in names})
    stage = stages[len(stages) // 2]
    yield "all-open", dict.fromkeys(names, True)
    yield "all-closed", dict.fromkeys(names, False)
    yield f"stage {stage} closed", {n: not n.startswith(stage + ".") for n in names}
    rng = random.Random(0)
    for i in range(n_random):
        yield f"random {i}", {n: rng.random() < 0.5 for n in names}


def check_equivalence(model, x, n_random):
    randomize(model).eval()
    gated = cg.insert_gates(model, x).eval()
    cg.fix_decisions(gated, dict.fromkeys(gated.gates, True))
    with torch.no_grad():
        assert rel_diff(model(x), gated(x)) <= 1e-6, "all gates open must equal the original"
    for label, decisions in _patterns(list(gated.gates), n_random):
        cg.fix_decisions(gated, decisions)
        slim = cg.materialize(gated, decisions).eval()
        with torch.no_grad():
            expected, got = gated(x), slim(x)
        assert rel_diff(expected, got) <= TOL, label
        assert not any(isinstance(m, cg.LayerGate) for m in slim.modules()), label
    return gated


SMALL = [
    ("resnet20", {}, (2, 3, 32, 32)),
    ("resnet20", {"shortcut": "B"}, (2, 3, 32, 32)),
    ("resnet56", {"in_channels": 1}, (2, 1, 28, 28)),
    ("resnet18", {}, (2, 3, 32, 32)),
    ("mobilenet_v2", {}, (2, 3, 32, 32)),
    ("efficientnet_b0", {}, (2, 3, 32, 32)),
]
LARGE = [
    ("resnet34", {}, (1, 3, 32, 32)),
    ("resnet50", {}, (1, 3, 32, 32)),
    ("resnet101", {}, (1, 3, 32, 32)),
    ("resnet152", {}, (1, 3, 32, 32)),
    ("resnext50_32x4d", {}, (1, 3, 32, 32)),
    ("wide_resnet50_2", {}, (1, 3, 32, 32)),
    ("vit_b_16", {"image_size": 32}, (2, 3, 32, 32)),
]


@pytest.mark.parametrize("name,kwargs,shape", SMALL, ids=lambda v: str(v))
def test_small_models_exact_under_20_random_patterns(name, kwargs, shape):
    check_equivalence(cg.create_model(name, **kwargs), torch.randn(*shape), n_random=20)


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,shape", LARGE, ids=lambda v: str(v))
def test_large_models_exact(name, kwargs, shape):
    check_equivalence(cg.create_model(name, **kwargs), torch.randn(*shape), n_random=2)


def test_slim_is_a_plain_graph_module_without_gate_ops():
    model = cg.create_model("resnet20")
    gated = cg.insert_gates(model, torch.randn(2, 3, 32, 32))
    slim = cg.materialize(gated, {n: n.endswith(".0") for n in gated.gates})
    assert type(slim).__mro__[1] is fx.GraphModule and not isinstance(slim, cg.GatedModel)
    traced_original = fx.symbolic_trace(model)

    def count(gm, fn):
        return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is fn)

    import operator

    # no multiplication left over from gating, and exactly one add per open block remains
    assert count(slim, operator.mul) == count(traced_original, operator.mul) == 0
    assert count(slim, operator.add) == 3
    assert not any("gate" in str(n.target) for n in slim.graph.nodes)


def test_materialize_leaves_the_gated_model_alone():
    gated = cg.insert_gates(cg.create_model("resnet20"), torch.randn(2, 3, 32, 32))
    n_params = sum(p.numel() for p in gated.parameters())
    slim = cg.materialize(gated, dict.fromkeys(gated.gates, False))
    assert sum(p.numel() for p in gated.parameters()) == n_params
    assert len(gated.gates) == 9
    with torch.no_grad():
        next(slim.parameters()).add_(1)  # weights are copies, not shared
    assert sum(p.numel() for p in slim.parameters()) < n_params


def test_closed_block_drops_the_redundant_relu():
    """A closed identity block leaves relu(x) on an already rectified x: it is removed."""
    gated = cg.insert_gates(cg.create_model("resnet20"), torch.randn(2, 3, 32, 32))
    slim = cg.materialize(gated, {n: n != "layer1.1" for n in gated.gates})
    relus = [n for n in slim.graph.nodes if n.target is torch.nn.functional.relu]
    full = cg.materialize(gated, dict.fromkeys(gated.gates, True))
    assert len(relus) == sum(n.target is torch.nn.functional.relu for n in full.graph.nodes) - 2


def test_consensus_is_the_default_decision():
    gated = cg.insert_gates(cg.create_model("resnet20"), torch.randn(2, 3, 32, 32))
    for i, g in enumerate(gated.gates.values()):
        g.running_open_rate.fill_(0.9 if i % 3 else 0.1)
    slim = cg.materialize(gated)
    explicit = cg.materialize(gated, cg.consensus(gated).decisions)
    assert slim.code == explicit.code
    assert sum(1 for n in slim.graph.nodes if n.target.__class__ is str and "conv1" in n.target) < 9


class _AlphaFirst(torch.nn.Module):
    """torch.add(branch, skip, alpha=a): closing the branch must leave a * skip."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.stem(x)
        return torch.add(self.bn(self.conv(x)), x, alpha=0.5)


def test_closing_a_branch_under_torch_add_alpha_keeps_the_scaled_skip():
    model = randomize(_AlphaFirst()).eval()
    x = torch.randn(2, 3, 8, 8)
    gated = cg.insert_gates(model, x).eval()
    (name,) = gated.gates
    slim = cg.materialize(gated, {name: False})
    with torch.no_grad():
        torch.testing.assert_close(slim(x), 0.5 * model.stem(x))


def test_keeps_dtype():
    model = randomize(cg.create_model("resnet20")).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    gated = cg.insert_gates(model, x).eval()
    slim = cg.materialize(gated, dict.fromkeys(gated.gates, False))
    assert all(p.dtype == torch.float64 for p in slim.parameters())
    assert slim(x).dtype == torch.float64

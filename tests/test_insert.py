"""insert_gates: structure, exactness with gates open, per-sample gating, device and dtype."""

import operator

import pytest
import torch
from torch import nn

import consensus_gates as cg

from conftest import randomize, rel_diff


def test_gate_structure_matches_paper_table_2():
    gated = cg.insert_gates(cg.create_model("resnet20"), torch.randn(2, 3, 32, 32))
    gate = gated.gates["layer2.0"]
    assert (gate.fc1.in_features, gate.fc1.out_features) == (16, 16)  # block input has 16 ch
    assert isinstance(gate.bn, nn.BatchNorm1d) and isinstance(gate.relu, nn.ReLU)
    assert (gate.fc2.in_features, gate.fc2.out_features) == (16, 1)
    assert gated.gates["layer3.2"].fc1.in_features == 64
    assert list(gated.gates) == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]


def test_original_model_is_untouched():
    model = cg.create_model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gated = cg.insert_gates(model, torch.randn(2, 3, 32, 32))
    assert not any(isinstance(m, cg.LayerGate) for m in model.modules())
    with torch.no_grad():
        for p in gated.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_merge_computes_skip_plus_gate_times_branch_per_sample():
    """Each sample's output equals the model with its own gate decision materialized."""
    model = randomize(cg.create_model("resnet20")).eval()
    x = torch.randn(16, 3, 32, 32)
    gated = cg.insert_gates(model, x, cg.GateConfig(exclude=("layer1.*", "layer3.*"))).eval()
    gate = gated.gates["layer2.1"]
    with torch.no_grad():
        gate.fc2.weight.normal_(0, 5)
        gated(x)
        # centre the logits so that about half of the batch opens the gate
        logits = gate.fc2(gate.relu(gate.bn(gate.fc1(gate.pool(gated_input(gated, x))))))
        gate.fc2.bias.sub_(logits.median())
        out = gated(x)
    d = gate.decisions.bool()
    assert 0 < d.sum() < len(d), "want a batch with both decisions"
    for decision in (True, False):
        slim = cg.materialize(gated, {n: True for n in gated.gates} | {"layer2.1": decision})
        with torch.no_grad():
            expected = slim.eval()(x[d == decision])
        assert rel_diff(expected, out[d == decision]) <= 1e-6


def gated_input(gated, x):
    """The input of block layer2.1 (the output of layer2.0), computed with all gates open."""
    slim = cg.materialize(gated, dict.fromkeys(gated.gates, True))
    captured = {}
    slim.layer2.get_submodule("1").conv1.register_forward_hook(
        lambda m, args, out: captured.setdefault("x", args[0])
    )
    slim(x)
    return captured["x"]


def test_graph_has_one_gate_call_and_one_mul_per_branch():
    gated = cg.insert_gates(cg.create_model("resnet20"), torch.randn(2, 3, 32, 32))
    calls = [n for n in gated.graph.nodes if n.op == "call_module" and "gate_modules" in n.target]
    muls = [n for n in gated.graph.nodes if n.target is operator.mul]
    assert len(calls) == len(muls) == 9
    assert all(next(iter(c.users)) in muls for c in calls)


def test_keeps_dtype_and_training_mode():
    model = cg.create_model("resnet20").double().train()
    gated = cg.insert_gates(model, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert gated.training
    assert all(p.dtype == torch.float64 for p in gated.parameters())
    assert gated(torch.randn(4, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_exclude_patterns_leave_blocks_ungated():
    gated = cg.insert_gates(
        cg.create_model("resnet20"), torch.randn(2, 3, 32, 32), cg.GateConfig(exclude=("layer1.*",))
    )
    assert list(gated.gates) == [f"layer{s}.{i}" for s in (2, 3) for i in range(3)]


def test_deepcopy_keeps_the_gated_class_after_a_training_step():
    import copy

    gated = cg.insert_gates(cg.create_model("resnet20"), torch.randn(2, 3, 32, 32)).train()
    gated(torch.randn(4, 3, 32, 32)).sum().backward()  # gates hold autograd history now
    clone = copy.deepcopy(gated)
    assert isinstance(clone, cg.GatedModel) and list(clone.gates) == list(gated.gates)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gated_and_slim_stay_on_device():
    model = randomize(cg.create_model("resnet20")).cuda().eval()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    gated = cg.insert_gates(model, x).eval()
    d = {n: i % 2 == 0 for i, n in enumerate(gated.gates)}
    cg.fix_decisions(gated, d)
    slim = cg.materialize(gated, d).eval()
    assert all(p.is_cuda for p in slim.parameters())
    with torch.no_grad():
        assert rel_diff(gated(x), slim(x)) <= 1e-5


def test_wrapped_models_are_unwrapped():
    model = randomize(cg.create_model("resnet20")).eval()
    x = torch.randn(2, 3, 32, 32)
    for wrapped in (torch.compile(model), nn.DataParallel(model)):
        gated = cg.insert_gates(wrapped, x).eval()
        assert len(gated.gates) == 9
        cg.fix_decisions(gated, dict.fromkeys(gated.gates, True))
        with torch.no_grad():
            assert rel_diff(model(x), gated(x)) <= 1e-6

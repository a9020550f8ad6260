"""The public API's shape: what `import consensus_gates` loads, and its small conveniences."""

import subprocess
import sys

import pytest
import torch

import consensus_gates as cg


def test_import_is_light():
    # torch itself imports tqdm (for torch.hub): count what consensus_gates adds to it
    code = (
        "import sys, torch; before = set(sys.modules); import consensus_gates as cg; "
        "cg.insert_gates; new = set(sys.modules) - before; "
        "print(sorted(m for m in new if m.split('.')[0] in "
        "('matplotlib', 'tqdm', 'click', 'torch_pruning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_train_config_is_exported_lazily():
    from consensus_gates.training.config import TrainConfig

    assert cg.TrainConfig is TrainConfig
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
        cg.no_such_thing  # noqa: B018


def test_cost_unpacks_and_keeps_its_names():
    model = cg.create_model("resnet20")
    flops, params = cg.flops(model, torch.randn(1, 3, 32, 32))
    cost = cg.flops(model, torch.randn(1, 3, 32, 32))
    assert (cost.flops, cost.params) == (flops, params)
    assert params == sum(p.numel() for p in model.parameters())
    assert (cost - cost) == cg.Cost(0, 0)


def test_unfix_decisions_unpins_and_fix_decisions_none_pins_the_consensus():
    gated = cg.insert_gates(cg.create_model("resnet20"), torch.randn(2, 3, 16, 16))
    gated.gates["layer1.0"].running_open_rate.fill_(0.2)
    cg.fix_decisions(gated)
    assert gated.gates["layer1.0"].fixed is False and gated.gates["layer1.1"].fixed is True
    cg.unfix_decisions(gated)
    assert all(g.fixed is None for g in gated.gates.values())


def test_register_model_bare_and_named_and_list_models_filter():
    @cg.register_model
    def test_api_bare_net(num_classes: int = 10):
        return torch.nn.Linear(4, num_classes)

    @cg.register_model("test_api_named_net")
    def _named():
        return torch.nn.Linear(4, 2)

    assert isinstance(cg.create_model("test_api_bare_net"), torch.nn.Linear)
    assert cg.list_models("test_api_*") == ["test_api_bare_net", "test_api_named_net"]
    assert "resnet20" in cg.list_models("resnet*") and "vit_b_16" not in cg.list_models("resnet*")


def test_gate_losses_is_exported():
    gated = cg.insert_gates(cg.create_model("resnet20"), torch.randn(2, 3, 16, 16)).train()
    gated(torch.randn(4, 3, 16, 16))
    polar, act, _ = losses = cg.gate_losses(gated)
    assert isinstance(losses, cg.GateLosses)
    assert torch.equal(polar, cg.polarization_loss(gated))
    assert torch.equal(act, cg.activation_loss(gated))

"""Gate modules: the running open rate each gate keeps."""

import pytest
import torch

import consensus_gates as cg

from conftest import gated_resnet20


def test_running_open_rate_is_an_exponential_average_in_training_only():
    gated = gated_resnet20(cg.GateConfig(momentum=0.1)).train()
    gate = gated.gates["layer1.0"]
    with torch.no_grad():
        gate.fc2.weight.zero_()
        gate.fc2.bias.fill_(-0.5)  # closed for every sample
    gated(torch.randn(4, 3, 32, 32))
    gated(torch.randn(4, 3, 32, 32))
    assert gate.running_open_rate.item() == pytest.approx(0.81)
    assert gate.num_batches_tracked.item() == 2
    gated.eval()(torch.randn(4, 3, 32, 32))
    assert gate.running_open_rate.item() == pytest.approx(0.81)


def test_cumulative_running_rate_and_fixed_gates_do_not_track():
    gated = gated_resnet20(cg.GateConfig(momentum=None)).train()
    gate = gated.gates["layer1.0"]
    rates = []
    for bias in (1.0, -1.0, -1.0):
        with torch.no_grad():
            gate.fc2.weight.zero_()
            gate.fc2.bias.fill_(bias * 0.5)
        gated(torch.randn(4, 3, 32, 32))
        rates.append(gate.running_open_rate.item())
    assert rates == pytest.approx([1.0, 0.5, 1 / 3])
    cg.fix_decisions(gated, {"layer1.0": True})
    gated(torch.randn(4, 3, 32, 32))
    assert gate.running_open_rate.item() == pytest.approx(1 / 3)
    assert gate.decisions.tolist() == [1.0] * 4

"""Reading the consensus and pinning decisions."""

import pytest

import consensus_gates as cg

from conftest import gated_resnet20


def test_consensus_decisions_and_agreement():
    gated = gated_resnet20()
    for gate, rate in zip(gated.gates.values(), [0.9, 0.5, 0.2] + [1.0] * 6, strict=True):
        gate.running_open_rate.fill_(rate)
    c = cg.consensus(gated)
    assert [c.decisions[n] for n in list(gated.gates)[:3]] == [True, True, False]
    assert [c.agreement[n] for n in list(gated.gates)[:3]] == pytest.approx([0.9, 0.5, 0.8])
    assert c.open_ratio == pytest.approx(8 / 9)
    assert "layer1.2" in str(c) and "closed" in str(c)
    assert cg.consensus(gated, threshold=0.95).decisions["layer1.0"] is False


def test_fix_decisions_pins_fills_from_consensus_and_unpins():
    gated = gated_resnet20().eval()
    gated.gates["layer1.1"].running_open_rate.fill_(0.1)
    cg.fix_decisions(gated, {"layer1.0": False})
    fixed = {n: g.fixed for n, g in gated.gates.items()}
    assert fixed["layer1.0"] is False and fixed["layer1.1"] is False and fixed["layer1.2"] is True
    cg.unfix_decisions(gated)
    assert all(g.fixed is None for g in gated.gates.values())

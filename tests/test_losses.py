"""Heads, regularizers, running statistics and consensus, against hand-computed values."""

import pytest
import torch

import consensus_gates as cg
from consensus_gates.losses import gate_losses

from conftest import gated_resnet20


def _set_decisions(gated, rows):
    for gate, row in zip(gated.gates.values(), rows, strict=False):
        gate.decisions = torch.tensor(row)


def test_polarization_and_activation_on_hand_decisions():
    gated = gated_resnet20(cg.GateConfig(exclude=("layer2.*", "layer3.*")))
    _set_decisions(gated, [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0]])
    # gbar = 0.25, 1.0, 0.5
    assert cg.polarization_loss(gated).item() == pytest.approx((0.1875 + 0.0 + 0.25) / 3)
    assert cg.activation_loss(gated).item() == pytest.approx(1.75 / 3)
    for gate, flops in zip(gated.gates.values(), [1, 2, 1], strict=True):
        gate.branch_flops.fill_(flops)
    assert cg.activation_loss(gated, weight="flops").item() == pytest.approx(2.75 / 4)
    polar, act, r_polar = gate_losses(gated, weight="flops")  # the trainer's one pass
    assert (polar.item(), act.item(), r_polar.item()) == (
        cg.polarization_loss(gated).item(),
        cg.activation_loss(gated, weight="flops").item(),
        cg.polarization_loss(gated).item(),
    )
    assert not r_polar.requires_grad


def test_polarization_gradient_through_the_ste_head():
    """dR/db for the last gate's output bias: (1 - 2 gbar) / B * #(|logit| <= 1), over #gates.
    (Earlier gates also move later gates' inputs, so only the last one has this closed form.)"""
    gated = gated_resnet20().train()
    x = torch.randn(8, 3, 32, 32)
    gate = gated.gates["layer3.2"]
    logits = {}
    gate.fc2.register_forward_hook(lambda m, i, out: logits.update(z=out.squeeze(1)))
    gated(x)
    loss = cg.polarization_loss(gated)
    (grad,) = torch.autograd.grad(loss, gate.fc2.bias)
    z, gbar = logits["z"].detach(), gate.decisions.detach().mean()
    expected = (1 - 2 * gbar) / len(z) * (z.abs() <= 1).sum() / len(gated.gates)
    torch.testing.assert_close(grad, expected.reshape(1))


def test_flops_weighted_activation_measures_costs_on_first_use():
    gated = gated_resnet20().train()
    gated(torch.randn(4, 3, 32, 32))
    assert all(g.branch_flops.item() == -1 for g in gated.gates.values())
    loss = cg.activation_loss(gated, weight="flops")
    flops = torch.tensor([float(g.branch_flops) for g in gated.gates.values()])
    gbar = torch.stack([g.decisions.mean() for g in gated.gates.values()])
    assert (flops > 0).all()
    torch.testing.assert_close(loss, (flops * gbar).sum() / flops.sum())



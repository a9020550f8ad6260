"""Heads, regularizers, running statistics and consensus, against hand-computed values."""

import pytest
import torch
import torch.nn.functional as F

import consensus_gates as cg
from consensus_gates.heads import BernoulliHead, GumbelHead, SteHead
from consensus_gates.losses import gate_losses


def test_ste_forward_and_gradient_window():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    y = SteHead()(x)
    assert y.tolist() == [0, 0, 0, 0, 1, 1, 1]
    (y * torch.arange(1.0, 8.0)).sum().backward()
    assert x.grad.tolist() == [0, 2, 3, 4, 5, 6, 0]


def test_gumbel_is_hard_forward_with_the_soft_samples_gradient():
    head = GumbelHead(tau=0.5).train()
    x = torch.tensor([-1.0, 0.2, 3.0], requires_grad=True)
    torch.manual_seed(3)
    y = head(x)
    assert set(y.tolist()) <= {0.0, 1.0}
    y.sum().backward()
    torch.manual_seed(3)
    u = torch.rand(3).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((x.detach() + u.log() - (-u).log1p()) / 0.5)
    torch.testing.assert_close(y.detach(), (soft > 0.5).float())
    torch.testing.assert_close(x.grad, soft * (1 - soft) / 0.5)
    assert head.eval()(x).tolist() == [0, 1, 1]  # no noise in eval


def test_bernoulli_keeps_logits_above_the_batch_mean():
    head = BernoulliHead(momentum=0.5).train()
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)  # mean 2.5
    y = head(x)
    assert y.tolist() == [0, 0, 1, 1]
    y.sum().backward()
    # d/dx_i of sum_j ste(x_j - mean): the window is |x_j - 2.5| <= 1, i.e. x = 2 and 3
    assert x.grad.tolist() == pytest.approx([-0.5, 0.5, 0.5, -0.5])
    assert head.running_mean.item() == pytest.approx(1.25)
    assert head.eval()(torch.tensor([1.0, 1.5])).tolist() == [0, 1]  # vs the running mean


def _gated(config=None):
    return cg.insert_gates(cg.create_model("resnet20"), torch.randn(2, 3, 32, 32), config)


def _set_decisions(gated, rows):
    for gate, row in zip(gated.gates.values(), rows, strict=False):
        gate.decisions = torch.tensor(row)


def test_polarization_and_activation_on_hand_decisions():
    gated = _gated(cg.GateConfig(exclude=("layer2.*", "layer3.*")))
    _set_decisions(gated, [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0]])
    # gbar = 0.25, 1.0, 0.5
    assert cg.polarization_loss(gated).item() == pytest.approx((0.1875 + 0.0 + 0.25) / 3)
    assert cg.activation_loss(gated).item() == pytest.approx(1.75 / 3)
    for gate, flops in zip(gated.gates.values(), [1, 2, 1], strict=True):
        gate.branch_flops.fill_(flops)
    assert cg.activation_loss(gated, weight="flops").item() == pytest.approx(2.75 / 4)
    polar, act = gate_losses(gated, weight="flops")  # the trainer's one pass over both
    assert (polar.item(), act.item()) == (
        cg.polarization_loss(gated).item(),
        cg.activation_loss(gated, weight="flops").item(),
    )


def test_polarization_gradient_through_the_ste_head():
    """dR/db for the last gate's output bias: (1 - 2 gbar) / B * #(|logit| <= 1), over #gates.
    (Earlier gates also move later gates' inputs, so only the last one has this closed form.)"""
    gated = _gated().train()
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


@pytest.mark.parametrize("head", ["ste", "gumbel", "bernoulli"])
def test_a_gradient_reaches_every_gate_parameter(head):
    gated = _gated(cg.GateConfig(head=head, init_bias=0.0)).train()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    loss = F.cross_entropy(gated(x), y) + cg.polarization_loss(gated) + cg.activation_loss(gated)
    loss.backward()
    for name, gate in gated.gates.items():
        for pname, p in gate.named_parameters():
            if head == "bernoulli" and pname == "fc2.bias":
                # logit - mean(logit) cancels the bias: its gradient is zero up to rounding
                assert p.grad is not None and p.grad.abs().sum() < 1e-6
                continue
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname}"


def test_flops_weighted_activation_measures_costs_on_first_use():
    gated = _gated().train()
    gated(torch.randn(4, 3, 32, 32))
    assert all(g.branch_flops.item() == -1 for g in gated.gates.values())
    loss = cg.activation_loss(gated, weight="flops")
    flops = torch.tensor([float(g.branch_flops) for g in gated.gates.values()])
    gbar = torch.stack([g.decisions.mean() for g in gated.gates.values()])
    assert (flops > 0).all()
    torch.testing.assert_close(loss, (flops * gbar).sum() / flops.sum())


def test_running_open_rate_is_an_exponential_average_in_training_only():
    gated = _gated(cg.GateConfig(momentum=0.1)).train()
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
    gated = _gated(cg.GateConfig(momentum=None)).train()
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


def test_consensus_decisions_and_agreement():
    gated = _gated()
    for gate, rate in zip(gated.gates.values(), [0.9, 0.5, 0.2] + [1.0] * 6, strict=True):
        gate.running_open_rate.fill_(rate)
    c = cg.consensus(gated)
    assert [c.decisions[n] for n in list(gated.gates)[:3]] == [True, True, False]
    assert [c.agreement[n] for n in list(gated.gates)[:3]] == pytest.approx([0.9, 0.5, 0.8])
    assert c.open_ratio == pytest.approx(8 / 9)
    assert "layer1.2" in str(c) and "closed" in str(c)
    assert cg.consensus(gated, threshold=0.95).decisions["layer1.0"] is False


def test_fix_decisions_pins_fills_from_consensus_and_unpins():
    gated = _gated().eval()
    gated.gates["layer1.1"].running_open_rate.fill_(0.1)
    cg.fix_decisions(gated, {"layer1.0": False})
    fixed = {n: g.fixed for n, g in gated.gates.items()}
    assert fixed["layer1.0"] is False and fixed["layer1.1"] is False and fixed["layer1.2"] is True
    cg.unfix_decisions(gated)
    assert all(g.fixed is None for g in gated.gates.values())

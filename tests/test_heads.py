"""Gate heads: the binary forward decision and the gradient each passes back."""

import pytest
import torch
import torch.nn.functional as F

import consensus_gates as cg
from consensus_gates.gates.heads import BernoulliHead, GumbelHead, SteHead

from conftest import gated_resnet20


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


@pytest.mark.parametrize("head", ["ste", "gumbel", "bernoulli"])
def test_a_gradient_reaches_every_gate_parameter(head):
    gated = gated_resnet20(cg.GateConfig(head=head, init_bias=0.0)).train()
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

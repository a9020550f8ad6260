"""Gate heads: the binary forward decision and the gradient each passes back, and the
registry that `GateConfig.head` reads."""

import math

import pytest
import torch
import torch.nn.functional as F

import consensus_gates as cg
from consensus_gates.gates import HEADS, GateHead, register_head
from consensus_gates.gates.heads import (
    BernoulliHead,
    GumbelHead,
    SteHead,
    make_head,
    straight_through,
)

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


# --- the head registry -------------------------------------------------------------------


class _HalfHead(GateHead):
    """A test head: open where the logit is above ``cut``, which it reads from the config."""

    built_with: list = []

    def __init__(self, cut: float):
        super().__init__()
        self.cut = cut

    @classmethod
    def from_config(cls, config, shape):
        cls.built_with.append(shape)
        return cls(config.init_bias / 2)

    def forward(self, logit):
        return straight_through(logit - self.cut)


@pytest.fixture
def half_head():
    """`_HalfHead` registered as "test_half" for one test, then removed."""
    _HalfHead.built_with = []
    register_head("test_half")(_HalfHead)
    yield "test_half"
    HEADS.pop("test_half", None)


def test_the_built_in_heads_are_registered():
    assert {"ste": SteHead, "gumbel": GumbelHead, "bernoulli": BernoulliHead}.items() <= (
        HEADS.items()
    )
    assert tuple(HEADS)[:3] == ("ste", "gumbel", "bernoulli")


def test_a_registered_head_is_accepted_and_trains(half_head):
    assert half_head in HEADS
    config = cg.GateConfig(mode="both", head=half_head, init_bias=0.2)
    gated = gated_resnet20(config).train()
    heads = [g.head for g in gated.gates.values()]
    assert heads and all(type(h) is _HalfHead and h.cut == pytest.approx(0.1) for h in heads)
    assert () in _HalfHead.built_with  # layer gates: one decision per sample
    assert any(len(s) == 1 for s in _HalfHead.built_with)  # channel gates: one per unit
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss = F.cross_entropy(gated(x), y) + cg.polarization_loss(gated) + cg.activation_loss(gated)
    loss.backward()
    assert all(g.fc2.weight.grad is not None for g in gated.gates.values())
    assert any(g.fc2.weight.grad.abs().sum() > 0 for g in gated.gates.values())


def test_a_registered_head_survives_save_and_load(half_head, tmp_path):
    gated = cg.insert_gates(
        cg.create_model("cifar_resnet", blocks=[1, 1, 1], num_classes=4),
        torch.randn(2, 3, 8, 8),
        cg.GateConfig(head=half_head),
    ).eval()
    cg.save(gated, tmp_path / "m.safetensors")
    loaded = cg.load(tmp_path / "m.safetensors")
    assert all(type(g.head) is _HalfHead for g in loaded.gates.values())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gated(x))


def test_an_unknown_head_lists_the_registered_ones(half_head):
    with pytest.raises(ValueError, match=r"GateConfig\.head must be one of \('ste', 'gumbel', "
                       r"'bernoulli', 'test_half'\), got 'softmax'"):  # fmt: skip
        cg.GateConfig(head="softmax")


def test_registering_a_taken_name_or_a_non_head_is_refused():
    class Other(GateHead):
        def forward(self, logit):
            return logit

    with pytest.raises(ValueError, match="'ste' is already registered"):
        register_head("ste")(Other)
    assert HEADS["ste"] is SteHead
    with pytest.raises(TypeError, match="decorates an nn.Module class"):
        register_head("test_not_a_module")(object)
    with pytest.raises(TypeError, match="needs a classmethod from_config"):
        register_head("test_no_from_config")(torch.nn.Identity)
    with pytest.raises(ValueError, match="non-empty string"):
        register_head("")
    assert not {"test_not_a_module", "test_no_from_config"} & set(HEADS)


def test_make_head_refuses_a_name_no_longer_registered(half_head):
    config = cg.GateConfig(head=half_head)
    HEADS.pop(half_head)
    with pytest.raises(ValueError, match=r"no gate head named 'test_half'; registered: \("):
        make_head(config)


# --- the Bernoulli head's own momentum ----------------------------------------------------


def test_the_bernoulli_head_has_its_own_momentum():
    config = cg.GateConfig(head="bernoulli", mode="both", momentum=0.5, bernoulli_momentum=0.25)
    gated = gated_resnet20(config)
    for gate in gated.gates.values():
        assert gate.momentum == 0.5  # the running open rate's
        assert gate.head.momentum == 0.25
    # the defaults are what they were: 0.1 for both, also with a cumulative open rate
    assert make_head(cg.GateConfig(head="bernoulli", momentum=None)).momentum == 0.1


@pytest.mark.parametrize("value", [0, -0.1, 1.5, math.nan, None, True])
def test_a_bad_bernoulli_momentum_is_refused(value):
    with pytest.raises(ValueError, match=r"GateConfig\.bernoulli_momentum must be"):
        cg.GateConfig(bernoulli_momentum=value)


def test_a_config_dict_from_before_bernoulli_momentum_keeps_the_old_momentum():
    old = cg.GateConfig(head="bernoulli", momentum=0.3).to_dict()
    del old["bernoulli_momentum"]
    assert cg.GateConfig.from_dict(old).bernoulli_momentum == 0.3  # what the head used then
    assert cg.GateConfig.from_dict({**old, "momentum": None}).bernoulli_momentum == 0.1
    assert cg.GateConfig.from_dict({}).bernoulli_momentum == 0.1

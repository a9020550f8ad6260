"""FLOPs and parameters drop by exactly what the removed branches cost."""

import random

import pytest
import torch

import consensus_gates as cg

CONV16 = 16 * 16 * 9 * 32 * 32  # one 3x3 16->16 conv at 32x32, in multiply-adds
BN16 = 2 * 16 * 32 * 32  # fvcore: 2 per element for an affine BatchNorm in eval


def test_resnet20_branch_cost_matches_a_hand_count():
    gated = cg.insert_gates(cg.create_model("resnet20"), torch.randn(2, 3, 32, 32))
    costs = cg.branch_costs(gated)
    assert costs["layer1.0"] == cg.Cost(
        flops=2 * CONV16 + 2 * BN16, params=2 * 16 * 16 * 9 + 4 * 16
    )
    # layer2.0: 16->32 stride 2 then 32->32, at 16x16; option-A shortcut costs nothing
    conv_a, conv_b, bn = 32 * 16 * 9 * 16 * 16, 32 * 32 * 9 * 16 * 16, 2 * 32 * 16 * 16
    assert costs["layer2.0"] == cg.Cost(
        conv_a + conv_b + 2 * bn, 32 * 16 * 9 + 32 * 32 * 9 + 4 * 32
    )
    assert [int(g.branch_flops) for g in gated.gates.values()] == [c.flops for c in costs.values()]


@pytest.mark.parametrize(
    "name,kwargs,shape",
    [
        ("resnet20", {}, (1, 3, 32, 32)),
        ("resnet20", {"shortcut": "B"}, (1, 3, 32, 32)),
        ("mobilenet_v2", {}, (1, 3, 32, 32)),
    ],
)
def test_drops_equal_the_closed_branches_costs(name, kwargs, shape):
    model = cg.create_model(name, **kwargs)
    x = torch.randn(*shape)
    gated = cg.insert_gates(model, x)
    costs = cg.branch_costs(gated, x)
    full = cg.flops(model, x)
    assert cg.flops(cg.materialize(gated, dict.fromkeys(gated.gates, True)), x) == full
    rng = random.Random(0)
    for _ in range(3):
        d = {n: rng.random() < 0.5 for n in gated.gates}
        closed = [costs[n] for n, keep in d.items() if not keep]
        expected = cg.Cost(
            full.flops - sum(c.flops for c in closed), full.params - sum(c.params for c in closed)
        )
        assert cg.flops(cg.materialize(gated, d), x) == expected


def test_flops_counts_in_eval_mode_and_restores_training():
    model = cg.create_model("resnet20").train()
    bn = model.bn1
    before = bn.running_mean.clone()
    cost = cg.flops(model, torch.randn(4, 3, 32, 32))
    assert model.training and torch.equal(bn.running_mean, before)
    assert cost.flops == 4 * cg.flops(model, torch.randn(1, 3, 32, 32)).flops
    assert cost.params == 269_722

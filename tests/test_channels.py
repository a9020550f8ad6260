"""Channel gates: insertion at each position, eq. 8, and exact channel surgery."""

import operator
import random

import pytest
import torch

import consensus_gates as cg

from conftest import randomize, rel_diff
from synthetic_models import CASES


def _patterns(gated, n_random):
    gates = gated.gates
    yield "all-open", {n: True for n in gates}
    yield "all-closed", {n: False for n in gates}
    yield "one channel kept", {n: tuple(i == 0 for i in range(g.units)) for n, g in gates.items()}
    rng = random.Random(0)
    for i in range(n_random):
        yield (
            f"random {i}",
            {n: tuple(rng.random() < 0.5 for _ in range(g.units)) for n, g in gates.items()},
        )


def check(model, x, config, n_random):
    model = randomize(model).eval()
    gated = cg.insert_gates(model, x, config).eval()
    cg.fix_decisions(gated, dict.fromkeys(gated.gates, True))
    with torch.no_grad():
        assert rel_diff(model(x), gated(x)) <= 1e-6
    for label, decisions in _patterns(gated, n_random):
        cg.fix_decisions(gated, decisions)
        slim = cg.materialize(gated, decisions).eval()
        with torch.no_grad():
            assert rel_diff(gated(x), slim(x)) <= 1e-5, label
        assert not any(isinstance(m, cg.ChannelGate) for m in slim.modules()), label
    return gated


X32 = torch.randn(2, 3, 32, 32)
MODELS = [  # the small CIFAR models get 20 random patterns, torchvision ones 8 (each cut ~1 s)
    ("resnet20", {}, "middle", 20),
    ("resnet20", {}, "after", 20),
    ("resnet20", {}, "before", 20),
    ("resnet20", {"shortcut": "B"}, "middle", 20),
    ("resnet18", {}, "middle", 8),
    ("mobilenet_v2", {}, "middle", 8),  # depthwise convs go with their producer
    ("efficientnet_b0", {}, "middle", 8),  # squeeze-excitation inside the group
]


@pytest.mark.parametrize("name,kwargs,position,n_random", MODELS, ids=lambda v: str(v))
def test_models_exact(name, kwargs, position, n_random):
    config = cg.GateConfig(mode="channel", position=position)
    check(cg.create_model(name, **kwargs), X32, config, n_random)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,kwargs,x,count",
    [
        ("resnet50", {}, torch.randn(1, 3, 32, 32), 32),  # both internal widths of a Bottleneck
        ("wide_resnet50_2", {}, torch.randn(1, 3, 32, 32), 32),
        ("vit_b_16", {"image_size": 32}, X32, 12),  # the MLP hidden width of each block
    ],
    ids=["resnet50", "wide_resnet50_2", "vit_b_16"],
)
def test_large_models_exact(name, kwargs, x, count):
    gated = check(cg.create_model(name, **kwargs), x, cg.GateConfig(mode="channel"), n_random=2)
    assert len(gated.gates) == count


@pytest.mark.slow
@pytest.mark.parametrize("position", ["middle", "after", "before"])
def test_resnext_grouped_convs_exact(position):
    model, x = cg.create_model("resnext50_32x4d"), torch.randn(1, 3, 32, 32)
    gated = check(model, x, cg.GateConfig(mode="channel", position=position), n_random=2)
    grouped = [g for g in gated.gates.values() if g.groups > 1]
    if position == "middle":  # conv1 -> grouped conv2 -> conv3: both widths, 32 groups each
        assert len(gated.gates) == 32 and len(grouped) == 32
        assert gated.gates["layer1.0/conv1"].units == 128 // 32
    else:  # conv3 and the block inputs are dense
        assert len(gated.gates) == 16 and not grouped


class GroupedBlock(torch.nn.Module):
    """A user-written ResNeXt-style block: conv, conv in 3 groups, conv in 2 groups."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(8, 12, 1)
        self.b = torch.nn.Conv2d(12, 18, 3, padding=1, groups=3)
        self.c = torch.nn.Conv2d(18, 8, 1, groups=2)
        self.bn = torch.nn.BatchNorm2d(18)

    def forward(self, x):
        return x + self.c(torch.relu(self.bn(self.b(torch.relu(self.a(x))))))


def test_grouped_conv_cut_keeps_groups_equal():
    gated = check(GroupedBlock(), torch.randn(2, 8, 6, 6), cg.GateConfig(mode="channel"), 20)
    a, b = gated.gates["b/a"], gated.gates["b/b"]
    assert (a.groups, a.units) == (3, 4)  # read by a conv in 3 groups
    assert (b.groups, b.units) == (6, 3)  # made in 3 groups and read in 2: lcm 6
    slim = cg.materialize(gated, {"b/a": (True, False, True, False), "b/b": (True, True, False)})
    assert (slim.b.in_channels, slim.b.out_channels, slim.b.groups) == (6, 12, 3)
    x = torch.randn(2, 8, 6, 6)
    d = {"b/a": False, "b/b": (True, False, True)}  # one gate empties the branch: a constant
    cg.fix_decisions(gated, d)
    with torch.no_grad():
        assert rel_diff(gated(x), cg.materialize(gated, d)(x)) <= 1e-6
    with pytest.raises(ValueError, match="takes 3 decisions .one per position in each of its 6"):
        cg.materialize(gated, {"b/b": (True, False)})


@pytest.mark.parametrize("case", [c for c in CASES if c.expected_blocks], ids=lambda c: c.name)
def test_user_written_models(case):
    model, x = case.factory(), torch.randn(*case.input_shape)
    try:
        check(model, x, cg.GateConfig(mode="channel", fc_layers=2), n_random=5)
    except ValueError as e:  # a branch with no dense producer/consumer pair, said clearly
        assert "can be gated at position='middle'" in str(e)


def test_both_modes_together_are_exact():
    gated = check(cg.create_model("resnet20"), X32, cg.GateConfig(mode="both", position="after"), 0)
    assert list(gated.gates)[:2] == ["layer1.0", "layer1.0/after"]
    rng = random.Random(3)
    for _ in range(10):
        d = {n: rng.random() < 0.6 if isinstance(g, cg.LayerGate)
             else tuple(rng.random() < 0.5 for _ in range(g.units))
             for n, g in gated.gates.items()}  # fmt: skip
        cg.fix_decisions(gated, d)
        with torch.no_grad():
            assert rel_diff(gated(X32), cg.materialize(gated, d).eval()(X32)) <= 1e-5


def test_resnet20_middle_cut_matches_a_hand_count():
    model = cg.create_model("resnet20")
    gated = cg.insert_gates(model, X32, cg.GateConfig(mode="channel"))
    assert list(gated.gates)[0] == "layer1.0/conv1" and gated.gates["layer1.0/conv1"].units == 16
    k = 5  # channels of layer1.0's conv1 cut
    d = {n: True for n in gated.gates} | {"layer1.0/conv1": tuple(i >= k for i in range(16))}
    full, slim = cg.flops(model, X32[:1]), cg.flops(cg.materialize(gated, d), X32[:1])
    hw = 32 * 32
    # conv1 loses k outputs, bn1 k channels (2 FLOPs/element), conv2 k inputs
    assert full.flops - slim.flops == k * (16 * 9 * hw + 2 * hw + 16 * 9 * hw)
    assert full.params - slim.params == k * (16 * 9 + 2 + 16 * 9)


def test_resnet56_half_of_every_internal_width_gives_about_half_the_flops():
    model = cg.create_model("resnet56")
    gated = cg.insert_gates(model, X32, cg.GateConfig(mode="channel"))
    d = {n: tuple(i % 2 == 0 for i in range(g.units)) for n, g in gated.gates.items()}
    ratio = cg.flops(cg.materialize(gated, d), X32[:1]).flops / cg.flops(model, X32[:1]).flops
    assert 0.50 <= ratio <= 0.55


def test_after_position_keeps_the_residual_add_exact():
    model = randomize(cg.create_model("resnet20")).eval()
    gated = cg.insert_gates(model, X32, cg.GateConfig(mode="channel", position="after")).eval()
    keep = tuple(i % 3 != 0 for i in range(16))
    d = {n: True for n in gated.gates} | {"layer1.1/after": keep}
    cg.fix_decisions(gated, d)
    slim = cg.materialize(gated, d).eval()
    adds = [n for n in slim.graph.nodes if n.target is torch.index_add]
    assert len(adds) == 1
    assert slim.get_submodule("layer1.1.conv2").out_channels == sum(keep)
    assert slim.get_submodule("layer1.1.bn2").num_features == sum(keep)
    # the skip keeps all 16 channels: closed ones pass the block input through unchanged
    captured = {}
    slim.get_submodule("layer1.2.conv1").register_forward_hook(
        lambda m, args, out: captured.update(x=args[0])
    )
    with torch.no_grad():
        assert rel_diff(gated(X32), slim(X32)) <= 1e-6
    assert captured["x"].shape[1] == 16
    assert not any(n.target is operator.mul for n in slim.graph.nodes)


def test_polarization_eq8_and_activation_on_hand_decisions():
    gated = cg.insert_gates(
        cg.create_model("resnet20"), X32, cg.GateConfig(mode="both", exclude=("layer[23].*",))
    )
    layer, channel = gated.gates["layer1.0"], gated.gates["layer1.0/conv1"]
    for g in gated.gates.values():
        g.decisions = torch.ones(4, *g.rate_shape())  # polarized: contributes 0
    layer.decisions = torch.tensor([1.0, 0.0, 0.0, 0.0])  # gbar 0.25 -> 0.1875
    channel.decisions = torch.ones(4, 16)
    channel.decisions[:2, :8] = 0  # 8 channels at 0.5 -> 0.25 each, 8 at 1 -> 0: mean 0.125
    n = len(gated.gates)
    assert cg.polarization_loss(gated).item() == pytest.approx((0.1875 + 0.125) / n)
    assert cg.activation_loss(gated).item() == pytest.approx((n - 2 + 0.25 + 0.75) / n)
    # summed over channels: each channel counts as much as the layer gate
    assert cg.polarization_loss(gated, "sum").item() == pytest.approx((0.1875 + 8 * 0.25) / n)
    polar, _, r_polar = cg.gate_losses(gated, channels="sum")
    assert polar.item() == cg.polarization_loss(gated, "sum").item()
    assert r_polar.item() == cg.polarization_loss(gated).item()  # eq. 8 for the records
    with pytest.raises(ValueError, match="channels must be 'mean' .* or 'sum', got 'max'"):
        cg.polarization_loss(gated, "max")


def test_consensus_per_channel_and_fixed_decisions_round_trip(tmp_path):
    gated = cg.insert_gates(cg.create_model("resnet20"), X32, cg.GateConfig(mode="channel"))
    gate = gated.gates["layer2.0/conv1"]
    gate.running_open_rate.copy_(torch.linspace(0, 1, gate.units))
    c = cg.consensus(gated)
    assert c.decisions["layer2.0/conv1"] == tuple(bool(r >= 0.5) for r in torch.linspace(0, 1, 32))
    assert "16/32 open" in str(c)
    with pytest.raises(ValueError, match="takes 32 decisions; got 3"):
        cg.fix_decisions(gated, {"layer2.0/conv1": [True, False, True]})
    cg.fix_decisions(gated, c)
    cg.save(gated, tmp_path / "g.safetensors")
    back = cg.load(tmp_path / "g.safetensors")
    assert back.gates["layer2.0/conv1"].fixed == c.decisions["layer2.0/conv1"]
    slim = cg.materialize(gated, c)
    cg.save(slim, tmp_path / "s.safetensors")
    again = cg.load(tmp_path / "s.safetensors")
    with torch.no_grad():
        assert rel_diff(slim.eval()(X32), again(X32)) <= 1e-6
    assert again.get_submodule("layer2.0.conv1").out_channels == 16


@pytest.mark.parametrize("head", ["ste", "gumbel", "bernoulli"])
@pytest.mark.parametrize("fc_layers", [1, 2])
def test_every_head_trains_channel_gates(head, fc_layers):
    config = cg.GateConfig(mode="channel", head=head, fc_layers=fc_layers, init_bias=0.0)
    gated = cg.insert_gates(cg.create_model("resnet20"), X32, config).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    out = gated(x)
    assert all(g.decisions.shape == (8, g.units) for g in gated.gates.values())
    loss = torch.nn.functional.cross_entropy(out, y) + cg.polarization_loss(gated)
    (loss + cg.activation_loss(gated)).backward()
    for name, gate in gated.gates.items():
        assert hasattr(gate, "fc1") == (fc_layers == 2)
        for pname, p in gate.named_parameters():
            if head == "bernoulli" and pname == "fc2.bias":
                continue  # logit - mean(logit) cancels it (see test_losses)
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname}"
        assert gate.running_open_rate.shape == (gate.units,)


def test_bernoulli_channel_gates_compare_each_channel_with_its_own_batch_mean():
    from consensus_gates.gates.heads import BernoulliHead

    head = BernoulliHead(momentum=1.0, shape=(2,)).train()
    logits = torch.tensor([[1.0, 10.0], [3.0, 30.0], [2.0, 50.0]])  # means 2 and 30
    assert head(logits).tolist() == [[0, 0], [1, 0], [0, 1]]
    assert head.running_mean.tolist() == [2.0, 30.0]


def _polarize_channel_gates(polarizer: str) -> list[dict]:
    """Channel gates on every block, trained with λ_polar 2 from the start and no target:
    4 epochs of 20 steps on a separable synthetic problem."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(480, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=24, shuffle=True, generator=g)
    torch.manual_seed(0)
    model = cg.create_model("resnet20", num_classes=2)
    gated = cg.insert_gates(model, x[:2], cg.GateConfig(mode="channel"))
    config = cg.TrainConfig(epochs=4, lr=0.05, polar_schedule="constant", progress=False,
                            channel_polarizer=polarizer)  # fmt: skip
    return cg.train(gated, loader, None, config, log=lambda s: None)


def test_summed_channel_polarizer_polarizes_in_tens_of_steps_where_eq8_is_slower():
    """Eq. 8 pulls each channel 1/C as hard as a layer gate; summed over channels, as hard."""
    mean, summed = _polarize_channel_gates("mean"), _polarize_channel_gates("sum")
    assert summed[1]["r_polar"] < 1e-3 < 1e-2 < mean[1]["r_polar"]  # after 40 steps
    assert summed[-1]["r_polar"] < 1e-3
    # records keep eq. 8's measure: the summed loss of an unpolarized gate exceeds 1/4
    assert all(0 <= r["r_polar"] <= 0.25 for r in mean + summed)
    assert summed[0]["loss"]["polar"] == summed[0]["r_polar"]

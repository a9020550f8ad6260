"""Channel surgery where a gate closes every channel of what it gates, and materialize's
context (no_grad, inference_mode) and console output."""

import random
import warnings

import pytest
import torch
from torch import nn

import consensus_gates as cg

from conftest import randomize, rel_diff

pytestmark = pytest.mark.usefixtures("one_thread")


class SE(nn.Module):
    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class SEBlock(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.se = SE(c, 2)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(x + self.se(out))


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 8, 3, padding=1), SEBlock()

    def forward(self, x):
        return self.block(self.stem(x))


class ThreeConvBlock(nn.Module):
    """A closed first conv leaves a uniform value that a padded conv makes non-uniform."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.conv3, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        x = self.stem(x)
        return x + self.bn(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))


class YBlock(nn.Module):
    """RegNetY's block: 1x1, grouped 3x3, SE, 1x1, each conv with its BN."""

    def __init__(self, c: int = 8, w: int = 44):
        super().__init__()
        self.a, self.b = _unit(c, w), _unit(w, w, 3, groups=w // 4)
        self.se, self.c = SE(w, w // 4), _unit(w, c, act=False)

    def forward(self, x):
        return torch.relu(x + self.c(self.se(self.b(self.a(x)))))


def _unit(cin: int, cout: int, k: int = 1, groups: int = 1, act: bool = True):
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), *([nn.ReLU()] if act else []))


class YNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block0, self.block1 = nn.Conv2d(3, 8, 3, padding=1), YBlock(), YBlock()

    def forward(self, x):
        return self.block1(self.block0(self.stem(x)))


def _cut(model, x, decisions, **config):
    gated = cg.insert_gates(randomize(model).eval(), x, cg.GateConfig(mode="channel", **config))
    gated.eval()
    decisions = {**dict.fromkeys(gated.gates, True), **decisions}
    cg.fix_decisions(gated, decisions)
    return gated, cg.materialize(gated, decisions).eval()


def _assert_exact(gated, slim, *inputs):
    for x in inputs:
        with torch.no_grad():
            assert rel_diff(gated(x), slim(x)) <= 1e-5, tuple(x.shape)


def test_a_closed_squeeze_excitation_still_scales_the_main_path():
    # The SE's output multiplies the branch: an emptied SE is a constant scale, not a
    # constant branch (this was off by 1.45e-2).
    gated, slim = _cut(SENet(), torch.randn(2, 3, 8, 8), {"block/se.fc1": False})
    assert list(gated.gates) == ["block/conv1", "block/se.fc1"]
    _assert_exact(gated, slim, torch.randn(2, 3, 8, 8), torch.randn(3, 3, 12, 10))
    assert not any(n.target == "block.se.fc1" for n in slim.graph.nodes)
    assert cg.flops(slim, torch.randn(1, 3, 8, 8)).params < sum(
        p.numel() for p in SENet().parameters()
    )


def test_an_emptied_branch_works_at_other_input_sizes_and_reloads(tmp_path):
    model = cg.create_model("resnet20")
    decisions = {"layer3.0/conv1": False, "layer2.1/conv1": False}
    gated, slim = _cut(model, torch.randn(2, 3, 32, 32), decisions)
    _assert_exact(gated, slim, torch.randn(2, 3, 32, 32), torch.randn(5, 3, 24, 40))
    constants = [b for n, b in slim.named_buffers() if n.startswith("cg_const")]
    assert constants and all(c.shape[2:] == (1, 1) for c in constants)  # one per channel
    cg.save(slim, tmp_path / "slim.safetensors")
    loaded = cg.load(tmp_path / "slim.safetensors")
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), slim(x))


def test_a_non_uniform_constant_is_computed_at_the_input_size(tmp_path):
    gated, slim = _cut(ThreeConvBlock(), torch.randn(2, 3, 8, 8), {"conv1/conv1": False})
    _assert_exact(gated, slim, torch.randn(2, 3, 8, 8), torch.randn(2, 3, 5, 11))
    called = {n.target for n in slim.graph.nodes if n.op == "call_module"}
    assert "conv1" not in called and "conv3" in called  # conv3 pads a uniform input
    cg.save(slim, tmp_path / "slim.safetensors")
    x = torch.randn(4, 3, 9, 7)
    with torch.no_grad():
        loaded = cg.load(tmp_path / "slim.safetensors", model=ThreeConvBlock())
        assert torch.equal(loaded(x), slim(x))


def test_folding_is_the_same_whatever_the_weights(tmp_path):
    # regnet_y_400mf's file did not load: a sigmoid of an SE's constant rounds differently in
    # a vectorized kernel's tail, so the real weights decided what was uniform (issue 25)
    x = torch.randn(2, 3, 8, 8)
    decisions = {"block0/se.fc1": False, "block1/a.0": False}  # an emptied SE, a first conv
    layouts = set()
    for seed in range(4):
        torch.manual_seed(seed)
        gated, slim = _cut(YNet(), x, decisions)
        _assert_exact(gated, slim, x, torch.randn(3, 3, 6, 10))
        called = {n.target for n in slim.graph.nodes if n.op == "call_module"}
        assert not any(t.startswith(("block0.se", "block1.")) for t in called), called
        layouts.add(tuple((k, tuple(v.shape)) for k, v in slim.state_dict().items()))
        cg.save(slim, tmp_path / "slim.safetensors")
        loaded = cg.load(tmp_path / "slim.safetensors", model=YNet())
        with torch.no_grad():
            assert torch.equal(loaded(x), slim(x)), seed
    assert len(layouts) == 1


@pytest.mark.parametrize("mode", ["channel", "both"])
def test_regnet_with_fully_closed_gates_is_exact(mode):
    model = cg.create_model("regnet_y_400mf")
    x = torch.randn(2, 3, 32, 32)
    gated = cg.insert_gates(randomize(model).eval(), x, cg.GateConfig(mode=mode)).eval()
    rng = random.Random(0)
    decisions = {}
    for name, g in gated.gates.items():
        if g.units == 1:
            decisions[name] = rng.random() < 0.8
        else:
            kind = rng.choice(["closed", "open", "random"])
            decisions[name] = (kind != "closed" if kind != "random"
                               else tuple(rng.random() < 0.5 for _ in range(g.units)))  # fmt: skip
    assert any(v is False for v in decisions.values())
    cg.fix_decisions(gated, decisions)
    slim = cg.materialize(gated, decisions).eval()
    _assert_exact(gated, slim, x, torch.randn(1, 3, 48, 40))


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_materialize_under_no_grad_and_inference_mode(context):
    x = torch.randn(2, 3, 16, 16)
    gated = cg.insert_gates(cg.create_model("resnet20"), x, cg.GateConfig(mode="channel")).eval()
    decisions = {n: tuple(i % 2 == 0 for i in range(g.units)) for n, g in gated.gates.items()}
    with context():
        slim = cg.materialize(gated, decisions)
    cg.fix_decisions(gated, decisions)
    _assert_exact(gated, slim.eval(), x)
    slim.train()
    loss = slim(x).sum()
    loss.backward()  # the slim model still trains
    assert all(p.grad is not None for p in slim.parameters())


def test_no_warning_for_parameters_outside_layers():
    x = torch.randn(2, 3, 32, 32)
    gated = cg.insert_gates(cg.create_model("convnext_tiny"), x, cg.GateConfig(mode="channel"))
    decisions = {n: tuple(i % 3 != 0 for i in range(g.units)) for n, g in gated.gates.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slim = cg.materialize(gated.eval(), decisions)
    assert [str(w.message) for w in caught] == []
    cg.fix_decisions(gated, decisions)
    _assert_exact(gated, slim.eval(), x)
    # the layer scales are on the residual width, which middle gates leave whole
    scales = {n: p.shape for n, p in slim.named_parameters() if n.endswith("layer_scale")}
    original = {n: p.shape for n, p in gated.named_parameters() if n.endswith("layer_scale")}
    assert scales and scales == original
    assert cg.flops(slim, x[:1]).params < cg.flops(cg.create_model("convnext_tiny"), x[:1]).params

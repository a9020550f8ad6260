"""The block finder on synthetic topologies (tests/synthetic_models.py) and torchvision."""

import random

import pytest
import torch

import consensus_gates as cg
from consensus_gates.fx.blocks import find_blocks
from consensus_gates.fx.tracing import record_shapes, trace

from conftest import randomize, rel_diff
from synthetic_models import CASES


def _find(model, x):
    gm, _ = trace(model)
    record_shapes(gm, (x,))
    return find_blocks(gm)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_synthetic_topologies(case):
    branches, rejected = _find(case.factory(), torch.randn(*case.input_shape))
    assert len(branches) == case.expected_blocks, (case.note, [r.reason for r in rejected])


@pytest.mark.parametrize("case", [c for c in CASES if c.expected_blocks], ids=lambda c: c.name)
def test_user_written_models_gate_and_cut_exactly(case):
    model = randomize(case.factory()).eval()
    x = torch.randn(*case.input_shape)
    gated = cg.insert_gates(model, x).eval()
    assert len(gated.gates) == case.expected_blocks
    cg.fix_decisions(gated, dict.fromkeys(gated.gates, True))
    with torch.no_grad():
        torch.testing.assert_close(gated(x), model(x), rtol=1e-6, atol=0)
    rng = random.Random(0)
    patterns = [dict.fromkeys(gated.gates, False)]
    patterns += [{n: rng.random() < 0.5 for n in gated.gates} for _ in range(20)]
    for decisions in patterns:
        cg.fix_decisions(gated, decisions)
        slim = cg.materialize(gated, decisions).eval()
        with torch.no_grad():
            assert rel_diff(gated(x), slim(x)) <= 1e-5, decisions


def test_refusals_say_why():
    by_name = {c.name: c for c in CASES}
    reasons = {
        "RepVGGBlock": "parallel branches",
        "DLALike": "used outside",
        "GRNBlock": "no conv, linear",
        "SliceAssignResidual": "slice",
    }
    for name, text in reasons.items():
        case = by_name[name]
        _, rejected = _find(case.factory(), torch.randn(*case.input_shape))
        assert any(text in r.reason for r in rejected), (name, rejected)


@pytest.mark.parametrize(
    "name,kwargs,shape,count,first,last",
    [
        ("resnet18", {}, (1, 3, 32, 32), 8, "layer1.0", "layer4.1"),
        ("resnet50", {}, (1, 3, 32, 32), 16, "layer1.0", "layer4.2"),
        ("mobilenet_v2", {}, (1, 3, 32, 32), 10, "features.3", "features.16"),
        ("efficientnet_b0", {}, (1, 3, 32, 32), 9, "features.2.1", "features.6.3"),
        (
            "vit_b_16",
            {"image_size": 32},
            (1, 3, 32, 32),
            24,
            "encoder.layers.encoder_layer_0.self_attention",
            "encoder.layers.encoder_layer_11.mlp",
        ),
        ("resnet20", {"shortcut": "B"}, (1, 3, 32, 32), 9, "layer1.0", "layer3.2"),
    ],
)
def test_torchvision_and_zoo_blocks_and_names(name, kwargs, shape, count, first, last):
    branches, rejected = _find(cg.create_model(name, **kwargs), torch.randn(*shape))
    names = [b.name for b in branches]
    assert (len(names), names[0], names[-1]) == (count, first, last)
    assert len(set(names)) == count and not rejected


def test_projection_shortcut_is_the_skip_not_the_branch():
    """In a downsampling Bottleneck the branch is conv1..bn3, the skip is downsample."""
    branches, _ = _find(cg.create_model("resnet50"), torch.randn(1, 3, 32, 32))
    first = branches[0]
    targets = {n.target for n in first.nodes if n.op == "call_module"}
    assert "layer1.0.conv3" in targets and "layer1.0.bn3" in targets
    assert not any(t.startswith("layer1.0.downsample") for t in targets)


class _BlurPool(torch.nn.Module):
    """A fixed-kernel anti-aliased downsampling, kept whole as a leaf module."""

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 2) * 1.0


class _BlurShortcutNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.down = _BlurPool()
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = self.down(x) + torch.relu(self.conv(x))
        return self.head(x.mean((2, 3)))


@pytest.fixture
def blur_as_shortcut():
    from consensus_gates.fx import blocks

    before = blocks.SHORTCUT.modules
    blocks.register_op(_BlurPool, "shortcut")
    yield
    blocks.SHORTCUT.modules = before


def test_a_registered_op_forms_a_shortcut(blur_as_shortcut):
    model, x = randomize(_BlurShortcutNet()).eval(), torch.randn(2, 3, 16, 16)
    gated = cg.insert_gates(model, x, leaf_modules=[_BlurPool])
    assert list(gated.gates) == ["conv"]
    slim = cg.materialize(gated, {"conv": False}).eval()
    with torch.no_grad():
        expected = model.head(model.down(model.stem(x)).mean((2, 3)))
        assert rel_diff(slim(x), expected) <= 1e-6


def test_an_unregistered_leaf_is_no_shortcut_and_bad_roles_are_refused():
    with pytest.raises(ValueError, match="or a projection shortcut of it"):
        cg.insert_gates(_BlurShortcutNet(), torch.randn(2, 3, 16, 16), leaf_modules=[_BlurPool])
    from consensus_gates.fx.blocks import register_op

    with pytest.raises(ValueError, match="roles from"):
        register_op(_BlurPool, "shorcut")
    with pytest.raises(TypeError, match="method name"):
        register_op(3, "shortcut")

"""Every user mistake gives an error of our own, with a message that says what to do.

Each `pytest.raises(..., match=...)` matches text written by consensus_gates, so a raw torch
or Python error with the same type cannot pass for it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import consensus_gates as cg
from consensus_gates import GateConfig, InputError, TracingError
from consensus_gates.models import CifarResNet

from conftest import randomize, rel_diff

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32)


@pytest.fixture()
def resnet20() -> nn.Module:
    return cg.create_model("resnet20")


@pytest.fixture()
def gated(resnet20, x) -> cg.GatedModel:
    return cg.insert_gates(resnet20, x)


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


class PlainCNN(nn.Module):
    """No residual merge anywhere (VGG-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class DataDependent(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace through it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class NetWithUntraceableChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.block = DataDependent(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = self.block(x)
        x = F.relu(x + self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class NetWithUntraceableTop(NetWithUntraceableChild):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        if x.mean() > 0:
            x = x * 2
        x = F.relu(x + self.bn1(self.conv1(x)))
        return self.fc(x.mean((2, 3)))


# --------------------------------------------------------------------------------------
# insert_gates
# --------------------------------------------------------------------------------------


def test_no_residual_merge(x):
    with pytest.raises(ValueError, match=r"PlainCNN has no residual merge to gate"):
        cg.insert_gates(PlainCNN(), x)


def test_exclude_removing_every_gate_says_so(resnet20, x):
    with pytest.raises(ValueError, match=r"no residual merge.*exclude=\('\*',\) removed every"):
        cg.insert_gates(resnet20, x, GateConfig(exclude=("*",)))


def test_untraceable_submodule_names_it():
    with pytest.raises(TracingError) as info:
        cg.insert_gates(NetWithUntraceableChild(), torch.randn(2, 3, 16, 16))
    message = str(info.value)
    assert "module 'block'" in message
    assert "(DataDependent)" in message
    assert "leaf_modules=['block']" in message
    assert "leaf_modules=[DataDependent]" in message
    assert isinstance(info.value.__cause__, Exception)  # the fx error is chained, not lost


@pytest.mark.parametrize("leaf", ["block", DataDependent], ids=["by-name", "by-class"])
def test_leaf_modules_fix_untraceable_submodule(leaf):
    model = randomize(NetWithUntraceableChild()).eval()
    x = torch.randn(2, 3, 16, 16)
    gated = cg.insert_gates(model, x, leaf_modules=[leaf])
    assert len(gated.gates) == 2
    assert gated.spec["leaf_modules"] == ["block"]
    cg.fix_decisions(gated, {n: True for n in gated.gates})
    gated.eval()
    with torch.no_grad():
        for sign in (1, -1):  # both sides of the data-dependent branch
            xi = sign * x.abs()
            assert rel_diff(model(xi), gated(xi)) <= 1e-6


def test_untraceable_top_level_forward():
    with pytest.raises(TracingError, match=r"forward of NetWithUntraceableTop itself") as info:
        cg.insert_gates(NetWithUntraceableTop(), torch.randn(2, 3, 16, 16))
    assert "top-level forward cannot be a leaf" in str(info.value)
    assert "leaf_modules" in str(info.value)


def test_wrong_channel_count(resnet20):
    with pytest.raises(InputError, match=r"got \(2, 1, 32, 32\), expected \(N, 3, H, W\)") as info:
        cg.insert_gates(resnet20, torch.randn(2, 1, 32, 32))
    assert "'conv1'" in str(info.value)


@pytest.mark.parametrize(
    "inputs, got",
    [([1, 2, 3], "list"), ("images", "str"), ((), "tuple"), (None, "NoneType")],
    ids=["list-of-ints", "string", "empty-tuple", "none"],
)
def test_non_tensor_inputs(resnet20, inputs, got):
    with pytest.raises(InputError, match=rf"must be a tensor or a tuple of tensors.*got {got}$"):
        cg.insert_gates(resnet20, inputs)


def test_too_many_inputs(resnet20, x):
    with pytest.raises(InputError, match=r"forward takes 1 input\(s\) \(x\); example_inputs has 2"):
        cg.insert_gates(resnet20, (x, x))


def test_input_errors_are_value_errors(resnet20):
    # InputError subclasses ValueError, so generic handlers still catch it
    with pytest.raises(ValueError, match=r"example_inputs"):
        cg.insert_gates(resnet20, "images")


def test_leaf_modules_unknown_name(resnet20, x):
    with pytest.raises(ValueError, match=r"does not have: \['layer9', 'no\.such'\]"):
        cg.insert_gates(resnet20, x, leaf_modules=["layer1", "no.such", "layer9"])


@pytest.mark.parametrize("bad", [3, nn.ReLU(), None], ids=["int", "module-instance", "none"])
def test_leaf_modules_wrong_type(resnet20, x, bad):
    with pytest.raises(TypeError, match=r"leaf_modules takes nn\.Module classes or qualified"):
        cg.insert_gates(resnet20, x, leaf_modules=["layer1", bad])


def test_leaf_modules_as_a_single_string(resnet20, x):
    gated = cg.insert_gates(resnet20, x, leaf_modules="layer1")
    assert gated.spec["leaf_modules"] == ["layer1"]
    assert not any(name.startswith("layer1.") for name in gated.gates)


def test_already_gated(gated, x):
    with pytest.raises(ValueError, match=r"already has gates; call insert_gates on the original"):
        cg.insert_gates(gated, x)


# --------------------------------------------------------------------------------------
# GateConfig
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"head": "sigmoid"}, r"head must be one of \('ste', 'gumbel', 'bernoulli'\), got 'sig"),
        ({"hidden": 0}, r"hidden must be >= 1, got 0"),
        ({"tau": 0.0}, r"tau must be > 0, got 0\.0"),
        ({"tau": -1.0}, r"tau must be > 0, got -1\.0"),
        ({"momentum": 0.0}, r"momentum must be in \(0, 1\] or None, got 0\.0"),
        ({"momentum": 2.0}, r"momentum must be in \(0, 1\] or None, got 2\.0"),
        ({"mode": "width"}, r"mode must be one of \('layer', 'channel', 'both'\), got 'width'"),
        ({"position": "inside"}, r"position must be one of \('middle', 'after', 'before'\)"),
        ({"fc_layers": 3}, r"fc_layers must be 1 or 2, got 3"),
    ],
    ids=[
        "head",
        "hidden",
        "tau-zero",
        "tau-negative",
        "momentum-zero",
        "momentum-two",
        "mode",
        "position",
        "fc_layers",
    ],
)
def test_gate_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=rf"GateConfig\.{message}"):
        GateConfig(**kwargs)


@pytest.mark.parametrize("pattern", ["layer1.0", "layer1.*"])
def test_gate_config_exclude_as_a_single_string(pattern):
    assert GateConfig(exclude=pattern).exclude == (pattern,)


def test_gate_config_exclude_removes_gates(resnet20, x):
    gated = cg.insert_gates(resnet20, x, GateConfig(exclude=("layer1.*", "layer3.2")))
    assert list(gated.gates) == ["layer2.0", "layer2.1", "layer2.2", "layer3.0", "layer3.1"]


def test_gate_config_edges_are_valid():
    GateConfig(momentum=1.0)
    GateConfig(momentum=None)
    GateConfig(hidden=1, tau=1e-3)


# --------------------------------------------------------------------------------------
# Functions that need a gated model
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda m: cg.materialize(m),
        lambda m: cg.consensus(m),
        lambda m: cg.fix_decisions(m, None),
        lambda m: cg.polarization_loss(m),
        lambda m: cg.activation_loss(m),
    ],
    ids=["materialize", "consensus", "fix_decisions", "polarization_loss", "activation_loss"],
)
def test_not_gated(resnet20, call):
    with pytest.raises(TypeError, match=r"got CifarResNet; call consensus_gates\.insert_gates"):
        call(resnet20)


def test_slim_model_is_not_gated(gated):
    slim = cg.materialize(gated)
    with pytest.raises(TypeError, match=r"expected a model returned by insert_gates\(\)"):
        cg.materialize(slim)


@pytest.mark.parametrize(
    "call",
    [
        lambda g: cg.materialize(g, {"no.such.gate": True}),
        lambda g: cg.fix_decisions(g, {"no.such.gate": False}),
    ],
    ids=["materialize", "fix_decisions"],
)
def test_unknown_gate_name(gated, call):
    with pytest.raises(
        KeyError, match=r"no gate named \['no\.such\.gate'\]; the gates are"
    ) as info:
        call(gated)
    for name in gated.gates:
        assert f"'{name}'" in str(info.value)


def test_unknown_gate_name_changes_nothing(gated):
    with pytest.raises(KeyError):
        cg.fix_decisions(gated, {"layer1.0": False, "no.such.gate": False})
    assert all(g.fixed is None for g in gated.gates.values())


@pytest.mark.parametrize("loss", [cg.polarization_loss, cg.activation_loss])
def test_losses_before_forward(gated, loss):
    with pytest.raises(RuntimeError, match=r"run a forward pass of the gated model before"):
        loss(gated)


def test_activation_loss_bad_weight(gated, x):
    gated(x)
    with pytest.raises(ValueError, match=r"weight must be 'uniform' or 'flops', got 'bogus'"):
        cg.activation_loss(gated, weight="bogus")


def test_batch_of_one_in_train_mode(gated):
    gated.train()
    with pytest.raises(ValueError, match=r"got a batch of 1 in training mode.*call \.eval\(\)"):
        gated(torch.randn(1, 3, 32, 32))
    gated.eval()
    assert gated(torch.randn(1, 3, 32, 32)).shape == (1, 10)  # as the message says


def test_batch_of_one_is_fine_with_pinned_gates(gated):
    gated.train()
    cg.fix_decisions(gated, {n: True for n in gated.gates})
    assert gated(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# --------------------------------------------------------------------------------------
# create_model and the zoo
# --------------------------------------------------------------------------------------


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*list_models\(\)"):
        cg.create_model("resnet21")


def test_unknown_model_name_suggests():
    with pytest.raises(ValueError, match=r"unknown model 'resnet5O'\. Did you mean .*resnet56"):
        cg.create_model("resnet5O")


def test_unknown_model_name_without_close_match():
    with pytest.raises(ValueError, match=r"unknown model 'zzzzzzzz'\. See") as info:
        cg.create_model("zzzzzzzz")
    assert "Did you mean" not in str(info.value)


def test_cifar_resnet_depth():
    with pytest.raises(
        ValueError, match=r"depth must be 6n\+2 \(20, 32, 44, 56, 110, \.\.\.\), got 21"
    ):
        CifarResNet(depth=21)
    with pytest.raises(ValueError, match=r"6n\+2"):
        CifarResNet(depth=2)


def test_cifar_resnet_shortcut():
    with pytest.raises(ValueError, match=r"shortcut must be 'A' \(zero-padding\) or 'B'.*got 'C'"):
        cg.create_model("resnet20", shortcut="C")


def test_register_model_twice():
    @cg.register_model("test_errors_twice")
    def first() -> nn.Module:
        return PlainCNN()

    cg.register_model("test_errors_twice")(first)  # the same function again is fine
    with pytest.raises(ValueError, match=r"'test_errors_twice' is already registered"):

        @cg.register_model("test_errors_twice")
        def second() -> nn.Module:
            return PlainCNN()

"""Channel positions: one registered object per position, which `insert_gates` asks where its
channel points are and `materialize` asks how to cut them."""

import pytest
import torch
from torch import nn

import consensus_gates as cg
from consensus_gates.fx.blocks import find_blocks, find_channel_points
from consensus_gates.fx.positions import (
    POSITIONS,
    After,
    Before,
    ChannelPosition,
    Middle,
    position_named,
    register_position,
)
from consensus_gates.fx.tracing import record_shapes, trace

from conftest import randomize, rel_diff

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 8, 8)
BUILT_IN = {"middle": Middle, "after": After, "before": Before}


def _net():
    return randomize(cg.create_model("cifar_resnet", blocks=[2, 1, 1], num_classes=4)).eval()


def _partly_closed(gated):
    """The first gate fully closed, every other channel of the rest closed."""
    names = list(gated.gates)
    decisions = {names[0]: False}
    for n in names[1:]:
        decisions[n] = tuple(i % 2 == 0 for i in range(gated.gates[n].units))
    return decisions


def _check_exact(gated, decisions):
    cg.fix_decisions(gated, decisions)
    slim = cg.materialize(gated, decisions).eval()
    assert not any(isinstance(m, cg.ChannelGate) for m in slim.modules())
    with torch.no_grad():
        assert rel_diff(gated(X), slim(X)) <= 1e-5
    return slim


def _spy(monkeypatch, position, calls):
    """Count the calls of each method of the registered `position` object."""
    for method in ("find", "cut_partly", "cut_closed"):
        original = getattr(position, method)

        def counted(*args, _method=method, _original=original):
            calls.append(_method)
            return _original(*args)

        monkeypatch.setattr(position, method, counted)


def test_the_built_in_positions_are_registered_in_order():
    assert [type(POSITIONS[n]) for n in BUILT_IN] == list(BUILT_IN.values())
    assert all(POSITIONS[n].name == n for n in BUILT_IN)
    assert tuple(POSITIONS)[:3] == ("middle", "after", "before")


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_each_position_finds_and_cuts_its_points(monkeypatch, name):
    calls = []
    _spy(monkeypatch, POSITIONS[name], calls)
    gated = cg.insert_gates(_net(), X, cg.GateConfig(mode="channel", position=name)).eval()
    gates = [g for g in gated.gates.values() if isinstance(g, cg.ChannelGate)]
    assert gates and all(g.position == name for g in gates)
    assert calls.count("find") == 4  # once per residual branch
    calls.clear()
    _check_exact(gated, _partly_closed(gated))
    assert calls.count("cut_closed") == 1
    assert calls.count("cut_partly") == len(gates) - 1


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_each_position_is_exact_with_layer_gates_too(name):
    gated = cg.insert_gates(_net(), X, cg.GateConfig(mode="both", position=name)).eval()
    decisions = _partly_closed(gated)
    decisions[next(n for n, g in gated.gates.items() if isinstance(g, cg.LayerGate))] = False
    _check_exact(gated, decisions)


class _First(ChannelPosition):
    """A test position: the first middle point of each branch only."""

    def find(self, facts, branch):
        return POSITIONS["middle"].find(facts, branch)[:1]

    def cut_partly(self, cut):
        POSITIONS["middle"].cut_partly(cut)


@pytest.fixture
def custom_position():
    """`_First` registered as "test_first" for one test, then removed."""
    register_position("test_first")(_First)
    yield "test_first"
    POSITIONS.pop("test_first", None)


class _Bottleneck(nn.Module):
    """Two middle points: the outputs of the 1x1 and of the 3x3 conv."""

    def __init__(self, c: int = 8, width: int = 4):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, width, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, c, 1), nn.BatchNorm2d(c),
        )  # fmt: skip

    def forward(self, x):
        return torch.relu(x + self.body(x))


def _bottlenecks():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Bottleneck(), _Bottleneck())
    return randomize(net).eval()


def test_a_registered_position_is_accepted_inserted_and_cut(custom_position):
    assert custom_position in POSITIONS
    net = _bottlenecks()
    middle = cg.insert_gates(net, X, cg.GateConfig(mode="channel"))
    assert list(middle.gates) == [f"{i}/body.{j}" for i in (1, 2) for j in (0, 3)]
    config = cg.GateConfig(mode="channel", position=custom_position)
    gated = cg.insert_gates(net, X, config).eval()
    assert list(gated.gates) == ["1/body.0", "2/body.0"]
    assert all(g.position == custom_position for g in gated.gates.values())
    slim = _check_exact(gated, {"1/body.0": (True, False, True, False), "2/body.0": False})
    assert slim.get_submodule("1.body.0").out_channels == 2


def test_an_unknown_position_lists_the_registered_ones(custom_position):
    with pytest.raises(ValueError, match=r"GateConfig\.position must be one of \('middle', "
                       r"'after', 'before', 'test_first'\), got 'nowhere'"):  # fmt: skip
        cg.GateConfig(position="nowhere")
    with pytest.raises(ValueError, match=r"no channel position named 'nowhere'; registered: \("):
        position_named("nowhere")
    gm, _ = trace(_net())
    record_shapes(gm, (X,))
    branches, _ = find_blocks(gm)
    with pytest.raises(ValueError, match="no channel position named 'nowhere'"):
        find_channel_points(gm, branches, "nowhere")
    assert find_channel_points(gm, branches, "middle") == find_channel_points(
        gm, branches, POSITIONS["middle"]
    )


def test_registering_a_taken_name_or_a_non_position_is_refused():
    with pytest.raises(ValueError, match="'middle' is already registered"):
        register_position("middle")(_First)
    assert type(POSITIONS["middle"]) is Middle
    with pytest.raises(TypeError, match="decorates a ChannelPosition subclass"):
        register_position("test_not_a_position")(object)
    with pytest.raises(ValueError, match="non-empty string"):
        register_position("")
    assert "test_not_a_position" not in POSITIONS


def test_positions_do_not_load_torch_pruning():
    import subprocess
    import sys

    code = (
        "import sys; import consensus_gates.fx.positions, consensus_gates.config; "
        "print('torch_pruning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

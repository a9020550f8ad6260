"""Decisions as users write them: bools, 0/1, numpy and torch arrays; anything else is an
error that names the gate."""

import numpy as np
import pytest
import torch

import consensus_gates as cg

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 16, 16)


@pytest.fixture(scope="module")
def layer_gated():
    return cg.insert_gates(cg.create_model("resnet20"), X).eval()


@pytest.fixture(scope="module")
def channel_gated():
    return cg.insert_gates(cg.create_model("resnet20"), X, cg.GateConfig(mode="channel")).eval()


@pytest.mark.parametrize(
    "value,expected",
    [(False, False), (True, True), (0, False), (1, True), (np.bool_(False), False),
     (np.int64(1), True), (torch.tensor(False), False), (torch.tensor(0), False),
     (np.array(True), True), ((False,), False), ([1], True), (np.array([False]), False),
     (torch.tensor([0]), False)],  # fmt: skip
    ids=repr,
)
def test_layer_gate_accepts_bools_and_0_1(layer_gated, value, expected):
    slim = cg.materialize(layer_gated, {"layer1.0": value})
    assert slim.meta["consensus_gates"]["decisions"]["layer1.0"] is expected
    kept = any(n.target.startswith("layer1.0.conv") for n in slim.graph.nodes
               if n.op == "call_module")  # fmt: skip
    assert kept is expected


@pytest.mark.parametrize(
    "value", ["False", "0", ("False",), [False, False], 2, -1, 0.0, 1.0, None, [0.0],
              np.array([[False]])],
    ids=repr,
)
def test_layer_gate_refuses_other_values(layer_gated, value):
    with pytest.raises(ValueError, match=r"gate 'layer1\.0' is a layer gate: its decision is one "
                                         r"bool .*; got "):  # fmt: skip
        cg.materialize(layer_gated, {"layer1.0": value})
    with pytest.raises(ValueError, match=r"gate 'layer1\.0'"):
        cg.fix_decisions(layer_gated, {"layer1.0": value})


def _half(units):
    return [i % 2 for i in range(units)]


@pytest.mark.parametrize(
    "make",
    [lambda u: tuple(bool(v) for v in _half(u)), lambda u: _half(u),
     lambda u: np.array(_half(u), dtype=bool), lambda u: np.array(_half(u)),
     lambda u: torch.tensor(_half(u), dtype=torch.bool), lambda u: torch.tensor(_half(u))],
    ids=["tuple", "list of 0/1", "numpy bool", "numpy int", "torch bool", "torch int"],
)
def test_channel_gate_accepts_sequences_and_arrays(channel_gated, make):
    name = "layer1.0/conv1"
    units = channel_gated.gates[name].units
    slim = cg.materialize(channel_gated, {name: make(units)})
    assert slim.meta["consensus_gates"]["decisions"][name] == tuple(bool(v) for v in _half(units))
    assert slim.get_submodule("layer1.0.conv1").out_channels == units // 2


@pytest.mark.parametrize(
    "value,message",
    [("0" * 16, "takes 16 decisions: a sequence or 1-d array of bools or 0/1"),
     (["False"] * 16, "takes 16 decisions: a sequence"),
     ([0.0] * 16, "takes 16 decisions: a sequence"),
     ([2] * 16, "takes 16 decisions: a sequence"),
     (np.zeros((4, 4), dtype=bool), "takes 16 decisions: a sequence"),
     ([True] * 15, "takes 16 decisions; got 15"),
     (torch.ones(17, dtype=torch.bool), "takes 16 decisions; got 17")],  # fmt: skip
    ids=["string", "strings", "floats", "twos", "2-d array", "too short", "too long"],
)
def test_channel_gate_refuses_other_values(channel_gated, value, message):
    with pytest.raises(ValueError, match=r"gate 'layer1\.0/conv1' " + message.replace("(", r"\(")):
        cg.materialize(channel_gated, {"layer1.0/conv1": value})


def test_a_single_bool_applies_to_every_channel(channel_gated):
    slim = cg.materialize(channel_gated, {"layer1.0/conv1": 0})
    assert slim.meta["consensus_gates"]["decisions"]["layer1.0/conv1"] == (False,) * 16


def test_unknown_gate_names_are_an_error_with_a_suggestion(layer_gated):
    with pytest.raises(KeyError, match=r"no gate named \['layr1\.0'\]; did you mean 'layer1\.0'"):
        cg.materialize(layer_gated, {"layr1.0": False})
    with pytest.raises(KeyError, match="no gate named"):
        cg.fix_decisions(layer_gated, {"layer9.9": False})


def test_decisions_must_be_a_mapping(layer_gated):
    with pytest.raises(TypeError, match="decisions must map gate names to decisions"):
        cg.materialize(layer_gated, [False] * 9)

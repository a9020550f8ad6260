"""The surgery fuzzer: random residual networks (tests/fuzz_models.py), every mode, position
and head, and the properties `materialize`, `save`/`load` and `export` promise.

CI runs the seeded `fuzz-ci` profile; ``CG_FUZZ=long`` runs thousands of random networks.
Every failure ever found is kept below as an explicit `@example`.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import consensus_gates as cg
from consensus_gates.config import MODES
from consensus_gates.fx.positions import POSITIONS
from consensus_gates.gates.heads import HEADS

from conftest import randomize, rel_diff
from fuzz_models import (
    IDENTITIES,
    Block,
    Branch,
    Net,
    ResBlock,
    build,
    fixed_size,
    input_shape,
    nets,
    parameter_free_merges,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

_common = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# CI: a fixed seed, about 70 s on one core (the suite must stay under 10 minutes on 2 cores);
# CG_FUZZ=long: new random networks each run
settings.register_profile("fuzz-ci", derandomize=True, max_examples=100, **_common)
settings.register_profile("fuzz-long", max_examples=2000, **_common)
PROFILE = settings.get_profile("fuzz-" + os.environ.get("CG_FUZZ", "ci"))
# save, load and export cost several surgeries each: a fifth as many networks
ROUND_TRIP = settings(PROFILE, max_examples=max(1, PROFILE.max_examples // 5))

TOL = 1e-5  # surgery: max abs difference relative to the output's max abs
EXACT = 1e-6  # the same computation (all gates open, a reloaded model)
REFUSALS = ("has no residual merge to gate", "can be gated at position=")
REJECTIONS = (  # what block finding may refuse in these networks
    "a sum of 3 parallel branches without a bare identity",
    "neither operand is the block input or a projection shortcut of it",
    "two parallel branches of equal length, neither is a shortcut",
)


@dataclass(frozen=True)
class Case:
    """A network, a gate config, and two decision patterns: `bits`, cycled over every
    gate's units (a layer gate takes one), and `whole`, cycled over the gates (each fully
    open or fully closed); "mixed" closes the gates `whole` closes and cuts the others as
    `bits` says."""

    net: Net
    mode: str = "layer"
    position: str = "middle"
    head: str = "ste"
    fc_layers: int = 1
    bits: tuple[bool, ...] = (True, False)
    whole: tuple[bool, ...] = (False,)


def _net(layout: str, *blocks: Block, cin: int = 4, head: bool = True) -> Net:
    """A network of `blocks` after a 4-channel stem, on 4x4 (or 4 tokens)."""
    return Net(layout, cin, 1 if layout == "vec" else 4, 4, blocks, head=head)


# Every failure the fuzzer found, minimized; /tmp/fuzz_failures.md, fixed where noted.
FOUND = {
    "parallel branches behind an nn.Identity shortcut": Case(  # fx/blocks.py
        _net("2d", Block(4, branches=(Branch(), Branch()), post_act=False), head=False)
    ),
    "in-place ReLU after a closed merge whose input is concatenated": Case(  # fx/surgery.py
        _net("2d", Block(4, then="concat"), head=False)
    ),
    "middle gate before an SE at the end of a branch": Case(  # fx/blocks.py
        _net("2d", Block(4, branches=(Branch(se="conv"),), post_act=False), head=False),
        mode="channel",
    ),
    "middle gate before an SE read by a LayerNorm": Case(  # fx/blocks.py
        _net(
            "vec",
            Block(
                4,
                branches=(Branch("mlp", 8, "ln", preact=True, se="linear", se_at="mid"),),
                shortcut="conv",
            ),
        ),
        mode="channel",
        whole=(True,),
    ),
    "a 1-D PoolFormer branch: the layer gate read the length as channels": Case(  # fx/insert.py
        _net("1d", Block(4, branches=(Branch("pool", norm="none"),), post_act=False), cin=1)
    ),
    "mode both, position before, conv1d: the layer gate read the length as channels": Case(
        _net("1d", Block(4), cin=1), mode="both", position="before"
    ),  # fx/insert.py
    "after gates on two parallel branches of one sum": Case(  # fx/surgery.py
        _net("2d", Block(4, branches=(Branch(), Branch()), shortcut="bare", merge="add")),
        mode="channel",
        position="after",
    ),
    # until the fold of emptied branches removes the layers it folds:
    "a fully closed before gate on a basic block keeps every parameter": Case(
        _net("2d", Block(4)), mode="channel", position="before", bits=(False,)
    ),
    "a fully closed before gate on a bias-free MLP keeps every parameter": Case(
        Net(
            "vec",
            14,
            1,
            13,
            (Block(4, branches=(Branch("mlp", 9),), shortcut="conv", post_act=False),),
            head=False,
        ),
        mode="channel",
        position="before",
        bits=(False,),
    ),
    "a fully closed gate inside a Linear SE keeps every parameter": Case(
        _net("2d", Block(4, branches=(Branch("inverted", 4, "gn", se="linear"),), post_act=False)),
        mode="channel",
    ),
    "Linear on tokens then nn.ReLU(inplace=True)": Case(  # fx/surgery.py
        _net("tok", Block(4, branches=(Branch("tokmix", 6, act="relu_", bias=True),))),
        mode="channel",
    ),
    "out.add_(x) on a transposed token-mixing branch": Case(  # fx/surgery.py
        _net("tok", Block(4, branches=(Branch("tokmix", 4, preact=True),), merge="add_")),
        mode="channel",
    ),
    "a size reference moved up twice for two dims of one constant": Case(  # fx/fold.py
        _net(
            "2d",
            Block(
                5,
                stride=2,
                branches=(Branch(preact=True, se="linear"),),
                shortcut="pad",
                post_act=False,
            ),
            Block(4, shortcut="conv", post_act=False),
            cin=1,
            head=False,
        ),
        mode="channel",
        bits=(False,),
        whole=(False,),
    ),
    # fx/fold.py: a sigmoid of equal values rounds differently in a vectorized kernel's tail,
    # and the real weights decided what was uniform; load folded otherwise (issue 25)
    "a wide SE fed by an emptied width: load refuses the file": Case(
        _net(
            "2d",
            Block(
                4,
                branches=(Branch("bottleneck", 28, groups="grouped", se="conv", se_at="mid"),),
                post_act=False,
            ),
            head=False,
        ),
        mode="channel",
        whole=(True, False),
    ),
    "a wide Linear SE fed by an emptied width: load refuses the file": Case(
        _net(
            "vec",
            Block(4, branches=(Branch("mlp", 19, se="linear", se_at="mid"),), post_act=False),
            head=False,
        ),
        mode="channel",
        bits=(False,),
        whole=(False,),
    ),
    "a wide Linear SE fed by an emptied width: the reloaded model differs": Case(
        _net(
            "vec",
            Block(
                4,
                branches=(Branch("mlp", 19, preact=True, se="linear", se_at="mid"),),
                post_act=False,
            ),
            head=False,
        ),
        mode="channel",
        bits=(False,),
        whole=(False,),
    ),
    # fx/fold.py, while only the probes decided: positive probe weights saturate an SE's
    # sigmoid to 1 in every channel, which looked uniform
    "an SE's sigmoid that the probe weights saturate": Case(
        _net(
            "2d",
            Block(4, branches=(Branch(se="conv"),), shortcut="bare", post_act=False),
            Block(4, branches=(Branch(), Branch()), shortcut="bare", post_act=False),
            cin=1,
            head=False,
        ),
        mode="channel",
        position="before",
        bits=(False,),
        whole=(False,),
    ),
}


def found(test):
    for name, case in reversed(FOUND.items()):
        test = example(case=case).via(name)(test)
    return test


bools = st.lists(st.booleans(), min_size=1, max_size=24).map(tuple)
cases = st.builds(
    Case,
    nets(),
    st.sampled_from(MODES),
    st.sampled_from(tuple(POSITIONS)),
    st.sampled_from(tuple(HEADS)),
    st.sampled_from((1, 2)),
    bools,
    bools,
)


def _gated(case: Case):
    """(model, x, gated), or None where insert_gates refuses the network as documented."""
    torch.manual_seed(0)
    model = randomize(build(case.net)).eval()
    x = torch.randn(*input_shape(case.net, 2))
    config = cg.GateConfig(
        mode=case.mode, position=case.position, head=case.head, fc_layers=case.fc_layers
    )
    try:
        gated = cg.insert_gates(model, x, config)
    except ValueError as e:
        assert any(r in str(e) for r in REFUSALS), e
        if REFUSALS[0] in str(e):  # then no block may be plainly residual
            assert not any(
                isinstance(m, ResBlock) and m.spec.shortcut in IDENTITIES for m in model.modules()
            ), e
        if REFUSALS[1] in str(e):
            assert not _plain_channel_point(case.net, case.position), e
        event(f"refused: {case.mode}")
        return None
    randomize(gated.gate_modules)  # gate BN statistics: eval decisions differ per sample
    event(f"gated: {case.net.layout}, {case.mode}")
    return model, x, gated.eval()


def _other_input(case: Case) -> torch.Tensor:
    """A batch of 3 and, where the network allows, another spatial size or token count."""
    size = None if fixed_size(case.net) else case.net.size % 8 + 4  # 4..8, not the same
    return torch.randn(*input_shape(case.net, 3, size))


def _plain_channel_point(net: Net, position: str) -> bool:
    """Whether an identity block plainly has a channel point at `position`: middle, a width
    that reaches the next layer through BN or nothing; before, a branch that starts with its
    layer; after, one that ends with its layer (and BN) and no SE."""
    norms = ("none",) if net.layout == "tok" else ("bn", "none")
    for b in net.blocks:
        for br in b.branches if b.shortcut in IDENTITIES else ():
            if br.kind in ("pool", "tokmix"):
                continue
            if position == "middle" and br.norm in norms:
                return True
            if position == "before" and not br.preact:
                return True
            ends_plainly = br.preact or br.norm in norms
            if position == "after" and ends_plainly and (br.se == "none" or br.se_at == "mid"):
                return True
    return False


def _check_blocks(model, gated) -> None:
    """Each block with an identity shortcut gets one layer gate per branch; the others are
    gated or refused for a documented reason."""
    layer = [n for n, g in gated.gates.items() if isinstance(g, cg.LayerGate)]
    for r in gated.spec["rejected"]:
        assert any(reason in r["reason"] for reason in REJECTIONS), r
    if not layer:
        return
    for name, m in model.named_modules():
        if isinstance(m, ResBlock):
            mine = [n for n in layer if n == name or n.startswith((name + ".", name + "#"))]
            if m.spec.shortcut in IDENTITIES:
                assert len(mine) == len(m.spec.branches), (name, layer)
            else:
                assert len(mine) in (0, len(m.spec.branches)), (name, layer)


def _patterns(gated, case: Case):
    gates = gated.gates
    yield "all open", dict.fromkeys(gates, True)
    bits = itertools.cycle(case.bits)
    per_unit = {n: _take(bits, g) for n, g in gates.items()}
    whole = dict(zip(gates, itertools.cycle(case.whole)))
    yield "per unit", per_unit
    yield "whole gates", whole
    yield "mixed", {n: per_unit[n] if whole[n] else False for n in gates}
    yield "all closed", dict.fromkeys(gates, False)


def _take(bits, gate):
    if isinstance(gate, cg.LayerGate):
        return next(bits)
    return tuple(next(bits) for _ in range(gate.units))


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _cuts_parameters(gated, decisions, free: set[str]) -> bool:
    """Whether `decisions` close something that holds parameters: any channel (each channel
    gate sits next to a dense layer), or a layer gate's branch unless it has none."""
    for name, d in decisions.items():
        if isinstance(gated.gates[name], cg.ChannelGate):
            if not all(d if isinstance(d, tuple) else (d,)):
                return True
        elif not d and name not in free:
            return True
    return False


@given(case=cases)
@settings(PROFILE)
@found
def test_surgery_is_exact(case):
    made = _gated(case)
    if made is None:
        return
    model, x, gated = made
    _check_blocks(model, gated)
    x2 = _other_input(case)
    with torch.no_grad():  # gates deciding per sample take every size the model takes
        assert gated(x2).shape == model(x2).shape
    cg.fix_decisions(gated, dict.fromkeys(gated.gates, True))
    with torch.no_grad():
        for each in (x, x2):
            assert rel_diff(model(each), gated(each)) <= EXACT, "all open must be the original"
    free, full = parameter_free_merges(model), None
    for label, decisions in _patterns(gated, case):
        cg.fix_decisions(gated, decisions)
        slim = cg.materialize(gated, decisions).eval()
        with torch.no_grad():
            diff = rel_diff(gated(x), slim(x))
        assert diff <= TOL, f"{label}: the slim model differs by {diff:.2e}"
        assert not any(isinstance(m, cg.Gate) for m in slim.modules()), label
        params = _params(slim)
        if full is None:  # "all open" comes first
            full = params
        elif _cuts_parameters(gated, decisions, free):
            assert params < full, f"{label}: {params} parameters, {full} with all open"
        else:
            assert params == full, f"{label}: {params} parameters, {full} with all open"


@given(case=cases)
@ROUND_TRIP
@found
def test_save_load_and_export_round_trip(case):
    made = _gated(case)
    if made is None:
        return
    _, x, gated = made
    x2 = _other_input(case)
    cg.fix_decisions(gated, None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cg.save(gated, tmp / "gated.safetensors")
        back = cg.load(tmp / "gated.safetensors", model=build(case.net, seed=1))
        with torch.no_grad():  # gates decide per sample: the same decisions, the same output
            assert rel_diff(gated(x2), back(x2)) <= EXACT, "gated"
        # channels cut per unit, and whole gates closed: both change what the file holds
        decisions = dict(_patterns(gated, case))["mixed"]
        cg.fix_decisions(gated, decisions)
        slim = cg.materialize(gated, decisions).eval()
        cg.save(slim, tmp / "slim.safetensors")
        back = cg.load(tmp / "slim.safetensors", model=build(case.net, seed=1))
        with torch.no_grad():
            expected = gated(x2)
            assert rel_diff(expected, slim(x2)) <= TOL, "slim at another input size"
            assert rel_diff(expected, back(x2)) <= TOL, "reloaded slim"
        cg.export(slim, x, tmp / "slim.pt2")
        program = torch.export.load(tmp / "slim.pt2").module()
        xb = torch.randn(*input_shape(case.net, 3))  # the batch is dynamic, the size is not
        with torch.no_grad():
            assert rel_diff(slim(xb), program(xb)) <= EXACT, "exported slim"

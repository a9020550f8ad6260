"""The depth pruners of language models (`baselines.depth`): Block Influence (ShortGPT) per
layer and per branch (LLM-Drop), the removal loss (Shortened LLaMA), the greedy search
(FinerCut) and a random order, as decisions for a gated model's gates."""

from __future__ import annotations

import pytest
import torch

import consensus_gates as cg
from consensus_gates.baselines import (
    block_influence,
    greedy_removal,
    influences,
    random_order,
    removal_loss,
)

from hf_models import inputs, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
WHOLE = cg.GateConfig(granularity="layer")


def _llama(identity: str | None = None):
    """A tiny 3-layer Llama; `identity` names an output projection zeroed, so that its
    branch (or, for a whole layer, both of its projections) adds nothing."""
    model = tiny("llama")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if identity and name.startswith(identity) and name.endswith(
                ("o_proj.weight", "down_proj.weight")
            ):
                p.zero_()
    return model


def _calibration():
    x = inputs("llama", batch=4, length=10, pad=False, seed=3)
    batches = [{**x, "labels": x["input_ids"]}]
    return batches, (lambda m: [m(**b) for b in batches]), (lambda m: cg.evaluate_loss(m, batches))


def _check(gated, decisions, target):
    """The decisions name every gate and reach the target; cut, they are the gated model."""
    assert set(decisions) == set(gated.gates)
    assert cg.flops_ratio(gated, decisions) <= target + 0.2
    x = inputs("llama", batch=2, length=9, seed=7)
    slim = cg.materialize(gated, decisions)
    cg.fix_decisions(gated, decisions)
    with torch.no_grad():
        torch.testing.assert_close(slim(**x).logits, gated.eval()(**x).logits,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    cg.unfix_decisions(gated)


def test_an_identity_layer_has_no_influence_and_goes_first():
    model = _llama(identity="model.layers.1.")
    gated = cg.insert_gates(model, inputs("llama"), WHOLE)
    _, run, _ = _calibration()
    scores = influences(gated, run)
    assert scores["model.layers.1"] == pytest.approx(0, abs=1e-6)
    assert all(s > 1e-3 for n, s in scores.items() if n != "model.layers.1")
    decisions = block_influence(gated, run, target=0.7)  # a third of the layers, or so
    assert [n for n, d in decisions.items() if not d] == ["model.layers.1"]
    _check(gated, decisions, 0.7)
    assert all(g.fixed is None for g in gated.gates.values())  # left as it was


def test_llm_drop_ranks_attention_and_mlp_branches():
    model = _llama(identity="model.layers.2.mlp")
    gated = cg.insert_gates(model, inputs("llama"))  # a gate per branch
    _, run, _ = _calibration()
    scores = influences(gated, run)
    assert min(scores, key=scores.__getitem__) == "model.layers.2.mlp"
    decisions = block_influence(gated, run, target=0.5)
    assert not decisions["model.layers.2.mlp"]
    _check(gated, decisions, 0.5)


@pytest.mark.parametrize("search", [removal_loss, greedy_removal])
def test_loss_based_searches_close_the_harmless_layer_first(search):
    model = _llama(identity="model.layers.0.")
    gated = cg.insert_gates(model, inputs("llama"), WHOLE)
    batches, _, _ = _calibration()
    with torch.no_grad():
        dense = [model(**b).logits for b in batches]

    def loss(m):  # how far from the dense model: zero without the harmless layer only
        pairs = zip(batches, dense, strict=True)
        return sum(float((m(**b).logits - d).square().mean()) for b, d in pairs)

    decisions = search(gated, loss, target=0.7)
    assert [n for n, d in decisions.items() if not d] == ["model.layers.0"]
    _check(gated, decisions, 0.7)
    deeper = search(gated, loss, target=0.4)
    assert sum(not d for d in deeper.values()) == 2 and not deeper["model.layers.0"]


def test_random_order_and_targets_out_of_reach():
    gated = cg.insert_gates(_llama(), inputs("llama"), WHOLE)
    picks = {tuple(random_order(gated, 0.7, seed=s).values()) for s in range(6)}
    assert len(picks) > 1 and all(sum(p) == 2 for p in picks)
    with pytest.raises(ValueError, match="out of reach: closing all 3 gates"):
        random_order(gated, 0.01)


def test_block_influence_on_an_image_model():
    x = torch.randn(4, 3, 16, 16)
    gated = cg.insert_gates(cg.create_model("resnet20"), x)
    scores = influences(gated, lambda m: m(x))
    assert set(scores) == set(gated.gates) and all(0 <= s <= 2 for s in scores.values())
    decisions = block_influence(gated, lambda m: m(x), target=0.6)
    assert cg.flops_ratio(gated, decisions) == pytest.approx(0.6, abs=0.1)

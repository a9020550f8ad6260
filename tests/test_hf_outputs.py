"""What transformers records by hooks, on gated, cut and loaded models: one hidden state per
remaining layer (``output_hidden_states``), and the MoE router logits and auxiliary loss
(``output_router_logits``). Before, traced layers and routers traced through made both
come back empty, without a word."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import consensus_gates as cg
from consensus_gates.hf.gating import traced_layers

from hf_models import inputs, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

# arch -> the layer whose branches a cut closes, the hidden states it is one of, and those
# it is not. Pre-norm layers are removed then; post-norm ones (BERT, BART) keep their norm.
HIDDEN = {
    "gpt2": ("transformer.h.1", "hidden_states", None),
    "llama": ("model.layers.1", "hidden_states", None),
    "bert": ("bert.encoder.layer.1", "hidden_states", None),
    "bart": ("model.encoder.layers.0", "encoder_hidden_states", "decoder_hidden_states"),
    "vit": ("vit.layers.1", "hidden_states", None),
}
POST_NORM = ("bert", "bart")


def _states(model, x, key):
    with torch.no_grad():
        return model(**x, output_hidden_states=True)[key]


@pytest.mark.parametrize("arch", list(HIDDEN))
def test_hidden_states_are_one_per_remaining_layer(tmp_path, arch):
    layer, key, other = HIDDEN[arch]
    model, x = tiny(arch), inputs(arch)
    gated = cg.insert_gates(model, {**x, "output_hidden_states": True})
    for k in filter(None, (key, other)):  # every gate open: all of the original's
        want, got = _states(model, x, k), _states(gated, x, k)
        assert len(got) == len(want) > 2
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    decisions = {n: not n.startswith(f"{layer}.") for n in gated.gates}
    assert sum(not d for d in decisions.values()) == 2
    slim = cg.materialize(gated, decisions)
    cg.fix_decisions(gated, decisions)
    cg.save(slim, tmp_path / "slim.safetensors")
    loaded = cg.load(tmp_path / "slim.safetensors")
    full, index = _states(gated, x, key), int(layer.rsplit(".", 1)[1])
    removed = len(traced_layers(gated)) - len(traced_layers(slim))
    assert removed == (arch not in POST_NORM)
    # the emptied layer returned its input: the state after it is the one before it
    want = [*full[: index + 1], *full[index + 1 + removed :]]
    for cut in (slim, loaded):
        got = _states(cut, x, key)
        assert len(got) == len(full) - removed
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        if other:
            assert len(_states(cut, x, other)) == len(_states(gated, x, other))


MOE = {
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(num_local_experts=4)),
    "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM,
                  dict(num_experts=4, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32)),
}  # fmt: skip


@pytest.mark.parametrize("arch", list(MOE))
def test_router_logits_and_auxiliary_loss_on_gated_and_cut_moe_models(tmp_path, arch):
    config_cls, cls, experts = MOE[arch]
    config = config_cls(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, num_experts_per_tok=2,
                        output_router_logits=True, vocab_size=100, pad_token_id=0,
                        **experts)  # fmt: skip
    torch.manual_seed(0)
    model = cls(config).eval()
    x = inputs("llama")
    want = model(**x, labels=x["input_ids"])
    gated = cg.insert_gates(model, x)
    got = gated(**x, labels=x["input_ids"])
    assert len(got.router_logits) == len(want.router_logits) == 3
    assert torch.equal(got.aux_loss, want.aux_loss) and torch.equal(got.loss, want.loss)
    got.loss.backward()  # the auxiliary loss reaches the routers
    router = next(m for n, m in gated.named_modules() if n.endswith("layers.2.mlp.gate"))
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0

    decisions = dict.fromkeys(gated.gates, True) | {"model.layers.0.mlp": False}
    slim = cg.materialize(gated, decisions)
    cg.fix_decisions(gated, decisions)
    with torch.no_grad():
        kept = gated(**x).router_logits[1:]  # the routers of the MoE blocks the cut keeps
        module = __import__(cls.__module__, fromlist=["load_balancing_loss_func"])
        aux = module.load_balancing_loss_func(
            kept, len(kept[0][0]), config.num_experts_per_tok, x["attention_mask"]
        )
        cg.save(slim, tmp_path / "slim.safetensors")
        for cut in (slim, cg.load(tmp_path / "slim.safetensors")):
            out = cut(**x, labels=x["input_ids"])
            assert len(out.router_logits) == 2
            torch.testing.assert_close(out.aux_loss, aux, rtol=1e-5, atol=1e-6)

"""Architectures whose attention was left ungated before: GPT-Neo, Bloom and MPT return
their attention weights beside the hidden states, DeBERTa-v2's attention traced only as a
leaf. Each now gates attention and MLP, exactly, and nothing is printed to stderr."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import consensus_gates as cg
from consensus_gates.hf.tracing import transformer_layers

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = dict(vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "gpt_neo": (T.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, window_size=8,
                               attention_types=[[["global", "local"], 1]], **TEXT),
                T.GPTNeoForCausalLM, ("attn", "mlp")),
    "bloom": (T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **TEXT), T.BloomForCausalLM,
              ("self_attention", "mlp")),
    "mpt": (T.MptConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **TEXT),
            T.MptForCausalLM, ("attn", "ffn")),
    "deberta-v2": (T.DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, **TEXT),
                   T.DebertaV2ForSequenceClassification, ("attention.output", "output")),
}  # fmt: skip


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_attention_and_mlp_are_gated_exactly(arch, capfd):
    config, cls, branches = CONFIGS[arch]
    torch.manual_seed(0)
    model = cls(config).eval()
    x = {"input_ids": torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))}
    gated = cg.insert_gates(model, x)
    assert capfd.readouterr().err == ""  # no fx tracebacks from the trial traces
    layers = [p for p, _ in transformer_layers(model)]
    assert sorted(gated.gates) == sorted(f"{p}.{b}" for p in layers for b in branches)
    with torch.no_grad():
        ref = model(**x).logits
        torch.testing.assert_close(gated.eval()(**x).logits, ref, rtol=0, atol=0)
        decisions = {n: i % 3 != 1 for i, n in enumerate(gated.gates)}
        cg.fix_decisions(gated, decisions)
        slim = cg.materialize(gated, decisions)
        torch.testing.assert_close(slim(**x).logits, gated(**x).logits, rtol=1e-5, atol=1e-6)
        longer = {"input_ids": torch.randint(3, 100, (3, 9))}
        torch.testing.assert_close(slim(**longer).logits, gated(**longer).logits,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_what_is_not_gated_is_said_once_a_line_per_reason():
    from hf_models import inputs, tiny

    with pytest.warns(UserWarning, match="left residual additions without a gate") as caught:
        cg.insert_gates(tiny("t5"), inputs("t5"))
    (warning,) = [w for w in caught if "without a gate" in str(w.message)]
    lines = str(warning.message).splitlines()[1:]
    assert lines and all(line.startswith("  ") for line in lines)
    assert "encoder.block.0.layer.0" in str(warning.message)
    import warnings

    with warnings.catch_warnings():  # GPT-2's GELU adds are inside its gated MLP: no warning
        warnings.simplefilter("error")
        cg.insert_gates(tiny("gpt2"), inputs("gpt2"))


def test_albert_is_refused_for_its_shared_weights():
    config = T.AlbertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, embedding_size=16, vocab_size=100)  # fmt: skip
    albert = T.AlbertForSequenceClassification(config).eval()
    with pytest.raises(cg.TracingError, match="its layers share weights"):
        cg.insert_gates(albert, {"input_ids": torch.randint(3, 100, (2, 8))})


def test_a_model_without_transformer_layers_gets_the_recipe_that_works():
    """HF ConvNeXt has no GradientCheckpointingLayer: the error gives the whole-model
    recipe, and the recipe gates and cuts it exactly."""
    config = T.ConvNextConfig(hidden_sizes=[8, 16], depths=[2, 1], num_stages=2, num_labels=3)
    convnext = T.ConvNextForImageClassification(config).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(cg.TracingError, match=r"leaf_modules=\['hf.convnext.embeddings'\]"):
        cg.insert_gates(convnext, {"pixel_values": x})

    class Wrapper(torch.nn.Module):
        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, x):
            return self.hf(pixel_values=x).logits

    gated = cg.insert_gates(Wrapper(convnext), x, leaf_modules=["hf.convnext.embeddings"])
    assert len(gated.gates) == 3
    decisions = dict(zip(gated.gates, (True, False, True), strict=True))
    cg.fix_decisions(gated, decisions)
    with torch.no_grad():
        torch.testing.assert_close(cg.materialize(gated, decisions)(x), gated.eval()(x),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("arch", ["bloom", "llama"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_both_cache_paths_work_and_save_however_the_layer_was_traced(tmp_path, arch, use_cache):
    """Bloom updates the cache in its layer's own code (a method call in the graph), Llama
    inside its attention (a leaf). Inserted with the cache or without, each runs with it and
    without it, generates the original's tokens both ways, and saves and loads."""
    from hf_models import inputs, tiny

    if arch == "bloom":
        torch.manual_seed(0)
        model = CONFIGS[arch][1](CONFIGS[arch][0]).eval()
    else:
        model = tiny(arch)
    x = inputs("llama")
    gated = cg.insert_gates(model, {**x, "use_cache": use_cache})
    decisions = {n: i % 3 != 1 for i, n in enumerate(gated.gates)}
    slim = cg.materialize(gated, decisions)
    cg.save(slim, tmp_path / "slim.safetensors")
    loaded = cg.load(tmp_path / "slim.safetensors")
    prompt = x["input_ids"][:1]
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=5, do_sample=False)
        for m in (cg.materialize(gated, dict.fromkeys(gated.gates, True)), slim, loaded):
            ref = m(**x, use_cache=False).logits
            torch.testing.assert_close(m(**x, use_cache=True).logits, ref, rtol=0, atol=0)
            tokens = [m.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=c)
                      for c in (True, False)]  # fmt: skip
            assert torch.equal(tokens[0], tokens[1])
            if m is not slim and m is not loaded:
                assert torch.equal(tokens[0], want)
        torch.testing.assert_close(loaded(**x).logits, slim(**x).logits, rtol=0, atol=0)


def test_a_tuple_concatenation_is_not_a_sum_and_umt5_says_why_attention_is_not_gated():
    """UMT5 returns ``(hidden,) + attention_output[1:]``: an add node of tuples, which took
    the residual addition before it for a term of a larger sum, and left it out unsaid."""
    config = T.UMT5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                          num_decoder_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1,
                          decoder_start_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = T.UMT5ForConditionalGeneration(config).eval()
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="without a gate") as caught:
        cg.insert_gates(model, {"input_ids": ids, "decoder_input_ids": ids[:, :4]})
    message = next(str(w.message) for w in caught if "without a gate" in str(w.message))
    assert "also used outside it: encoder.block.0.layer.0 (add_1)" in message


def test_a_leaf_that_adds_its_own_residual_is_said():
    """Canine's first character layer runs its local attention whole, residual included:
    no gate can go there, and the warning says so instead of leaving it out."""
    config = T.CanineConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    model = T.CanineForSequenceClassification(config).eval()
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="without a gate") as caught:
        gated = cg.insert_gates(model, {"input_ids": ids})
    message = next(str(w.message) for w in caught if "without a gate" in str(w.message))
    assert ("adds its own residual inside: canine.initial_char_encoder.layer.0.attention"
            in message)  # fmt: skip
    assert "canine.initial_char_encoder.layer.0.output" in gated.gates

"""Tiny random-weight Hugging Face models, one per architecture the tests cover, and their
example inputs."""

from __future__ import annotations

from typing import Any

import torch
import transformers  # the `hf` extra, part of `dev`

VOCAB = 100
CAUSAL = ("gpt2", "llama", "qwen2", "neox")
SEQ2SEQ = ("bart", "t5")
VISION = ("vit", "swin")
ARCHS = (*CAUSAL, "bert", *SEQ2SEQ, *VISION)


def _configs() -> dict[str, tuple[Any, type]]:
    T = transformers
    text = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "gpt2": (T.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=64, **text),
                 T.GPT2LMHeadModel),
        "llama": (T.LlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=64, **text),
                  T.LlamaForCausalLM),
        "qwen2": (T.Qwen2Config(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=64, **text),
                  T.Qwen2ForCausalLM),
        "neox": (T.GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                 intermediate_size=64, use_parallel_residual=True, **text),
                 T.GPTNeoXForCausalLM),
        "bert": (T.BertConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                              intermediate_size=64, num_labels=3, **text),
                 T.BertForSequenceClassification),
        "bart": (T.BartConfig(encoder_layers=2, decoder_layers=2, d_model=32,
                              encoder_attention_heads=4, decoder_attention_heads=4,
                              encoder_ffn_dim=64, decoder_ffn_dim=64,
                              max_position_embeddings=64, decoder_start_token_id=1, **text),
                 T.BartForConditionalGeneration),
        "t5": (T.T5Config(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8, num_heads=4,
                          d_ff=64, decoder_start_token_id=0, **text),
               T.T5ForConditionalGeneration),
        "vit": (T.ViTConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                            intermediate_size=64, image_size=16, patch_size=4, num_labels=5,
                            hidden_dropout_prob=0.1),
                T.ViTForImageClassification),
        "swin": (T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                              num_heads=[2, 4], window_size=4, num_labels=5),
                 T.SwinForImageClassification),
    }  # fmt: skip


def tiny(arch: str) -> torch.nn.Module:
    config, cls = _configs()[arch]
    torch.manual_seed(0)
    return cls(config).eval()


def inputs(arch: str, batch: int = 2, length: int = 7, *, pad: bool = True, seed: int = 1):
    """Example inputs: token ids with a padding mask (the last row left-padded), the
    decoder's ids for an encoder-decoder, or images."""
    g = torch.Generator().manual_seed(seed)
    if arch in VISION:
        size = 16 if arch == "vit" else 32
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        mask[-1, : length // 3] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if arch in SEQ2SEQ:
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return out


def labels(arch: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labels for the model's own loss."""
    rows = next(iter(x.values())).shape[0]
    g = torch.Generator().manual_seed(2)
    if arch in CAUSAL:
        return x["input_ids"]
    if arch in SEQ2SEQ:
        return torch.randint(3, VOCAB, x["decoder_input_ids"].shape, generator=g)
    classes = 3 if arch == "bert" else 5
    return torch.randint(0, classes, (rows,), generator=g)


def output(model: torch.nn.Module, x: dict[str, Any], **kwargs: Any) -> torch.Tensor:
    return model(**x, **kwargs).logits

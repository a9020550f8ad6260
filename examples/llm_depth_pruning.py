"""Depth pruning of a small language model with consensus gates: learn which attention and
MLP blocks to drop during a short fine-tune, cut them out, and measure what was gained.

Runs offline on any machine. The corpus is the Python standard library's own source code,
the tokenizer is the bytes themselves (a vocabulary of 256), and the model is a Llama built
from a config and trained here from scratch:

1. pretrain the dense model;
2. gate every layer's attention and MLP branch, and fine-tune weights and gates together
   with the polarizer and a FLOPs target (`TrainConfig.target`);
3. cut the consensus out (`materialize`): closed branches go, and a layer with both closed
   goes entirely, its KV cache entry with it;
4. compare dense and cut: perplexity, FLOPs per token, parameters, and greedy `generate()`
   tokens per second, timed in alternation in this process. The dense model's perplexity
   is also given after the same fine-tune without gates ("dense, same steps"), the fair
   comparison: the cut model trained that much longer than the pretrained one.

    python examples/llm_depth_pruning.py                  # about 17 minutes on 2 CPU cores
    python examples/llm_depth_pruning.py --quick          # a smoke run, under a minute
    python examples/llm_depth_pruning.py --target 0.5 --out runs/llm

It writes OUT/dense (save_pretrained), OUT/slim.safetensors (consensus_gates.save) and
OUT/results.json, and refuses an OUT that holds them unless --overwrite.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import sysconfig
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

import consensus_gates as cg

OUTPUTS = ("dense", "slim.safetensors", "results.json")


def stdlib_bytes(limit: int) -> bytes:
    """The first `limit` bytes of the standard library's .py files, in sorted order (tests
    and bundled packages left out): the same text on every machine with this Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "tkinter")
    chunks, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if any(part in skip for part in path.relative_to(root).parts):
            continue
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def loaders(text: bytes, seq: int, batch: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """Non-overlapping windows of `seq` bytes, 95% to train on; batches are dicts with
    ``labels``, so the model computes its own shifted next-token loss."""
    ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    windows = ids[: len(ids) // seq * seq].view(-1, seq)
    split = int(len(windows) * 0.95)

    def collate(rows):
        x = torch.stack(rows)
        return {"input_ids": x, "labels": x}

    g = torch.Generator().manual_seed(seed)
    train = DataLoader(list(windows[:split]), batch, shuffle=True, generator=g,
                       collate_fn=collate, drop_last=True)  # fmt: skip
    val = DataLoader(list(windows[split:]), batch, collate_fn=collate)
    return train, val


def tokens_per_second(model, prompt: torch.Tensor, new: int) -> float:
    """Greedy generation with the KV cache, one sequence."""
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return new / (time.perf_counter() - start)


def generation_speed(dense, slim, prompt: torch.Tensor, new: int, rounds: int) -> dict:
    """Tokens per second of each, the two timed in alternation (median over rounds), after
    a warm-up round; the ratio is what to quote."""
    times = {"dense": [], "slim": []}
    for r in range(rounds + 1):
        for name, model in (("dense", dense), ("slim", slim)):
            speed = tokens_per_second(model, prompt, new)
            if r:
                times[name].append(speed)
    dense_tps, slim_tps = (statistics.median(times[k]) for k in ("dense", "slim"))
    return {"dense": dense_tps, "slim": slim_tps, "slim/dense": slim_tps / dense_tps}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/llm_depth_pruning")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run")
    p.add_argument("--target", type=float, default=0.6, help="FLOPs kept, of the dense model")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--corpus", type=int, default=1_200_000, help="bytes of source to use")
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="of the gated fine-tune")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    args = p.parse_args(argv)
    out = Path(args.out)
    if any((out / f).exists() for f in OUTPUTS) and not args.overwrite:
        sys.exit(f"{out} holds a run; pass --overwrite to replace it, or --out elsewhere")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    seq, batch = (64, 8) if q else (128, 16)
    train, val = loaders(stdlib_bytes(100_000 if q else args.corpus), seq, batch, args.seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64 if q else 128, intermediate_size=160 if q else 352,
        num_hidden_layers=4 if q else args.layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=seq, tie_word_embeddings=True,
        bos_token_id=10, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    dense = LlamaForCausalLM(config)

    def recipe(epochs: int, lr: float, **kw) -> cg.TrainConfig:
        return cg.TrainConfig(
            epochs=epochs, optimizer="adamw", lr=lr, weight_decay=0.01, milestones=(epochs,),
            seed=args.seed, progress=not q, **kw,
        )  # fmt: skip

    print(f"corpus: {len(train.dataset) * seq:,} training bytes of the standard library")
    pretrain = recipe(1 if q else args.pretrain_epochs, 3e-3, lambda_polar=0.0, lambda_act=0.0)
    cg.train(dense, train, val, pretrain)
    example = next(iter(val))
    control = copy.deepcopy(dense)  # fine-tuned as long as the gated model, without gates
    gated = cg.insert_gates(dense, {"input_ids": example["input_ids"]})
    print(f"{len(gated.gates)} gates: {', '.join(list(gated.gates)[:4])}, ...")
    fine_tune = recipe(1 if q else args.epochs, 1e-3, lambda_polar=0.5, target=args.target,
                       polar_schedule="constant")  # fmt: skip
    cg.train(gated, train, val, fine_tune)
    print("the same fine-tune without gates:")
    cg.train(control, train, val, replace(fine_tune, lambda_polar=0.0, lambda_act=0.0, target=None))
    decisions = cg.consensus(gated)
    slim = cg.materialize(gated, decisions).eval()
    dense.eval()
    print(decisions)

    x = {"input_ids": example["input_ids"][:1]}
    ppl = {name: math.exp(cg.evaluate_loss(m, val)) for name, m in
           (("dense", dense), ("dense, same steps", control), ("gated", gated),
            ("slim", slim))}  # fmt: skip
    cost = {name: cg.flops(m, x) for name, m in (("dense", dense), ("slim", slim))}
    prompt = example["input_ids"][:1, :16]
    speed = generation_speed(dense, slim, prompt, new=16 if q else 96, rounds=2 if q else 5)
    results = {
        "target": args.target,
        "layers": [len(dense.model.layers), len(slim.model.layers)],
        "closed": [n for n, d in decisions.decisions.items() if not d],
        "perplexity": ppl,
        "flops_per_token": [cost["dense"].flops, cost["slim"].flops],
        "params": [cost["dense"].params, cost["slim"].params],
        "generate_tokens_per_s": speed,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"\n{'':<26}{'dense':>12}{'cut':>12}{'cut/dense':>11}")
    rows = [("validation perplexity", ppl["dense"], ppl["slim"]),
            ("MFLOPs per token", cost["dense"].flops / 1e6, cost["slim"].flops / 1e6),
            ("parameters (M)", cost["dense"].params / 1e6, cost["slim"].params / 1e6),
            ("generate() tokens/s", speed["dense"], speed["slim"])]  # fmt: skip
    for label, a, b in rows:
        print(f"{label:<26}{a:>12.3f}{b:>12.3f}{b / a:>11.3f}")
    closed = ", ".join(results["closed"]) or "none"
    print(f"layers {results['layers'][0]} -> {results['layers'][1]}; closed: {closed}; "
          f"gated perplexity {ppl['gated']:.3f}; dense after the same fine-tune without "
          f"gates: {ppl['dense, same steps']:.3f}")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    dense.save_pretrained(out / "dense")
    cg.save(slim, out / "slim.safetensors")
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out / "results.json")
    print(f"wrote {out / 'dense'}, {out / 'slim.safetensors'}, {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()

"""Depth pruning of a small language model with consensus gates: learn which layers to drop
during a short fine-tune with `transformers.Trainer`, cut them out, and hand back a plain
Hugging Face model that is measurably faster.

Runs offline on any machine. The corpus is the Python standard library's own source code,
the tokenizer is the bytes themselves (a vocabulary of 256), and the model is a Llama built
from a config and trained here from scratch:

1. pretrain the dense model (`transformers.Trainer`);
2. put a gate on every whole layer (`GateConfig(granularity="layer")`, or on each
   attention and MLP branch with ``--granularity branch``) and fine-tune weights and gates
   together with `cg.GatesTrainer`, the polarizer and a FLOPs target;
3. cut the consensus out (`materialize`): closed layers go, their KV cache entries with
   them; with whole-layer gates, `cg.hf.to_transformers` gives a `LlamaForCausalLM` with
   fewer layers, saved with `save_pretrained` and reloaded with plain `from_pretrained`
   (also in a fresh process that never imports consensus_gates);
4. compare dense and cut: perplexity, FLOPs per token, parameters, and greedy `generate()`
   tokens per second of the reloaded folders, timed in alternation in this process. The
   dense model's perplexity is also given after the same fine-tune without gates ("dense,
   same steps"), the fair comparison: the cut model trained that much longer.

    python examples/llm_depth_pruning.py                  # about 20 minutes on 2 CPU cores
    python examples/llm_depth_pruning.py --quick          # a smoke run, under a minute
    python examples/llm_depth_pruning.py --target 0.5 --granularity branch --out runs/llm

It writes OUT/dense (save_pretrained), OUT/slim.safetensors (consensus_gates.save), OUT/hf
(the cut as a plain save_pretrained folder, whole-layer gates only) and OUT/results.json,
and refuses an OUT that holds them unless --overwrite.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

import consensus_gates as cg

OUTPUTS = ("dense", "slim.safetensors", "hf", "results.json")


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


def datasets(text: bytes, seq: int) -> tuple[list[dict], list[dict]]:
    """Non-overlapping windows of `seq` bytes, 95% to train on, as rows with ``labels``, so
    the model computes its own shifted next-token loss."""
    ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    windows = ids[: len(ids) // seq * seq].view(-1, seq)
    split = int(len(windows) * 0.95)
    return ([{"input_ids": w, "labels": w} for w in windows[:split]],
            [{"input_ids": w, "labels": w} for w in windows[split:]])  # fmt: skip


def batches(rows: list[dict], batch: int) -> DataLoader:
    return DataLoader(rows, batch, collate_fn=lambda r: {k: torch.stack([x[k] for x in r])
                                                         for k in r[0]})  # fmt: skip


def reload_elsewhere(folder: Path, x: torch.Tensor) -> dict:
    """Load `folder` with plain transformers in a fresh process that never imports
    consensus_gates, and return its class, layer count and logits on `x`."""
    with tempfile.TemporaryDirectory() as tmp:
        save_file({"x": x}, f"{tmp}/x.safetensors")
        code = (
            "import sys, torch, transformers\n"
            "from safetensors.torch import load_file, save_file\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()\n"
            f"x = load_file({tmp + '/x.safetensors'!r})['x']\n"
            "with torch.no_grad():\n"
            f"    save_file({{'y': m(input_ids=x).logits}}, {tmp + '/y.safetensors'!r})\n"
            "print(type(m).__name__, m.config.num_hidden_layers,\n"
            "      any(k.startswith('consensus_gates') for k in sys.modules))\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        name, layers, imported = done.stdout.split()
        return {"class": name, "layers": int(layers), "imports_consensus_gates": imported,
                "logits": load_file(f"{tmp}/y.safetensors")["y"]}  # fmt: skip


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
    p.add_argument("--granularity", choices=("layer", "branch"), default="layer",
                   help="a gate per whole layer, or per attention and MLP branch")  # fmt: skip
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
    train, val = datasets(stdlib_bytes(100_000 if q else args.corpus), seq)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64 if q else 128, intermediate_size=160 if q else 352,
        num_hidden_layers=4 if q else args.layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=seq, tie_word_embeddings=True,
        bos_token_id=10, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    dense = LlamaForCausalLM(config)

    def run(trainer_class, model, epochs: int, lr: float, folder: str, **gate_options):
        """The Trainer's usual arguments: AdamW, a constant learning rate, no checkpoints."""
        arguments = TrainingArguments(
            str(out / "trainer" / folder), num_train_epochs=epochs, learning_rate=lr,
            weight_decay=0.01, lr_scheduler_type="constant", per_device_train_batch_size=batch,
            logging_steps=50, save_strategy="no", report_to=[], use_cpu=True,
            disable_tqdm=q, seed=args.seed, data_seed=args.seed,
        )  # fmt: skip
        trainer_class(model=model, args=arguments, train_dataset=train, **gate_options).train()
        return model.eval()

    print(f"corpus: {len(train) * seq:,} training bytes of the standard library")
    run(Trainer, dense, 1 if q else args.pretrain_epochs, 3e-3, "pretrain")
    example = {"input_ids": val[0]["input_ids"][None]}
    control = copy.deepcopy(dense)  # fine-tuned as long as the gated model, without gates
    gate_config = cg.GateConfig(granularity=args.granularity)
    gated = cg.insert_gates(dense, example, gate_config)
    print(f"{len(gated.gates)} gates: {', '.join(list(gated.gates)[:4])}, ...")
    epochs = 1 if q else args.epochs
    run(cg.GatesTrainer, gated.train(), epochs, 1e-3, "gated", lambda_polar=0.5,
        target=args.target, polar_schedule="constant")  # fmt: skip
    print("the same fine-tune without gates:")
    run(Trainer, control.train(), epochs, 1e-3, "control")
    decisions = cg.consensus(gated)
    slim = cg.materialize(gated, decisions).eval()
    print(decisions)

    out.mkdir(parents=True, exist_ok=True)
    dense.save_pretrained(out / "dense")
    cg.save(slim, out / "slim.safetensors")
    plain = None
    if args.granularity == "layer":  # a cut of whole layers is a LlamaForCausalLM
        cg.hf.to_transformers(slim).save_pretrained(out / "hf")
        plain = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    cut = plain if plain is not None else slim
    reloaded = AutoModelForCausalLM.from_pretrained(out / "dense").eval()

    val_batches = batches(val, batch)
    ppl = {name: math.exp(cg.evaluate_loss(m, val_batches)) for name, m in
           (("dense", dense), ("dense, same steps", control), ("gated", gated),
            ("slim", slim), ("reloaded cut", cut))}  # fmt: skip
    cost = {name: cg.flops(m, example) for name, m in (("dense", dense), ("slim", slim))}
    prompt = example["input_ids"][:, :16]
    speed = generation_speed(reloaded, cut, prompt, new=16 if q else 96, rounds=2 if q else 5)
    results = {
        "target": args.target,
        "granularity": args.granularity,
        "layers": [len(dense.model.layers), len(slim.model.layers)],
        "closed": [n for n, d in decisions.decisions.items() if not d],
        "perplexity": ppl,
        "flops_per_token": [cost["dense"].flops, cost["slim"].flops],
        "params": [cost["dense"].params, cost["slim"].params],
        "generate_tokens_per_s": speed,
        "torch_threads": torch.get_num_threads(),
    }
    if plain is not None:
        elsewhere = reload_elsewhere(out / "hf", prompt)
        with torch.no_grad():
            gap = (elsewhere.pop("logits") - slim(input_ids=prompt).logits).abs().max().item()
        results["plain_transformers"] = {**elsewhere, "max_logit_difference": gap,
                                         "class_here": type(plain).__name__}  # fmt: skip
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
    if plain is not None:
        r = results["plain_transformers"]
        print(f"{out / 'hf'}: a {r['class']} of {r['layers']} layers in a fresh process "
              f"(consensus_gates imported there: {r['imports_consensus_gates']}), logits "
              f"within {r['max_logit_difference']:.1e} of the cut model's")  # fmt: skip
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out / "results.json")
    print(f"wrote {', '.join(str(out / f) for f in OUTPUTS if (out / f).exists())}")
    return results


if __name__ == "__main__":
    main()

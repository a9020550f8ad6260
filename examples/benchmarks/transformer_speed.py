"""Is a cut transformer faster? Prefill throughput and per-token generate() latency of cut
Hugging Face models against the originals, at fixed decisions, beside their FLOPs.

    python examples/benchmarks/transformer_speed.py            # CPU: writes docs/benchmarks.md
    python examples/benchmarks/transformer_speed.py --quick    # tiny models; for CI

The models are GPT-2 small's and a Llama's configs with random weights (speed does not
depend on the weights). For each decision pattern, the original and the cut model are
saved (save_pretrained and consensus_gates.save), then each is loaded and timed in its own
fresh process, several processes per model in alternating order (A B B A ...); the ratios
of the medians are what to quote (../shared/notes/measuring-speed.md). A process times:
- prefill: ``model(input_ids)`` without a cache on a batch of sequences, in tokens/s;
- decode: greedy ``generate()`` with the KV cache from a short prompt, per new token (the
  time for `new` tokens minus the time for one, over new - 1).

It rewrites only its own section of docs/benchmarks.md (`write_sections`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import consensus_gates as cg
from consensus_gates.bench.reports import write_sections

ROOT = Path(__file__).resolve().parents[2]
COMMAND = "python examples/benchmarks/transformer_speed.py"
# which branches close: a fraction of the layers, counted from the last
PATTERNS = {
    "attention of the last half of the layers": ("attn", 0.5),
    "MLP of the last half of the layers": ("mlp", 0.5),
    "the last half of the layers (both branches)": ("both", 0.5),
}


def configs(quick: bool) -> dict:
    from transformers import GPT2Config, LlamaConfig

    if quick:
        return {
            "GPT-2 (tiny)": GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=500),
            "Llama (tiny)": LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=160,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=500),
        }  # fmt: skip
    return {
        "GPT-2 small (124M)": GPT2Config(),
        "Llama, 12 layers of 768, GQA 12/4 heads": LlamaConfig(
            num_hidden_layers=12, hidden_size=768, intermediate_size=2048,
            num_attention_heads=12, num_key_value_heads=4, vocab_size=16000,
        ),  # fmt: skip
    }


def decisions_for(gated, pattern: tuple[str, float]) -> dict[str, bool]:
    """Close the pattern's branches in the last layers: the first gate of a layer is its
    attention, the last its MLP."""
    kind, share = pattern
    layers: dict[str, list[str]] = {}
    for name in gated.gates:
        layers.setdefault(name.rsplit(".", 1)[0], []).append(name)
    paths = list(layers)
    closed_layers = paths[len(paths) - round(len(paths) * share):]
    decisions = dict.fromkeys(gated.gates, True)
    for path in closed_layers:
        attn, *_, mlp = layers[path]
        for name, close in ((attn, kind in ("attn", "both")), (mlp, kind in ("mlp", "both"))):
            decisions[name] = not close
    return decisions


def worker(job: dict) -> dict:
    """Load one model and time it: run in a fresh process."""
    torch.set_num_threads(job["threads"])
    if job["kind"] == "original":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(job["path"], local_files_only=True)
    else:
        model = cg.load(job["path"])
    model.eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (job["batch"], job["length"]), generator=g)
    prompt = torch.randint(0, vocab, (1, job["prompt"]), generator=g)

    def prefill() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(batch, use_cache=False)
        return time.perf_counter() - start

    def generate(new: int) -> float:
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=0)  # fmt: skip
        return time.perf_counter() - start

    for _ in range(job["warmup"]):
        prefill(), generate(job["new"])
    prefills = [prefill() for _ in range(job["runs"])]
    decode = [(generate(job["new"]) - generate(1)) / (job["new"] - 1) for _ in range(job["runs"])]
    return {
        "prefill_tokens_per_s": batch.numel() / statistics.median(prefills),
        "decode_ms_per_token": 1000 * statistics.median(decode),
    }


def timed(files: dict[str, dict], settings: dict, processes: int) -> dict[str, dict]:
    """Each model's medians over `processes` fresh processes, in alternating order."""
    results: dict[str, list[dict]] = {k: [] for k in files}
    order = list(files)
    for i in range(processes):
        for key in order if i % 2 == 0 else order[::-1]:
            job = {**files[key], **settings}
            done = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(job)],
                capture_output=True, text=True, check=True,
                env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
            )  # fmt: skip
            results[key].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {k: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for k, rs in results.items()}


def measure(name: str, config, settings: dict, processes: int, tmp: Path) -> list[list[str]]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    x = {"input_ids": torch.randint(0, config.vocab_size, (1, settings["length"]))}
    gated = cg.insert_gates(model, x)
    original = tmp / f"{name}-original"
    model.save_pretrained(original)
    whole = cg.flops(model, x)
    rows = []
    for label, pattern in PATTERNS.items():
        slim = cg.materialize(gated, decisions_for(gated, pattern))
        path = tmp / f"{name}-{label}.safetensors"
        cg.save(slim, path)
        files = {"original": {"kind": "original", "path": str(original)},
                 "cut": {"kind": "cut", "path": str(path)}}  # fmt: skip
        t = timed(files, settings, processes)
        cut = cg.flops(slim, x)
        layers = sum(1 for m in slim.modules() if isinstance(m, cg.hf.layer.TracedLayer))
        rows.append([
            label, f"{layers}/{len(gated.gates) // 2}", f"{cut.flops / whole.flops:.3f}",
            f"{cut.params / whole.params:.3f}",
            f"{t['cut']['prefill_tokens_per_s'] / t['original']['prefill_tokens_per_s']:.3f}",
            f"{t['original']['decode_ms_per_token'] / t['cut']['decode_ms_per_token']:.3f}",
        ])  # fmt: skip
        print(name, rows[-1], flush=True)
    head = f"**{name}**: {whole.flops / 1e6:,.1f} MFLOPs per token at length {settings['length']}"
    return [[head], *rows]


def section(results: dict[str, list[list[str]]], settings: dict, processes: int) -> str:
    head = ["closed", "layers left", "FLOPs per token", "params", "prefill tokens/s",
            "decode tokens/s"]  # fmt: skip
    parts = [
        f"Cut/original at the same decisions: prefill of {settings['batch']}x"
        f"{settings['length']} tokens without a cache, and greedy decoding of "
        f"{settings['new']} tokens from a {settings['prompt']}-token prompt with the KV cache "
        f"(throughput ratios, so above 1 is faster). Medians of {settings['runs']} runs in "
        f"each of {processes} fresh processes per model, alternating."
    ]
    for rows in results.values():
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        parts += [rows[0][0], "\n".join(lines)]
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny models, few runs; for CI")
    p.add_argument("--out", type=Path, default=None, help="the doc [docs/benchmarks.md]; "
                   "--quick writes only where told")  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    q = args.quick
    settings = {"batch": 2, "length": 32 if q else 128, "prompt": 8 if q else 16,
                "new": 4 if q else 32, "warmup": 1, "runs": 2 if q else 3,
                "threads": args.threads}  # fmt: skip
    processes = 2 if q else 3
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in configs(q).items():
            results[name] = measure(name, config, settings, processes, Path(tmp))
    machine = (
        f"{platform.machine()} CPU, {os.cpu_count()} cores visible; {args.threads} threads; "
        f"torch {torch.__version__}; transformers {__import__('transformers').__version__}; "
        f"{time.strftime('%Y-%m-%d')}"
    )
    flags = " --quick" if q else ""
    sections = {
        "transformers cpu": section(results, settings, processes)
        + f"\n\nWritten by `{COMMAND}{flags}` on {machine}."
    }
    print("\n" + sections["transformers cpu"])
    out = args.out or (None if q else ROOT / "docs" / "benchmarks.md")
    if out is not None:
        write_sections(out, sections, title="Benchmarks")
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

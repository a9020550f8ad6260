"""How should a cut `after` gate rejoin the skip tensor? Time the exact constructions.

    python examples/benchmarks/after_gate_add.py            # writes docs/after-gate-add.md
    python examples/benchmarks/after_gate_add.py --quick    # a smoke run (CI)

ResNet-56 with `after` channel gates, every other channel of every branch output closed.
The branch then makes C/2 channels that must be added into a C-channel skip tensor:
- index_add:   skip.index_add(1, kept, branch)                 (what `materialize` emits)
- index_copy:  skip + zeros(C).index_copy(1, kept, branch)     (scatter, then a full add)
- full width:  the branch conv keeps all C outputs (no cut)    (the original model)
Each model runs in its own process, in alternating order (consensus_gates.bench.compare).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

import consensus_gates as cg
from consensus_gates.bench.compare import compare, ratios
from consensus_gates.bench.measure import BenchConfig

ROOT = Path(__file__).resolve().parents[2]


def index_copy_variant(slim: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite every ``skip.index_add(dim, kept, branch)`` as ``skip + zeros.index_copy(...)``."""
    graph = slim.graph
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is torch.index_add:
            skip, dim, kept, branch = n.args
            with graph.inserting_before(n):
                zeros = graph.call_method("new_zeros", (skip, graph.call_method("size", (skip,))))
                full = graph.call_function(torch.index_copy, (zeros, dim, kept, branch))
                added = graph.call_function(torch.add, (skip, full))
            n.replace_all_uses_with(added)
            graph.erase_node(n)
    slim.recompile()
    return slim


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="resnet20, batch 8, few runs; no doc")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    name, batch = ("resnet20", 8) if args.quick else ("resnet56", 64)
    config = BenchConfig(
        device=args.device, threads=args.threads, warmup=2 if args.quick else 10,
        runs=3 if args.quick else 40,
    )  # fmt: skip
    rounds = 1 if args.quick else args.rounds

    torch.manual_seed(0)
    model = cg.create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    gated = cg.insert_gates(model, x, cg.GateConfig(mode="channel", position="after")).eval()
    half = {n: tuple(i % 2 == 0 for i in range(g.units)) for n, g in gated.gates.items()}
    cg.fix_decisions(gated, half)
    slim = cg.materialize(gated, half).eval()
    variant = index_copy_variant(cg.materialize(gated, half).eval())
    with torch.no_grad():  # both constructions are exact
        for m in (slim, variant):
            assert torch.allclose(m(x), gated(x), rtol=1e-5, atol=1e-5 * gated(x).abs().max())

    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for label, m in [("full width", model), ("index_add", slim), ("index_copy", variant)]:
            files[label] = Path(tmp) / f"{label.replace(' ', '_')}.pt2"
            cg.export(m, x, files[label])
        results = compare(files, (3, 32, 32), [batch], config, rounds=rounds)
    r = ratios(results, "full width")
    lines = [
        f"| construction | FLOPs ratio | latency ms (median of {rounds}) | spread ms | "
        "latency ratio |",
        "|---|---|---|---|---|",
    ]
    for m in results:
        q = r[(m.model, m.batch)]
        lo, hi = m.spread_ms
        lines.append(
            f"| {m.model} | {q['flops']:.3f} | {m.median_ms:.2f} | {lo:.2f}–{hi:.2f} | "
            f"{q['latency']:.3f} |"
        )
    table = "\n".join(lines)
    header = (
        f"{name}, batch {batch}, {results[0].device}, {results[0].threads} threads, "
        f"torch {torch.__version__}, {platform.machine()} ({platform.processor() or 'cpu'})"
    )
    print(header)
    print(table)
    if not args.quick:
        doc = ROOT / "docs" / "after-gate-add.md"
        doc.write_text(
            "# Rejoining a cut `after` branch: `index_add` or `index_copy` + add\n\n"
            f"Written by `python examples/benchmarks/after_gate_add.py`. {header}.\n"
            "Half the output channels of every branch of a ResNet-56 with `after` gates cut; "
            "each model timed in its own process, alternating, median over rounds.\n\n"
            f"{table}\n"
        )
        print(f"wrote {doc}")


if __name__ == "__main__":
    main()

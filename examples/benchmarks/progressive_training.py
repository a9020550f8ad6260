"""Does cutting settled gates out while training save training time? Dense training, gates,
and gates with progressive surgery, same data, recipe and FLOPs target.

    python examples/benchmarks/progressive_training.py --data-root ../shared/data
    python examples/benchmarks/progressive_training.py --epochs 12     # the 12-epoch budget
    python examples/benchmarks/progressive_training.py --quick ...     # a smoke run, no doc

ResNet-20 on Fashion-MNIST (8,000 training images, the 10,000 test images), batch 128,
the paper's recipe and λ↑ schedule, FLOPs target 0.5. Every run is a fresh process; per
seed the three kinds run one after another, so that slow phases of the machine hit all of
them. Wall time is the whole `train` call (its epochs, with their evaluations); training
time only the steps. Ratios are taken within a seed, then averaged. Writes a table into
docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _fashion_mnist_runs import add_data_options, resnet20_and_loaders, run_fresh

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("dense", "gates", "progressive")


def one_run(kind: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one model in this process; what it cost and reached."""
    import consensus_gates as cg

    model, train_loader, test_loader, x = resnet20_and_loaders(args, seed)
    config = cg.TrainConfig(epochs=args.epochs, seed=seed, progress=False)
    if kind != "dense":
        model = cg.insert_gates(model, x)
        config = cg.TrainConfig(epochs=args.epochs, seed=seed, progress=False,
                                target=args.target, progressive=kind == "progressive",
                                settle_steps=args.settle_steps)  # fmt: skip
    began = time.perf_counter()
    records = cg.train(model, train_loader, test_loader, config, log=lambda line: None)
    wall = time.perf_counter() - began
    last = records[-1]
    return {
        "kind": kind, "seed": seed, "wall_s": wall,
        "train_s": sum(r["train_seconds"] for r in records),
        "train_flops": last["train_flops"], "test_acc": last["test_acc"],
        "flops_ratio": last["flops_ratio"] if kind != "dense" else 1.0,
        "cut": sum(len(r["cut"] or []) for r in records),
    }  # fmt: skip


def table(results: list[dict], args: argparse.Namespace) -> str:
    by = {(r["kind"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})

    def mean(kind: str, key: str, over: str | None = None) -> float:
        values = [by[kind, s][key] / (by[over, s][key] if over else 1) for s in seeds]
        return statistics.mean(values)

    rows = [
        "| run | test accuracy | FLOPs ratio | wall s | training s | training TFLOPs | "
        "wall / gates | wall / dense | training FLOPs / gates |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        accs = [by[kind, s]["test_acc"] for s in seeds]
        spread = f" ± {statistics.stdev(accs):.4f}" if len(accs) > 1 else ""
        rows.append(
            f"| {kind} | {statistics.mean(accs):.4f}{spread} | {mean(kind, 'flops_ratio'):.3f} | "
            f"{mean(kind, 'wall_s'):.1f} | {mean(kind, 'train_s'):.1f} | "
            f"{mean(kind, 'train_flops') / 1e12:.2f} | {mean(kind, 'wall_s', 'gates'):.3f} | "
            f"{mean(kind, 'wall_s', 'dense'):.3f} | {mean(kind, 'train_flops', 'gates'):.3f} |"
        )
    return (
        f"ResNet-20, Fashion-MNIST, {args.subset:,} training images, {args.epochs} epochs, "
        f"FLOPs target {args.target}, settle_steps {args.settle_steps}; mean of seeds "
        f"{', '.join(map(str, seeds))} (accuracy ± its standard deviation); ratios within a "
        f"seed. `python examples/benchmarks/progressive_training.py --epochs {args.epochs}`, "
        "2 CPU cores.\n\n" + "\n".join(rows)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_data_options(p)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--settle-steps", type=int, default=20)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="one seed; print, write no doc")
    p.add_argument("--one", nargs=2, metavar=("KIND", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one[0], int(args.one[1]), args)))
        return
    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]
    results = []
    for seed in seeds:
        for kind in KINDS:
            results.append(run_fresh(__file__, kind, str(seed)))
    text = table(results, args)
    print(text)
    if not args.quick:
        from consensus_gates.bench.reports import write_sections

        write_sections(ROOT / "docs" / "training.md", {f"progressive-{args.epochs}": text})


if __name__ == "__main__":
    main()

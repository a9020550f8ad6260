"""What the training benchmarks share: ResNet-20 on a Fashion-MNIST subset, each run in a
fresh process of the calling script (``--one ...``), its result one JSON line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--subset", type=int, default=8000)


def resnet20_and_loaders(args: argparse.Namespace, seed: int) -> tuple[Any, Any, Any, Any]:
    """A seeded ResNet-20 for Fashion-MNIST, its training and test loaders (batch 128) and
    an example input batch, with freed memory kept in the process as `cgates train` does
    (without it the steps took 4.9x as long here)."""
    import torch

    import consensus_gates as cg
    from consensus_gates.bench.measure import keep_freed_memory
    from consensus_gates.training.data import make_loaders

    keep_freed_memory()
    torch.manual_seed(seed)
    train_loader, test_loader, info = make_loaders(
        "fashion_mnist", args.data_root, batch_size=128, subset=args.subset, seed=seed
    )
    model = cg.create_model("resnet20", in_channels=info.in_channels,
                            num_classes=info.num_classes)  # fmt: skip
    x = torch.randn(2, info.in_channels, info.image_size, info.image_size)
    return model, train_loader, test_loader, x


def run_fresh(script: str, *one: str) -> dict[str, Any]:
    """Run ``script --one ONE... <this process's arguments>`` and return its JSON result."""
    cmd = [sys.executable, script, "--one", *one, *sys.argv[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(result, flush=True)
    return result

"""Gate a CIFAR ResNet-20 on Fashion-MNIST, train weights and gates in one pass, cut it out.

    python examples/fashion_mnist_quickstart.py --data-root ../shared/data

The training loop by hand, with the public API: insert_gates, the two regularizers,
consensus, materialize. `cgates demo` and `consensus_gates.train` do the same with
checkpoints, records and plots.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import consensus_gates as cg
from consensus_gates import evaluate
from consensus_gates.errors import DataError
from consensus_gates.training.data import make_loaders


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-root", default="data")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--subset", type=int, default=20000, help="training images (0: all 60k)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--lambda-polar", type=float, default=2.0)
    p.add_argument("--lambda-act", type=float, default=0.5)
    p.add_argument("--out", default="runs/quickstart")
    args = p.parse_args()
    torch.manual_seed(0)

    try:
        train, test, _ = make_loaders(
            "fashion_mnist",
            args.data_root,
            batch_size=args.batch,
            subset=args.subset or None,
            augment=False,  # a 4-epoch run learns faster without crops and flips
        )
    except DataError as e:
        raise SystemExit(str(e)) from e
    model = cg.create_model("resnet20", in_channels=1, num_classes=10)
    example = torch.randn(2, 1, 28, 28)
    gated = cg.insert_gates(model, example)  # STE layer gates on all 9 residual blocks
    opt = torch.optim.SGD(gated.parameters(), args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * len(train))

    for epoch in range(args.epochs):
        # "λ↑": no polarization in the first epoch, then on
        lam_polar = 0.0 if epoch == 0 else args.lambda_polar
        gated.train()
        start, totals = time.time(), torch.zeros(3)
        for x, y in train:
            task = F.cross_entropy(gated(x), y)
            polar, act = cg.polarization_loss(gated), cg.activation_loss(gated, weight="flops")
            loss = task + lam_polar * polar + args.lambda_act * act
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            totals += torch.tensor([task.item(), polar.item(), act.item()])
        task, polar, act = (totals / len(train)).tolist()
        c = cg.consensus(gated)
        print(
            f"epoch {epoch}: task {task:.3f}  R_polar {polar:.4f}  R_act {act:.3f}  "
            f"test acc {evaluate(gated, test):.4f}  consensus {sum(c.decisions.values())}/"
            f"{len(c.decisions)} open  ({time.time() - start:.0f}s)"
        )

    c = cg.consensus(gated)
    print(c)
    slim = cg.materialize(gated, c)
    cg.fix_decisions(gated, c)
    per_image = example[:1]
    before, after = cg.flops(model, per_image), cg.flops(slim, per_image)
    acc_fixed, acc_slim = evaluate(gated, test), evaluate(slim, test)
    print(f"\n{'':<28}{'original':>14}{'slim':>14}{'slim/original':>15}")
    print(
        f"{'MFLOPs per image':<28}{before.flops / 1e6:>14.2f}{after.flops / 1e6:>14.2f}"
        f"{after.flops / before.flops:>15.3f}"
    )
    print(
        f"{'parameters':<28}{before.params:>14,}{after.params:>14,}"
        f"{after.params / before.params:>15.3f}"
    )
    print(f"test accuracy: gated with the consensus fixed {acc_fixed:.4f}, slim {acc_slim:.4f}")

    out = Path(args.out)
    cg.save(slim, out / "slim.safetensors")
    cg.export(slim, example, out / "slim.pt2")
    print(f"wrote {out / 'slim.safetensors'} and {out / 'slim.pt2'}")


if __name__ == "__main__":
    main()

"""FLOPs and parameters of ResNet-56 with half of each channel gate's channels cut, for each
channel-gate position (the table in docs/channel-gates.md).

    python examples/channel_positions.py
"""

from __future__ import annotations

import torch

import consensus_gates as cg


def main() -> None:
    model = cg.create_model("resnet56")
    x = torch.randn(2, 3, 32, 32)
    full = cg.flops(model, x[:1])
    print(f"ResNet-56 (CIFAR, 32x32): {full}")
    print(f"{'position':<10}{'gates':>7}{'channels':>10}{'MFLOPs':>10}{'FLOPs ratio':>13}"
          f"{'params':>10}{'params ratio':>14}")  # fmt: skip
    for position in ("middle", "after", "before"):
        gated = cg.insert_gates(model, x, cg.GateConfig(mode="channel", position=position))
        half = {n: tuple(i % 2 == 0 for i in range(g.units)) for n, g in gated.gates.items()}
        slim = cg.flops(cg.materialize(gated, half), x[:1])
        channels = sum(g.units for g in gated.gates.values())
        print(
            f"{position:<10}{len(gated.gates):>7}{channels:>10}{slim.flops / 1e6:>10.2f}"
            f"{slim.flops / full.flops:>13.3f}{slim.params:>10,}{slim.params / full.params:>14.3f}"
        )


if __name__ == "__main__":
    main()

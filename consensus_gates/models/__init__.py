"""Model zoo (CIFAR ResNets) and the registry behind `create_model`."""

from __future__ import annotations

from .cifar_resnet import CifarResNet, Shortcut
from .registry import create_model, list_models, register_model


def _cifar_resnet(depth: int):
    def build(num_classes: int = 10, in_channels: int = 3, shortcut: Shortcut = "A") -> CifarResNet:
        return CifarResNet(depth, num_classes, in_channels, shortcut)

    build.__name__ = build.__qualname__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016), option-A or option-B shortcuts."
    return build


for _depth in (20, 32, 44, 56, 110):
    register_model()(_cifar_resnet(_depth))


@register_model()
def cifar_resnet(
    blocks: tuple[int, int, int] = (3, 3, 3),
    num_classes: int = 10,
    in_channels: int = 3,
    shortcut: Shortcut = "A",
) -> CifarResNet:
    """CIFAR ResNet with its own block count per stage, e.g. the shape left after layer
    pruning: ``cifar_resnet(blocks=(5, 4, 4))``."""
    return CifarResNet(num_classes=num_classes, in_channels=in_channels, shortcut=shortcut,
                       blocks=tuple(blocks))  # fmt: skip


__all__ = ["CifarResNet", "create_model", "list_models", "register_model"]

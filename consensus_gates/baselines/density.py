"""Activation-density pruning (Foldy-Porto & Panda 2020): during training, each internal width
is resized to about its activation density times its width, and training continues on the
smaller network.

A layer's activation density is the fraction of its post-ReLU activations that are non-zero
over the data. The widths are the internal ones of the residual branches (`inner_layers`),
measured where the next layer reads them, and cut with torch-pruning's dependency graph.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .._utils import set_training
from ..fx.pruning import cut_out_channels, dependency_graph
from ..fx.tracing import as_input_tuple
from ..models.registry import forget_source
from .space import InnerLayer, inner_layers


def activation_density(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *, max_batches: int = 10
) -> dict[str, float]:
    """The activation density of each internal width of `model` (keyed by the layer that
    produces it, e.g. ``"layer1.0.conv1"``), over the first `max_batches` of (inputs, labels)
    `batches`, in eval mode."""
    batches = iter(batches)
    first = next(batches)
    layers = inner_layers(model, first[0][:1].to(next(model.parameters()).device))
    per_channel = channel_density(model, itertools.chain([first], batches), layers, max_batches)
    return {name: d.mean().item() for name, d in per_channel.items()}


@torch.no_grad()
def channel_density(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    layers: list[InnerLayer],
    max_batches: int = 10,
) -> dict[str, Tensor]:
    """Per channel of each width in `layers` (those a module reads), the fraction of its
    activations that are non-zero, over the first `max_batches` batches, in eval mode."""
    modules = dict(model.named_modules())
    nonzero: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(layer: InnerLayer):
        def count(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            dims = [d for d in range(x.dim()) if d != layer.channel_dim]
            found = (x != 0).sum(dim=dims).double().cpu()
            nonzero[layer.producer] = nonzero.get(layer.producer, 0) + found
            counts[layer.producer] = counts.get(layer.producer, 0) + x.numel() // len(found)

        return count

    read = [layer for layer in layers if layer.reader is not None]
    handles = [modules[layer.reader].register_forward_pre_hook(hook(layer)) for layer in read]
    was_training = model.training
    set_training(model, False)
    device = next(model.parameters()).device
    try:
        for x, _ in itertools.islice(batches, max_batches):
            model(x.to(device))
    finally:
        set_training(model, was_training)
        for handle in handles:
            handle.remove()
    return {name: nonzero[name] / counts[name] for name in nonzero}


class DensityPruning:
    """An `epoch_end` for `train` that resizes every internal width to its activation density.

    Every `every` epochs, each width of ``n`` channels whose density is ``d`` keeps the
    ``max(min_channels, round(scale · d · n))`` channels that are most often non-zero; the
    others are cut out with torch-pruning. ``scale < 1`` shrinks further per step, to
    reach smaller models within few epochs.

        train(model, loader, config=TrainConfig(epochs=6),
              epoch_end=DensityPruning(x[:1], loader, every=2))

    Args:
        example_inputs: inputs the model accepts (to trace it).
        loader: batches of (inputs, labels) to measure the densities on; one of its own (a
            fixed subset) leaves the training loader's order and random state alone.
        max_batches: how many batches of `loader` to measure on.
    """

    def __init__(
        self,
        example_inputs: Tensor | tuple[Tensor, ...],
        loader: Iterable[tuple[Tensor, Tensor]],
        *,
        every: int = 1,
        scale: float = 1.0,
        min_channels: int = 1,
        max_batches: int = 10,
    ) -> None:
        if every < 1 or scale <= 0 or min_channels < 1:
            raise ValueError("every and min_channels must be >= 1, and scale > 0")
        self.example_inputs = as_input_tuple(example_inputs)
        self.loader, self.every, self.scale = loader, every, scale
        self.min_channels, self.max_batches = min_channels, max_batches

    def __call__(self, model: nn.Module, epoch: int) -> bool:
        """Resize `model` in place after 0-based `epoch`; True if any width changed."""
        if (epoch + 1) % self.every:
            return False
        layers = inner_layers(model, self.example_inputs)
        density = channel_density(model, self.loader, layers, self.max_batches)
        cuts = {name: self.dropped(d) for name, d in density.items()}
        cuts = {name: idxs for name, idxs in cuts.items() if idxs}
        if not cuts:
            return False
        was_training = model.training
        dg = dependency_graph(model, self.example_inputs)
        for name, idxs in cuts.items():
            cut_out_channels(dg, model.get_submodule(name), idxs)
        set_training(model, was_training)  # tp traced it in eval mode and left it there
        forget_source(model)
        return True

    def dropped(self, density: Tensor) -> list[int]:
        """The channels to cut from a width with these per-channel densities: the least
        dense, beyond the ``max(min_channels, round(scale · mean density · width))`` kept."""
        width = len(density)
        keep = round(self.scale * density.mean().item() * width)
        keep = min(width, max(self.min_channels, keep))
        return sorted(density.argsort(stable=True)[: width - keep].tolist())

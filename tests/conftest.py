"""Shared test helpers."""

from __future__ import annotations

import os
import random

import pytest
import torch
from torch import nn

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one thread per worker: two workers share the two cores


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


def randomize(model: nn.Module) -> nn.Module:
    """Give BatchNorm non-trivial statistics and affine weights, and re-draw parameters that
    models zero-initialise (ViT's head, timm's last BN), so every branch changes the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.uniform_(-0.5, 0.5, generator=g)
        for p in model.parameters():
            if p.numel() and (p == 0).all():
                p.normal_(0, 0.1, generator=g)
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the max abs of `a`."""
    scale = a.abs().max().clamp_min(1e-12)
    return ((a - b).abs().max() / scale).item()

"""Shared test helpers."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one thread per worker: two workers share the two cores


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: one intra-op thread is as fast, and avoids OpenMP's
    pathological slowdown when another process competes for the cores. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def fake_fashion_mnist(root: Path, n_train: int, n_test: int) -> Path:
    """A small Fashion-MNIST in torchvision's on-disk layout (FashionMNIST/raw/*-ubyte):
    labels 0..9 in turn, and images that depend on the label, so a few steps learn."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = (torch.rand(n, 28, 28) * 60 + labels.view(-1, 1, 1) * 19).clamp(0, 255)
        for kind, magic, data in (("images-idx3", 2051, images), ("labels-idx1", 2049, labels)):
            header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in data.shape)
            body = data.to(torch.uint8).numpy().tobytes()
            (raw / f"{split}-{kind}-ubyte").write_bytes(header + body)
    return root


def gated_resnet20(config=None):
    """resnet20 with a gate on each of its nine residual branches."""
    import consensus_gates as cg

    return cg.insert_gates(cg.create_model("resnet20"), torch.randn(2, 3, 32, 32), config)


def gated_file(root: Path) -> str:
    """A gated ResNet-20 whose consensus closes two blocks, saved for `cgates slim`."""
    import consensus_gates as cg

    gated = gated_resnet20()
    for name, gate in gated.gates.items():
        gate.running_open_rate.fill_(0.0 if name in ("layer1.1", "layer3.2") else 1.0)
    cg.save(gated, root / "gated.safetensors")
    return str(root / "gated.safetensors")

"""Under torch.distributed the gate statistics are over the global batch: two gloo processes on
CPU, each with half the batch, against one process with all of it."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import consensus_gates as cg

from conftest import randomize

WORLD = 2
BATCH = 8
SHARD = BATCH // WORLD
CONFIGS = (cg.GateConfig(init_bias=0.0), cg.GateConfig(mode="channel", init_bias=0.0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)  # the two processes share the cores
    # Before the process group exists the losses take the single-process path: the reference.
    ddp_refs = _ddp_references()
    gated = _three_gates()
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        _check_losses_and_running_rates(rank, gated)
        _check_ddp_gradients(rank, ddp_refs)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gate_statistics_are_global_under_ddp():
    """Two gloo processes with half the batch each: losses, their gradients and the running
    open rates are those of one process with the whole batch. Failures in a process re-raise
    here."""
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD)


def _gated(config: cg.GateConfig) -> cg.GatedModel:
    """The same weights in every process. In eval mode BatchNorm does not depend on the batch,
    and the STE head's decisions are deterministic, so a shard's decisions are those of its
    samples in the whole batch."""
    torch.manual_seed(0)
    model = cg.create_model("resnet20", in_channels=1, num_classes=10)
    gated = cg.insert_gates(model, torch.randn(2, 1, 28, 28), config)
    return randomize(gated).double().eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 1, 28, 28, generator=g, dtype=torch.float64)
    # Per-sample scale and offset, so that gates decide differently for different samples.
    ramp = torch.linspace(0, 1, BATCH, dtype=torch.float64).view(BATCH, 1, 1, 1)
    return x * (0.5 + 1.5 * ramp) + 2 * ramp - 1, torch.randint(0, 10, (BATCH,), generator=g)


def _loss(model, x, y):
    out = model(x)
    reg = cg.polarization_loss(model)
    return F.cross_entropy(out, y) + 2.0 * reg + 0.5 * cg.activation_loss(model), reg


def _ddp_references():
    x, y = _batch()
    refs = []
    for config in CONFIGS:
        gated = _gated(config)
        loss, reg = _loss(gated, x, y)
        loss.backward()
        means = torch.cat([gate.decisions.mean(0).reshape(-1) for gate in gated.gates.values()])
        assert ((means > 0) & (means < 1)).any(), "no gate is split: the test would be weak"
        refs.append((reg.detach(), {n: p.grad for n, p in gated.named_parameters()}))
    return refs


def _check_ddp_gradients(rank, refs):
    """Cross-entropy plus both regularizers, layer and channel gates: after DDP averages the
    gradients, every parameter's is the single-process one."""
    x, y = _batch()
    part = slice(rank * SHARD, (rank + 1) * SHARD)
    for config, (ref_reg, ref_grads) in zip(CONFIGS, refs, strict=True):
        ddp = DistributedDataParallel(_gated(config))
        loss, reg = _loss(ddp, x[part], y[part])
        loss.backward()
        torch.testing.assert_close(reg.detach(), ref_reg, rtol=0, atol=1e-7)
        params = dict(ddp.module.named_parameters())
        assert params.keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            grad = params[name].grad
            assert grad is not None, f"{config.mode}: {name} has no gradient"
            diff = (grad - ref).abs().max().item()
            assert diff <= 1e-5, f"{config.mode}: {name} gradient off by {diff:.2e}"


# Decisions for three gates over the whole batch: ḡ = 1/2, 5/8, 1.
DECISIONS = torch.tensor(
    [[1.0, 1, 1, 1, 0, 0, 0, 0], [1.0, 1, 1, 1, 1, 0, 0, 0], [1.0, 1, 1, 1, 1, 1, 1, 1]]
)


def _three_gates() -> cg.GatedModel:
    return cg.insert_gates(
        cg.create_model("resnet20", in_channels=1),
        torch.randn(2, 1, 28, 28),
        cg.GateConfig(momentum=None, exclude=("layer2.*", "layer3.*")),
    )


def _check_losses_and_running_rates(rank, gated):
    gates = list(gated.gates.values())
    # Rank 0 sees gate 0 open for all its samples, rank 1 closed for all: each local
    # (1 - ḡ) ḡ would be 0, the global one is 1/4.
    leaves = []
    for gate, row in zip(gates, DECISIONS[:, rank * SHARD : (rank + 1) * SHARD], strict=True):
        gate.decisions = row.clone().requires_grad_()
        leaves.append(gate.decisions)
    reg = cg.polarization_loss(gated)
    assert reg.item() == pytest.approx((1 / 4 + 15 / 64 + 0) / 3)
    assert cg.activation_loss(gated).item() == pytest.approx((1 / 2 + 5 / 8 + 1) / 3)
    # One process on the whole batch: dR/dd_i = (1 - 2 ḡ) / BATCH / #gates. The all-reduce's
    # backward sums the identical upstream gradients of the WORLD ranks, which DDP's average
    # divides back out.
    grads = torch.autograd.grad(reg, leaves)
    gbar = DECISIONS.mean(1, keepdim=True).expand(-1, SHARD)
    torch.testing.assert_close(torch.stack(grads), WORLD * (1 - 2 * gbar) / BATCH / 3)

    # Running open rates: the global batch's, weighted by each rank's batch size.
    layer = gates[0]
    layer._track(torch.ones(4) if rank == 0 else torch.zeros(2))
    assert layer.running_open_rate.item() == pytest.approx(4 / 6)
    channel = cg.ChannelGate("c", 3, 1, 4, "middle", "b", 1, cg.GateConfig(momentum=None))
    d = torch.tensor([[1.0, 0, 1], [1, 0, 0], [1, 1, 0]]) if rank == 0 else torch.ones(1, 3)
    channel._track(d)
    assert channel.running_open_rate.tolist() == [1.0, 0.5, 0.5]

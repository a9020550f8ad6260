"""The baselines on a tiny ResNet-20: naive weight and layer dropping, Torch-Pruning at a FLOPs
target, and activation-density pruning during training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import consensus_gates as cg
from consensus_gates.baselines import (
    IMPORTANCES,
    DensityPruning,
    activation_density,
    drop_layers,
    drop_weights,
    prune_to_flops,
    sparse_flops_ratio,
)
from consensus_gates.fx.graph_module import META_KEY
from consensus_gates.training.config import TrainConfig
from consensus_gates.training.trainer import train

from conftest import randomize, rel_diff

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
INNER = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]  # every block's inner width


def resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(cg.create_model("resnet20", in_channels=1)).eval()


def batches(n: int = 2, size: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 1, 16, 16, generator=g), torch.randint(0, 10, (size,), generator=g))
        for _ in range(n)
    ]


def ratio(model: nn.Module, original: nn.Module) -> float:
    return cg.flops(model, X).flops / cg.flops(original, X).flops


def same_state(a: dict[str, torch.Tensor], b: nn.Module) -> bool:
    return a.keys() == b.state_dict().keys() and all(
        torch.equal(v, b.state_dict()[k]) for k, v in a.items()
    )


def widths(model: nn.Module) -> list[int]:
    return [model.get_submodule(f"{block}.conv1").out_channels for block in INNER]


# --------------------------------------------------------------------------------------
# Naive dropout and naive layer drop (paper Fig. 2)
# --------------------------------------------------------------------------------------


def test_drop_weights_zeroes_that_fraction_of_every_weight_and_nothing_else():
    model = resnet()
    before = copy.deepcopy(model.state_dict())
    dropped = drop_weights(model, 0.3, seed=1)
    assert same_state(before, model)  # the original is untouched
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    for name in layers:
        w = dropped.get_submodule(name).weight
        zero = (w == 0).float().mean().item()
        if w.numel() >= 1000:
            assert abs(zero - 0.3) <= 0.02, name
        kept = w != 0
        assert torch.equal(w[kept], model.get_submodule(name).weight[kept])  # not rescaled
    weights = {f"{n}.weight" for n in layers}
    assert all(
        torch.equal(v, dropped.state_dict()[k]) for k, v in before.items() if k not in weights
    )
    again, other = drop_weights(model, 0.3, seed=1), drop_weights(model, 0.3, seed=2)
    w = dropped.layer3[0].conv1.weight
    assert torch.equal(again.layer3[0].conv1.weight, w)
    assert not torch.equal(other.layer3[0].conv1.weight == 0, w == 0)
    assert same_state(before, drop_weights(model, 0.0))
    with pytest.raises(ValueError, match="fraction"):
        drop_weights(model, 1.5)


def test_sparse_flops_ratio_counts_only_the_nonzero_weights():
    model = resnet()
    assert sparse_flops_ratio(drop_weights(model, 0.0), model, X) == 1.0
    # conv and linear layers are 99% of ResNet-20's FLOPs, so the ratio is close to 1 - f
    for fraction in (0.3, 0.8):
        assert sparse_flops_ratio(drop_weights(model, fraction), model, X) == pytest.approx(
            1 - fraction, abs=0.015
        )
    # one whole layer zeroed saves exactly that layer's FLOPs
    zeroed = copy.deepcopy(model)
    nn.init.zeros_(zeroed.layer3[2].conv2.weight)
    whole = cg.flops(model, X).flops
    layer = cg.flops(model.layer3[2].conv2, torch.randn(1, 64, 4, 4)).flops
    assert sparse_flops_ratio(zeroed, model, X) == pytest.approx(1 - layer / whole, rel=1e-9)


def test_drop_layers_reaches_the_target_and_equals_the_gated_model():
    model = resnet()
    gated = cg.insert_gates(model, X)
    step = max(c.flops for c in cg.branch_costs(gated).values()) / cg.flops(model, X).flops
    x = torch.randn(4, 1, 16, 16)
    kept = {}
    for target, seed in ((0.4, 0), (0.7, 0), (0.7, 1)):
        slim = drop_layers(model, X, target, seed=seed)
        decisions = slim.meta[META_KEY]["decisions"]
        kept[target, seed] = decisions
        assert abs(ratio(slim, model) - target) <= step / 2 + 1e-9, (target, seed)
        assert not any(isinstance(m, cg.Gate) for m in slim.modules())
        cg.fix_decisions(gated, decisions)
        with torch.no_grad():
            assert rel_diff(gated.eval()(x), slim.eval()(x)) < 1e-5
    assert kept[0.7, 0] != kept[0.7, 1]  # another seed, other branches
    assert sum(kept[0.4, 0].values()) < sum(kept[0.7, 0].values())


def test_drop_layers_refuses_a_target_below_no_branches():
    model = resnet()
    floor = ratio(drop_layers(model, X, 0.005), model)  # the stem and the classifier
    assert floor == pytest.approx(0.0046, abs=1e-4)
    with pytest.raises(ValueError, match="out of reach: closing all 9 gates"):
        drop_layers(model, X, 0.004)


# --------------------------------------------------------------------------------------
# Torch-Pruning: magnitude, BN-scale, Taylor
# --------------------------------------------------------------------------------------


def test_torch_pruning_mistakes_the_option_a_pad_for_an_elementwise_op():
    """Why prune_to_flops keeps to the branches' inner widths: cutting the residual stream
    (here two stem channels) cuts the same positions from all three stages and the model no
    longer runs. If a torch-pruning release fixes this, the search space can grow."""
    model = resnet()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=X)
    group = dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, [0, 1])
    assert model.layer3[2].bn2 in {dep.target.module for dep, _ in group}
    group.prune()
    assert model.layer3[2].bn2.num_features == 62  # 64 wide, not 16: the pad is ignored
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        model(X)


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_prune_to_flops_reaches_the_target_on_inner_widths(importance):
    model = resnet()
    before = copy.deepcopy(model.state_dict())
    pruned = prune_to_flops(model, X, 0.5, importance, batches=batches())
    assert same_state(before, model)
    assert abs(ratio(pruned, model) - 0.5) <= 0.02
    assert cg.flops(pruned, X).params < 0.6 * cg.flops(model, X).params
    assert all(w < full for w, full in zip(widths(pruned), widths(model), strict=True))
    # the residual stream and the classifier are whole
    assert pruned.conv1.out_channels == 16 and pruned.fc.weight.shape == (10, 64)
    stream = [pruned.get_submodule(f"{block}.conv2").out_channels for block in INNER]
    assert stream == [16] * 3 + [32] * 3 + [64] * 3
    assert not pruned.training and all(p.grad is None for p in pruned.parameters())
    with torch.no_grad():
        assert pruned(torch.randn(3, 1, 16, 16)).shape == (3, 10)
    # no longer the network create_model built: save refuses it instead of a wrong spec
    with pytest.raises(ValueError, match="cannot describe how to rebuild"):
        cg.save(pruned, "never-written.safetensors")


def _kept_channels(pruned: nn.Module, model: nn.Module, block: str) -> set[int]:
    new, old = (m.get_submodule(f"{block}.conv1").weight for m in (pruned, model))
    return {i for i in range(len(old)) if any(torch.equal(old[i], row) for row in new)}


def test_prune_to_flops_keeps_the_channels_its_importance_ranks_highest():
    model = resnet()
    chosen = {imp: prune_to_flops(model, X, 0.5, imp, batches=batches()) for imp in IMPORTANCES}
    for block in INNER:
        conv1, bn1, conv2 = (model.get_submodule(f"{block}.{n}") for n in ("conv1", "bn1", "conv2"))
        width = len(_kept_channels(chosen["bn-scale"], model, block))
        gamma = bn1.weight.detach().abs()
        assert _kept_channels(chosen["bn-scale"], model, block) == set(
            gamma.topk(width).indices.tolist()
        )
        group_l1 = conv1.weight.abs().sum((1, 2, 3)) + gamma + conv2.weight.abs().sum((0, 2, 3))
        assert _kept_channels(chosen["magnitude"], model, block) == set(
            group_l1.topk(width).indices.tolist()
        )
    taylor = [_kept_channels(chosen["taylor"], model, b) for b in INNER]
    assert taylor != [_kept_channels(chosen["magnitude"], model, b) for b in INNER]


def test_prune_to_flops_refuses_bad_requests():
    model = resnet()
    with pytest.raises(ValueError, match="importance='taylor'.*pass batches="):
        prune_to_flops(model, X, 0.5, "taylor")
    with pytest.raises(ValueError, match="importance must be one of"):
        prune_to_flops(model, X, 0.5, "random")
    with pytest.raises(ValueError, match="out of reach: one channel left"):
        prune_to_flops(model, X, 0.01, "magnitude")


# --------------------------------------------------------------------------------------
# Activation density
# --------------------------------------------------------------------------------------

DEAD = list(range(0, 16, 2))  # layer1.0's inner channels that never fire


def half_dead_resnet() -> nn.Module:
    """Every inner activation is ~10 (a small input-dependent part on top), except layer1.0's
    even channels, which sit at ~-10 before their ReLU: densities 0.5 there, 1 elsewhere."""
    model = resnet()
    with torch.no_grad():
        for block in INNER:
            bn1 = model.get_submodule(f"{block}.bn1")
            bn1.weight.fill_(0.01)
            bn1.bias.fill_(10.0)
        model.layer1[0].bn1.bias[DEAD] = -10.0
    return model


def test_activation_density_is_the_fraction_of_nonzero_activations():
    density = activation_density(half_dead_resnet(), batches())
    assert density == {f"{b}.conv1": 0.5 if b == "layer1.0" else 1.0 for b in INNER}
    measured = activation_density(resnet(), batches(), max_batches=1)
    assert all(0.2 < d < 0.8 for d in measured.values()), measured  # ReLU of ~N(μ, σ)


def test_density_pruning_removes_exactly_the_dead_channels():
    model = half_dead_resnet()
    original = copy.deepcopy(model)
    x = torch.randn(8, 1, 16, 16)
    prune = DensityPruning(X, batches(), every=2)
    assert not prune(model, 0)  # not its epoch
    assert prune(model, 1)
    assert widths(model) == [8] + widths(original)[1:]
    assert _kept_channels(model, original, "layer1.0") == set(range(1, 16, 2))
    with torch.no_grad():
        assert rel_diff(original(x), model(x)) < 1e-5  # the dead channels added nothing
    saved = sum(cg.flops(original.layer1[0].get_submodule(c), torch.randn(1, 16, 16, 16)).flops
                for c in ("conv1", "conv2")) / 2  # fmt: skip
    assert cg.flops(original, X).flops - cg.flops(model, X).flops >= saved
    assert not model.training
    assert not prune(model, 3)  # every channel left fires: nothing more to cut


def test_density_pruning_scale_and_min_channels():
    model = half_dead_resnet().train()  # measured in eval mode, left in train mode
    assert DensityPruning(X, batches(), scale=0.5)(model, 0)
    assert widths(model) == [4, 8, 8, 16, 16, 16, 32, 32, 32]
    assert DensityPruning(X, batches(), scale=0.01, min_channels=2)(model, 0)
    assert widths(model) == [2] * 9
    assert model.training
    with torch.no_grad():
        assert model(X).shape == (1, 10)


def test_training_with_density_pruning_shrinks_the_model_as_it_trains():
    model = resnet().train()
    data = TensorDataset(*(torch.cat(t) for t in zip(*batches(4), strict=True)))
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator())
    measure = batches(1, 32, seed=1)
    records = train(
        model, loader, None, TrainConfig(epochs=2, lr=0.02, milestones=(), progress=False),
        log=lambda _: None, epoch_end=DensityPruning(X, measure),
    )  # fmt: skip
    assert all(w < full for w, full in zip(widths(model), widths(resnet()), strict=True))
    assert ratio(model, resnet()) < 0.5  # two rounds at densities ~0.5
    assert all(r["loss"]["task"] == r["loss"]["total"] for r in records)
    assert model.training
    with torch.no_grad():
        assert model(X).shape == (1, 10)

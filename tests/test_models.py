import pytest
import torch

import consensus_gates as cg
from consensus_gates.models import CifarResNet


@pytest.mark.parametrize(
    "name,blocks,params",
    # He et al. report 0.27M / 0.46M / 0.66M / 0.85M / 1.7M parameters (option A).
    [
        ("resnet20", 9, 269_722),
        ("resnet32", 15, 464_154),
        ("resnet44", 21, 658_586),
        ("resnet56", 27, 853_018),
        ("resnet110", 54, 1_727_962),
    ],
)
def test_cifar_resnets_have_the_papers_sizes(name, blocks, params):
    m = cg.create_model(name)
    assert sum(p.numel() for p in m.parameters()) == params
    n = sum(len(getattr(m, f"layer{i}")) for i in (1, 2, 3))
    assert n == blocks
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_resnet_with_per_stage_block_counts():
    m = cg.create_model("cifar_resnet", blocks=(3, 1, 2), num_classes=7)
    assert [len(getattr(m, f"layer{i}")) for i in (1, 2, 3)] == [3, 1, 2]
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    # with n blocks in every stage it is ResNet-(6n+2), parameter for parameter
    same = cg.create_model("cifar_resnet", blocks=(3, 3, 3)).state_dict()
    assert {k: v.shape for k, v in same.items()} == {
        k: v.shape for k, v in cg.create_model("resnet20").state_dict().items()
    }
    with pytest.raises(ValueError, match="three counts >= 1"):
        cg.create_model("cifar_resnet", blocks=(3, 0, 3))


def test_option_b_adds_projection_parameters():
    a, b = cg.create_model("resnet20"), cg.create_model("resnet20", shortcut="B")
    # two 1x1 projections (16->32, 32->64) with BN
    extra = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    assert sum(p.numel() for p in b.parameters()) - sum(p.numel() for p in a.parameters()) == extra


def test_fashion_mnist_shapes():
    m = cg.create_model("resnet20", in_channels=1, num_classes=10)
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert isinstance(m, CifarResNet)


def test_registry_resolves_torchvision_and_user_models():
    m = cg.create_model("resnet18", num_classes=5)
    assert m.fc.out_features == 5
    assert "resnet20" in cg.list_models() and "resnet50" in cg.list_models()

    @cg.register_model("test_models_tiny")
    def tiny(width: int = 4):
        return torch.nn.Linear(width, 2)

    assert cg.create_model("test_models_tiny", width=3).in_features == 3
    with pytest.raises(ValueError, match="already registered"):
        cg.register_model("test_models_tiny")(lambda: None)

"""Ground-truth fixtures for the residual-block finder.

Each class is a tiny, plain-PyTorch imitation of one real-world topology. All of them
run in eval mode on ``torch.randn(*case.input_shape)`` (batch 2), have < 50k params,
and trace with plain ``torch.fx.symbolic_trace``.

``CASES`` at the bottom is the registry: ``expected_blocks`` is the number of residual
branches a correct finder gates (a parallel ``x + attn(x) + mlp(x)`` counts 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------
# Shared helpers (plain modules; symbolic_trace traces through all of them)
# --------------------------------------------------------------------------------------


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, dim: int = 2) -> nn.Sequential:
    conv = nn.Conv2d if dim == 2 else nn.Conv1d
    bn = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
    return nn.Sequential(conv(cin, cout, k, stride, k // 2, bias=False), bn(cout))


class Attention(nn.Module):
    """Multi-head self-attention written functionally (q/k/v Linear, explicit softmax)."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        q = self.q(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        attn = F.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.proj(out)


class Mlp(nn.Module):
    """Transformer MLP over the last dim: Linear-GELU-Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------------------
# Positive cases: real residual blocks
# --------------------------------------------------------------------------------------


class _BasicBlockIAdd(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return out


class _BasicBlockTorchAdd(_BasicBlockIAdd):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = torch.add(out, identity)
        return self.relu(out)


class BasicResNet(nn.Module):
    """torchvision ResNet-18/34 BasicBlocks (identity shortcut, ReLU after the add)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16), nn.ReLU(inplace=True))
        self.layer1 = _BasicBlockIAdd(16)
        self.layer2 = _BasicBlockTorchAdd(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class _ProjBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, downsample: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut)


class ProjectionResNet(nn.Module):
    """ResNet stride-2 blocks: conv1x1+BN projection shortcut, and ResNet-D avgpool+conv+BN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8), nn.ReLU())
        self.layer1 = _ProjBlock(8, 16, 2, conv_bn(8, 16, k=1, stride=2))
        down_d = nn.Sequential(
            nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
            nn.Conv2d(16, 24, 1, bias=False),
            nn.BatchNorm2d(24),
        )
        self.layer2 = _ProjBlock(16, 24, 2, down_d)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class LambdaLayer(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class _OptionABlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            p = (cout - cin) // 2
            self.shortcut: nn.Module = LambdaLayer(
                lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p), "constant", 0.0)
            )
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class OptionAResNet(nn.Module):
    """CIFAR ResNet (akamaster) with option-A zero-pad shortcut, plus an identity block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8), nn.ReLU())
        self.layer1 = _OptionABlock(8, 8, 1)
        self.layer2 = _OptionABlock(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _PreActBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + x


class PreActResNet(nn.Module):
    """Pre-activation ResNet (He et al. 2016 v2): bn-relu-conv-bn-relu-conv, bare add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.layer1 = _PreActBlock(16)
        self.layer2 = _PreActBlock(16)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _InplaceAddBlock(_BasicBlockIAdd):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out.add_(x)
        return F.relu(out)


class _MethodAddBlock(_BasicBlockIAdd):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = x.add(out)
        return F.relu(out)


class InplaceMethodResNet(nn.Module):
    """ResNet variants that merge with the tensor methods ``out.add_(x)`` and ``x.add(out)``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16), nn.ReLU())
        self.layer1 = _InplaceAddBlock(16)
        self.layer2 = _MethodAddBlock(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _PreNormBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class TokenTransformer(nn.Module):
    """ViT/DeiT: cls token concat, learned pos-embed add (not a block), 2 pre-norm blocks."""

    def __init__(self, dim: int = 32, num_tokens: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, num_tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(_PreNormBlock(dim), _PreNormBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


class ParallelBlock(nn.Module):
    """ViT-22B / GPT-J parallel block: ``x + attn(ln(x)) + mlp(ln(x))`` in one expression."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.mlp = Mlp(dim, 2 * dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        h = self.ln(x)
        x = x + self.attn(h) + self.mlp(h)
        return self.head(x.mean(dim=1))


class PoolFormerBlock(nn.Module):
    """PoolFormer (MetaFormer) block: weightless pooling token mixer with layer scale."""

    def __init__(self, c: int = 16, layer_scale_init: float = 0.1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 1, 1)
        self.norm1 = nn.GroupNorm(1, c)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.ls1 = nn.Parameter(layer_scale_init * torch.ones(c, 1, 1))
        self.norm2 = nn.GroupNorm(1, c)
        self.mlp = nn.Sequential(nn.Conv2d(c, 4 * c, 1), nn.GELU(), nn.Conv2d(4 * c, c, 1))
        self.ls2 = nn.Parameter(layer_scale_init * torch.ones(c, 1, 1))
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.norm1(x)
        x = x + self.ls1 * (self.pool(y) - y)
        x = x + self.ls2 * self.mlp(self.norm2(x))
        return self.head(x.mean(dim=(2, 3)))


class FusedMBConvExp1(nn.Module):
    """EfficientNetV2 FusedMBConv with expansion 1: one-layer branch ``x + bn(conv3x3(x))``."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, c), nn.SiLU())
        self.conv = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.bn(self.conv(x))
        return self.head(x.mean(dim=(2, 3)))


class ChannelsLastSwinLike(nn.Module):
    """Swin / ConvNeXt channels-last (B, H, W, C) stage: ``x + mlp(ln(x))`` over the last dim."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(c, c)
        self.norm = nn.LayerNorm(c)
        self.mlp = Mlp(c, 4 * c)
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.mlp(self.norm(x))
        return self.head(x.mean(dim=(1, 2)))


class _BasicBlock1d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(c)
        self.conv2 = nn.Conv1d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class Conv1dResNet(nn.Module):
    """1-D ResNet for audio/time series (e.g. ResNet1D / wav2letter-style) on (B, C, L)."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(4, c, dim=1), nn.ReLU())
        self.layer1 = _BasicBlock1d(c)
        self.layer2 = _BasicBlock1d(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean(dim=-1))


class _ResMLPBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


class VectorResMLP(nn.Module):
    """Residual MLP on flat (B, D) vectors (tabular ResNet, e.g. Gorishniy et al. 2021)."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.block1 = _ResMLPBlock(d)
        self.block2 = _ResMLPBlock(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)))


class _InnerBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.bn1(self.conv1(x))))


class NestedResidual(nn.Module):
    """Residual-in-residual (ESRGAN RRDB / RCAN RIR): outer branch contains an inner block."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 1, 1)
        self.conv_in = nn.Conv2d(c, c, 3, 1, 1)
        self.inner = _InnerBlock(c)
        self.conv_out = nn.Conv2d(c, c, 3, 1, 1)
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        branch = self.conv_out(self.inner(self.conv_in(x)))
        x = x + branch
        return self.head(x.mean(dim=(2, 3)))


class DropPath(nn.Module):
    """Stochastic depth per sample (timm ``DropPath``); identity in eval mode."""

    def __init__(self, drop_prob: float = 0.1) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        # per-sample mask of shape (B, 1, 1, 1); rand_like (not torch.rand(x.shape[0], ...))
        # so that the train-mode graph also traces with symbolic_trace
        mask = torch.floor(torch.rand_like(x[:, :1, :1, :1]) + keep_prob)
        return x / keep_prob * mask


class DropPathResNet(nn.Module):
    """timm ResNet/ConvNeXt block whose branch ends in ``DropPath`` right before the add."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, c), nn.ReLU())
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.drop_path = DropPath(0.1)
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        shortcut = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.drop_path(out)
        x = F.relu(out + shortcut)
        return self.head(x.mean(dim=(2, 3)))


class ScaledAddResNet(nn.Module):
    """Scaled residual (Inception-ResNet / SkipInit style): ``torch.add(identity, b, alpha=.5)``."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, c), nn.ReLU())
        self.branch = nn.Sequential(conv_bn(c, c), nn.ReLU(), conv_bn(c, c))
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.stem(x)
        out = self.branch(identity)
        x = F.relu(torch.add(identity, out, alpha=0.5))
        return self.head(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------
# Negative cases: adds that are NOT gateable residual merges
# --------------------------------------------------------------------------------------


class PlainCNN(nn.Module):
    """VGG-style plain CNN: conv-bn-relu stack, pooling, linear; no residual at all."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8),
            nn.ReLU(),
            conv_bn(8, 16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            conv_bn(16, 16),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class _RepVGGUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, brief_order: bool) -> None:
        super().__init__()
        self.brief_order = brief_order
        self.rbr_dense = conv_bn(cin, cout, 3, stride)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride)
        self.rbr_identity = nn.BatchNorm2d(cin) if (cin == cout and stride == 1) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rbr_identity is None:
            return F.relu(self.rbr_dense(x) + self.rbr_1x1(x))
        if self.brief_order:
            return F.relu(self.rbr_identity(x) + self.rbr_dense(x) + self.rbr_1x1(x))
        # order used by the official RepVGG code: dense + 1x1 + id_out
        return F.relu(self.rbr_dense(x) + self.rbr_1x1(x) + self.rbr_identity(x))


class RepVGGBlock(nn.Module):
    """RepVGG training-time blocks: BN-identity + 3x3+BN + 1x1+BN summed; no real residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8), nn.ReLU())
        self.block1 = _RepVGGUnit(8, 8, 1, brief_order=True)
        self.block2 = _RepVGGUnit(8, 8, 1, brief_order=False)
        self.block3 = _RepVGGUnit(8, 16, 2, brief_order=True)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


class MobileOneLike(nn.Module):
    """MobileOne training-time block: BN skip + 1x1 conv+BN + k=4 over-parameterized 3x3 convs."""

    def __init__(self, c: int = 8, k: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, c), nn.ReLU())
        self.rbr_skip = nn.BatchNorm2d(c)
        self.rbr_scale = conv_bn(c, c, 1)
        self.rbr_conv = nn.ModuleList([conv_bn(c, c, 3) for _ in range(k)])
        self.act = nn.ReLU()
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        identity_out = self.rbr_skip(x)
        scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for conv in self.rbr_conv:
            out += conv(x)
        x = self.act(out)
        return self.fc(x.mean(dim=(2, 3)))


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN for channels-last tensors (B, H, W, C)."""

    def __init__(self, c: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(0.1 * torch.randn(1, 1, 1, c))
        self.beta = nn.Parameter(0.1 * torch.randn(1, 1, 1, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return x + (self.gamma * (x * nx) + self.beta)


class GRNBlock(nn.Module):
    """ConvNeXt-V2 MLP (pwconv-GELU-GRN-pwconv) with GRN used on its own, no outer residual."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(4 * c)
        self.pwconv2 = nn.Linear(4 * c, c)
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pwconv2(self.grn(self.act(self.pwconv1(x))))
        return self.head(x.mean(dim=(1, 2)))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    halves = x.chunk(2, dim=-1)
    return torch.cat((-halves[1], halves[0]), dim=-1)


class RotaryEmbedding(nn.Module):
    """LLaMA/GPT-NeoX rotary position embedding ``x * cos + rotate_half(x) * sin``."""

    def __init__(self, dim: int = 32, num_tokens: int = 8) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        freqs = torch.outer(torch.arange(num_tokens).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos()[None], persistent=False)
        self.register_buffer("sin", emb.sin()[None], persistent=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q_proj(x)
        x = x * self.cos + rotate_half(x) * self.sin
        return self.out(x)


class DistilledHeads(nn.Module):
    """DeiT distilled inference head: ``(head(x) + head_dist(x)) / 2`` on (B, D)."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)
        self.head_dist = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return (self.head(x) + self.head_dist(x)) / 2


class _ClassAttnBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim)

    def forward(self, cls: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        u = torch.cat([cls, tokens], dim=1)
        return cls + self.attn(self.norm(u))[:, :1]


class TwoInputBlock(nn.Module):
    """CaiT class-attention: ``cls + attn(cat([cls, tokens]))[:, :1]``; branch needs ``tokens``."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.ca1 = _ClassAttnBlock(dim)
        self.ca2 = _ClassAttnBlock(dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)
        cls = self.cls.expand(x.shape[0], -1, -1)
        cls = self.ca1(cls, tokens)
        cls = self.ca2(cls, tokens)
        x = self.norm(torch.cat([cls, tokens], dim=1))
        return self.head(x[:, 0])


class DLALike(nn.Module):
    """DLA tree node: ``relu(branch(x) + project(maxpool(x)))``; ``bottom`` reused by root cat."""

    def __init__(self, cin: int = 8, cout: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, cin), nn.ReLU())
        self.downsample = nn.MaxPool2d(2, 2)
        self.project = conv_bn(cin, cout, 1)
        self.branch = nn.Sequential(conv_bn(cin, cout, 3, 2), nn.ReLU(), conv_bn(cout, cout))
        self.root = nn.Sequential(conv_bn(cout + cin, cout, 1), nn.ReLU())
        self.fc = nn.Linear(cout, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        bottom = self.downsample(x)
        res = self.project(bottom)
        y = F.relu(self.branch(x) + res)
        x = self.root(torch.cat([y, bottom], 1))
        return self.fc(x.mean(dim=(2, 3)))


class Res2NetLike(nn.Module):
    """Res2Net bottleneck: hierarchical ``sp + spx[i]`` adds (not blocks) inside one residual."""

    def __init__(self, c: int = 32, scale: int = 4) -> None:
        super().__init__()
        self.scale = scale
        self.width = c // scale
        self.stem = nn.Sequential(conv_bn(3, c), nn.ReLU())
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.convs = nn.ModuleList(
            [nn.Conv2d(self.width, self.width, 3, 1, 1, bias=False) for _ in range(scale - 1)]
        )
        self.bns = nn.ModuleList([nn.BatchNorm2d(self.width) for _ in range(scale - 1)])
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, 1)
        pieces = []
        sp = spx[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            if i > 0:
                sp = sp + spx[i]
            sp = F.relu(bn(conv(sp)))
            pieces.append(sp)
        pieces.append(spx[self.scale - 1])
        out = torch.cat(pieces, 1)
        out = self.bn3(self.conv3(out))
        out += identity
        x = F.relu(out)
        return self.fc(x.mean(dim=(2, 3)))


class SliceAssignResidual(nn.Module):
    """ReXNet channel-growing block: ``out[:, :C] += x`` (in-place residual on a slice view)."""

    def __init__(self, cin: int = 8, cout: int = 12) -> None:
        super().__init__()
        self.in_channels = cin
        self.stem = nn.Sequential(conv_bn(3, cin), nn.ReLU())
        self.conv_exp = nn.Sequential(conv_bn(cin, 4 * cin, 1), nn.SiLU())
        self.conv_dw = nn.Sequential(
            nn.Conv2d(4 * cin, 4 * cin, 3, 1, 1, groups=4 * cin, bias=False),
            nn.BatchNorm2d(4 * cin),
            nn.ReLU6(),
        )
        self.conv_pwl = conv_bn(4 * cin, cout, 1)
        self.fc = nn.Linear(cout, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        out = self.conv_pwl(self.conv_dw(self.conv_exp(x)))
        # timm writes `out[:, 0:C] += x`; fx.Proxy has no __setitem__, so use the equivalent
        # in-place add on the slice view (same eager semantics, traces as getitem + add_).
        out[:, 0 : self.in_channels].add_(x)
        return self.fc(out.mean(dim=(2, 3)))


class ScalarAndBiasAdds(nn.Module):
    """Plain CNN with ``x + 1.0``, ``x + bias_param`` and ``x + zeros_like(x)`` adds."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.block1 = nn.Sequential(conv_bn(3, c), nn.ReLU())
        self.block2 = nn.Sequential(conv_bn(c, c), nn.ReLU())
        self.block3 = nn.Sequential(conv_bn(c, c), nn.ReLU())
        self.bias_param = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(x)
        x = x + 1.0
        x = self.block2(x)
        x = x + self.bias_param
        x = self.block3(x)
        x = x + torch.zeros_like(x)
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    expected_blocks: int
    note: str


CASES: list[Case] = [
    # ---- positive ----
    Case(
        "BasicResNet",
        BasicResNet,
        (2, 3, 8, 8),
        2,
        "identity BasicBlocks; `out += identity` and `torch.add(out, identity)`, relu after",
    ),
    Case(
        "ProjectionResNet",
        ProjectionResNet,
        (2, 3, 8, 8),
        2,
        "stride-2 conv1x1+BN projection shortcut; ResNet-D avgpool+conv1x1+BN shortcut",
    ),
    Case(
        "OptionAResNet",
        OptionAResNet,
        (2, 3, 8, 8),
        2,
        "identity block + CIFAR option-A shortcut F.pad(x[:, :, ::2, ::2]) in a LambdaLayer",
    ),
    Case(
        "PreActResNet",
        PreActResNet,
        (2, 3, 8, 8),
        2,
        "pre-activation blocks; bare `out + x` with nothing after the add",
    ),
    Case(
        "InplaceMethodResNet",
        InplaceMethodResNet,
        (2, 3, 8, 8),
        2,
        "`out.add_(x)` (call_method add_) and `x.add(out)` (identity is the self operand)",
    ),
    Case(
        "TokenTransformer",
        TokenTransformer,
        (2, 8, 32),
        4,
        "2 pre-norm blocks x (attn + mlp); cls-token cat and `x + self.pos` are not blocks",
    ),
    Case(
        "ParallelBlock",
        ParallelBlock,
        (2, 8, 32),
        2,
        "`x + attn(h) + mlp(h)` with shared h = ln(x): two branches on one chained add",
    ),
    Case(
        "PoolFormerBlock",
        PoolFormerBlock,
        (2, 3, 8, 8),
        2,
        "weightless mixer `ls1 * (pool(y) - y)` counts; ls (C,1,1) Parameter multiplies branch",
    ),
    Case(
        "FusedMBConvExp1", FusedMBConvExp1, (2, 3, 8, 8), 1, "one-layer branch `x + bn(conv3x3(x))`"
    ),
    Case(
        "ChannelsLastSwinLike",
        ChannelsLastSwinLike,
        (2, 8, 8, 16),
        1,
        "4-D channels-last (B, H, W, C); LayerNorm + Linear MLP over the last dim",
    ),
    Case(
        "Conv1dResNet", Conv1dResNet, (2, 4, 16), 2, "Conv1d/BatchNorm1d BasicBlocks on (B, C, L)"
    ),
    Case(
        "VectorResMLP",
        VectorResMLP,
        (2, 32),
        2,
        "(B, D) residual MLP blocks; the first block's input is the graph placeholder",
    ),
    Case(
        "NestedResidual",
        NestedResidual,
        (2, 3, 8, 8),
        2,
        "outer block's branch conv -> inner residual block -> conv; both adds count",
    ),
    Case(
        "DropPathResNet",
        DropPathResNet,
        (2, 3, 8, 8),
        1,
        "branch ends in DropPath (identity in eval, so it vanishes from an eval trace)",
    ),
    Case(
        "ScaledAddResNet",
        ScaledAddResNet,
        (2, 3, 8, 8),
        1,
        "`torch.add(identity, branch, alpha=0.5)`: alpha scales the branch operand",
    ),
    # ---- negative ----
    Case("PlainCNN", PlainCNN, (2, 3, 8, 8), 0, "no adds at all"),
    Case(
        "RepVGGBlock",
        RepVGGBlock,
        (2, 3, 8, 8),
        0,
        "BN-id + 3x3 + 1x1 sums (both operand orders) and a stride-2 3x3+1x1 sum; no identity",
    ),
    Case(
        "MobileOneLike",
        MobileOneLike,
        (2, 3, 8, 8),
        0,
        "BN skip + 1x1 + 4 parallel 3x3 conv+BN branches summed with `out +=` in a loop",
    ),
    Case(
        "GRNBlock",
        GRNBlock,
        (2, 8, 8, 16),
        0,
        "GRN `x + (gamma * (x * nx) + beta)` alone: normalisation, not a residual block",
    ),
    Case(
        "RotaryEmbedding",
        RotaryEmbedding,
        (2, 8, 32),
        0,
        "`x * cos + rotate_half(x) * sin`: neither operand is x",
    ),
    Case(
        "DistilledHeads",
        DistilledHeads,
        (2, 32),
        0,
        "`(head(x) + head_dist(x)) / 2`: two weighted heads, no identity",
    ),
    Case(
        "TwoInputBlock",
        TwoInputBlock,
        (2, 8, 32),
        0,
        "CaiT class attention x2: branch also reads `tokens`, which are used after the block",
    ),
    Case(
        "DLALike",
        DLALike,
        (2, 3, 8, 8),
        0,
        "shortcut project(maxpool(x)); `bottom` escapes into a later torch.cat",
    ),
    Case(
        "Res2NetLike",
        Res2NetLike,
        (2, 3, 8, 8),
        1,
        "inner `sp + spx[i]` split-hierarchy adds don't count; outer `out += identity` does",
    ),
    Case(
        "SliceAssignResidual",
        SliceAssignResidual,
        (2, 3, 8, 8),
        0,
        "ReXNet `out[:, :C] += x`, written `out[:, :C].add_(x)`: getitem view + add_, no setitem",
    ),
    Case(
        "ScalarAndBiasAdds",
        ScalarAndBiasAdds,
        (2, 3, 8, 8),
        0,
        "`x + 1.0`, `x + Parameter`, `x + torch.zeros_like(x)`",
    ),
]

"""Random residual networks for the surgery fuzzer (tests/test_fuzz_surgery.py).

A `Net` is a small printable description that hypothesis draws (`nets()`) and shrinks;
`build` turns it into an `nn.Module` written the way people write residual networks: conv
(2-D and 1-D) nets, residual MLPs on vectors (B, C) and on tokens (B, N, C); basic,
bottleneck, inverted (depthwise) and PoolFormer-style branches; pre- and post-activation;
BatchNorm, GroupNorm, LayerNorm or none; grouped convs; squeeze-excitation, some of it wide
(RegNetY's); identity, 1x1-conv, ResNet-D and zero-padding shortcuts; merges written as
``+``, ``torch.add``, ``add_`` and ``+=``; two parallel branches on one merge; a residual
add followed by a concat; block outputs that a head reads too; nested ``Sequential``\\ s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

CONV_LAYOUTS = ("2d", "1d")  # (B, C, H, W) and (B, C, L)
LAYOUTS = ("2d", "2d", "1d", "vec", "tok")  # and (B, C), (B, N, C); 2-D nets most often
KINDS = {
    "2d": ("basic", "bottleneck", "inverted", "pool"),
    "1d": ("basic", "bottleneck", "inverted", "pool"),
    "vec": ("mlp",),
    "tok": ("mlp", "tokmix"),
}
# BatchNorm most often, as in real nets (hypothesis shrinks towards the first entry)
NORMS = ("bn", "bn", "bn", "none", "gn", "ln")
ACTS = ("relu", "relu_", "F.relu", "gelu", "silu", "hardswish")
MERGES = ("+", "radd", "add", "add_", "+=")
IDENTITIES = ("bare", "identity")  # `x` itself, or `self.shortcut = nn.Identity()`


@dataclass(frozen=True)
class Branch:
    """One residual branch. `kind`: basic (3x3, 3x3), bottleneck (1x1, 3x3, 1x1), inverted
    (1x1, depthwise 3x3, 1x1), pool (PoolFormer's ``pool(n(x)) - n(x)``), mlp (Linear, act,
    Linear) or tokmix (an MLP across tokens, MLP-Mixer). `se`: none, or a squeeze-excitation
    written with 1x1 convs or Linears, after the middle layer or at the end (`se_at`)."""

    kind: str = "basic"
    hidden: int = 8
    norm: str = "bn"
    act: str = "relu"
    preact: bool = False
    groups: str = "dense"  # the 3x3 of a bottleneck: dense, grouped (2 groups) or depthwise
    se: str = "none"  # none | conv | linear
    se_at: str = "end"  # mid | end
    nest: bool = False  # each (layer, norm, act) in its own Sequential
    bias: bool = False


@dataclass(frozen=True)
class Block:
    """A residual block: ``shortcut(x) + branch(x) [+ branch2(x)]``, then an optional ReLU
    and an optional concat with the block input (`then="concat"`); `then="tap"`: the head
    also reads this block's output."""

    out: int
    stride: int = 1
    branches: tuple[Branch, ...] = (Branch(),)
    shortcut: str = "identity"  # bare | identity | conv | pool_conv (ResNet-D) | pad (option A)
    merge: str = "+"  # + (branch + skip) | radd (skip + branch) | add | add_ | +=
    post_act: bool = True
    then: str = "none"  # none | concat | tap


@dataclass(frozen=True)
class Net:
    layout: str
    cin: int
    size: int  # H = W, L, or N tokens; 1 for vectors
    stem: int
    blocks: tuple[Block, ...]
    stages: tuple[int, ...] = ()  # blocks per nested Sequential; () puts all in one
    head: bool = True


def channel_dim(layout: str) -> int:
    return -1 if layout in ("vec", "tok") else 1


def input_shape(net: Net, batch: int, size: int | None = None) -> tuple[int, ...]:
    size = net.size if size is None else size
    return {
        "2d": (batch, net.cin, size, size),
        "1d": (batch, net.cin, size),
        "vec": (batch, net.cin),
        "tok": (batch, size, net.cin),
    }[net.layout]


def fixed_size(net: Net) -> bool:
    """Whether the net takes one size only: vectors, or tokens mixed by a Linear over N."""
    return net.layout == "vec" or any(br.kind == "tokmix" for b in net.blocks for br in b.branches)


# ---- modules ------------------------------------------------------------------------


class Transpose(nn.Module):
    def __init__(self, a: int, b: int):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(self.a, self.b)


class ChannelsLastNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, ...) map, as ConvNeXt writes it."""

    def __init__(self, c: int, layout: str):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "2d":
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class TokenBatchNorm(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class FunctionalRelu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class SqueezeExcite(nn.Module):
    """``x * sigmoid(fc2(relu(fc1(pool(x)))))``, with 1x1 convs (timm) or Linears (a view)."""

    def __init__(self, layout: str, c: int, style: str):
        super().__init__()
        self.layout, self.style = layout, style
        r = max(2, c // 4)
        conv = style == "conv" and layout in CONV_LAYOUTS
        layer = (nn.Conv2d if layout == "2d" else nn.Conv1d) if conv else nn.Linear
        self.fc1 = layer(c, r, 1) if conv else layer(c, r)
        self.fc2 = layer(r, c, 1) if conv else layer(r, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "2d":
            s = F.adaptive_avg_pool2d(x, 1)
        elif self.layout == "1d":
            s = F.adaptive_avg_pool1d(x, 1)
        elif self.layout == "tok":
            s = x.mean(1, keepdim=True)
        else:
            s = x
        if self.layout in CONV_LAYOUTS and not isinstance(self.fc1, nn.modules.conv._ConvNd):
            s = self.fc2(F.relu(self.fc1(s.flatten(1))))
            s = s.view(x.shape[0], x.shape[1], *((1, 1) if self.layout == "2d" else (1,)))
        else:
            s = self.fc2(F.relu(self.fc1(s)))
        return torch.sigmoid(s) * x


class PadShortcut(nn.Module):
    """CIFAR option A: subsample, then zero-pad the new channels."""

    def __init__(self, layout: str, stride: int, extra: int):
        super().__init__()
        self.layout, self.stride, self.extra = layout, stride, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        if self.layout == "2d":
            return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, 0, self.extra))
        return F.pad(x[:, :, ::s], (0, 0, 0, self.extra))


def norm(kind: str, layout: str, c: int) -> list[nn.Module]:
    if kind == "none":
        return []
    if kind == "bn":
        bn = {"2d": nn.BatchNorm2d, "1d": nn.BatchNorm1d, "vec": nn.BatchNorm1d}
        return [bn[layout](c) if layout in bn else TokenBatchNorm(c)]
    if kind == "gn" and layout != "tok":  # GroupNorm on tokens would normalize over N
        return [nn.GroupNorm(2 if c % 2 == 0 else 1, c)]
    return [ChannelsLastNorm(c, layout) if layout in CONV_LAYOUTS else nn.LayerNorm(c)]


def act(kind: str, first: bool) -> nn.Module:
    """An activation; never in place on the block input (the shortcut still reads it)."""
    if kind == "relu_" and not first:
        return nn.ReLU(inplace=True)
    other = {"gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "F.relu": FunctionalRelu}
    return other.get(kind, nn.ReLU)()


def dense(layout: str, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1,
          bias: bool = False) -> nn.Module:  # fmt: skip
    if layout in ("vec", "tok"):
        return nn.Linear(cin, cout, bias=bias)
    conv = nn.Conv2d if layout == "2d" else nn.Conv1d
    return conv(cin, cout, k, stride, k // 2, groups=groups, bias=bias)


def _groups(br: Branch, c: int) -> int:
    return {"dense": 1, "grouped": 2 if c % 2 == 0 else 1, "depthwise": c}[br.groups]


def branch_module(layout: str, br: Branch, cin: int, cout: int, stride: int, tokens: int):
    """The branch as a Sequential of units: each unit is a layer with its norm and act."""
    h = br.hidden
    if br.kind == "pool":
        return PoolMixer(layout, br, cin)
    if br.kind == "tokmix":
        layers = [(nn.Linear(tokens, h, bias=br.bias), True), (nn.Linear(h, tokens), False)]
    elif br.kind == "mlp":
        layers = [(dense(layout, cin, h, bias=br.bias), True), (dense(layout, h, cout), False)]
    elif br.kind == "basic":
        layers = [(dense(layout, cin, h, 3, stride, bias=br.bias), True),
                  (dense(layout, h, cout, 3), False)]  # fmt: skip
    else:  # bottleneck, or inverted: its 3x3 is depthwise
        groups = h if br.kind == "inverted" else _groups(br, h)
        layers = [(dense(layout, cin, h, bias=br.bias), True),
                  (dense(layout, h, h, 3, stride, groups=groups), True),
                  (dense(layout, h, cout), False)]  # fmt: skip
    widths = [cin] + [_out_width(m) for m, _ in layers]
    se_after = {"mid": len(layers) - 2, "end": len(layers) - 1}.get(br.se_at)
    units = []
    for i, (layer, activated) in enumerate(layers):
        if br.preact:  # norm, act, layer
            normed = [] if br.kind == "tokmix" else norm(br.norm, layout, widths[i])
            unit = [*normed, act(br.act, first=i == 0 and not normed), layer]
        else:  # layer, norm, act
            normed = [] if br.kind == "tokmix" else norm(br.norm, layout, widths[i + 1])
            unit = [layer, *normed] + ([act(br.act, first=False)] if activated else [])
        if br.se != "none" and i == se_after:
            unit.append(SqueezeExcite(layout, widths[i + 1], br.se))
        units.append(nn.Sequential(*unit) if br.nest else unit)
    if br.kind == "tokmix":
        pre = norm(br.norm, "tok", cin)
        return nn.Sequential(*pre, Transpose(1, 2), *_flat(units, br.nest), Transpose(1, 2))
    return nn.Sequential(*_flat(units, br.nest))


def _flat(units, nest: bool) -> list[nn.Module]:
    return list(units) if nest else [m for u in units for m in u]


def _out_width(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


class PoolMixer(nn.Module):
    """PoolFormer's token mixer: ``pool(n(x)) - n(x)``, parameter-free without a norm."""

    def __init__(self, layout: str, br: Branch, c: int):
        super().__init__()
        self.norm = nn.Sequential(*norm(br.norm, layout, c))
        pool = nn.AvgPool2d if layout == "2d" else nn.AvgPool1d
        self.pool = pool(3, 1, 1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return self.pool(y) - y


class ResBlock(nn.Module):
    def __init__(self, layout: str, spec: Block, cin: int, tokens: int):
        super().__init__()
        self.spec, self.dim = spec, channel_dim(layout)
        self.branch = branch_module(layout, spec.branches[0], cin, spec.out, spec.stride, tokens)
        if len(spec.branches) > 1:
            self.branch2 = branch_module(
                layout, spec.branches[1], cin, spec.out, spec.stride, tokens
            )
        norm_kind = spec.branches[0].norm
        if spec.shortcut == "identity":
            self.shortcut = nn.Identity()
        elif spec.shortcut == "pad":
            self.shortcut = PadShortcut(layout, spec.stride, spec.out - cin)
        elif spec.shortcut != "bare":
            pool = []
            if spec.shortcut == "pool_conv" and spec.stride > 1:
                cls = nn.AvgPool2d if layout == "2d" else nn.AvgPool1d
                pool = [cls(2, 2, ceil_mode=True, count_include_pad=False)]
            stride = 1 if pool else spec.stride
            proj = dense(layout, cin, spec.out, 1, stride)
            self.shortcut = nn.Sequential(*pool, proj, *norm(norm_kind, layout, spec.out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        out = self.branch(x)
        sc = x if spec.shortcut == "bare" else self.shortcut(x)
        if hasattr(self, "branch2"):
            out2 = self.branch2(x)
            if spec.merge == "+":
                out = out + out2 + sc
            elif spec.merge == "radd":
                out = sc + out + out2
            elif spec.merge == "add":
                out = torch.add(torch.add(out, out2), sc)
            elif spec.merge == "add_":
                out = out.add_(out2).add_(sc)
            else:
                out += out2
                out += sc
        elif spec.merge == "+":
            out = out + sc
        elif spec.merge == "radd":
            out = sc + out
        elif spec.merge == "add":
            out = torch.add(out, sc)
        elif spec.merge == "add_":
            out.add_(sc)
        else:
            out += sc
        if spec.post_act:
            out = self.relu(out)
        if spec.then == "concat":
            out = torch.cat([out, x], dim=self.dim)
        return out


class FuzzNet(nn.Module):
    def __init__(self, net: Net):
        super().__init__()
        self.layout = net.layout
        self.stem = dense(net.layout, net.cin, net.stem, 3 if net.layout in CONV_LAYOUTS else 1)
        blocks, c, taps = [], net.stem, []
        for spec in net.blocks:
            blocks.append(ResBlock(net.layout, spec, c, net.size))
            c = spec.out + (c if spec.then == "concat" else 0)
            if spec.then == "tap":
                taps.append(spec.out)
        counts, stages, i = net.stages or (len(blocks),), [], 0
        for n in counts:
            stages.append(nn.Sequential(*blocks[i : i + n]))
            i += n
        self.stages = nn.Sequential(*stages)
        self.taps = bool(taps)
        if net.head or taps:
            self.fc = nn.Linear(c + sum(taps), 5)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout in CONV_LAYOUTS:
            return x.flatten(2).mean(-1)
        return x.mean(1) if self.layout == "tok" else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if not self.taps:
            x = self.stages(x)
            return self.fc(self.pool(x)) if hasattr(self, "fc") else x
        tapped = []
        for stage in self.stages:
            for block in stage:
                x = block(x)
                if block.spec.then == "tap":
                    tapped.append(self.pool(x))  # the block output, used twice
        return self.fc(torch.cat([*tapped, self.pool(x)], dim=1))


def build(net: Net, seed: int = 0) -> nn.Module:
    """The module `net` describes, with weights drawn from `seed`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return FuzzNet(net)


def parameter_free_merges(model: nn.Module) -> set[str]:
    """Qualified names of the blocks whose (single) branch has no parameters."""
    return {
        name
        for name, m in model.named_modules()
        if isinstance(m, ResBlock) and not any(True for _ in m.branch.parameters())
    }


# ---- strategies ---------------------------------------------------------------------

widths = st.integers(4, 16)
# An SE inside a branch is as often wider (RegNetY's): 2 x 17..48 values give an elementwise
# kernel a vectorized part and a scalar tail, where a sigmoid of equal values may round
# differently; closing the width before it, or the branch's first layer, makes them equal.
se_widths = st.one_of(widths, st.integers(17, 48))


@st.composite
def branches(draw, layout: str, kind: str) -> Branch:
    conv = layout in CONV_LAYOUTS
    se = (
        draw(st.sampled_from(("none", "conv", "linear") if conv else ("none", "linear")))
        if kind != "pool" and kind != "tokmix"
        else "none"
    )
    se_at = draw(st.sampled_from(("end", "mid")))
    return Branch(
        kind=kind,
        hidden=draw(se_widths if se != "none" and se_at == "mid" else widths),
        norm=draw(st.sampled_from(NORMS)),
        act=draw(st.sampled_from(ACTS)),
        preact=draw(st.sampled_from((False, False, True))),
        groups=draw(st.sampled_from(("dense", "grouped", "depthwise")))
        if conv and kind == "bottleneck"
        else "dense",
        se=se,
        se_at=se_at,
        nest=draw(st.booleans()),
        bias=draw(st.booleans()),
    )


@st.composite
def blocks(draw, layout: str, cin: int, can_stride: bool) -> Block:
    kind = draw(st.sampled_from(KINDS[layout]))
    then = draw(st.sampled_from(("none", "none", "concat", "tap")))
    merge, post_act = draw(st.sampled_from(MERGES)), draw(st.booleans())
    if kind in ("pool", "tokmix"):  # same shape in and out: identity shortcut only
        shortcut = draw(st.sampled_from(IDENTITIES))
        return Block(cin, 1, (draw(branches(layout, kind)),), shortcut, merge, post_act, then)
    stride = draw(st.sampled_from((1, 2))) if can_stride else 1
    out = draw(widths)
    shortcuts = ["conv"] + (list(IDENTITIES) if stride == 1 and out == cin else [])
    if layout in CONV_LAYOUTS:
        shortcuts += ["pool_conv"] + (["pad"] if out > cin or stride > 1 and out == cin else [])
    shortcut = draw(st.sampled_from(sorted(shortcuts)))
    # two parallel branches on one merge; without an identity they are refused (RepVGG)
    if draw(st.integers(0, 2 if shortcut in IDENTITIES else 9)) == 0:
        pair = (draw(branches(layout, kind)), draw(branches(layout, kind)))
    else:
        pair = (draw(branches(layout, kind)),)
    if then == "concat" and stride > 1:
        then = "none"
    return Block(out, stride, pair, shortcut, merge, post_act, then)


@st.composite
def nets(draw) -> Net:
    layout = draw(st.sampled_from(LAYOUTS))
    size = 1 if layout == "vec" else draw(st.integers(4, 8))
    cin = draw(st.integers(1, 3)) if layout in CONV_LAYOUTS else draw(widths)
    stem = draw(widths)
    specs, c, spatial = [], stem, size
    for _ in range(draw(st.integers(1, 4))):
        b = draw(blocks(layout, c, layout in CONV_LAYOUTS and spatial >= 4))
        specs.append(b)
        c = b.out + (c if b.then == "concat" else 0)
        spatial = -(-spatial // b.stride)
    cuts = draw(st.sets(st.integers(1, len(specs) - 1))) if len(specs) > 1 else set()
    bounds = [0, *sorted(cuts), len(specs)]
    stages = tuple(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    return Net(layout, cin, size, stem, tuple(specs), stages, draw(st.booleans()))

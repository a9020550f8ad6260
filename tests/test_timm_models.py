"""Models we did not design for: a spread of timm architectures (random init, small inputs).

Each is either gated exactly (all-open equals the original; surgery equals the fixed-decision
gated model) or refused with a clear error.
"""

import random

import pytest
import torch

import consensus_gates as cg

from conftest import randomize, rel_diff

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.slow

GATED = [  # name, image size, gates found (refused sums are listed in gated.spec["rejected"])
    ("resnet50d", 64, 16),
    ("convnext_atto", 64, 12),
    ("convnextv2_atto", 64, 12),  # GRN adds refused
    ("vit_tiny_patch16_224", 224, 24),
    ("deit_tiny_distilled_patch16_224", 224, 24),  # the two-head average refused
    ("poolformer_s12", 64, 24),  # weightless pooling mixers
    ("resmlp_12_224", 224, 24),
    ("mixer_s32_224", 224, 16),
    ("cait_xxs24_224", 224, 50),  # class attention (two inputs) refused
    ("dla34", 64, 11),  # the aggregation that reuses a block input refused
    ("res2net50_14w_8s", 64, 16),  # hierarchical inner adds refused, bottleneck adds kept
    ("mobileone_s0", 64, 35),  # one gate per block: BN identity + drop_path(conv sum)
    ("ghostnet_100", 64, 16),
    ("hrnet_w18_small", 64, 23),  # multi-resolution fusion adds refused
    ("nf_resnet26", 64, 8),
    ("edgenext_xx_small", 64, 15),
]


@pytest.mark.parametrize("name,size,count", GATED, ids=[g[0] for g in GATED])
def test_timm_model_gated_exactly(name, size, count):
    model = randomize(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    x = torch.randn(2, 3, size, size)
    gated = cg.insert_gates(model, x).eval()
    assert len(gated.gates) == count
    cg.fix_decisions(gated, dict.fromkeys(gated.gates, True))
    with torch.no_grad():
        assert rel_diff(model(x), gated(x)) <= 1e-6
    rng = random.Random(0)
    for d in (dict.fromkeys(gated.gates, False), {n: rng.random() < 0.5 for n in gated.gates}):
        cg.fix_decisions(gated, d)
        slim = cg.materialize(gated, d).eval()
        with torch.no_grad():
            assert rel_diff(gated(x), slim(x)) <= 1e-5


@pytest.mark.parametrize("name", ["dpn48b", "rexnet_100", "vovnet39a"])
def test_timm_models_without_gateable_merges_are_refused_clearly(name):
    model = timm.create_model(name, pretrained=False, num_classes=10)
    with pytest.raises(ValueError, match="has no residual merge"):
        cg.insert_gates(model, torch.randn(2, 3, 64, 64))


def test_untraceable_timm_block_is_named_and_leaf_modules_fixes_it():
    from timm.models.mobilevit import MobileVitBlock

    model = randomize(timm.create_model("mobilevit_xxs", pretrained=False, num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(cg.TracingError, match=r"'stages\.2\.1' \(MobileVitBlock\).*leaf_modules"):
        cg.insert_gates(model, x)
    gated = cg.insert_gates(model, x, leaf_modules=[MobileVitBlock]).eval()
    cg.fix_decisions(gated, dict.fromkeys(gated.gates, True))
    with torch.no_grad():
        assert rel_diff(model(x), gated(x)) <= 1e-6

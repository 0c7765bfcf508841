"""Folding eval-mode BatchNorm into the convolution before it: which pairs fold, and that resets still take effect."""

import timm
import torch
from torch import nn

import layercrit
from layercrit.columns import METRIC_COLUMNS
from layercrit.measurement.folding import find_pairs, folded_batchnorm
from layercrit.models import Preprocessing, wrap_module

PRE = Preprocessing(resize=None, crop=None, source="test")


def with_trained_statistics(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, so that a wrong fold shows (fresh ones are 0/1)."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)
    return model.eval()


def timm_model(name, **kwargs):
    torch.manual_seed(0)
    build = lambda: timm.create_model(name, num_classes=10, **kwargs)  # noqa: E731
    return wrap_module(with_trained_statistics(build()), fresh=build, preprocessing=PRE, spec=f"timm:{name}")


def images(n=8, size=32):
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator),
            torch.randint(0, 10, (n,), generator=generator))


class ConvOutputUsedTwice(nn.Module):
    """The convolution's output feeds its BatchNorm and a skip connection: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 10)

    def forward(self, x):
        y = self.conv(x)
        return self.head((self.bn(y) + y).mean((2, 3)))


class NormAfterAnActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        return self.head(self.bn(torch.relu(self.conv(x))).mean((2, 3)))


def test_every_conv_batchnorm_pair_of_a_resnet_folds_and_gives_the_same_outputs_to_the_last_bits():
    model = with_trained_statistics(timm.create_model("resnet18", num_classes=10, zero_init_last=False))
    x = torch.randn(2, 3, 32, 32)
    pairs = find_pairs(model, x)
    assert len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    assert ("conv1", "bn1") in pairs and ("layer2.0.downsample.0", "layer2.0.downsample.1") in pairs
    with torch.no_grad():
        reference = model(x)
        with folded_batchnorm(model, pairs):
            folded = model(x)
        after = model(x)
    assert torch.allclose(folded, reference, rtol=1e-4, atol=1e-5)
    assert not torch.equal(folded, reference)  # it did run the folded convolutions
    assert torch.equal(after, reference)  # and left the model as it was


def test_timm_batchnorm_with_activation_folds_and_keeps_its_activation():
    model = with_trained_statistics(timm.create_model("mobilenetv3_small_050", num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    pairs = find_pairs(model, x)
    assert ("conv_stem", "bn1") in pairs
    with torch.no_grad(), folded_batchnorm(model, pairs):
        folded = model(x)
    with torch.no_grad():
        assert torch.allclose(folded, model(x), rtol=1e-4, atol=1e-5)


def test_a_pair_is_not_folded_when_the_conv_output_is_used_elsewhere_or_a_nonlinearity_sits_between():
    x = torch.randn(2, 3, 8, 8)
    assert find_pairs(ConvOutputUsedTwice().eval(), x) == []
    assert find_pairs(NormAfterAnActivation().eval(), x) == []


def test_a_batchnorm_in_training_mode_is_not_folded():
    model = ConvOutputUsedTwice().eval()
    model.bn.train()
    assert find_pairs(nn.Sequential(model.conv, model.bn), torch.randn(2, 3, 8, 8)) == []


def test_densenet_folds_only_the_norms_that_follow_a_conv_not_those_after_a_concatenation():
    model = timm.create_model("densenet121", num_classes=10).eval()
    pairs = dict(find_pairs(model, torch.randn(2, 3, 32, 32)))
    assert pairs["features.denseblock1.denselayer1.conv1"] == "features.denseblock1.denselayer1.norm2"
    assert "features.denseblock1.denselayer2.norm1" not in pairs.values()  # its input is a concatenation


def assert_default_engine_matches_naive(resolved, data, batch_size=4, **options):
    fast = layercrit.measure(resolved, data, trials=2, batch_size=batch_size, **options)  # NHWC + folded BatchNorm
    naive = layercrit.measure(resolved, data, trials=2, batch_size=batch_size, engine="naive", **options)
    assert list(fast.layer) == list(naive.layer)
    for column in ("top1_acc", "top5_acc", "agreement"):
        assert (fast[column] - naive[column]).abs().max() == 0, column
    for column in ("pred_cos_sim", "criticality"):
        assert (fast[column] - naive[column]).abs().max() <= 1e-5, column
    relative = ((fast[list(METRIC_COLUMNS)] - naive[list(METRIC_COLUMNS)]).abs()
                / naive[list(METRIC_COLUMNS)].abs().clip(lower=1)).max().max()
    assert relative <= 1e-4
    assert fast.criticality.iloc[1:].min() > 0  # every reset did something, folded or not
    return fast


def test_resets_of_convolutions_and_of_batchnorms_take_effect_through_the_fold():
    resolved = timm_model("resnet18", zero_init_last=False)
    assert_default_engine_matches_naive(resolved, images(), layers="conv1,bn1,layer1.0.*,layer3.1.conv2,fc")


def test_batchnorm_statistics_reset_and_recalibrated_take_effect_through_the_fold():
    resolved = timm_model("resnet18", zero_init_last=False)
    for bn, batches in (("reset", None), ("recalibrate", 1)):
        # 8 images per batch: statistics re-estimated from only 4 would amplify rounding beyond 1e-5 in cosine
        assert_default_engine_matches_naive(resolved, images(n=16), batch_size=8,
                                            layers="layer1.0.conv1,layer2.1.conv2", bn=bn, bn_batches=batches)

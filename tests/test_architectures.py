"""Every common architecture family: selection, groups, resets, engines and figures (random init, 32 px images)."""

import pandas as pd
import pytest
import timm
import torch
import torchvision

import layercrit
from layercrit.analysis import tables as analysis
from layercrit.columns import METRIC_COLUMNS
from layercrit.measurement.layers import block_units, select_layers
from layercrit.models import Preprocessing, wrap_module

PRE = Preprocessing(resize=None, crop=None, source="test")

# spec -> (constructor keywords, a few layers to measure (the full set would be slow on a CPU), blocks, stages)
FAMILIES = {
    "timm:resnet50": ({}, "conv1,layer1.0.*,layer4.2.conv3,fc", 16, 4),
    "timm:vit_small_patch16_224": ({"img_size": 32}, "patch_embed.proj,blocks.0.*,blocks.11.mlp.fc2,head", 12, 12),
    "timm:convnext_tiny": ({}, "stem.0,stages.1.downsample.1,stages.1.blocks.0.*,head.fc", 18, 4),
    "timm:efficientnet_b0": ({}, "conv_stem,blocks.1.0.*,conv_head,classifier", 16, 7),
    "timm:mobilenetv3_large_100": ({}, "conv_stem,blocks.2.0.*,blocks.6.0.conv,classifier", 15, 7),
    "timm:regnety_002": ({}, "stem.conv,s1.b1.*,s4.b7.conv3.conv,head.fc", 13, 4),
    "timm:swin_tiny_patch4_window7_224": ({"img_size": 32, "window_size": 2},
                                          "patch_embed.proj,layers.0.blocks.1.attn.*,layers.0.blocks.1.mlp.*,"
                                          "layers.1.downsample.reduction,head.fc", 12, 4),
    "torchvision:resnet50": ({}, "conv1,layer2.0.*,layer4.2.conv3,fc", 16, 4),
}


def build(spec, kwargs):
    source, name = spec.split(":")
    if source == "timm":
        return timm.create_model(name, num_classes=10, **kwargs)
    return torchvision.models.get_model(name, num_classes=10, **kwargs)


@pytest.fixture(scope="module")
def models():
    """Each family's model, built once (seeded), wrapped with a factory for fresh instances."""
    built = {}
    for spec, (kwargs, *_) in FAMILIES.items():
        torch.manual_seed(0)
        built[spec] = wrap_module(build(spec, kwargs).eval(), fresh=lambda s=spec, k=kwargs: build(s, k),
                                  preprocessing=PRE, spec=spec)
    return built


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=generator),
            torch.randint(0, 10, (4,), generator=generator))


def assert_engines_agree(resolved, data, **options):
    fast = layercrit.measure(resolved, data, trials=1, batch_size=2, channels_last=False, fold_bn=False, **options)
    naive = layercrit.measure(resolved, data, trials=1, batch_size=2, engine="naive", **options)
    assert list(fast.layer) == list(naive.layer)
    assert (fast[list(METRIC_COLUMNS)] - naive[list(METRIC_COLUMNS)]).abs().max().max() <= 1e-5
    assert fast.criticality.iloc[1:].max() > 0
    return fast


@pytest.mark.parametrize("spec", FAMILIES)
def test_fast_engine_equals_naive_engine_layer_by_layer(models, data, spec):
    layers = FAMILIES[spec][1]
    df = assert_engines_agree(models[spec], data, layers=layers)
    assert list(df.layer[1:]) == select_layers(models[spec].model, layers)


# The fast tier checks the default engine on two BatchNorm families; CI's slow tier on every family.
FAST_TIER = ("timm:efficientnet_b0", "timm:regnety_002")
EVERY_FAMILY_IN_THE_SLOW_TIER = [spec if spec in FAST_TIER else pytest.param(spec, marks=pytest.mark.slow)
                                 for spec in FAMILIES]


@pytest.mark.parametrize("spec", EVERY_FAMILY_IN_THE_SLOW_TIER)
def test_default_fast_engine_agrees_with_naive_to_the_last_bits_of_fp32(models, data, spec):
    """The default adds NHWC layout and folded BatchNorm to prefix replay: the same predictions, rounding aside."""
    fast = layercrit.measure(models[spec], data, trials=1, batch_size=2, layers=FAMILIES[spec][1])
    naive = layercrit.measure(models[spec], data, trials=1, batch_size=2, layers=FAMILIES[spec][1],
                              engine="naive")
    assert (fast.top1_acc == naive.top1_acc).all() and (fast.agreement == naive.agreement).all()
    assert (fast.criticality - naive.criticality).abs().max() <= 1e-5
    metrics = list(METRIC_COLUMNS)
    assert ((fast[metrics] - naive[metrics]).abs() / naive[metrics].abs().clip(lower=1)).max().max() <= 1e-4


@pytest.mark.parametrize("spec", FAMILIES)
def test_fast_engine_equals_naive_engine_for_blocks_under_noise(models, data, spec):
    df = assert_engines_agree(models[spec], data, layers=FAMILIES[spec][1], groups="blocks", reset="noise",
                              reset_options={"scale": 1.0})
    assert set(df.layer[1:]) & set(block_units(models[spec].model))  # at least one whole block was reset


@pytest.mark.parametrize("spec", FAMILIES)
def test_blocks_and_stages_match_the_architecture(models, spec):
    blocks, stages = FAMILIES[spec][2:]
    assert len(block_units(models[spec].model, "blocks")) == blocks
    assert len(block_units(models[spec].model, "stages")) == stages


@pytest.mark.parametrize(("spec", "expected"), [
    ("timm:vit_small_patch16_224", ["patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.proj",
                                    "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "head"]),
    ("timm:efficientnet_b0", ["blocks.1.0.conv_dw", "blocks.1.0.se.conv_reduce", "blocks.1.0.se.conv_expand"]),
    ("timm:mobilenetv3_large_100", ["blocks.2.0.conv_dw", "blocks.2.0.se.conv_reduce", "blocks.2.0.se.conv_expand"]),
    ("timm:convnext_tiny", ["stages.0.blocks.0.conv_dw", "stages.0.blocks.0.mlp.fc1", "stages.1.downsample.1"]),
    ("timm:swin_tiny_patch4_window7_224", ["layers.0.blocks.0.attn.qkv", "layers.0.blocks.0.attn.proj",
                                           "layers.1.downsample.reduction"]),
    ("timm:regnety_002", ["s1.b1.conv2.conv", "s1.b1.se.fc1", "s1.b1.se.fc2"]),
])
def test_default_selection_includes_attention_depthwise_and_squeeze_excite_layers(models, spec, expected):
    selected = select_layers(models[spec].model)
    assert {f"model.{name}" for name in expected} <= set(selected)
    if "conv_dw" in expected[0]:
        depthwise = models[spec].model.get_submodule(f"model.{expected[0]}")
        assert depthwise.groups == depthwise.in_channels > 1


@pytest.mark.parametrize(("layer", "shown"), [
    ("model.layer2.1.conv2", "[2.1] conv2"),
    ("model.blocks.3.attn.qkv", "[3] attn.qkv"),
    ("model.stages.1.blocks.2.conv_dw", "[1.2] conv_dw"),
    ("model.stages.1.downsample.1", "[1] downsample.1"),
    ("model.blocks.2.1.conv_pw", "[2.1] conv_pw"),
    ("model.s2.b1.conv1.conv", "[2.1] conv1.conv"),
    ("model.layers.2.blocks.1.attn.qkv", "[2.1] attn.qkv"),
    ("model.encoder.layers.encoder_layer_4.mlp.0", "[4] mlp.0"),
    ("model.patch_embed.proj", "[0.0] patch_embed.proj"),
    ("model.conv_head", "[Head] conv_head"),
    ("model.layer3.0", "[3.0]"),
    ("prefix:model.layer3.0", "up to [3.0]"),
    ("suffix:model.fc", "from [Head] fc"),
])
def test_display_names_follow_each_family(layer, shown):
    assert analysis.display_layer(layer) == shown


@pytest.mark.parametrize("spec", FAMILIES)
def test_every_layer_of_every_family_gets_a_positional_display_name(models, spec):
    for name in select_layers(models[spec].model):
        assert analysis.display_layer(name).startswith("["), name


@pytest.mark.slow
def test_figures_and_tables_cover_every_family(models, data, tmp_path):
    frames = [layercrit.measure(models[spec], data, layers=FAMILIES[spec][1], trials=1, batch_size=4)
              for spec in FAMILIES]
    result = analysis.analyze(pd.concat(frames, ignore_index=True), tmp_path)
    assert result["paths"]["heatmap"][0].stat().st_size > 0
    layers = result["layers"]
    assert layers.model_id.nunique() == len(FAMILIES)
    assert layers.layer_display.str.startswith("[").all()


"""Groups of layers reset together (blocks, stages, a group file) and cumulative targets (prefix, suffix)."""

import json

import pytest
import timm
import torch

import layercrit
from layercrit.columns import METRIC_COLUMNS
from layercrit.errors import LayercritError
from layercrit.measurement import engine
from layercrit.measurement.layers import Target, select_layers, select_targets
from layercrit.measurement.resets import Rerandomize
from layercrit.models import Preprocessing, wrap_module


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    build = lambda: timm.create_model("resnet18", num_classes=10, zero_init_last=False)  # noqa: E731
    return wrap_module(build().eval(), fresh=build, preprocessing=Preprocessing(resize=None, crop=None), spec="r18")


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator),
            torch.randint(0, 10, (8,), generator=generator))


def names(targets):
    return [t.name for t in targets]


def test_blocks_of_a_resnet_are_its_residual_blocks_and_other_layers_stay_alone(resnet):
    targets = select_targets(resnet.model, groups="blocks")
    assert names(targets) == ["model.conv1", *[f"model.layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)],
                              "model.fc"]
    block = next(t for t in targets if t.name == "model.layer2.0")
    assert block.modules == ["model.layer2.0.conv1", "model.layer2.0.conv2", "model.layer2.0.downsample.0"]


def test_stages_of_a_resnet_are_layer1_to_layer4(resnet):
    targets = select_targets(resnet.model, groups="stages")
    assert names(targets) == ["model.conv1", "model.layer1", "model.layer2", "model.layer3", "model.layer4",
                              "model.fc"]
    assert len(targets[3].modules) == 5  # layer3: two blocks of two convs, and the downsample conv


def test_groups_hold_only_the_selected_layers(resnet):
    targets = select_targets(resnet.model, "layer1.*,bn1", groups="blocks")
    assert names(targets) == ["model.bn1", "model.layer1.0", "model.layer1.1"]
    assert targets[1].modules == ["model.layer1.0.conv1", "model.layer1.0.bn1", "model.layer1.0.conv2",
                                  "model.layer1.0.bn2"]


def test_a_group_file_names_the_groups_and_matches_globs_with_or_without_the_wrapper_prefix(resnet, tmp_path):
    path = tmp_path / "groups.yaml"
    path.write_text("stem: conv1\nearly: ['layer1.*', 'model.layer2.0.*']\nhead: [fc]\n")
    targets = select_targets(resnet.model, groups=str(path))
    assert names(targets) == ["stem", "early", "head"]
    assert targets[1].modules == [n for n in select_layers(resnet.model)
                                  if n.startswith(("model.layer1.", "model.layer2.0."))]
    as_json = tmp_path / "groups.json"
    as_json.write_text(json.dumps({"stem": ["conv1"], "early": ["layer1.*", "model.layer2.0.*"], "head": "fc"}))
    assert select_targets(resnet.model, groups=str(as_json)) == targets


@pytest.mark.parametrize(("text", "message"), [
    ("late: ['layer9.*']\n", r"group 'late' of .*groups\.yaml matches none of the selected layers \(patterns layer9\.\*"),
    ("- layer1.*\n", r"must map group names to lists of layer globs, e.g. early: \[layer1\.\*\]"),
    ("early: []\n", r"group 'early' in .* needs a list of layer globs"),
    ("early: [layer1\n", r"cannot read group file .*groups\.yaml: "),
])
def test_group_file_mistakes_are_one_line_errors(resnet, tmp_path, text, message):
    path = tmp_path / "groups.yaml"
    path.write_text(text)
    with pytest.raises(LayercritError, match=message):
        select_targets(resnet.model, groups=str(path))


def test_unknown_grouping_is_an_error_naming_the_choices(resnet):
    with pytest.raises(LayercritError, match=r"groups='block' is neither blocks nor stages nor a group file"):
        select_targets(resnet.model, groups="block")
    with pytest.raises(LayercritError, match=r"cumulative='both': one of prefix, suffix"):
        select_targets(resnet.model, cumulative="both")


def test_cumulative_prefix_and_suffix_reset_targets_one_to_k_and_k_to_the_end(resnet):
    layers = select_layers(resnet.model)
    prefix = select_targets(resnet.model, cumulative="prefix")
    suffix = select_targets(resnet.model, cumulative="suffix")
    assert [t.modules for t in prefix] == [layers[: k + 1] for k in range(len(layers))]
    assert [t.modules for t in suffix] == [layers[k:] for k in range(len(layers))]
    assert prefix[2].name == f"prefix:{layers[2]}" and suffix[2].name == f"suffix:{layers[2]}"


def test_cumulative_over_blocks_accumulates_whole_blocks(resnet):
    targets = select_targets(resnet.model, groups="stages", cumulative="prefix")
    assert names(targets)[:3] == ["prefix:model.conv1", "prefix:model.layer1", "prefix:model.layer2"]
    assert len(targets[2].modules) == 1 + 4 + 5


@pytest.mark.slow
def test_fast_engine_equals_naive_engine_for_groups_and_cumulative_targets(resnet, data):
    for options in ({"groups": "blocks"}, {"groups": "stages", "cumulative": "suffix"},
                    {"layers": "layer3.*,layer4.*,fc", "cumulative": "prefix"}):
        fast = layercrit.measure(resnet, data, trials=1, batch_size=4, channels_last=False, fold_bn=False, **options)
        naive = layercrit.measure(resnet, data, trials=1, batch_size=4, engine="naive", **options)
        assert list(fast.layer) == list(naive.layer)
        assert (fast[list(METRIC_COLUMNS)] - naive[list(METRIC_COLUMNS)]).abs().max().max() <= 1e-5, options
        assert fast.criticality.iloc[1:].min() > 0


def test_first_suffix_target_equals_resetting_every_layer_at_once(resnet, data):
    everything = Target("all", select_layers(resnet.model, "layer4.*,fc"))
    together = layercrit.measure(resnet, data, layers=[everything], trials=2, batch_size=4)
    suffix = layercrit.measure(resnet, data, layers="layer4.*,fc", cumulative="suffix", trials=2, batch_size=4)
    first = suffix[suffix.layer == f"suffix:{everything.modules[0]}"]
    assert first[list(METRIC_COLUMNS)].reset_index(drop=True).equals(
        together[together.layer == "all"][list(METRIC_COLUMNS)].reset_index(drop=True))


def test_rows_name_the_group(resnet, data):
    df = layercrit.measure(resnet, data, layers="layer4.*", groups="blocks", trials=1, batch_size=8)
    assert list(df.layer) == ["original", "model.layer4.0", "model.layer4.1"]


def test_targets_that_share_a_module_share_one_snapshot_of_its_trained_state(resnet):
    targets = select_targets(resnet.model, "layer4.*,fc", cumulative="prefix")
    plans = engine._plan_units(resnet.model, targets, Rerandomize(fresh=resnet.fresh), [0])
    first = plans[0].target.modules[0]
    assert all(plan.trained[first] is plans[0].trained[first] for plan in plans)


def test_grouped_targets_given_with_groups_are_refused(resnet):
    with pytest.raises(LayercritError, match=r"layers given as Targets are already grouped: leave groups=None"):
        select_targets(resnet.model, [Target("x", ["model.fc"])], groups="blocks")

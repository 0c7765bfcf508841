"""Reset strategies beyond the paper's: checkpoints, noise, interpolation, and BatchNorm statistics around a reset."""

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layercrit
from layercrit.analysis import tables as analysis
from layercrit.cli import main
from layercrit.columns import METRIC_COLUMNS
from layercrit.errors import LayercritError
from layercrit.measurement.layers import Target
from layercrit.measurement.resets import (
    Interpolate,
    Noise,
    Reinit,
    Rerandomize,
    Reset,
    declared_options,
    get_reset,
)

from .conftest import TinyCNN


@pytest.fixture
def init_checkpoint(tmp_path):
    """Initial weights of a TinyCNN other than the trained one (bare keys, as torch.save(net.state_dict()))."""
    torch.manual_seed(123)
    path = tmp_path / "init.pth"
    torch.save(TinyCNN().state_dict(), path)
    return path


def both_engines(resolved, data, **kwargs):
    fast = layercrit.measure(resolved, data, batch_size=16, channels_last=False, fold_bn=False, **kwargs)
    naive = layercrit.measure(resolved, data, batch_size=16, engine="naive", **kwargs)
    assert list(fast.layer) == list(naive.layer) and list(fast.reset) == list(naive.reset)
    assert (fast[list(METRIC_COLUMNS)] - naive[list(METRIC_COLUMNS)]).abs().max().max() <= 1e-5
    return fast


@pytest.mark.parametrize("options", [
    {"reset": "noise", "reset_options": {"scale": 0.5}},
    {"reset": "noise", "reset_options": {"scale": 0.2, "base": "reinit", "checkpoint": "INIT"}},
    {"reset": "reinit", "reset_options": {"checkpoint": "INIT"}},
    {"reset": "rewind", "reset_options": {"checkpoint": "INIT"}},
    {"reset": "interpolate", "reset_options": {"alpha": [0.25, 1.0]}},
    {"reset": "interpolate", "reset_options": {"alpha": [0.5], "base": "zero"}},
    {"reset": "zero", "bn": "reset"},
    {"reset": "rerandomize", "bn": "recalibrate", "bn_batches": 2},
    {"reset": "interpolate", "reset_options": {"alpha": [0.5]}, "bn": "recalibrate", "bn_batches": 1},
])
def test_fast_engine_equals_naive_engine_for_every_reset(tiny_model, tiny_data, init_checkpoint, options):
    options = {**options, "reset_options": {k: init_checkpoint if v == "INIT" else v
                                            for k, v in options.get("reset_options", {}).items()}}
    df = both_engines(tiny_model, tiny_data, trials=2, **options)
    assert df[df.layer == "model.fc"].criticality.min() > 0  # the reset did something


# ---------------------------------------------------------------- checkpoints


def test_reinit_to_the_trained_weights_changes_nothing_and_is_computed_once(tiny_model, tiny_data, tmp_path):
    path = tmp_path / "same.pth"
    torch.save(tiny_model.model.model.state_dict(), path)
    df = layercrit.measure(tiny_model, tiny_data, reset="reinit", reset_options={"checkpoint": path}, trials=3)
    layers = df[df.layer != "original"]
    assert layers.criticality.abs().max() == 0 and (layers.top1_acc == df.top1_acc.iloc[0]).all()
    assert set(layers.computed_in_trial) == {0}
    assert set(df.reset) == {"reinit(same.pth)"}


def test_reinit_loads_the_initial_weights_into_the_layer(tiny_model, init_checkpoint):
    initial = torch.load(init_checkpoint)
    state = Reinit(checkpoint=init_checkpoint).new_state("model.conv2", tiny_model.model.get_submodule("model.conv2"), 0)
    assert torch.equal(state["weight"], initial["conv2.weight"]) and torch.equal(state["bias"], initial["conv2.bias"])


def test_rewind_reads_checkpoints_with_or_without_the_wrapper_prefix(tiny_model, tiny_data, init_checkpoint, tmp_path):
    prefixed = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in torch.load(init_checkpoint).items()}}, prefixed)
    bare = layercrit.measure(tiny_model, tiny_data, reset="rewind", reset_options={"checkpoint": init_checkpoint},
                             trials=1)
    wrapped = layercrit.measure(tiny_model, tiny_data, reset="rewind", reset_options={"checkpoint": prefixed},
                                trials=1)
    assert bare[list(METRIC_COLUMNS)].equals(wrapped[list(METRIC_COLUMNS)])
    assert bare.criticality.iloc[1:].max() > 0


def test_checkpoint_without_a_layer_is_a_one_line_error_naming_it(tiny_model, tiny_data, tmp_path):
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in TinyCNN().state_dict().items() if not k.startswith("fc.")}, partial)
    with pytest.raises(LayercritError, match=r"has no fc\.weight for layer model\.fc: give a checkpoint of the same "):
        layercrit.measure(tiny_model, tiny_data, layers="fc", reset="reinit", reset_options={"checkpoint": partial})


def test_checkpoint_of_another_shape_is_refused(tiny_model, tiny_data, tmp_path):
    other = tmp_path / "other.pth"
    torch.save(TinyCNN(num_classes=5).state_dict(), other)
    with pytest.raises(LayercritError, match=r"other\.pth has fc\.weight of shape \(5, 16\), the model \(10, 16\)"):
        layercrit.measure(tiny_model, tiny_data, layers="fc", reset="rewind", reset_options={"checkpoint": other})


def test_reinit_without_a_checkpoint_says_how_to_give_one():
    with pytest.raises(LayercritError, match=r"reset 'reinit' needs a checkpoint: reinit --init CKPT"):
        get_reset("reinit")


# ---------------------------------------------------------------- noise


def test_noise_std_is_scale_times_each_tensors_own_std():
    torch.manual_seed(0)
    layer = nn.Linear(300, 200)
    with torch.no_grad():
        layer.bias.normal_(0, 3.0)
    state = Noise(scale=0.5).new_state("layer", layer, trial=0)
    for name in ("weight", "bias"):
        trained = getattr(layer, name).detach()
        ratio = float((state[name] - trained).std() / trained.std(correction=0))
        assert ratio == pytest.approx(0.5, rel=0.1), name


def test_noise_sigma_is_an_absolute_std_added_to_the_base_state(init_checkpoint, tiny_model):
    module = tiny_model.model.get_submodule("model.conv2")
    initial = torch.load(init_checkpoint)["conv2.weight"]
    state = Noise(sigma=0.01, base=Reinit(checkpoint=init_checkpoint)).new_state("model.conv2", module, 0)
    assert float((state["weight"] - initial).std()) == pytest.approx(0.01, rel=0.1)


def test_noise_differs_between_trials_and_repeats_exactly_in_a_new_instance(tiny_model):
    module = tiny_model.model.get_submodule("model.fc")
    first = Noise(scale=0.1, seed=3).new_state("model.fc", module, 0)["weight"]
    again = Noise(scale=0.1, seed=3).new_state("model.fc", module, 0)["weight"]
    other_trial = Noise(scale=0.1, seed=3).new_state("model.fc", module, 1)["weight"]
    assert torch.equal(first, again) and not torch.equal(first, other_trial)


def test_noise_of_scale_zero_leaves_the_predictions_unchanged(tiny_model, tiny_data):
    df = layercrit.measure(tiny_model, tiny_data, reset="noise", reset_options={"scale": 0.0}, trials=2)
    assert df.criticality.abs().max() < 1e-12 and set(df.reset) == {"noise(scale=0)"}


# ---------------------------------------------------------------- interpolation


def test_interpolated_state_is_the_convex_combination_of_trained_and_base(tiny_model):
    module = tiny_model.model.get_submodule("model.conv2")
    base = Rerandomize(seed=4, fresh=tiny_model.fresh)
    fresh = base.new_state("model.conv2", module, 1)
    state = Interpolate(alpha=0.3, base=base).new_state("model.conv2", module, 1)
    torch.testing.assert_close(state["weight"], 0.7 * module.weight.detach() + 0.3 * fresh["weight"])


def test_interpolation_endpoints_are_the_trained_model_and_the_base_reset(tiny_model, tiny_data):
    sweep = layercrit.measure(tiny_model, tiny_data, reset="interpolate", reset_options={"alpha": [0.0, 1.0]},
                              trials=2, seed=5)
    plain = layercrit.measure(tiny_model, tiny_data, reset="rerandomize", trials=2, seed=5)
    assert list(sweep.columns[:5]) == ["model_id", "layer", "trial", "reset", "alpha"]
    at_zero, at_one = sweep[sweep.alpha == 0.0], sweep[sweep.alpha == 1.0]
    assert at_zero.criticality.abs().max() < 1e-12
    assert at_one[list(METRIC_COLUMNS)].reset_index(drop=True).equals(plain[list(METRIC_COLUMNS)])
    assert set(at_one.reset) == {"interpolate(rerandomize,alpha=1)"}


def test_interpolation_area_is_the_trapezoid_under_the_mean_criticality(tiny_model, tiny_data):
    alphas = [0.0, 0.25, 0.5, 1.0]
    df = layercrit.measure(tiny_model, tiny_data, reset="interpolate", reset_options={"alpha": alphas}, trials=2)
    curves = analysis.interpolation_curves(df)
    areas = analysis.interpolation_area(curves)
    fc = df[df.layer == "model.fc"]
    means = [100 * (1 - fc[fc.alpha == a].pred_cos_sim).mean() for a in alphas]
    by_hand = sum((alphas[i + 1] - alphas[i]) * (means[i] + means[i + 1]) / 2 for i in range(len(alphas) - 1))
    row = areas[areas.layer == "model.fc"].iloc[0]
    assert row.area == pytest.approx(by_hand) and row.area > 0
    assert (row.alpha_min, row.alpha_max, row.reset) == (0.0, 1.0, "interpolate(rerandomize)")
    assert list(curves[curves.layer == "model.fc"].alpha) == alphas


def test_interpolation_needs_alphas_in_the_unit_interval():
    with pytest.raises(LayercritError, match=r"alpha=\[0\.5, 2\]: reset 'interpolate' needs alphas a\[,a2,\.\.\.\] with every a in \[0, 1\]"):
        get_reset("interpolate", alpha=[0.5, 2])


def test_interpolation_rows_are_persisted_across_alphas(tiny_model, tiny_data):
    seen = []
    df = layercrit.measure(tiny_model, tiny_data, reset="interpolate", reset_options={"alpha": [0.5, 1.0]},
                           trials=1, on_rows=lambda rows: seen.append(rows))
    assert seen[-1].equals(df) and len(seen[-1].alpha.unique()) == 2


# ---------------------------------------------------------------- BatchNorm statistics


def test_rerandomized_batchnorm_gets_the_fresh_statistics_as_in_the_paper(tiny_model):
    target = Target("model.bn1", ["model.bn1"])
    states = Rerandomize(fresh=tiny_model.fresh).new_states(tiny_model.model, target, 0)
    assert torch.equal(states["model.bn1"]["running_mean"], torch.zeros(8))
    assert torch.equal(states["model.bn1"]["running_var"], torch.ones(8))


def test_bn_keep_resets_only_the_conv_so_its_batchnorm_keeps_trained_statistics(tiny_model):
    states = Rerandomize(fresh=tiny_model.fresh).new_states(tiny_model.model, Target("c", ["model.conv1"]), 0)
    assert list(states) == ["model.conv1"]


def test_bn_reset_sets_the_statistics_of_the_batchnorm_after_the_reset_conv(tiny_model, tiny_data):
    reset = Rerandomize(fresh=tiny_model.fresh, bn="reset").bind(tiny_model.model, tiny_data[0])
    states = reset.new_states(tiny_model.model, Target("c", ["model.conv1"]), 0)
    assert set(states) == {"model.conv1", "model.bn1"}
    assert torch.equal(states["model.bn1"]["running_mean"], torch.zeros(8))
    assert torch.equal(states["model.bn1"]["running_var"], torch.ones(8))
    assert "weight" not in states["model.bn1"]  # its affine parameters stay trained
    untouched = reset.new_states(tiny_model.model, Target("c", ["model.conv2"]), 0)
    assert list(untouched) == ["model.conv2"]  # conv2 feeds no BatchNorm


def test_bn_recalibrate_estimates_the_statistics_of_the_reset_conv_output(tiny_model, tiny_data):
    model = tiny_model.model
    reset = Rerandomize(fresh=tiny_model.fresh, bn="recalibrate", bn_batches=2).bind(model, tiny_data[0], 10)
    states = reset.new_states(model, Target("c", ["model.conv1"]), 1)
    conv = states["model.conv1"]
    x = (tiny_data[0][:20].float() / 255 - 0.5) / 0.25
    out = F.conv2d(x, conv["weight"], conv["bias"], padding=1)
    torch.testing.assert_close(states["model.bn1"]["running_mean"], out.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    # the cumulative average of the two batches' unbiased variances
    per_batch = [out[i:i + 10].transpose(0, 1).flatten(1).var(dim=1) for i in (0, 10)]
    torch.testing.assert_close(states["model.bn1"]["running_var"], sum(per_batch) / 2, atol=1e-5, rtol=1e-4)


def test_bn_recalibrate_leaves_batchnorms_before_the_target_alone(tiny_model, tiny_data):
    reset = Rerandomize(fresh=tiny_model.fresh, bn="recalibrate", bn_batches=1).bind(tiny_model.model, tiny_data[0])
    assert list(reset.new_states(tiny_model.model, Target("fc", ["model.fc"]), 0)) == ["model.fc"]


def test_model_is_bit_identical_and_in_eval_mode_after_recalibration(tiny_model, tiny_data):
    before = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    layercrit.measure(tiny_model, tiny_data, reset="rerandomize", bn="recalibrate", bn_batches=2, trials=1)
    after = tiny_model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    bn = tiny_model.model.model.bn1
    assert not bn.training and bn.momentum == 0.1


def test_recalibrated_rows_say_so_in_the_reset_column(tiny_model, tiny_data):
    df = layercrit.measure(tiny_model, tiny_data, layers="conv1", bn="recalibrate", bn_batches=3, trials=1)
    assert set(df.reset) == {"rerandomize+bn-recalibrate3"}


def test_bn_modes_other_than_keep_need_batchnorm_layers(tiny_data):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))
    with pytest.raises(LayercritError, match=r"bn='reset': the model has no BatchNorm layers \(use bn='keep'\)"):
        layercrit.measure(model, tiny_data, bn="reset", trials=1)


def test_bn_recalibrate_needs_a_number_of_batches():
    with pytest.raises(LayercritError, match=r"bn='recalibrate' needs a number of batches K"):
        get_reset("zero", bn="recalibrate")
    with pytest.raises(LayercritError, match=r"bn='fresh': one of keep, reset, recalibrate K"):
        get_reset("zero", bn="fresh")


# ---------------------------------------------------------------- options and errors


def test_an_option_the_reset_does_not_take_is_named_with_the_resets_options():
    with pytest.raises(LayercritError, match=r"reset 'rewind' takes no option 'scale' \(its options: checkpoint\)"):
        get_reset("rewind", scale=0.1, checkpoint="x.pth")
    with pytest.raises(LayercritError, match=r"reset 'rerandomize' takes no option 'scale'"):
        get_reset("interpolate", alpha=0.5, scale=0.1)  # options beyond alpha and base go to the base reset


def test_every_reset_declares_its_options_once_as_typed_keywords():
    assert declared_options("noise") == {"scale": "a number", "sigma": "a number", "base": "a reset"}
    assert declared_options("interpolate") == {"alpha": "a number or numbers separated by |", "base": "a reset"}
    assert declared_options("reinit") == {"checkpoint": "a file"} and declared_options("zero") == {}
    noise = get_reset("noise(sigma=0.02,base=zero)")
    assert (noise.sigma, noise.scale, noise.base.name) == (0.02, None, "zero")
    assert get_reset("interpolate(alpha=0.25|1)").alphas == [0.25, 1.0]
    with pytest.raises(LayercritError, match=r"reset noise\(scale=big\): give a number"):
        get_reset("noise(scale=big)")


def test_the_resets_command_lists_every_reset_with_the_options_it_declares(capsys):
    from layercrit.measurement.resets import RESETS

    assert main(["resets"]) == 0
    out = capsys.readouterr().out
    for name in RESETS:
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert all(f"{key} (" in line for key in declared_options(name))
    assert "rewind(checkpoint=CKPT)" in out


@pytest.mark.parametrize("text", ["noise(scale=nan)", "noise(sigma=inf)", "interpolate(alpha=0.5|nan)"])
def test_a_reset_option_that_is_not_a_finite_number_is_refused(text):
    with pytest.raises(LayercritError, match=r"give a number"):
        get_reset(text)


def test_a_config_file_cannot_trust_a_checkpoint_through_the_reset_text():
    with pytest.raises(LayercritError, match="reset 'reinit' takes no option 'trust_checkpoint'"):
        get_reset("reinit(checkpoint=x.pth,trust_checkpoint=true)")


class Shrink(Reset):
    """A reset that only this test knows: the trained values times ``factor``."""

    name = "shrink"

    def __init__(self, *, factor: float = 0.5, seed=0, fresh=None, bn="keep", bn_batches=None):
        super().__init__(seed=seed, fresh=fresh, bn=bn, bn_batches=bn_batches)
        self.factor = factor

    def new_state(self, layer, module, trial):
        return {name: p.detach() * self.factor for name, p in module.named_parameters()}

    def label(self):
        return f"shrink(factor={self.factor:g})"


def test_a_new_reset_declared_in_the_registry_alone_is_usable_from_measure_run_and_a_sweep(
        tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    from layercrit.measurement import resets
    from layercrit.sweeps.sweep import SweepConfig

    monkeypatch.setitem(resets.RESETS, "shrink", Shrink)
    assert declared_options("shrink") == {"factor": "a number"}
    rows = layercrit.measure(tiny_model, tiny_data, layers="fc", reset="shrink(factor=1)", trials=1)
    assert rows.loc[rows.layer != "original", "reset"].tolist() == ["shrink(factor=1)"]
    assert rows.loc[rows.layer != "original", "criticality"].abs().max() < 1e-6  # factor 1 changes nothing
    config = SweepConfig.from_dict({"data": "d", "models": [{"id": "m", "spec": "s"}], "reset": "shrink(factor=0)"})
    assert config.experiment(config.reset[0]).reset == "shrink(factor=0)"
    with pytest.raises(LayercritError, match="reset 'shrink' takes no option 'size'"):
        SweepConfig.from_dict({"data": "d", "models": [{"id": "m", "spec": "s"}], "reset": "shrink(size=0)"})


def test_noise_needs_exactly_one_of_scale_and_sigma():
    with pytest.raises(LayercritError, match=r"reset 'noise' needs either a relative scale or an absolute sigma: noise\(scale=S\) or noise\(sigma=S\)"):
        get_reset("noise")


def test_reset_object_with_measure_options_is_refused(tiny_model, tiny_data):
    with pytest.raises(LayercritError, match=r"give its options \(and bn\) to the object, not to measure\(\)"):
        layercrit.measure(tiny_model, tiny_data, reset=get_reset("zero"), bn="reset")


def test_a_sweep_takes_a_resets_options_as_keys_and_refuses_a_reset_missing_them():
    from layercrit.sweeps.sweep import SweepConfig

    config = {"data": "fashion-mnist", "models": [{"id": "m", "spec": "zoo:fmnist/baseline"}], "reset": ["noise"]}
    with pytest.raises(LayercritError, match=r"reset 'noise' needs either a relative scale or an absolute sigma: noise\(scale=S\) or noise\(sigma=S\)"):
        SweepConfig.from_dict(config)
    swept = SweepConfig.from_dict({**config, "scale": 0.5, "reset": ["noise", "zero"]})
    assert swept.reset == ("noise(scale=0.5)", "zero")
    assert get_reset(swept.experiment(swept.reset[0]).reset).scale == 0.5


def test_every_reset_leaves_the_model_bit_identical(tiny_model, tiny_data, init_checkpoint):
    before = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    for reset, options in [("noise", {"scale": 1.0}), ("reinit", {"checkpoint": init_checkpoint}),
                           ("interpolate", {"alpha": [0.5]})]:
        layercrit.measure(tiny_model, tiny_data, layers="conv,linear,bn", reset=reset, reset_options=options,
                          trials=1, bn="reset")
    after = tiny_model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_targets_sharing_a_module_share_one_copy_of_its_rerandomized_tensors(tiny_model):
    reset = Rerandomize(fresh=tiny_model.fresh)
    block = reset.new_states(tiny_model.model, Target("block", ["model.conv1", "model.conv2"]), 0)
    alone = reset.new_states(tiny_model.model, Target("model.conv1", ["model.conv1"]), 0)
    assert block["model.conv1"]["weight"].data_ptr() == alone["model.conv1"]["weight"].data_ptr()
    trained = tiny_model.model.get_submodule("model.conv1").weight
    assert alone["model.conv1"]["weight"].data_ptr() != trained.data_ptr()


# ---------------------------------------------------------------- command line


@pytest.fixture
def fmnist_checkpoints(tmp_path):
    """Two random Fashion-MNIST ResNet-8 checkpoints: trained.pth and its init.pth."""
    for name, seed in (("init.pth", 0), ("trained.pth", 1)):
        torch.manual_seed(seed)
        net = layercrit.resolve_model("layercrit:fmnist_resnet8", pretrained=False).model.model
        torch.save(net.state_dict(), tmp_path / name)
    return tmp_path / "trained.pth", tmp_path / "init.pth"


def test_run_command_takes_reset_options_batchnorm_statistics_and_groups(fmnist_checkpoints, tmp_path, capsys):
    trained, init = fmnist_checkpoints
    code = main(["run", "--model", str(trained), "--arch", "layercrit:fmnist_resnet8", "--data", "fashion-mnist",
                 "--images", "16", "--batch-size", "8", "--trials", "1", "--reset", "interpolate", "--alpha", "0.5,1",
                 "--base", "reinit", "--init", str(init), "--bn", "recalibrate", "2", "--groups", "blocks",
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    df = pd.read_csv(tmp_path / "out" / "results.csv")
    assert set(df.alpha) == {0.5, 1.0}
    assert set(df.reset) == {"interpolate(reinit(init.pth),alpha=0.5)+bn-recalibrate2",
                             "interpolate(reinit(init.pth),alpha=1)+bn-recalibrate2"}
    assert list(df[df.alpha == 1.0].layer) == ["original", "model.conv1", "model.layer1.0", "model.layer2.0",
                                               "model.layer3.0", "model.fc"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--bn", "recalibrate", "x"], "--bn='recalibrate x': use keep, reset or recalibrate K (K a number of batches)"),
    (["--reset", "noise"], "reset 'noise' needs either a relative scale or an absolute sigma: noise(scale=S) or "
                            "noise(sigma=S)"),
    (["--scale", "0.1"], "reset 'rerandomize' takes no option 'scale' (its options: none)"),
    (["--reset", "interpolate", "--alpha", "0.5,x"], "reset interpolate(alpha=0.5|x): give a number or numbers "
                                                     "separated by |"),
    (["--groups", "block"], "--groups='block' is neither blocks nor stages nor a group file (YAML/JSON)"),
])
def test_run_command_reports_reset_mistakes_in_one_line(fmnist_checkpoints, tmp_path, capsys, argv, message):
    trained, _ = fmnist_checkpoints
    code = main(["run", "--model", str(trained), "--arch", "layercrit:fmnist_resnet8", "--data", "fashion-mnist",
                 "--images", "8", "--trials", "1", "--out", str(tmp_path / "out"), "--quiet", *argv])
    assert code == 2 and capsys.readouterr().err.strip() == f"layercrit: error: {message}"

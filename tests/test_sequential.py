"""The sequential design through measure(): blocks, mirrored pairs, Stein's stopping, determinism, and the rows it
leaves."""

import pandas as pd
import pytest
import torch

import layercrit
from layercrit.measurement.estimate import layer_table, stein_half_width, stein_units
from layercrit.measurement.layers import select_targets
from layercrit.measurement.resets import get_reset
from layercrit.measurement.sequential import Mirrored, SequentialDesign, mirrors, pairs_pay, unit_means


@pytest.fixture
def pool():
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (600, 1, 16, 16), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 10, (600,), generator=generator)


def sequential(model, data, **options):
    options = {"layers": "conv1,conv2,fc", "trials": 3, "target_ci": 0.05, "max_trials": 30, "images": None,
               "batch_size": 64, **options}
    return layercrit.measure(model, data, **options)


def test_each_trial_sees_its_own_block_the_same_for_every_layer(tiny_model, pool):
    df = sequential(tiny_model, pool, images_per_trial=40)
    rows = df[df.layer != "original"]
    pilot = SequentialDesign(0.05).pilot_size(600)  # 32 images for each of the 6 pilot trials (3 draws, 3 mirrors)
    offsets = rows.groupby("trial").image_offset.unique()
    assert all(len(o) == 1 for o in offsets)  # every layer's trial t is on the same block
    assert [o[0] for o in offsets][:8] == [0, pilot, 2 * pilot, 3 * pilot, 4 * pilot, 5 * pilot, 6 * pilot,
                                           6 * pilot + 40]
    assert rows[rows.trial < 6].n_images.eq(pilot).all() and rows[rows.trial >= 6].n_images.eq(40).all()


def test_each_layer_reports_its_own_stein_interval_within_the_target_or_says_it_hit_the_cap(tiny_model, pool):
    df = sequential(tiny_model, pool, images_per_trial=40)
    table = layer_table(df).set_index("layer")
    assert set(table.index) == {"model.conv1", "model.conv2", "model.fc"}
    for name, layer in table.iterrows():
        rows = df[(df.layer == name) & ~df.pilot]  # the pilot chose the design; the estimate is what follows it
        units = unit_means(rows.to_dict("records"))
        assert layer.criticality == pytest.approx(sum(units) / len(units))
        assert layer.criticality_ci == pytest.approx(stein_half_width(units, 20))
        if len(units) < 20:  # the cap came before the first stage's end
            assert layer.capped
            continue
        stein = stein_units(units[:20], 0.05)
        if layer.capped:  # Stein's rule wanted more units than 30 trials hold
            assert stein > len(units) and layer.criticality_ci > 0.05
        else:
            assert len(units) == stein and layer.criticality_ci <= 0.05
    assert (table.target_ci == 0.05).all()  # each layer's own interval, the target beside it
    rows = df[df.layer != "original"]
    assert rows.first_stage.eq(20).all() and rows.target_ci.eq(0.05).all() and rows.ci_looks.eq(1).all()
    assert rows.pilot.eq(rows.trial < 6).all()


def test_the_pilot_pairs_every_symmetric_draw_with_its_mirror(tiny_model, pool):
    df = sequential(tiny_model, pool, images_per_trial=40)
    pilot = df[(df.layer != "original") & (df.trial < 6)]
    assert pilot[pilot.trial % 2 == 1].mirror_of.eq(pilot[pilot.trial % 2 == 1].trial - 1).all()
    assert pilot[pilot.trial % 2 == 0].mirror_of.isna().all()
    alone = sequential(tiny_model, pool, images_per_trial=40, mirror=False)
    assert alone[alone.layer != "original"].mirror_of.isna().all()


def test_after_the_pilot_a_layer_is_measured_in_pairs_exactly_when_its_pilot_pairs_pay(tiny_model, pool):
    df = sequential(tiny_model, pool, images_per_trial=40)
    for name, rows in df[df.layer != "original"].groupby("layer"):
        pilot = rows[rows.trial < 6].sort_values("trial").criticality
        later = rows[rows.trial >= 6]
        paired = later[later.trial % 2 == 1].mirror_of.notna()
        assert (paired.all() if pairs_pay(pilot) else not paired.any()), name


def test_pairs_pay_when_mirrored_draws_are_negatively_correlated():
    assert pairs_pay([0.2, 0.8, 0.7, 0.3, 0.4, 0.6])  # each pair averages 0.5
    assert not pairs_pay([0.2, 0.21, 0.8, 0.79, 0.5, 0.52])  # each draw's mirror is as critical as the draw


def test_a_mirrored_trial_is_the_negated_draw_of_the_trial_before(tiny_model):
    model = tiny_model.model
    reset = get_reset("rerandomize", fresh=tiny_model.fresh).bind(model)
    conv1, fc = (select_targets(model, name)[0] for name in ("conv1", "fc"))
    mirrored = Mirrored(reset, [conv1])
    for name, value in mirrored.new_states(model, conv1, 5)["model.conv1"].items():
        assert torch.equal(value, -reset.new_states(model, conv1, 4)["model.conv1"][name])
    for name, value in mirrored.new_states(model, fc, 5)["model.fc"].items():  # not mirrored: its own draw
        assert torch.equal(value, reset.new_states(model, fc, 5)["model.fc"][name])


def test_only_draws_symmetric_about_zero_are_mirrored(tiny_model):
    model = tiny_model.model
    rerandomize = get_reset("rerandomize", fresh=tiny_model.fresh).bind(model)
    conv, bn = (select_targets(model, name)[0] for name in ("conv1", "bn1"))
    assert mirrors(rerandomize, model, conv)  # Kaiming-uniform weight and a uniform bias around 0
    assert not mirrors(rerandomize, model, bn)  # a BatchNorm weight of 1 (and a running variance of 1)
    assert not mirrors(get_reset("zero"), model, conv)  # not random
    assert not mirrors(get_reset("noise", scale=0.1), model, conv)  # noise around the trained weights


def test_a_layers_trials_do_not_depend_on_which_other_layers_run(tiny_model, pool):
    together = sequential(tiny_model, pool, images_per_trial=40)
    alone = sequential(tiny_model, pool, images_per_trial=40, layers="conv2")
    columns = ["trial", "image_offset", "n_images", "mirror_of", "criticality", "top1_acc"]
    a = together[together.layer == "model.conv2"][columns].reset_index(drop=True)
    b = alone[alone.layer == "model.conv2"][columns].reset_index(drop=True)
    assert a.equals(b)


def test_the_same_spec_gives_the_same_rows(tiny_model, pool):
    first, second = sequential(tiny_model, pool), sequential(tiny_model, pool)
    assert first.drop(columns="layercrit_version").equals(second.drop(columns="layercrit_version"))
    # Cochran's rule chose the block size from the pilot: every post-pilot trial has the same size
    post = first[(first.layer != "original") & (first.trial >= 6)]
    assert post.n_images.nunique() <= 1


def test_the_original_row_pools_every_block_evaluated(tiny_model, pool):
    df = sequential(tiny_model, pool, images_per_trial=40)
    original = df[df.layer == "original"].iloc[0]
    trials = int(df.trial.max()) + 1
    assert original.n_images == 6 * 32 + (trials - 6) * 40
    full = layercrit.measure(tiny_model, pool, layers="fc", trials=1, images=None)
    assert original.top1_acc == pytest.approx(full[full.layer == "original"].top1_acc.item(), abs=15)


def test_the_fixed_design_rows_say_so(tiny_model, pool):
    df = layercrit.measure(tiny_model, pool, layers="fc", trials=2, images=100)
    rows = df[df.layer != "original"]
    assert rows.image_offset.eq(0).all() and rows.ci_looks.eq(1).all() and not rows.capped.any()
    assert rows.target_ci.isna().all() and rows.mirror_of.isna().all() and rows.first_stage.isna().all()
    assert not rows.pilot.any()


@pytest.mark.parametrize("options, message", [
    ({"target_ci": 1.5}, "target_ci"),
    ({"target_ci": 0.05, "trials": 1}, "trials >= 2"),
    ({"target_ci": 0.05, "max_trials": 5}, "max_trials=5: give at least twice trials"),
    ({"target_ci": 0.05, "images_per_trial": 0}, "images_per_trial"),
    ({"target_ci": 0.05, "trials": [1, 2]}, "trials as a number"),
])
def test_bad_design_options_are_one_line_errors(tiny_model, pool, options, message):
    with pytest.raises(layercrit.LayercritError, match=message):
        layercrit.measure(tiny_model, pool, layers="fc", images=None, **options)


def test_run_writes_layers_csv_and_prints_each_layers_interval(tmp_path, capsys):
    from layercrit.cli import main

    out = tmp_path / "seq"
    code = main(["run", "--model", "zoo:fmnist/baseline", "--data", "fashion-mnist", "--images", "300",
                 "--layers", "conv1,fc", "--target-ci", "0.1", "--max-trials", "24", "--device", "cpu",
                 "--out", str(out), "--quiet"])
    assert code == 0
    layers = pd.read_csv(out / "layers.csv")
    assert list(layers.columns[2:]) == ["layer", "criticality", "criticality_ci", "criticality_low",
                                        "criticality_high", "target_ci", "trials", "images", "capped"]
    assert set(layers.layer) == {"model.conv1", "model.fc"}
    assert ((layers.criticality_ci <= 0.1 + 1e-12) | layers.capped).all()
    printed = capsys.readouterr().out
    for _, layer in layers.iterrows():
        assert f"{layer.criticality:.4f} ± {layer.criticality_ci:.4f}  ({layer.trials} resets" in printed


@pytest.mark.parametrize("argv, fragment", [
    (["--target-ci", "0"], "--target-ci=0.0: give a half-width as a fraction of 1"),
    (["--target-ci", "0.05", "--max-trials", "0"], "--max-trials"),
    (["--target-ci", "0.05", "--max-trials", "2"], "--max-trials=2: give at least twice trials (6, the pilot)"),
    (["--target-ci", "0.05", "--images-per-trial", "-4"], "--images-per-trial"),
    (["--save-logits", "--save-logits-top-k", "0"], "--save-logits-top-k"),
])
def test_bad_design_flags_are_one_line_errors(tmp_path, capsys, argv, fragment):
    from layercrit.cli import main

    code = main(["run", "--model", "zoo:fmnist/baseline", "--data", "fashion-mnist", "--images", "20",
                 "--layers", "fc", "--device", "cpu", "--out", str(tmp_path / "out"), "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err


def test_the_weights_change_layout_once_per_run_not_once_per_trial(tiny_model, pool, monkeypatch):
    conversions = []
    to = torch.nn.Module.to

    def counting(self, *args, **kwargs):
        if kwargs.get("memory_format") is not None and any(p.dim() == 4 for p in self.parameters()):
            conversions.append(kwargs["memory_format"])
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", counting)
    df = sequential(tiny_model, pool, images_per_trial=40)
    assert df.trial.max() >= 5  # many trials, each an engine call
    assert conversions.count(torch.contiguous_format) == 1, "back to the caller's layout once, at the end"
    assert all(p.is_contiguous() for p in tiny_model.model.parameters())


# ---------------------------------------------------------------- resets that are the same in every trial


def test_a_reset_the_same_in_every_trial_never_sees_an_image_twice_after_the_pilot():
    """zero / rewind / skip: a trial adds only its images; wrapping around the pool would count them again."""
    from layercrit.measurement.sequential import design_loop

    seen: dict[str, list[int]] = {}

    def evaluate(layers, trial, offset, positions, mirrored):
        rows = []
        for layer in layers:
            if trial >= design.pilot_trials:
                seen.setdefault(layer, []).extend(positions)
            value = 0.5 + 0.01 * ((sum(positions) % 7) - 3) * (3 if layer == "noisy" else 1)
            rows.append({"layer": layer, "trial": trial, "criticality": value, "criticality_sd": 0.2,
                         "n_images": len(positions)})
        return rows

    design = SequentialDesign(0.001, images_per_trial=16)  # a target no pool of 600 images can reach
    rows = pd.DataFrame(design_loop(design, ["quiet", "noisy"], 600, evaluate, repeats=True))
    for positions in seen.values():
        pilot = design.pilot_trials * design.pilot_images  # 192 images; then 25 blocks of 16 fit, 8 are left
        assert len(positions) == len(set(positions)) == (600 - pilot) // 16 * 16 and min(positions) == pilot
    assert rows.groupby("layer").capped.all().all()  # they needed more than the pool holds: their own interval
    wrapped = pd.DataFrame(design_loop(design, ["quiet"], 600, evaluate))  # a random reset may wrap: new draws
    assert wrapped.trial.max() == design.max_trials - 1


def test_skip_with_too_few_windows_for_a_first_stage_of_their_own_is_a_one_line_error(tiny_model, tiny_data):
    from layercrit.measurement.sequential import MIN_IMAGES_PER_TRIAL

    design = SequentialDesign(0.02)
    design.check_pool(6 * MIN_IMAGES_PER_TRIAL)  # enough for a random reset's pilot
    with pytest.raises(layercrit.LayercritError, match=(
            r"images=96: reset zero is the same in every trial, so each trial of the sequential design "
            r"\(target_ci=\.\.\.\) needs images of its own, 20 blocks of at least 16 after the pilot's 6; give "
            r"images=512 or more, or leave out target_ci \(trials=1: every image once\)")):
        design.check_pool(96, repeats=True, reset="zero")
    images, labels = tiny_data
    with pytest.raises(layercrit.LayercritError, match="reset zero is the same in every trial"):
        layercrit.measure(tiny_model, (images.repeat(2, 1, 1, 1), labels.repeat(2)), reset="zero", target_ci=0.05,
                          progress=False)


def test_a_reset_the_same_in_every_trial_gets_blocks_small_enough_for_a_whole_first_stage_of_new_images():
    from layercrit.measurement.sequential import design_loop

    def evaluate(layers, trial, offset, positions, mirrored):
        return [{"layer": layer, "trial": trial, "criticality": 0.5 + 0.001 * (offset % 5), "criticality_sd": 0.3,
                 "n_images": len(positions)} for layer in layers]  # blocks alike: Cochran alone would take big ones

    design = SequentialDesign(0.02)
    rows = pd.DataFrame(design_loop(design, ["block"], 512, evaluate, repeats=True))
    stage = rows[~rows.pilot]
    assert len(stage) == design.first_stage and not rows.capped.any()
    assert (stage.n_images == 16).all() and stage.image_offset.is_unique and stage.image_offset.max() + 16 <= 512

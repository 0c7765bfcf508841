"""The sequential design through measure(): blocks, stopping, determinism, and the rows it leaves."""

import pandas as pd
import pytest
import torch

import layercrit
from layercrit.measurement.estimate import layer_table
from layercrit.measurement.sequential import SequentialDesign


@pytest.fixture
def pool():
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (600, 1, 16, 16), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 10, (600,), generator=generator)


def sequential(model, data, **options):
    options = {"layers": "conv1,conv2,fc", "trials": 3, "target_ci": 0.05, "max_trials": 15, "images": None,
               "batch_size": 64, **options}
    return layercrit.measure(model, data, **options)


def test_each_trial_sees_its_own_block_the_same_for_every_layer(tiny_model, pool):
    df = sequential(tiny_model, pool, images_per_trial=40)
    rows = df[df.layer != "original"]
    pilot = SequentialDesign(0.05).pilot_size(600)  # 200: three pilot blocks cover the pool
    offsets = rows.groupby("trial").image_offset.unique()
    assert all(len(o) == 1 for o in offsets)  # every layer's trial t is on the same block
    assert [o[0] for o in offsets][:5] == [0, pilot, 2 * pilot, 3 * pilot, 3 * pilot + 40]
    assert rows[rows.trial < 3].n_images.eq(pilot).all() and rows[rows.trial >= 3].n_images.eq(40).all()


def test_layers_stop_at_the_target_or_say_they_hit_the_cap(tiny_model, pool):
    df = sequential(tiny_model, pool, images_per_trial=40)
    table = layer_table(df).set_index("layer")
    assert set(table.index) == {"model.conv1", "model.conv2", "model.fc"}
    for _, layer in table.iterrows():
        assert (layer.criticality_ci <= 0.05 and not layer.capped) or \
            (layer.capped and layer.trials == 15 and layer.criticality_ci > 0.05)
        assert layer.target_ci == 0.05  # a stopped layer reports its own interval, the target beside it
    assert (table.trials >= 10).all() | (table.trials == 15).all()
    rows = df[df.layer != "original"]
    assert rows.ci_looks.eq(len(SequentialDesign(0.05, max_trials=15).looks)).all()
    assert rows.target_ci.eq(0.05).all()


def test_a_layers_trials_do_not_depend_on_which_other_layers_run(tiny_model, pool):
    together = sequential(tiny_model, pool, images_per_trial=40)
    alone = sequential(tiny_model, pool, images_per_trial=40, layers="conv2")
    columns = ["trial", "image_offset", "n_images", "criticality", "top1_acc"]
    a = together[together.layer == "model.conv2"][columns].reset_index(drop=True)
    b = alone[alone.layer == "model.conv2"][columns].reset_index(drop=True)
    assert a.equals(b)


def test_the_same_spec_gives_the_same_rows(tiny_model, pool):
    first, second = sequential(tiny_model, pool), sequential(tiny_model, pool)
    assert first.drop(columns="layercrit_version").equals(second.drop(columns="layercrit_version"))
    # Cochran's rule chose the block size from the pilot: every post-pilot trial has the same size
    post = first[(first.layer != "original") & (first.trial >= 3)]
    assert post.n_images.nunique() <= 1


def test_the_original_row_pools_every_block_evaluated(tiny_model, pool):
    df = sequential(tiny_model, pool, images_per_trial=40)
    original = df[df.layer == "original"].iloc[0]
    trials = int(df.trial.max()) + 1
    assert original.n_images == 3 * 200 + (trials - 3) * 40
    full = layercrit.measure(tiny_model, pool, layers="fc", trials=1, images=None)
    assert original.top1_acc == pytest.approx(full[full.layer == "original"].top1_acc.item(), abs=15)


def test_the_fixed_design_rows_say_so(tiny_model, pool):
    df = layercrit.measure(tiny_model, pool, layers="fc", trials=2, images=100)
    rows = df[df.layer != "original"]
    assert rows.image_offset.eq(0).all() and rows.ci_looks.eq(1).all() and not rows.capped.any()
    assert rows.target_ci.isna().all()


@pytest.mark.parametrize("options, message", [
    ({"target_ci": 1.5}, "target_ci"),
    ({"target_ci": 0.05, "trials": 1}, "trials >= 2"),
    ({"target_ci": 0.05, "max_trials": 2}, "max_trials"),
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
                 "--layers", "conv1,fc", "--target-ci", "0.1", "--max-trials", "12", "--device", "cpu",
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
    (["--target-ci", "0.05", "--max-trials", "2"], "--max-trials=2: give at least trials (3)"),
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

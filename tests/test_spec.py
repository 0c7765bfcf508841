"""One experiment spec: every `run` option is a sweep key of the same name and back, and a sweep of a spec gives
the rows `run` gives for it."""

import argparse

import pandas as pd
import pytest
import yaml

from layercrit import cli
from layercrit.errors import LayercritError
from layercrit.spec import FIELDS, MEASURED, RESET_SHORTHANDS, Experiment, parse_bn, split_reset
from layercrit.sweeps.sweep import SweepConfig, export_frame, run_sweep

RUN_ONLY = {"out", "quiet", "func", "command", "verbose"}  # where a run writes and how it talks
MODEL_FLAGS = {"model": "spec", "model_id": "id", "arch": "arch", "pretrained": "pretrained",
               "num_classes": "num_classes", "trust_checkpoint": "trust_checkpoint",
               "dtype": "dtype"}  # run flag -> sweep model key
SWEEP_ONLY = {"models", "layers_per_unit"}


def run_options() -> set[str]:
    parser = argparse.ArgumentParser()
    cli._add_run(parser.add_subparsers())
    run = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    return {action.dest for action in run._actions if action.dest != "help"}


def test_every_run_option_is_a_sweep_key_of_the_same_name_and_back():
    options = run_options() - RUN_ONLY
    assert options - set(MODEL_FLAGS) == set(FIELDS) | set(RESET_SHORTHANDS)
    sweep_keys = {name for name in SweepConfig.__dataclass_fields__} - SWEEP_ONLY
    assert sweep_keys == set(FIELDS)
    assert set(MODEL_FLAGS.values()) <= set(cli_model_keys())


@pytest.mark.parametrize(("flags", "keys", "reset"), [
    (["--reset", "noise", "--scale", "0.1"], {"reset": "noise", "scale": 0.1}, "noise(scale=0.1)"),
    (["--reset", "interpolate", "--alpha", "0.25,0.5"], {"reset": "interpolate", "alpha": [0.25, 0.5]},
     "interpolate(alpha=0.25|0.5)"),
    (["--reset", "reinit", "--init", "c.pth"], {"reset": "reinit", "checkpoint": "c.pth"}, "reinit(checkpoint=c.pth)"),
    (["--reset", "noise(sigma=0.01)"], {"reset": "noise(sigma=0.01)"}, "noise(sigma=0.01)"),
])
def test_reset_shorthand_flags_and_keys_fold_into_the_reset_the_same_way(tmp_path, monkeypatch, flags, keys, reset):
    import torch

    monkeypatch.chdir(tmp_path)
    torch.save({"fc.weight": torch.zeros(1)}, "c.pth")
    parser = argparse.ArgumentParser()
    cli._add_run(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["run", "--model", "m", "--data", "d", "--out", "o", *flags])
    assert cli.experiment_from_args(args).reset == reset
    config = SweepConfig.from_dict({"data": "d", "models": [{"id": "m", "spec": "s"}], **keys})
    assert config.reset == (reset,) and config.experiment(reset) == cli.experiment_from_args(args)


def test_a_sweeps_shorthand_goes_to_the_resets_that_take_it_and_is_refused_when_none_does():
    config = SweepConfig.from_dict({"data": "d", "models": [{"id": "m", "spec": "s"}], "reset": ["zero", "noise"],
                                    "scale": 0.5})
    assert config.reset == ("zero", "noise(scale=0.5)")
    with pytest.raises(LayercritError, match="scale: none of the resets .zero. takes it"):
        SweepConfig.from_dict({"data": "d", "models": [{"id": "m", "spec": "s"}], "reset": "zero", "scale": 0.5})


@pytest.mark.parametrize(("text", "parsed"), [
    ("zero", ("zero", {})),
    ("noise(scale=0.1, base=zero)", ("noise", {"scale": "0.1", "base": "zero"})),
    ("interpolate(base=noise(scale=0.1,base=zero),alpha=0|1)",
     ("interpolate", {"base": "noise(scale=0.1,base=zero)", "alpha": "0|1"})),
])
def test_a_reset_is_written_name_then_its_options(text, parsed):
    assert split_reset(text) == parsed


@pytest.mark.parametrize(("text", "error"), [
    ("noise(scale=0.1", "write NAME"), ("noise(scale)", "'scale' is not OPTION=VALUE"),
    ("noise(scale=1,scale=2)", "option 'scale' given twice"), ("a b", "give a reset name"),
    ("interpolate(base=noise(scale=1),alpha=1))", "unbalanced"),
])
def test_a_badly_written_reset_is_a_one_line_error(text, error):
    with pytest.raises(LayercritError, match=error):
        split_reset(text)


def cli_model_keys():
    from layercrit.sweeps.sweep import ModelEntry

    return ModelEntry.__dataclass_fields__


def test_the_measured_fields_leave_out_only_where_and_how_the_work_runs():
    assert set(FIELDS) - set(MEASURED) == {"data_root", "cache_dir", "use_cache", "batch_size", "device",
                                            "max_cache_mb", "save_logits", "save_logits_top_k", "log_to",
                                            "log_batches", "per_class"}
    assert Experiment(seed=1).spec_id() != Experiment().spec_id()
    assert Experiment(device="cpu").spec_id() == Experiment().spec_id()


def test_run_flags_become_the_experiment():
    parser = argparse.ArgumentParser()
    cli._add_run(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["run", "--model", "m", "--data", "d", "--out", "o", "--bn", "recalibrate", "8",
                              "--target-ci", "0.03", "--reset", "reinit", "--init", "c.pth", "--exact"])
    experiment = cli.experiment_from_args(args)
    assert experiment == Experiment(data="d", bn="recalibrate 8", target_ci=0.03, reset="reinit(checkpoint=c.pth)",
                                    exact=True)
    assert parse_bn(experiment.bn) == ("recalibrate", 8)
    assert experiment.engine_layout() == (False, False)


@pytest.mark.parametrize("extra, rtol", [
    ({"target_ci": 0.2, "max_trials": 12, "images_per_trial": 32}, 1e-5),  # the sequential design
    # groups of layers, BatchNorm statistics re-estimated: a sweep worker runs torch with its own thread count, and
    # reductions in another order move fp32 results in the last bits, which re-estimated statistics amplify (1
    # thread against 2 in one process: pred_kl by 3e-4)
    ({"groups": "blocks", "bn": "recalibrate 2"}, 1e-3),
])
@pytest.mark.slow
def test_a_sweep_gives_the_rows_run_gives_for_the_same_spec(tmp_path, capsys, extra, rtol):
    spec = {"data": "fashion-mnist", "images": 300, "seed": 0, "layers": "layer1.*,fc", "trials": 3,
            "batch_size": 100, **extra}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**spec, "models": [{"id": "m", "spec": "zoo:fmnist/baseline"}]}))
    run_sweep(SweepConfig.from_dict(yaml.safe_load(config.read_text())), tmp_path / "store.sqlite", progress=False)
    swept = export_frame(tmp_path / "store.sqlite")
    flags = [f"--{k.replace('_', '-')}" for k in spec]
    argv = ["run", "--model", "zoo:fmnist/baseline", "--model-id", "m", "--out", str(tmp_path / "run"), "--quiet",
            "--device", "cpu"]
    for flag, value in zip(flags, spec.values(), strict=True):
        argv += [flag, *str(value).split()]
    assert cli.main(argv) == 0
    ran = pd.read_parquet(tmp_path / "run" / "results.parquet")
    keys = ["layer", "trial"]
    columns = ["layer", "trial", "n_images", "image_offset", "criticality", "top1_acc", "pred_kl", "capped"]
    ran = ran.sort_values(keys, kind="stable").reset_index(drop=True)[columns]
    swept = swept.sort_values(keys, kind="stable").reset_index(drop=True)[columns]
    pd.testing.assert_frame_equal(ran, swept, check_dtype=False, rtol=rtol)
    assert len(ran) > 1


def test_data_seed_keeps_the_images_while_the_resets_follow_seed(tiny_model, tiny_data):
    from layercrit import measure

    generator_images = {seed: measure(tiny_model, "fashion-mnist", layers="fc", trials=1, images=20, seed=seed,
                                      data_seed=5) for seed in (0, 1)}
    first, second = generator_images[0], generator_images[1]
    assert first.data_id.iloc[0] == second.data_id.iloc[0]  # the same images
    assert first[first.layer == "original"].top1_acc.item() == second[second.layer == "original"].top1_acc.item()
    assert not first[first.layer != "original"].criticality.equals(second[second.layer != "original"].criticality)
    plain = measure(tiny_model, "fashion-mnist", layers="fc", trials=1, images=20, seed=5)
    assert plain.data_id.iloc[0] == first.data_id.iloc[0]


def test_measure_takes_the_spec_itself_and_gives_what_its_keywords_give(tiny_model, tiny_data):
    from layercrit import measure

    spec = Experiment(layers="conv1,fc", trials=2, images=None, reset="zero", batch_size=16)
    by_spec = measure(tiny_model, tiny_data, spec)
    by_keywords = measure(tiny_model, tiny_data, layers="conv1,fc", trials=2, images=None, reset="zero",
                          batch_size=16)
    assert by_spec.drop(columns="layercrit_version").equals(by_keywords.drop(columns="layercrit_version"))
    on_its_data = measure(tiny_model, spec=Experiment(data="fashion-mnist", images=20, layers="fc", trials=1))
    assert on_its_data.data_id.iloc[0] == "fashion-mnist-test-n20-s0"

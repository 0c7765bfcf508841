"""Hostile and odd inputs from issue #19: a reset text nested hundreds deep, seeds beyond 64 bits, options that do
nothing in the combination given, configs with duplicate keys, stores that are not what they seem, pickles that
call the shell, and diffs of results that share nothing. Each is one line on stderr (exit status 2), or an honest
answer; nothing is computed that was not asked for."""

import pytest
import torch
import yaml

import layercrit
from layercrit.errors import LayercritError

from .conftest import assert_one_line_error, run_cli
from .test_reliability_sweep import read_only_mounts
from .test_store import rows_of  # noqa: F401 - a fixture
from .test_sweep import write_config

RESNET8 = ("--model", "layercrit:fmnist_resnet8", "--no-pretrained", "--data", "fashion-mnist", "--images", 20,
           "--trials", 1, "--layers", "model.fc", "--quiet")
DEEP_RESET = "zero"
for _ in range(600):
    DEEP_RESET = f"noise(scale=0.1,base={DEEP_RESET})"
TOO_BIG_SEED = 99999999999999999999


# ---------------------------------------------------------------- a reset nested hundreds deep


def test_a_reset_nested_hundreds_deep_is_a_one_line_error_for_run(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", *RESNET8, "--reset", DEEP_RESET, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "--reset='noise(scale=0.1,base=", "parentheses nested 600 deep",
                          "at most 16 deep")
    assert len(err) < 300


def test_a_reset_nested_hundreds_deep_is_a_one_line_error_for_a_sweep(tmp_path, capsys):
    config = write_config(tmp_path / "sweep.yaml", reset=DEEP_RESET)
    code, _, err = run_cli(capsys, "sweep", config, "--store", tmp_path / "s.sqlite")
    assert_one_line_error(code, err, str(config), "parentheses nested 600 deep")
    assert not (tmp_path / "s.sqlite").exists()


def test_measure_refuses_a_reset_nested_hundreds_deep_naming_the_parameter(tiny_model, tiny_data):
    with pytest.raises(LayercritError, match=r"^reset='noise\(scale=0.1,.*nested 600 deep"):
        layercrit.measure(tiny_model, tiny_data, reset=DEEP_RESET, trials=1)


def test_a_reset_nested_as_deep_as_allowed_still_works(tiny_model, tiny_data):
    reset = "zero"
    for _ in range(15):
        reset = f"noise(scale=0.0,base={reset})"
    nested = layercrit.measure(tiny_model, tiny_data, layers="fc", reset=reset, trials=1)
    zero = layercrit.measure(tiny_model, tiny_data, layers="fc", reset="zero", trials=1)
    assert nested.top1_acc.tolist() == zero.top1_acc.tolist(), "noise of scale 0 on zero is zero"


# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize("flag", ["--seed", "--data-seed"])
def test_a_seed_beyond_64_bits_is_a_one_line_error_before_any_work(tmp_path, capsys, flag):
    code, _, err = run_cli(capsys, "run", *RESNET8, flag, TOO_BIG_SEED, "--out", tmp_path / "out")
    assert_one_line_error(code, err, f"argument {flag}: give a whole number from -2**63 to 2**63-1",
                          str(TOO_BIG_SEED))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["zoo", "train"], ["module-criticality", "--model", "m.pth", "--init", "i.pth",
                                                          "--data", "fashion-mnist", "--out", "o"]],
                         ids=["zoo train", "module-criticality"])
def test_every_command_with_a_seed_refuses_one_beyond_64_bits(tmp_path, capsys, command):
    code, _, err = run_cli(capsys, *command, "--seed", str(-2**63 - 1))
    assert_one_line_error(code, err, "argument --seed: give a whole number from -2**63 to 2**63-1")


def test_a_sweep_config_with_a_seed_beyond_64_bits_is_refused(tmp_path, capsys):
    config = write_config(tmp_path / "sweep.yaml", seed=TOO_BIG_SEED)
    code, _, err = run_cli(capsys, "sweep", config, "--store", tmp_path / "s.sqlite", "--dry-run")
    assert_one_line_error(code, err, f"{config}: --seed={TOO_BIG_SEED}: give a seed from -2**63 to 2**63-1")


def test_measure_refuses_a_seed_beyond_64_bits_and_takes_the_largest_one(tiny_model, tiny_data):
    with pytest.raises(LayercritError, match=rf"^data_seed={TOO_BIG_SEED}: give a seed from -2\*\*63 to 2\*\*63-1"):
        layercrit.measure(tiny_model, tiny_data, data_seed=TOO_BIG_SEED, trials=1)
    rows = layercrit.measure(tiny_model, tiny_data, layers="fc", seed=2**63 - 1, trials=1)
    assert rows.seed.iloc[0] == 2**63 - 1


# ---------------------------------------------------------------- a pickle that calls the shell


def test_a_checkpoint_whose_pickle_calls_the_shell_gets_the_trust_checkpoint_hint(tmp_path, capsys):
    import posix

    import torch

    class Shell:
        def __reduce__(self):
            return posix.system, (f"touch {tmp_path / 'pwned'}",)

    torch.save({"state_dict": {}, "payload": Shell()}, tmp_path / "shell.pth")
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "shell.pth", "--arch", "layercrit:fmnist_resnet8",
                           "--data", "fashion-mnist", "--images", 20, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "holds pickled Python objects besides its weights (posix.system)",
                          "pass --trust-checkpoint if you trust its source")
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- options that do nothing in the combination given


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-trials", 5], "--max-trials=5 does nothing without --target-ci=...: give both, or leave it out"),
    (["--images-per-trial", 32], "--images-per-trial=32 does nothing without --target-ci=..."),
    (["--save-logits-top-k", 3], "--save-logits-top-k=3 does nothing without --save-logits=..."),
    (["--reset", "noise(scale=0.1)", "--scale", 0.2],
     "--reset='noise(scale=0.1)' sets scale itself and the scale shorthand (0.2) sets it again: give it once"),
    (["--reset", "noise(bogus=1)"], "reset 'noise' takes no option 'bogus' (its options: scale, sigma, base)"),
    (["--reset", "noise(scale=0.1,base=zero,bogus=1)"], "reset 'zero' takes no option 'bogus'"),
    (["--reset", "interpolate(alpha=0.5,bogus=1)"], "reset 'rerandomize' takes no option 'bogus'"),
    (["--target-ci", 0.1, "--images", 5, "--trials", 3], "--images=5: the sequential design (--target-ci=...) needs at least 96 "
                                          "images, a pilot block of 16 for each of its 6 pilot trials"),
], ids=["max-trials alone", "images-per-trial alone", "top-k alone", "scale twice", "unknown noise option",
        "unknown option of the base", "unknown option of interpolate's default base", "too few images"])
def test_options_that_would_be_silently_ignored_are_one_line_errors(tmp_path, capsys, flags, message):
    code, _, err = run_cli(capsys, "run", *RESNET8, *flags, "--out", tmp_path / "out")
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_sequential_design_runs_on_as_few_images_as_its_pilot_needs(tiny_model):
    generator = torch.Generator().manual_seed(1)  # 96 images: 3 pilot draws and their mirrors, 16 images each
    data = (torch.randint(0, 256, (96, 1, 16, 16), dtype=torch.uint8, generator=generator),
            torch.randint(0, 10, (96,), generator=generator))
    rows = layercrit.measure(tiny_model, data, layers="fc", trials=3, target_ci=0.5, max_trials=6)
    assert rows.n_images.iloc[1:].min() >= 16


@pytest.mark.parametrize(("keys", "message"), [
    ({"max_trials": 5}, "--max-trials=5 does nothing without --target-ci=..."),  # the CLI's spelling of keys
    ({"save_logits_top_k": 3}, "--save-logits-top-k=3 does nothing without --save-logits=..."),
    ({"reset": ["zero", "noise(scale=0.1)"], "scale": 0.2},
     "--reset='noise(scale=0.1)' sets scale itself and the scale shorthand (0.2) sets it again"),
    ({"target_ci": 0.1, "images": 20, "trials": 2}, "--images=20: the sequential design (--target-ci=...) needs "
                                                    "at least 64 images"),
], ids=["max_trials alone", "top-k alone", "scale twice", "too few images"])
def test_a_sweep_config_refuses_options_that_would_be_silently_ignored(tmp_path, capsys, keys, message):
    config = write_config(tmp_path / "sweep.yaml", **keys)
    code, _, err = run_cli(capsys, "sweep", config, "--store", tmp_path / "s.sqlite", "--dry-run")
    assert_one_line_error(code, err, f"{config}: ", message)


def test_measure_refuses_options_that_would_be_silently_ignored(tiny_model, tiny_data, tmp_path):
    with pytest.raises(LayercritError, match=r"^images_per_trial=32 does nothing without target_ci="):
        layercrit.measure(tiny_model, tiny_data, images_per_trial=32)
    with pytest.raises(LayercritError, match=r"^save_logits_top_k=3 does nothing without save_logits="):
        layercrit.measure(tiny_model, tiny_data, save_logits_top_k=3)
    with pytest.raises(LayercritError, match=r"^images=20: the sequential design"):
        layercrit.measure(tiny_model, (tiny_data[0][:20], tiny_data[1][:20]), target_ci=0.1)


def test_run_json_records_the_max_trials_the_run_used(tmp_path, capsys):
    import json

    code, _, err = run_cli(capsys, "run", *RESNET8, "--out", tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "run.json").read_text())["max_trials"] == 100


# ---------------------------------------------------------------- sweep configs and stores


def test_a_sweep_config_with_a_key_given_twice_is_refused_naming_the_key_and_line(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    text = yaml.safe_dump({"data": "fashion-mnist", "images": 64, "models": [{"id": "a", "spec": "layercrit:x"}]})
    config.write_text(text + "images: 128\n")
    code, _, err = run_cli(capsys, "sweep", config, "--store", tmp_path / "s.sqlite", "--dry-run")
    line = text.count("\n") + 1
    assert_one_line_error(code, err, f"cannot parse {config}: key 'images' is given twice at line {line}")


def test_a_model_given_a_key_twice_is_refused(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text("data: fashion-mnist\nmodels:\n  - {id: a, spec: 'layercrit:fmnist_resnet8', id: b}\n")
    code, _, err = run_cli(capsys, "sweep", config, "--store", tmp_path / "s.sqlite", "--dry-run")
    assert_one_line_error(code, err, "key 'id' is given twice at line 3")


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    from layercrit.sweeps.sweep import load_config

    config = tmp_path / "sweep.yaml"
    config.write_text("data: fashion-mnist\nbase: &m {spec: 'layercrit:fmnist_resnet8', pretrained: false}\n"
                      "models:\n  - {<<: *m, id: a, pretrained: true}\n".replace("base: &m", "x_: &m"))
    with pytest.raises(LayercritError, match="unknown key"):  # the anchor's holder is not a sweep key...
        load_config(config)
    config.write_text("data: fashion-mnist\nmodels:\n  - &m {id: a, spec: 'layercrit:fmnist_resnet8', "
                      "pretrained: false}\n  - {<<: *m, id: b}\n")
    assert [m.id for m in load_config(config).models] == ["a", "b"]  # ...but a merge that overrides is fine


@pytest.mark.parametrize("model_id", ["", "  "])
def test_a_model_with_an_empty_id_is_refused(tmp_path, capsys, model_id):
    config = write_config(tmp_path / "sweep.yaml", models=[{"id": model_id, "spec": "layercrit:fmnist_resnet8"}])
    code, _, err = run_cli(capsys, "sweep", config, "--store", tmp_path / "s.sqlite", "--dry-run")
    assert_one_line_error(code, err, f"{config}: model #1 has an empty id: give it a name")


def test_a_sweep_refuses_an_empty_file_as_its_store_and_leaves_it_as_it_is(tmp_path, capsys):
    store = tmp_path / "s.sqlite"
    store.touch()
    code, _, err = run_cli(capsys, "sweep", write_config(tmp_path / "sweep.yaml"), "--store", store, "--quiet")
    assert_one_line_error(code, err, f"{store} is not a layercrit sweep store (an empty database)")
    assert store.read_bytes() == b"" and sorted(p.name for p in tmp_path.iterdir()) == ["s.sqlite", "sweep.yaml"]


def test_a_new_store_appears_whole_with_its_tables(tmp_path):
    from layercrit.sweeps.store import Store

    with Store(tmp_path / "new.sqlite", create=True):
        pass
    with Store(tmp_path / "new.sqlite", readonly=True) as db:  # an empty database would be refused here
        assert db.units() == []
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(not read_only_mounts(), reason="needs unshare and mounts in a user namespace")
@pytest.mark.parametrize("finished", [pytest.param(True, id="complete store", marks=pytest.mark.slow),
                                      pytest.param(False, id="store with work left", marks=pytest.mark.slow)])
def test_a_sweep_on_a_store_on_read_only_media_says_it_is_read_only(tmp_path, rows_of, finished):  # noqa: F811
    import subprocess
    import sys

    from .test_store import planned_store

    db, units = planned_store(tmp_path / "store" / "s.sqlite")
    for unit in units if finished else units[:1]:
        db.record_done(unit, rows_of(unit), seconds=0.1, worker="w", batch_size=16)
    db.close()
    config = write_config(tmp_path / "sweep.yaml")
    sweep = (f"from layercrit.cli import main; import sys; "
             f"sys.exit(main(['sweep', {str(config)!r}, '--store', {str(db.path)!r}, '--quiet']))")
    folder = db.path.parent
    mount = f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} {folder}"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f'{mount} && exec "$0" -c "$1"', sys.executable, sweep],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert_one_line_error(done.returncode, done.stderr, f"cannot write the sweep store {db.path}: it is read-only",
                          "copy it somewhere writable to go on")
    assert "not a layercrit sweep store" not in done.stderr


# ---------------------------------------------------------------- diff of results that share nothing


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders: ResNet-8 on its fc and on one conv, and a ResNet-20 on its fc."""
    from layercrit.cli import main

    folder = tmp_path_factory.mktemp("runs")
    for name, extra in {"fc": [], "conv": ["--layers", "model.conv1"],
                        "resnet20": ["--model", "layercrit:fmnist_resnet20"]}.items():
        assert main([str(a) for a in ("run", *RESNET8, *extra, "--out", folder / name)]) == 0
    return folder


def test_diff_of_two_different_models_is_a_one_line_error(runs, tmp_path, capsys):
    code, _, err = run_cli(capsys, "diff", runs / "fc", runs / "resnet20", "--out", tmp_path / "d.csv")
    assert_one_line_error(code, err, "A is model 'layercrit:fmnist_resnet8', B 'layercrit:fmnist_resnet20'",
                          "compare models with layercrit analyze")
    assert not (tmp_path / "d.csv").exists()


def test_diff_of_runs_without_a_layer_in_common_is_a_one_line_error(runs, tmp_path, capsys):
    code, _, err = run_cli(capsys, "diff", runs / "fc", runs / "conv", "--out", tmp_path / "d.csv")
    assert_one_line_error(code, err, "A and B have no layer in common (A: model.fc; B: model.conv1)")
    assert not (tmp_path / "d.csv").exists()



@pytest.mark.parametrize(("name", "text"), [
    ("meta.yaml", "models:\n  - {model_id: a, accuracy: 70}\n  - model_id: b\n    accuracy: 60\n    accuracy: 65\n"),
    ("meta.json", '{"models": [{"model_id": "a", "accuracy": 70, "accuracy": 75}]}'),
])
def test_a_metadata_file_with_a_key_given_twice_is_refused_naming_the_key(tmp_path, name, text):
    from layercrit.analysis.inputs import load_meta

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(LayercritError, match=rf"cannot read metadata {path}: key 'accuracy' is given twice"):
        load_meta(path)


@pytest.mark.parametrize(("name", "text"), [
    ("groups.yaml", "early: [conv1]\nlate: [fc]\nearly: [conv2]\n"),
    ("groups.json", '{"early": ["conv1"], "early": ["conv2"]}'),
])
def test_a_group_file_with_a_group_given_twice_is_refused_naming_it(tmp_path, tiny_model, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(LayercritError, match=rf"cannot read group file {path}: key 'early' is given twice"):
        layercrit.select_targets(tiny_model.model, layers="conv,linear", groups=str(path))

"""Hostile and odd inputs from issue #19: a reset text nested hundreds deep, seeds beyond 64 bits, options that do
nothing in the combination given, configs with duplicate keys, stores that are not what they seem, pickles that
call the shell, and diffs of results that share nothing. Each is one line on stderr (exit status 2), or an honest
answer; nothing is computed that was not asked for."""

import pytest
import yaml

import layercrit
from layercrit.errors import LayercritError

from .conftest import assert_one_line_error, run_cli
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

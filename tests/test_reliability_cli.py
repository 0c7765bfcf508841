"""`layercrit run` and `measure()` under user mistakes and broken environments (issue #11): reproducible random
inits, broken models, missing devices, unwritable output folders, bad counts, channel mismatches, empty results,
closed pipes. Each mistake is one line on stderr and exit status 2; nothing finished is lost."""

import errno
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import layercrit
from layercrit.errors import LayercritError
from layercrit.resolve import resolve_model

from .conftest import assert_one_line_error, run_cli, without_warnings

FMNIST = ("--data", "fashion-mnist", "--images", 20, "--trials", 1, "--quiet")
RESNET8 = ("--model", "layercrit:fmnist_resnet8", "--no-pretrained", "--layers", "model.fc,model.layer3.*", *FMNIST)


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def finished_run(tmp_path, capsys):
    """A folder holding a complete run's results.csv, .parquet, .json, layers.csv and run.json, and their bytes."""
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", *RESNET8, "--out", out)
    assert code == 0, err
    assert sorted(outputs(out)) == ["layers.csv", "results.csv", "results.json", "results.parquet", "run.json"]
    return out, outputs(out)


# ---------------------------------------------------------------- 1. reproducible random inits


def test_two_runs_of_a_random_init_give_identical_results(tmp_path, capsys):
    for name in ("first", "second"):
        torch.rand(7)  # whatever else used the global RNG in between must not matter
        code, _, err = run_cli(capsys, "run", *RESNET8, "--out", tmp_path / name)
        assert code == 0, err
    first = (tmp_path / "first" / "results.csv").read_bytes()
    assert first == (tmp_path / "second" / "results.csv").read_bytes()
    assert pd.read_csv(tmp_path / "first" / "results.csv").criticality.iloc[1:].max() > 0


def test_a_random_init_is_built_as_a_sweep_builds_it_seeded_by_seed_and_model_id():
    from layercrit.sweeps.sweep import ModelEntry, resolve_entry

    entry = ModelEntry(id="mine", spec="layercrit:fmnist_resnet8", pretrained=False)
    state = resolve_model(entry.spec, pretrained=False, seed=3, model_id="mine").model.state_dict()
    swept = resolve_entry(entry, seed=3).model.state_dict()
    assert all(torch.equal(state[k], swept[k]) for k in state)
    other = resolve_model(entry.spec, pretrained=False, seed=3, model_id="other").model.state_dict()
    assert not torch.equal(state["model.conv1.weight"], other["model.conv1.weight"])


def test_building_a_seeded_model_leaves_the_callers_random_state_alone():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    resolve_model("layercrit:fmnist_resnet8", pretrained=False, seed=0)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- 2. a model with non-finite outputs


def nan_checkpoint(path: Path) -> Path:
    state = resolve_model("layercrit:fmnist_resnet8", pretrained=False, seed=0).model.model.state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, path)
    return path


def test_a_model_with_non_finite_outputs_is_refused_before_measuring(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "--model", nan_checkpoint(tmp_path / "nan.pt"),
                           "--arch", "layercrit:fmnist_resnet8", *FMNIST, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "the unmodified model gives non-finite outputs for 20 of 20 images")
    assert list((tmp_path / "out").iterdir()) == []


def test_measure_refuses_a_model_with_non_finite_outputs(tiny_model, tiny_data):
    with torch.no_grad():
        tiny_model.model.model.conv2.bias[0] = float("inf")
    with pytest.raises(LayercritError, match="non-finite outputs for 48 of 48 images"):
        layercrit.measure(tiny_model, tiny_data, layers="fc", trials=1)


# ---------------------------------------------------------------- 3. devices this machine lacks


MISSING_DEVICES = ["tpu7", "cuda:7", *([] if torch.cuda.is_available() else ["cuda"])]


@pytest.mark.parametrize("device", [d for d in MISSING_DEVICES if d != "cuda:7" or torch.cuda.device_count() < 8])
def test_a_device_this_machine_lacks_is_a_one_line_error_listing_those_it_has(tmp_path, capsys, device):
    code, _, err = run_cli(capsys, "run", *RESNET8, "--device", device, "--out", tmp_path / "out")
    assert_one_line_error(code, err, f"--device {device!r} is not available on this machine: use one of cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [
    ["demo"], ["zoo", "train"],
    ["module-criticality", "--model", "zoo:fmnist/baseline", "--init", "init.pth", "--data", "fashion-mnist"],
])
def test_every_command_that_computes_refuses_a_missing_device_before_any_work(tmp_path, capsys, command):
    code, _, err = run_cli(capsys, *command, "--device", "tpu7", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "--device 'tpu7' is not available on this machine: use one of cpu")
    assert not (tmp_path / "out").exists()


def test_measure_names_its_device_parameter_when_the_device_is_missing(tiny_model, tiny_data):
    with pytest.raises(LayercritError, match="^device 'tpu7' is not available on this machine: use one of cpu"):
        layercrit.measure(tiny_model, tiny_data, device="tpu7")


# ---------------------------------------------------------------- 4, 5. output folders, full disks, run.json


def test_an_out_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    code, _, err = run_cli(capsys, "run", *RESNET8, "--out", tmp_path / "taken")
    assert_one_line_error(code, err, "output folder", "is an existing file")
    assert (tmp_path / "taken").read_text() == "mine"


def read_only_below(monkeypatch, folder: Path) -> None:
    """Files can no longer be created in ``folder`` (tests run as root, so chmod would not stop them)."""
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).is_relative_to(folder):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_an_out_on_a_read_only_filesystem_is_refused_before_any_work(finished_run, capsys, monkeypatch):
    out, before = finished_run
    read_only_below(monkeypatch, out)
    code, _, err = run_cli(capsys, "run", *RESNET8, "--out", out)
    assert_one_line_error(code, err, f"cannot write {out}: Read-only file system; choose a folder you can write to")
    assert outputs(out) == before


def test_a_full_disk_is_a_one_line_error_and_leaves_the_previous_results_whole(finished_run, capsys, monkeypatch):
    out, before = finished_run

    def full_disk(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    code, _, err = run_cli(capsys, "run", *RESNET8, "--seed", 1, "--out", out)
    assert_one_line_error(code, without_warnings(err),  # the random model measured first: at chance, warned
                          f"cannot write {out / 'results.csv'}: No space left on device; free some space")
    assert outputs(out) == before  # the earlier run's files, and no temporary files left beside them


def test_a_run_that_fails_leaves_the_run_json_of_the_results_beside_it(finished_run, capsys):
    out, before = finished_run
    code, _, err = run_cli(capsys, "run", *RESNET8, "--layers", "nope.*", "--seed", 5, "--out", out)
    assert_one_line_error(code, err, "'nope.*' matches no module")
    assert outputs(out) == before


def test_run_json_describes_the_results_next_to_it(finished_run, capsys):
    out, _ = finished_run
    code, _, err = run_cli(capsys, "run", *RESNET8, "--seed", 4, "--out", out)
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["seed"] == 4
    assert set(pd.read_csv(out / "results.csv").seed) == {4}


# ---------------------------------------------------------------- 6. counts


@pytest.mark.parametrize(("flag", "value"), [
    ("--images", -5), ("--images", 0), ("--trials", 0), ("--batch-size", 0), ("--max-cache-mb", -1),
    ("--images", "many"),
])
def test_counts_that_mean_nothing_are_one_line_errors(tmp_path, capsys, flag, value):
    code, _, err = run_cli(capsys, "run", *RESNET8, flag, value, "--out", tmp_path / "out")
    named = f"argument {flag}/--windows:" if flag == "--images" else f"argument {flag}:"  # --windows: its text alias
    assert_one_line_error(code, err, named, repr(str(value)), "(see layercrit run --help)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("option", "message"), [
    ({"images": -5}, "images=-5: give a number of images of at least 1"),
    ({"images": 0}, "images=0: give a number of images of at least 1"),
    ({"trials": 0}, "trials=0: give at least 1"),
    ({"batch_size": 0}, "batch_size=0: give at least 1 image per forward"),
    ({"max_cache_mb": -1}, "max_cache_mb=-1: give a memory budget of 0 MB or more"),
])
def test_measure_refuses_counts_naming_the_parameter(tiny_model, option, message):
    with pytest.raises(LayercritError, match=message.replace("(", r"\(")):
        layercrit.measure(tiny_model, "fashion-mnist", **option)


def test_a_missing_argument_is_a_one_line_error(capsys):
    code, _, err = run_cli(capsys, "run", "--model", "zoo:fmnist/baseline", "--data", "fashion-mnist")
    assert_one_line_error(code, err, "the following arguments are required: --out")


# ---------------------------------------------------------------- 7. channels


def test_a_one_channel_model_on_rgb_images_is_a_one_line_error(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ["a/0.png", "a/1.png", "b/0.png"]:
        (tmp_path / "rgb" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(tmp_path / "rgb" / name)
    code, _, err = run_cli(capsys, "run", "--model", "zoo:fmnist/baseline", "--data", tmp_path / "rgb", "--no-cache",
                           "--layers", "model.fc", "--trials", 1, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "the model takes 1-channel input but the data has 3-channel images")


# ---------------------------------------------------------------- 8. empty results


@pytest.mark.parametrize("content", ["", "model_id,layer,trial,reset,criticality\n"])
def test_analyze_of_an_empty_csv_is_a_one_line_error(tmp_path, capsys, content):
    (tmp_path / "results.csv").write_text(content)
    code, _, err = run_cli(capsys, "analyze", tmp_path / "results.csv", "--out", tmp_path / "analysis")
    assert_one_line_error(code, err, f"{tmp_path / 'results.csv'} holds no results rows")


# ---------------------------------------------------------------- 9. a reader that goes away


@pytest.mark.slow  # a subprocess: CI runs it
def test_output_into_a_closed_pipe_ends_quietly_as_sigpipe_would():
    process = subprocess.Popen([sys.executable, "-m", "layercrit.cli", "zoo", "list"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # as `| head -1` does, before the listing is written
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert err == ""

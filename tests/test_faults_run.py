"""`layercrit run` under hostile inputs and faults (issue #11): checkpoints whose pickles run code are never
unpickled without --trust-checkpoint; a run killed with SIGKILL, or whose disk fills up, leaves results that parse
and equal the uninterrupted run's rows."""

import errno
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from layercrit.cli import main
from layercrit.resolve import resolve_model

from .conftest import assert_one_line_error, run_cli

# The Fashion-MNIST ResNet-20 (22 conv/linear layers); no memory for recorded activations, so every layer is a
# chunk of its own and results.csv is rewritten 22 times.
RUN = ["run", "--model", "zoo:fmnist/baseline", "--data", "fashion-mnist", "--images", "100", "--trials", "2",
       "--batch-size", "50", "--max-cache-mb", "0", "--quiet"]
N_ROWS = 1 + 22 * 2


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[str]:
    """The lines of an uninterrupted run's results.csv."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main([*RUN, "--out", str(out)]) == 0
    lines = (out / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + N_ROWS
    return lines


def assert_leading_rows_of(expected: list[str], out: Path) -> int:
    """The results in ``out`` parse in full and are, line for line, the first rows of ``expected``; returns how
    many rows there are. (Parquet and CSV are each replaced whole; a kill between the two renames may leave them
    one chunk apart, each of them the leading rows of the uninterrupted run.)"""
    table = pd.read_csv(out / "results.csv")
    lines = (out / "results.csv").read_text().splitlines()
    assert lines == expected[:len(lines)] and len(table) == len(lines) - 1
    parquet = pd.read_parquet(out / "results.parquet")
    leading = pd.read_csv(io.StringIO("\n".join(expected))).iloc[:len(parquet)]
    assert parquet[["layer", "trial", "criticality"]].equals(leading[["layer", "trial", "criticality"]])
    assert abs(len(parquet) - len(table)) <= 2  # at most one chunk (a layer's two trials) apart
    assert json.loads((out / "run.json").read_text())["complete"] is False  # a reader can tell it was interrupted
    return len(table)


# ---------------------------------------------------------------- hostile pickles


class WritesAMarker:
    """Unpickling this creates a file: what a hostile checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def checkpoints(tmp_path):
    """(a plain checkpoint, a hostile one holding the same weights, the marker it would write)."""
    state = resolve_model("layercrit:fmnist_resnet8", pretrained=False, seed=0).model.model.state_dict()
    marker = tmp_path / "pwned"
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"state_dict": state, "extra": WritesAMarker(marker)}, tmp_path / "hostile.pth")
    return tmp_path / "plain.pth", tmp_path / "hostile.pth", marker


def test_the_hostile_checkpoint_does_run_code_when_trusted(checkpoints):
    _, hostile, marker = checkpoints
    torch.load(hostile, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("where", ["--model", "--reset reinit --init", "module-criticality --init"])
def test_a_checkpoint_that_would_run_code_is_refused_without_trust(tmp_path, capsys, checkpoints, where):
    plain, hostile, marker = checkpoints
    data = ["--data", "fashion-mnist", "--images", 20, "--out", tmp_path / "out"]
    arch = ["--arch", "layercrit:fmnist_resnet8"]
    argv = {
        "--model": ["run", "--model", hostile, *arch, *data],
        "--reset reinit --init": ["run", "--model", plain, *arch, "--reset", "reinit", "--init", hostile, *data],
        "module-criticality --init": ["module-criticality", "--model", plain, *arch, "--init", hostile, *data],
    }[where]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, f"checkpoint {hostile} holds pickled Python objects",
                          "pass --trust-checkpoint if you trust its source")
    assert not marker.exists()
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------- SIGKILL


def _wait_for_rows(process: subprocess.Popen, results: Path, rows: int) -> None:
    """Wait until ``results`` holds ``rows`` rows (it is replaced whole after every chunk, so it can be read)."""
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if results.read_bytes().count(b"\n") - 1 >= rows:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.002)


@pytest.mark.slow
@pytest.mark.parametrize("chunks", [0, 1, 10])
def test_a_run_killed_with_sigkill_leaves_whole_results_equal_to_the_uninterrupted_run(tmp_path, uninterrupted,
                                                                                      chunks):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-u", "-m", "layercrit.cli", *RUN, "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert process.stdout.readline().startswith(b"model:")  # the model is built; measuring starts
        if chunks:
            _wait_for_rows(process, out / "results.csv", 1 + 2 * chunks)
        assert process.poll() is None, "the run must still be going when it is killed"
        process.kill()
    finally:
        process.kill()
        assert process.wait() == -signal.SIGKILL
    if (out / "results.csv").exists() or chunks:
        assert 1 + 2 * chunks <= assert_leading_rows_of(uninterrupted, out) < N_ROWS
    else:
        assert not (out / "run.json").exists()  # it comes with the first results


# ---------------------------------------------------------------- a disk that fills up


@pytest.mark.slow  # end to end (two whole analyses / a sweep / a filled disk): CI runs it
def test_a_disk_that_fills_mid_run_keeps_the_finished_chunks(tmp_path, capsys, monkeypatch, uninterrupted):
    out = tmp_path / "out"
    to_csv = pd.DataFrame.to_csv
    writes = []

    def fills_after_the_first_chunk(self, path, *args, **kwargs):
        writes.append(path)
        if len(writes) > 2:  # each chunk writes results.csv and layers.csv
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return to_csv(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", fills_after_the_first_chunk)
    code, _, err = run_cli(capsys, *RUN, "--out", out)
    assert_one_line_error(code, err, f"cannot write {out / 'results.csv'}: No space left on device; free some space")
    assert len(writes) == 3
    monkeypatch.undo()
    assert assert_leading_rows_of(uninterrupted, out) == 1 + 2  # the original row and the first layer's trials
    assert sorted(p.name for p in out.iterdir()) == ["layers.csv", "results.csv", "results.json", "results.parquet", "run.json"]

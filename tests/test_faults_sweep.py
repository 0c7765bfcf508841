"""Faults during a sweep (issue #11): ``kill -9`` while planning and between units, a disk that fills up mid-sweep, and hostile
pickles named in the config. A sweep that is killed or runs out of space loses no finished unit, and the rerun
ends with the table an uninterrupted sweep gives; a checkpoint is only unpickled when the config says
``trust_checkpoint: true``."""

import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from layercrit.cli import main
from layercrit.sweeps.store import export_frame

from .conftest import without_warnings
from .test_sweep import N_UNITS, write_config

COMMAND = [sys.executable, "-m", "layercrit.cli", "sweep", "sweep.yaml", "--store", "sweep.sqlite", "--quiet"]


@pytest.fixture(scope="module")
def expected(reference) -> pd.DataFrame:
    """The table of an uninterrupted sweep of test_sweep's CONFIG (2 models x 2 trials x 4 chunks), one worker."""
    return reference[2]


def count_units(store: Path, where: str = "") -> int:
    """Units in the store (``where``: a condition on them), read-only; 0 before the store exists."""
    try:
        with sqlite3.connect(f"{store.absolute().as_uri()}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute(f"SELECT COUNT(*) FROM units {where}").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def units_done(store: Path) -> int:
    return count_units(store, "WHERE status = 'done'")


def max_attempts(store: Path) -> int:
    with sqlite3.connect(f"{store.absolute().as_uri()}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT MAX(attempts) FROM units").fetchone()[0]


def live_processes_in_group(group: int) -> list[int]:
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == group and fields[0] != "Z":
                alive.append(int(entry.name))
    return alive


def units_planned(store: Path) -> int:
    return count_units(store)


def kill_sweep(folder: Path, happened) -> None:
    """Start the sweep in ``folder`` and SIGKILL it as soon as ``happened(store)`` is true (an event the store
    shows, not a duration, so the moment is the same on any machine); its workers must then exit by themselves."""
    sweep = subprocess.Popen(COMMAND, cwd=folder, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300  # a hang, not a slow machine
        while time.monotonic() < deadline and sweep.poll() is None and not happened(folder / "sweep.sqlite"):
            time.sleep(0.02)
        os.kill(sweep.pid, signal.SIGKILL)
        assert sweep.wait() == -signal.SIGKILL, "the sweep must be killed before it finishes"
        deadline = time.monotonic() + 15
        while live_processes_in_group(sweep.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not live_processes_in_group(sweep.pid), "workers must exit when the sweep is killed"
    finally:
        if live_processes_in_group(sweep.pid):
            os.killpg(sweep.pid, signal.SIGKILL)


# ---------------------------------------------------------------- kill -9


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc")
def test_sweep_killed_while_planning_and_between_units_resumes_to_the_uninterrupted_table(expected, tmp_path):
    write_config(tmp_path / "sweep.yaml")
    store = tmp_path / "sweep.sqlite"
    # first as soon as the store holds the planned units (no unit done yet), then once 3 more units are done
    kill_sweep(tmp_path, lambda path: units_planned(path) > 0)
    done = units_done(store)
    kill_sweep(tmp_path, lambda path: units_done(path) >= done + 3)
    assert units_done(store) < N_UNITS, "killed mid-way"

    rerun = subprocess.run(COMMAND, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    resumed = export_frame(store)
    assert not resumed.duplicated(["model_id", "reset", "layer", "trial"]).any()
    pd.testing.assert_frame_equal(resumed, expected, obj="table after kills")
    assert max_attempts(store) == 1, "units finished before a kill are not computed again"


# ---------------------------------------------------------------- a full disk


def small_disk() -> None:
    """In the sweep's process: no file may grow past 128 KiB (the store fills up after a few units); writes past
    it fail with EFBIG instead of killing the process with SIGXFSZ."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, 128 * 1024))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.mark.slow
def test_disk_filling_up_mid_sweep_keeps_finished_units_and_the_rerun_completes(expected, tmp_path):
    write_config(tmp_path / "sweep.yaml")
    store = tmp_path / "sweep.sqlite"
    full = subprocess.run(COMMAND, cwd=tmp_path, preexec_fn=small_disk, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert full.returncode == 2
    error = without_warnings(full.stderr)  # the random models are at chance: one-line warnings, then the error
    assert len(error.splitlines()) == 1, full.stderr
    assert error.startswith("layercrit: error: cannot write the sweep store sweep.sqlite: ")
    assert error.strip().endswith("; the units finished so far are kept: free some space and run the same "
                                        "command again to resume")
    kept = units_done(store)
    assert 0 < kept < N_UNITS, "the disk fills up mid-sweep"

    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--store", str(store), "--quiet"]) == 0  # space freed
    pd.testing.assert_frame_equal(export_frame(store), expected)
    assert max_attempts(store) == 1, "the units finished before the disk filled up are not computed again"


# ---------------------------------------------------------------- hostile pickles


class Hostile:
    """Unpickling this runs ``open(marker, "w")``: the stand-in for any code an attacker's checkpoint runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def hostile_checkpoint(tmp_path) -> tuple[Path, Path]:
    """A checkpoint whose unpickling creates a marker file: (checkpoint, marker)."""
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": Hostile(marker)}, tmp_path / "hostile.pth")
    return tmp_path / "hostile.pth", marker


def config_with(tmp_path: Path, checkpoint: Path, trust) -> Path:
    return write_config(tmp_path / "sweep.yaml", models=[
        {"id": "evil", "spec": str(checkpoint), "arch": "layercrit:fmnist_resnet8", "trust_checkpoint": trust}])


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("trust", ["false", "no", "False", 0])
def test_trust_checkpoint_that_is_not_a_yaml_boolean_is_refused_and_the_pickle_never_runs(
        tmp_path, capsys, hostile_checkpoint, trust, dry_run):
    checkpoint, marker = hostile_checkpoint
    config = config_with(tmp_path, checkpoint, trust)
    store = tmp_path / "sweep.sqlite"
    assert main(["sweep", str(config), "--store", str(store), *(["--dry-run"] if dry_run else [])]) == 2
    error = capsys.readouterr().err
    assert error == (f"layercrit: error: {config}: model 'evil': trust_checkpoint must be true or false, not "
                     f"{trust!r}{'; write it without quotes' if isinstance(trust, str) else ''}\n")
    assert not marker.exists()
    assert not store.exists()


def test_hostile_checkpoint_runs_only_when_trust_checkpoint_is_true_and_code_is_allowed(tmp_path, capsys,
                                                                                       hostile_checkpoint):
    checkpoint, marker = hostile_checkpoint
    store = str(tmp_path / "sweep.sqlite")
    assert main(["sweep", str(config_with(tmp_path, checkpoint, False)), "--store", store, "--dry-run"]) == 1
    assert "cannot measure evil: " in capsys.readouterr().out
    assert not marker.exists()
    trusted = str(config_with(tmp_path, checkpoint, True))
    assert main(["sweep", trusted, "--store", store, "--dry-run"]) == 2
    assert "model 'evil': trust_checkpoint (unpickling runs code)" in capsys.readouterr().err
    assert main(["sweep", trusted, "--store", store, "--dry-run", "--allow-code"]) == 0
    assert "not built (a dry run runs no code from the config): evil" in capsys.readouterr().out
    assert not marker.exists(), "a dry run unpickles nothing"
    assert main(["sweep", trusted, "--store", store, "--quiet", "--allow-code"]) == 1
    assert marker.exists(), "the fixture's pickle does run code when trusted and allowed"


# ---------------------------------------------------------------- code named in a config


FACTORY = """
from pathlib import Path
Path(__file__).with_name("imported").touch()

from layercrit.models.architectures import SmallResNet

def build(pretrained=False, **kwargs):
    return SmallResNet(depth=8, **kwargs)
"""


@pytest.fixture
def factory_file(tmp_path) -> Path:
    """A model factory in its own folder that leaves a marker there when it is imported."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "nets.py").write_text(FACTORY)
    return tmp_path / "code" / "nets.py"


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("where", ["file spec", "module spec", "file arch"])
def test_code_named_in_a_sweep_config_is_refused_without_allow_code_and_nothing_is_imported(
        tmp_path, capsys, factory_file, where, dry_run):
    spec, named = {
        "file spec": ({"spec": f"{factory_file}:build", "pretrained": False}, f"spec '{factory_file}:build'"),
        "module spec": ({"spec": "this:x"}, "spec 'this:x'"),
        "file arch": ({"spec": str(tmp_path / "w.pth"), "arch": f"{factory_file}:build"},
                      f"arch '{factory_file}:build'"),
    }[where]
    config = write_config(tmp_path / "sweep.yaml", models=[{"id": "mine", **spec}])
    store = tmp_path / "sweep.sqlite"
    assert "this" not in sys.modules
    path_before = list(sys.path)
    assert main(["sweep", str(config), "--store", str(store), *(["--dry-run"] if dry_run else [])]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"model 'mine': {named}" in error and "only with --allow-code" in error
    assert not (factory_file.parent / "imported").exists() and "this" not in sys.modules
    assert sys.path == path_before and not store.exists()


@pytest.mark.slow  # end to end (two whole analyses / a sweep / a filled disk): CI runs it
def test_a_dry_run_with_allow_code_imports_nothing_and_the_sweep_then_runs_the_factory(tmp_path, capsys, factory_file):
    config = write_config(tmp_path / "sweep.yaml", images=16, trials=1, models=[
        {"id": "mine", "spec": f"{factory_file}:build", "pretrained": False},
        {"id": "plain", "spec": "layercrit:fmnist_resnet8", "pretrained": False}])
    store = tmp_path / "sweep.sqlite"
    path_before = list(sys.path)
    assert main(["sweep", str(config), "--store", str(store), "--dry-run", "--allow-code"]) == 0
    out = capsys.readouterr().out
    assert "not built (a dry run runs no code from the config): mine" in out
    assert not (factory_file.parent / "imported").exists() and sys.path == path_before
    assert main(["sweep", str(config), "--store", str(store), "--quiet", "--allow-code"]) == 0
    assert (factory_file.parent / "imported").exists()
    assert set(export_frame(store).model_id) == {"mine", "plain"}

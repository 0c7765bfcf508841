"""Issue #19: what a run writes stays in its output folder, one writer per folder, a finished folder tells itself
from an interrupted one, and saved logits and trackers fail with one line (a full disk, a folder that cannot be
written, a logits folder cut short or edited)."""

import contextlib
import json
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

import layercrit
from layercrit.cli import main
from layercrit.errors import LayercritError
from layercrit.names import file_name
from layercrit.results import read_table
from layercrit.trackers import log_models

from .conftest import assert_one_line_error, run_cli, without_warnings
from .test_reliability_cli import read_only_below
from .test_store import rows_of  # noqa: F401 - a fixture
from .test_trackers import tensorboard_scalars

HOSTILE_IDS = ["../../escaped", "/tmp/layercrit-absolute-id", "zoo:fmnist/baseline", ".", "..", ".hidden", "a%2Fb",
               "a/b", "x" * 400, "é" * 200, "tab\tand\nnewline", "back\\slash"]


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


# ---------------------------------------------------------------- ids never become paths unescaped


def test_a_file_name_made_from_any_id_is_one_new_entry_of_its_folder_and_ids_keep_distinct_names():
    names = [file_name(model_id) for model_id in HOSTILE_IDS]
    for name in names:
        assert "/" not in name and "\0" not in name and not name.startswith(".")
        assert 0 < len(name.encode()) <= 255
    assert len(set(names)) == len(names)
    assert file_name("baseline") == "baseline"
    assert file_name("interpolate(rerandomize,alpha=0.5)") == "interpolate(rerandomize,alpha=0.5)"


def test_a_sweeps_tensorboard_folders_stay_inside_dir_whatever_the_model_ids(tmp_path):
    pytest.importorskip("tensorboard")
    ids = ["../../escaped", str(tmp_path / "absolute"), "zoo:fmnist/baseline", ".."]
    rows = pd.DataFrame({"model_id": [i for i in ids for _ in range(3)], "layer": ["original", "fc", "fc"] * len(ids),
                         "trial": [0, 0, 1] * len(ids), "criticality": [0, 0.2, 0.4] * len(ids),
                         "top1_acc": [90.0, 50, 40] * len(ids)})
    board = tmp_path / "deep" / "er" / "tb"
    log_models(rows, f"tensorboard:{board}")
    assert all(board in path.parents for path in files_under(tmp_path))
    assert {path.name for path in board.iterdir()} == {file_name(i) for i in ids}
    for model_id in ids:
        assert tensorboard_scalars(board / file_name(model_id))["criticality"] == [(0, pytest.approx(0.3))]


# ---------------------------------------------------------------- one writer per output folder, and a finished folder

RUN = ("run", "--model", "layercrit:fmnist_resnet8", "--no-pretrained", "--layers", "model.fc,model.layer3.*",
       "--data", "fashion-mnist", "--images", 20, "--trials", 1, "--quiet")

HOLD = """import sys
from layercrit.results import claim_output_folder
with claim_output_folder(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def held(folder: Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``folder`` as a writer does, until it is killed with SIGKILL on leaving the block."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline() == "held\n"
        yield process
    finally:
        process.kill()
        assert process.wait() == -signal.SIGKILL


def test_a_second_writer_into_a_held_output_folder_is_a_one_line_error_naming_the_first(tmp_path, capsys):
    out = tmp_path / "out"
    with held(out) as first:
        code, _, err = run_cli(capsys, *RUN, "--out", out)
        assert_one_line_error(code, err, f"output folder {out} is in use by another process (pid {first.pid} on ",
                              "wait for it to end, or write to another folder")
        assert f": -c {out}): " in err  # its command line (python -c HOLD OUT)
        assert [path.name for path in out.iterdir()] == [".layercrit.lock"]  # nothing of the second run
    # killed with SIGKILL, the first writer leaves no lock behind
    code, _, err = run_cli(capsys, *RUN, "--out", out)
    assert code == 0, err
    assert not (out / ".layercrit.lock").exists()


@pytest.mark.parametrize("command", [
    ("module-criticality", "--model", "layercrit:fmnist_resnet8", "--no-pretrained", "--init", "x.pt", "--data",
     "fashion-mnist", "--images", 20),
    ("analyze", "results.csv"),
    ("demo", "--images", 10),
], ids=lambda command: command[0])
def test_every_command_that_writes_a_folder_refuses_one_held_by_another_process(tmp_path, capsys, command):
    out = tmp_path / "out"
    with held(out) as first:
        code, _, err = run_cli(capsys, *command, "--out", out)
        assert_one_line_error(code, err, f"output folder {out} is in use by another process (pid {first.pid} on ")


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory) -> Path:
    """A run folder whose run was stopped after its chunks' results were written and before the final ones."""
    out = tmp_path_factory.mktemp("interrupted")
    from layercrit import results

    write_results = results.write_results

    def stopped_before_the_final_results(df, folder, run=None):
        if run is not None and run.get("complete"):
            raise KeyboardInterrupt
        return write_results(df, folder, run)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(results, "write_results", stopped_before_the_final_results)
        assert main([*map(str, RUN), "--out", str(out)]) == 130
    return out


def test_run_json_says_complete_only_beside_the_final_results(interrupted_run, tmp_path, capsys):
    assert json.loads((interrupted_run / "run.json").read_text())["complete"] is False
    assert len(pd.read_csv(interrupted_run / "results.csv")) > 1  # the chunks' rows are kept
    code, _, err = run_cli(capsys, *RUN, "--out", tmp_path / "finished")
    assert code == 0, err
    assert json.loads((tmp_path / "finished" / "run.json").read_text())["complete"] is True


@pytest.mark.parametrize("command", [pytest.param("analyze", marks=pytest.mark.slow), "diff"])
def test_reading_the_results_of_an_interrupted_run_warns_that_they_are_partial(interrupted_run, tmp_path, capsys,
                                                                               caplog, command):
    extra = [interrupted_run] if command == "diff" else []
    out = tmp_path / ("diff.csv" if command == "diff" else "analysis")
    code, _, err = run_cli(capsys, command, interrupted_run, *extra, "--out", out)
    assert code == 0, err
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert warning.startswith(f"the results in {interrupted_run} are from a run that did not finish")
    assert warning.endswith("run it again to measure the rest")


def test_reading_the_results_of_a_run_still_going_names_its_process(interrupted_run, caplog):
    with held(interrupted_run) as writer:
        read_table(interrupted_run)
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"the results in {interrupted_run} are from a run that is still going (another "
                              f"process (pid {writer.pid} on ")


def test_the_results_of_a_finished_run_are_read_without_a_warning(tmp_path, capsys, caplog):
    code, _, err = run_cli(capsys, *RUN, "--out", tmp_path / "finished")
    assert code == 0, err
    read_table(tmp_path / "finished")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# ---------------------------------------------------------------- trackers that cannot write where they are sent


@pytest.mark.parametrize("where", ["file", "file/below", "/proc/layercrit-tb", "read-only"])
def test_a_tensorboard_folder_that_cannot_be_written_is_a_one_line_error_before_any_work(tmp_path, capsys,
                                                                                      monkeypatch, where):
    pytest.importorskip("tensorboard")
    (tmp_path / "file").write_text("mine")
    board = Path(where) if where.startswith("/") else tmp_path / where
    if where == "read-only":
        read_only_below(monkeypatch, board)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *RUN, "--out", out, "--log-to", f"tensorboard:{board}")
    assert_one_line_error(code, err, f"--log-to=tensorboard:{board}: ")
    assert (tmp_path / "file").read_text() == "mine"
    assert not (out / "results.csv").exists()


# ---------------------------------------------------------------- saved logits: a full disk, a folder cut short


def small_file_limit(limit: int):
    """For a child process: no file may grow beyond ``limit`` bytes (as a full disk, but at a chosen point)."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


# batches of 10 images: the index of two units (about 260 bytes) outgrows 250 bytes before any .val (200 bytes a
# batch) does; 6 kB is passed by each unit's .val (8 kB for 400 images) before any results.* are written
@pytest.mark.slow
@pytest.mark.parametrize("limit, full", [(250, "index.json"), (6_000, ".val")], ids=["index", "logits"])
def test_save_logits_on_a_full_disk_is_a_one_line_error_and_leaves_no_temporary_index(tmp_path, limit, full):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "layercrit.cli", "run", "--model", "layercrit:fmnist_resnet8", "--no-pretrained",
               "--layers", "model.fc", "--data", "fashion-mnist", "--images", "400", "--trials", "1", "--quiet",
               "--batch-size", "10", "--save-logits", "--out", str(out)]
    run = subprocess.run(command, preexec_fn=small_file_limit(limit), capture_output=True, text=True, timeout=600)
    assert run.returncode == 2, run.stderr
    [line] = without_warnings(run.stderr).splitlines()  # the random model is at chance: one-line warnings first
    assert line.startswith(f"layercrit: error: cannot write the logits to {out / 'logits'}/"), line
    assert full in line and "File too large; free some space" in line
    assert not list(out.rglob("*.tmp")) and not (out / ".layercrit.lock").exists()


@pytest.fixture(scope="module")
def saved_logits(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("logits") / "logits"
    layercrit.measure("layercrit:fmnist_resnet8", "fashion-mnist", images=40, layers="model.fc", trials=2,
                      save_logits=folder, device="cpu", batch_size=16, pretrained=False)
    return folder


@pytest.fixture
def logits_copy(saved_logits, tmp_path) -> Path:
    shutil.copytree(saved_logits, tmp_path / "logits")
    return tmp_path / "logits"


def test_saved_logits_of_a_finished_run_read_back_whole_without_a_warning(saved_logits, caplog):
    logits = layercrit.load_logits(saved_logits)
    assert set(logits) == {("original", 0), ("model.fc", 0), ("model.fc", 1)}
    assert all(values.shape == (40, 10) for values in logits.values())
    assert json.loads((saved_logits / "index.json").read_text())["complete"] is True
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_logits_cut_at_the_same_image_in_every_file_are_refused_not_read_as_half(logits_copy):
    for path in logits_copy.glob("u00001.*"):
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    with pytest.raises(LayercritError) as excinfo:
        layercrit.load_logits(logits_copy)
    assert_one_line(excinfo, f"{logits_copy / 'u00001.pos'} holds 20 images where index.json says 40")


@pytest.mark.parametrize("change, message", [
    (lambda folder: (folder / "u00001.val").unlink(), "u00001.val is missing"),
    (lambda folder: (folder / "index.json").write_text("[1, 2]"), "index.json is not a logits index of layercrit"),
    (lambda folder: edit_index(folder, lambda index: index.pop("units")), "index.json is not a logits index"),
    (lambda folder: edit_index(folder, lambda index: index["units"][0].pop("file")), "index.json is not a logits"),
    (lambda folder: edit_index(folder, lambda index: index.update(top_k="x")), "index.json is not a logits index"),
], ids=["val missing", "index a list", "no units", "unit without file", "top_k not a number"])
def test_a_logits_folder_missing_a_file_or_with_an_odd_index_is_a_one_line_error(logits_copy, change, message):
    change(logits_copy)
    with pytest.raises(LayercritError) as excinfo:
        layercrit.load_logits(logits_copy)
    assert_one_line(excinfo, message)


def test_logits_of_a_run_that_did_not_finish_are_read_with_a_warning(logits_copy, caplog):
    edit_index(logits_copy, lambda index: index.update(complete=False))
    assert len(layercrit.load_logits(logits_copy)) == 3
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"the logits in {logits_copy} are from a run that did not finish")


def test_a_rerun_into_a_logits_folder_never_shows_the_old_index_with_the_new_files(saved_logits, tmp_path):
    from layercrit.measurement.logits import LogitsWriter

    folder = tmp_path / "logits"
    shutil.copytree(saved_logits, folder)
    LogitsWriter(folder)  # a rerun starts: nothing written yet
    assert layercrit.load_logits(folder) == {}


def edit_index(folder: Path, edit) -> None:
    index = json.loads((folder / "index.json").read_text())
    edit(index)
    (folder / "index.json").write_text(json.dumps(index))


def assert_one_line(excinfo, fragment: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and fragment in message, message


def test_reading_a_sweep_store_with_units_left_warns_that_its_results_are_partial(tmp_path, rows_of,  # noqa: F811
                                                                                   caplog):
    from layercrit.sweeps.store import Store

    from .test_store import planned_store

    store, units = planned_store(tmp_path / "s.sqlite")
    for unit in units[:-1]:
        store.record_done(unit, rows_of(unit), seconds=0.1, worker="w", batch_size=16)
    store.close()
    read_table(tmp_path / "s.sqlite")
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"the sweep store {tmp_path / 's.sqlite'} holds 3 of its 4 units (1 pending, 0 failed)")
    caplog.clear()
    with Store(tmp_path / "s.sqlite") as store:
        store.record_done(units[-1], rows_of(units[-1]), seconds=0.1, worker="w", batch_size=16)
    read_table(tmp_path / "s.sqlite")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_sweeps_tracker_folder_that_cannot_be_written_is_refused_before_any_unit(tmp_path, capsys):
    from .test_sweep import write_config

    (tmp_path / "file").write_text("mine")
    config = write_config(tmp_path / "sweep.yaml", log_to=f"tensorboard:{tmp_path / 'file'}")
    code, _, err = run_cli(capsys, "sweep", config, "--store", tmp_path / "s.sqlite", "--quiet")
    assert_one_line_error(code, err, f"--log-to=tensorboard:{tmp_path / 'file'}: output folder")
    assert not (tmp_path / "s.sqlite").exists()

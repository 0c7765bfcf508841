"""Issue #19: what a run writes stays in its output folder, one writer per folder, a finished folder tells itself
from an interrupted one, and saved logits and trackers fail with one line (a full disk, a folder that cannot be
written, a logits folder cut short or edited)."""

from pathlib import Path

import pandas as pd
import pytest

from layercrit.results import file_name
from layercrit.trackers import log_models

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

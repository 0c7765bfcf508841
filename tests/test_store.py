"""The sweep store: atomic unit commits, one original row per (model, reset), export order, status, errors."""

import sqlite3

import pandas as pd
import pytest

from layercrit import measure
from layercrit.columns import COLUMNS
from layercrit.errors import LayercritError
from layercrit.sweeps.store import Store, Unit, export_frame, status_frame

LAYERS = ["model.conv1", "model.conv2", "model.fc"]


@pytest.fixture
def rows_of(tiny_model, tiny_data):
    """The rows ``measure`` gives for a unit (its layers, its one trial) of the tiny model."""

    def compute(unit: Unit) -> pd.DataFrame:
        return measure(tiny_model, tiny_data, layers=list(unit.layers), reset=unit.reset, trials=[unit.trial],
                       model_id=unit.model_id, images=None, batch_size=16)

    return compute


def planned_store(path, model_ids=("m",), layers=LAYERS, trials=2) -> tuple[Store, list[Unit]]:
    store = Store(path, create=True)
    units = []
    for position, model_id in enumerate(model_ids):
        store.set_model(model_id, position, {"spec": "test:tiny", "metadata": {"category": f"cat-{model_id}"}}, layers)
        units += [Unit(model_id, "rerandomize", trial, chunk, tuple(layers[chunk * 2:chunk * 2 + 2]))
                  for trial in range(trials) for chunk in range(2)]
    store.add_units(units)
    return store, units


def test_finished_unit_is_committed_with_its_rows_and_survives_reopening(tmp_path, rows_of):
    store, units = planned_store(tmp_path / "s.sqlite")
    rows = rows_of(units[0])
    assert store.record_done(units[0], rows, seconds=1.0, worker="w", batch_size=16)
    store.close()
    with Store(tmp_path / "s.sqlite") as reopened:
        assert reopened.units(("done",)) == [units[0]]
        assert len(reopened.units(("pending",))) == len(units) - 1
        stored = reopened.results()
    pd.testing.assert_frame_equal(stored[list(COLUMNS)], rows.reset_index(drop=True), check_dtype=False)


def test_original_row_is_stored_once_per_model_and_reset(tmp_path, rows_of):
    store, units = planned_store(tmp_path / "s.sqlite")
    for unit in units:
        store.record_done(unit, rows_of(unit), seconds=0.1, worker="w", batch_size=16)
    table = store.results()
    store.close()
    assert (table.layer == "original").sum() == 1
    assert len(table) == 1 + len(LAYERS) * 2
    assert not table.duplicated(["model_id", "reset", "layer", "trial"]).any()


def test_a_unit_recorded_twice_keeps_the_first_result(tmp_path, rows_of):
    store, units = planned_store(tmp_path / "s.sqlite")
    rows = rows_of(units[1])
    assert store.record_done(units[1], rows, seconds=0.1, worker="first", batch_size=16)
    assert not store.record_done(units[1], rows.assign(top1_acc=-1.0), seconds=0.1, worker="second", batch_size=16)
    table = store.results()
    store.close()
    assert (table.top1_acc >= 0).all()
    assert len(table) == len(rows)


def test_failed_unit_keeps_its_error_until_a_retry_succeeds(tmp_path, rows_of):
    path = tmp_path / "s.sqlite"
    store, units = planned_store(path)
    store.record_failed(units[2], "out of memory at batch size 1", detail="Traceback ...")
    assert store.units(("failed",)) == [units[2]]
    assert status_frame_of(store).loc["m", "error"] == "out of memory at batch size 1"
    store.record_done(units[2], rows_of(units[2]), seconds=0.1, worker="w", batch_size=8)
    attempts = store.conn.execute("SELECT attempts, status, error FROM units WHERE trial = 1 AND chunk = 0").fetchone()
    store.close()
    assert attempts == (2, "done", None)


def status_frame_of(store: Store) -> pd.DataFrame:
    return store.status().set_index("model_id")


def test_status_counts_done_failed_and_pending_units_per_model(tmp_path, rows_of):
    path = tmp_path / "s.sqlite"
    store, units = planned_store(path, model_ids=("a", "b"))
    store.set_model("broken", 2, {"spec": "x"}, None, error="cannot load weights")
    store.record_done(units[0], rows_of(units[0]), seconds=0.1, worker="w", batch_size=16)
    store.record_failed(units[5], "boom")
    store.close()
    status = status_frame(path).set_index("model_id")
    assert status.loc["a", ["units", "done", "failed", "pending"]].tolist() == [4, 1, 0, 3]
    assert status.loc["b", ["units", "done", "failed", "pending"]].tolist() == [4, 0, 1, 3]
    assert status.loc["b", "error"] == "boom"
    assert status.loc["broken", "units"] == 0
    assert status.loc["broken", "error"] == "cannot load weights"
    assert list(status.index) == ["a", "b", "broken"]


def test_export_orders_rows_by_model_then_layer_then_trial_and_adds_metadata(tmp_path, rows_of):
    path = tmp_path / "s.sqlite"
    store, units = planned_store(path, model_ids=("b_first", "a_second"))
    for unit in reversed(units):  # finishing order must not matter
        store.record_done(unit, rows_of(unit), seconds=0.1, worker="w", batch_size=16)
    store.close()
    table = export_frame(path)
    assert list(table.columns) == [*COLUMNS, "category"]
    assert table.model_id.drop_duplicates().tolist() == ["b_first", "a_second"]
    first = table[table.model_id == "b_first"]
    assert list(zip(first.layer, first.trial, strict=True)) == [("original", 0)] + [
        (layer, trial) for layer in LAYERS for trial in (0, 1)]
    assert set(first.category) == {"cat-b_first"}


def test_opening_a_missing_store_says_how_to_create_it(tmp_path):
    with pytest.raises(LayercritError, match=r"no sweep store at .*missing.sqlite: create it with 'layercrit sweep"):
        export_frame(tmp_path / "missing.sqlite")


def test_a_file_that_is_not_a_store_is_refused(tmp_path):
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO meta VALUES ('schema', '{\"version\": 0}')")
    conn.commit()
    conn.close()
    with pytest.raises(LayercritError, match="written by another layercrit version"):
        status_frame(other)
    (tmp_path / "text.sqlite").write_text("not a database at all, just text " * 100)
    with pytest.raises(LayercritError, match="is not a layercrit sweep store"):
        status_frame(tmp_path / "text.sqlite")

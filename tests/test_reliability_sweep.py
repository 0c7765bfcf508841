"""Sweep configs and stores under mistaken or hostile input (issue #11).

Every config key has the YAML type it means or is refused in one line (a quoted "false" is not false); YAML
aliases cannot blow a config up; a dry run checks the data; commands that read a store open it read-only, so they
never change another program's file and work on read-only media; a store path that is a folder and a full disk
are one-line errors; rows count the images --skip-bad-images left out, and a store made before that column opens,
resumes and reads."""

import dataclasses
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import pandas as pd
import pytest
import yaml

from layercrit import cli
from layercrit.cli import main
from layercrit.columns import COLUMNS
from layercrit.data import EvalSet
from layercrit.errors import LayercritError
from layercrit.measurement.measure import measure
from layercrit.sweeps import store
from layercrit.sweeps.store import Store, export_frame, status_frame
from layercrit.sweeps.sweep import load_config, run_sweep

from .test_store import planned_store, rows_of  # noqa: F401 - rows_of is a fixture
from .test_sweep import write_config


def one_line_error(capsys) -> str:
    """The CLI's stderr, checked to be one ``layercrit: error:`` line; returns the message."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("layercrit: error: "), err
    return err.removeprefix("layercrit: error: ").strip()


# ---------------------------------------------------------------- config types


@pytest.mark.parametrize("value", ["false", "no", 1, None])
@pytest.mark.parametrize("key", ["skip_bad_images", "pretrained", "trust_checkpoint"])
def test_boolean_keys_take_only_yaml_booleans(tmp_path, key, value):
    if key == "skip_bad_images":
        config, where = write_config(tmp_path / "s.yaml", skip_bad_images=value), key
    else:
        config = write_config(tmp_path / "s.yaml", models=[{"id": "a", "spec": "layercrit:fmnist_resnet8", key: value}])
        where = f"model 'a': {key}"
    quoted = "; write it without quotes" if isinstance(value, str) else ""
    with pytest.raises(LayercritError) as error:
        load_config(config)
    assert str(error.value) == f"{config}: {where} must be true or false, not {value!r}{quoted}"


def test_unquoted_yaml_booleans_are_booleans(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("data: fashion-mnist\nskip_bad_images: yes\n"
                    "models:\n  - {id: a, spec: ckpt.pth, arch: 'layercrit:fmnist_resnet8', pretrained: no, "
                    "trust_checkpoint: false}\n")
    config = load_config(path)
    assert config.skip_bad_images is True
    assert (config.models[0].pretrained, config.models[0].trust_checkpoint) == (False, False)


@pytest.mark.parametrize(("change", "message"), [
    ({"layers": ["conv", 5]}, "layers must be a name or a list of names, not ['conv', 5]"),
    ({"layers": []}, "layers must be a name or a list of names, not []"),
    ({"reset": {"a": 1}}, "reset must be a name or a list of names, not {'a': 1}"),
    ({"device": 7}, "device must be a string or null, not 7"),
    ({"data": 5}, "data must be a string, not 5"),
    ({"seed": 1.5}, "seed must be int, not 1.5"),
    ({"images": True}, "images must be int or null, not True"),
    ({"batch_size": 0}, "batch_size=0: give at least 1 image per forward"),
    ({"max_cache_mb": "lots"}, "max_cache_mb must be a number, not 'lots'"),
    ({"cache_dir": ["a"]}, "cache_dir must be a string or null, not ['a']"),
    ({"models": [{"id": 5, "spec": "s"}]}, "model #1: id must be a string, not 5"),
    ({"models": [{"id": "a", "spec": ["s"]}]}, "model 'a': spec must be a string, not ['s']"),
    ({"models": [{"id": "a", "spec": "s", "arch": 5}]}, "model 'a': arch must be a string or null, not 5"),
    ({"models": [{"id": "a", "spec": "s", "num_classes": "10"}]}, "model 'a': num_classes must be int or null, not '10'"),
    ({"models": [{"id": "a", "spec": "s", "num_classes": 0}]}, "model 'a': num_classes must be at least 1"),
])
def test_every_key_of_the_wrong_type_is_a_one_line_error(tmp_path, change, message):
    config = write_config(tmp_path / "s.yaml", **change)
    with pytest.raises(LayercritError) as error:
        load_config(config)
    assert str(error.value) == f"{config}: {message}"


def test_values_a_store_cannot_hold_are_refused_where_they_are(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("data: fashion-mnist\nmodels:\n  - {id: a, spec: s, released: 2024-05-01}\n")
    with pytest.raises(LayercritError) as error:
        load_config(path)
    assert str(error.value) == (f"{path}: models[0].released is a date, which a sweep store cannot hold; "
                                "quote it to keep it as text")
    path.write_text("data: fashion-mnist\n5: x\nmodels: [{id: a, spec: s}]\n")
    with pytest.raises(LayercritError) as error:
        load_config(path)
    assert str(error.value) == f"{path}: key 5 is not a string; quote it"


def test_config_that_is_not_utf8_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "utf16.yaml"
    path.write_bytes("data: fashion-mnist\n".encode("utf-16"))  # starts with the BOM \xff\xfe
    assert main(["sweep", str(path), "--dry-run"]) == 2
    assert one_line_error(capsys) == f"{path} is not UTF-8 text (byte 0xff at offset 0): save it as UTF-8"


def test_wrong_type_through_the_cli_is_one_line_and_exit_2(tmp_path, capsys):
    config = write_config(tmp_path / "s.yaml", device=7)
    assert main(["sweep", str(config), "--store", str(tmp_path / "s.sqlite")]) == 2
    assert one_line_error(capsys) == f"{config}: device must be a string or null, not 7"
    assert not (tmp_path / "s.sqlite").exists()


# ---------------------------------------------------------------- size bounds


def billion_laughs(levels: int = 9) -> str:
    """A model whose metadata is ten "lol"s nested ``levels`` deep through aliases: 10**levels strings."""
    lines = ["data: fashion-mnist", "models:", "  - id: a", "    spec: layercrit:fmnist_resnet8",
             "    l0: &l0 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_billion_laughs_in_metadata_is_refused_without_expanding_it(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(billion_laughs())  # 10**9 "lol"s: about 6 GB as JSON, from a 700-byte file
    tracemalloc.start()
    try:
        with pytest.raises(LayercritError) as error:
            load_config(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(error.value) == (f"{path} is over 1 MB once its YAML aliases are expanded: a sweep config lists "
                                "settings and models, keep it small")
    assert peak < 20_000_000


def test_metadata_value_and_config_file_sizes_are_bounded(tmp_path):
    config = write_config(tmp_path / "notes.yaml", models=[{"id": "a", "spec": "s", "notes": "x" * 70_000}])
    with pytest.raises(LayercritError, match=r"model 'a': metadata 'notes' is over 64 kB once its YAML aliases are "
                                             r"expanded: keep metadata to names, numbers and short notes$"):
        load_config(config)
    big = tmp_path / "big.yaml"
    big.write_text(write_config(tmp_path / "s.yaml").read_text() + "#" * 1_000_000 + "\n")
    with pytest.raises(LayercritError, match=r"big.yaml is over 1 MB: a sweep config lists settings and models"):
        load_config(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("data: " + "[" * 20_000 + "]" * 20_000 + "\n")
    with pytest.raises(LayercritError, match=r"cannot parse .*deep.yaml"):
        load_config(deep)


# ---------------------------------------------------------------- dry run


@pytest.mark.parametrize("data", ["folder", "fashion-mnist"])
def test_dry_run_reports_data_that_cannot_be_read(tmp_path, capsys, data):
    missing = tmp_path / "nothing-here"
    if data == "folder":
        config, extra, message = write_config(tmp_path / "s.yaml", data=str(missing)), [], f"data not found: {missing}"
    else:
        missing.mkdir()
        config, extra, message = write_config(tmp_path / "s.yaml"), ["--data-root", str(missing)], "Fashion-MNIST not found"
    assert main(["sweep", str(config), "--store", str(tmp_path / "s.sqlite"), "--dry-run", *extra]) == 2
    assert message in one_line_error(capsys)


# ---------------------------------------------------------------- reading never writes


def foreign_database(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE people (name TEXT, age INTEGER)")
    conn.execute("INSERT INTO people VALUES ('ada', 36)")
    conn.commit()
    conn.close()
    return path


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("command", ["status", "export", "analyze", "dry-run"])
@pytest.mark.parametrize("kind", ["foreign", "empty"])
def test_reading_commands_never_change_a_file_that_is_not_a_store(tmp_path, capsys, command, kind):
    folder = tmp_path / "data"
    folder.mkdir()
    path = foreign_database(folder / "other.sqlite") if kind == "foreign" else folder / "other.sqlite"
    path.touch()
    before = files_in(folder)
    argv = {"status": ["status", str(path)],
            "export": ["export", str(path), "--out", str(tmp_path / "out.csv")],
            "analyze": ["analyze", str(path), "--out", str(tmp_path / "analysis")],
            "dry-run": ["sweep", str(write_config(tmp_path / "s.yaml")), "--store", str(path), "--dry-run"]}[command]
    assert main(argv) == 2
    reason = "it holds tables people" if kind == "foreign" else "an empty database"
    assert one_line_error(capsys) == (f"{path} is not a layercrit sweep store ({reason}): give a store that "
                                      "'layercrit sweep' made, or a new path")
    assert files_in(folder) == before  # same bytes, and no -wal, -shm or -journal beside it


def test_a_sweep_does_not_write_its_tables_into_another_programs_database(tmp_path):
    path = foreign_database(tmp_path / "other.db")
    before = path.read_bytes()
    with pytest.raises(LayercritError, match=r"other.db is not a layercrit sweep store \(it holds tables people\)"):
        run_sweep(write_config(tmp_path / "s.yaml"), path, workers=1, progress=False)
    assert files_in(tmp_path) == {"other.db": before, "s.yaml": (tmp_path / "s.yaml").read_bytes()}


@pytest.fixture
def finished_store(tmp_path, rows_of):  # noqa: F811 - the fixture imported above
    """A store with one finished unit, closed cleanly: (path, the rows export gives)."""
    db, units = planned_store(tmp_path / "store" / "s.sqlite")
    db.record_done(units[0], rows_of(units[0]), seconds=0.1, worker="w", batch_size=16)
    db.close()
    return db.path, export_frame(db.path)


def test_reading_a_store_opens_it_read_only(finished_store, monkeypatch):
    path, expected = finished_store
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    connect = sqlite3.connect

    def read_only_media(database, *args, **kwargs):
        if not (str(database).startswith("file:") and "mode=ro" in str(database) and kwargs.get("uri")):
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only_media)
    pd.testing.assert_frame_equal(export_frame(path), expected)
    assert status_frame(path).loc[0, ["units", "done", "pending"]].tolist() == [4, 1, 3]
    assert (path.read_bytes(), path.stat().st_mtime_ns) == (before, mtime)


def test_a_store_whose_wal_index_cannot_be_made_is_read_as_immutable(finished_store, monkeypatch):
    path, expected = finished_store
    connect = sqlite3.connect

    def no_shm(database, *args, **kwargs):  # what SQLite says for a WAL file on read-only media
        if "immutable=1" not in str(database):
            raise sqlite3.OperationalError("unable to open database file")
        return connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", no_shm)
    pd.testing.assert_frame_equal(export_frame(path), expected)


def read_only_mounts() -> bool:
    if not shutil.which("unshare"):
        return False
    with tempfile.TemporaryDirectory() as folder:
        mount = f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} {folder}"
        return subprocess.run(["unshare", "-rm", "sh", "-c", mount], capture_output=True).returncode == 0


@pytest.mark.skipif(not read_only_mounts(), reason="needs unshare and mounts in a user namespace")
def test_status_and_export_read_a_store_on_read_only_media(finished_store, tmp_path):
    path, _ = finished_store
    assert main(["export", str(path), "--out", str(tmp_path / "expected.csv")]) == 0
    out = tmp_path / "results.csv"
    read = (f"from layercrit.cli import main; import sys; "
            f"sys.exit(main(['status', {str(path)!r}]) or main(['export', {str(path)!r}, '--out', {str(out)!r}]))")
    mount = f"mount --bind {path.parent} {path.parent} && mount -o remount,ro,bind {path.parent} {path.parent}"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f'{mount} && exec "$0" -c "$1"', sys.executable, read],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "units: 1 done, 0 failed, 3 pending of 4" in done.stdout
    assert out.read_bytes() == (tmp_path / "expected.csv").read_bytes()


# ---------------------------------------------------------------- store path and full disk


@pytest.mark.parametrize("command", ["sweep", "dry-run", "status"])
def test_store_that_is_a_folder_is_a_one_line_error(tmp_path, capsys, command):
    config = str(write_config(tmp_path / "s.yaml"))
    argv = {"sweep": ["sweep", config, "--store", str(tmp_path)],
            "dry-run": ["sweep", config, "--store", str(tmp_path), "--dry-run"],
            "status": ["status", str(tmp_path)]}[command]
    assert main(argv) == 2
    assert one_line_error(capsys) == (f"{tmp_path} is a folder, not a sweep store: give a file, e.g. "
                                      f"{tmp_path / 'sweep.sqlite'}")


class FillsUp:
    """A connection whose disk is full after ``commits`` more commits (SQLite's error, the transaction still open)."""

    def __init__(self, conn: sqlite3.Connection, commits: int):
        self.conn, self.commits = conn, commits

    def execute(self, sql, *args):
        if sql == "COMMIT":
            if self.commits == 0:
                raise sqlite3.OperationalError("database or disk is full")
            self.commits -= 1
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_full_disk_is_a_one_line_error_and_keeps_the_finished_units(tmp_path, rows_of):  # noqa: F811
    db, units = planned_store(tmp_path / "s.sqlite")
    db.conn = FillsUp(db.conn, commits=1)
    with pytest.raises(LayercritError) as error, db:
        for unit in units:
            db.record_done(unit, rows_of(unit), seconds=0.1, worker="w", batch_size=16)
    assert str(error.value) == (f"cannot write the sweep store {db.path}: database or disk is full; the units "
                                "finished so far are kept: free some space and run the same command again to resume")
    with Store(db.path) as reopened:
        assert reopened.units(("done",)) == units[:1]
        assert reopened.results().layer.tolist() == ["original", *units[0].layers]  # none of the failed unit's rows


# ---------------------------------------------------------------- skipped images


def test_rows_and_the_run_summary_count_the_images_left_out(tiny_model, tiny_data, capsys):
    evalset = dataclasses.replace(EvalSet.from_tensors(*tiny_data), n_skipped=3)
    rows = measure(tiny_model, evalset, layers="conv", trials=1, images=None, batch_size=16)
    assert rows.n_skipped.tolist() == [3] * len(rows)
    cli.print_summary(rows)
    assert "on 48 images (3 unreadable images skipped)" in capsys.readouterr().out
    cli.print_summary(rows.assign(n_skipped=0))
    assert "skipped" not in capsys.readouterr().out


def test_store_made_before_a_column_was_added_opens_resumes_and_reads(tmp_path, rows_of, monkeypatch):  # noqa: F811
    old_columns = tuple(c for c in COLUMNS if c != "n_skipped")
    with monkeypatch.context() as old_version:
        old_version.setattr(store, "COLUMNS", old_columns)
        old_version.setattr(store, "SCHEMA_VERSION", 1)
        db, units = planned_store(tmp_path / "old.sqlite")
        db.record_done(units[0], rows_of(units[0]), seconds=0.1, worker="w", batch_size=16)
        db.close()
    path = db.path
    schema = sqlite3.connect(path).execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
    assert yaml.safe_load(schema) == {"version": 1, "columns": list(old_columns)}

    before = path.read_bytes()
    read = export_frame(path)  # a reader does not upgrade the file
    assert list(read.columns) == [*COLUMNS, "category"]
    assert read.n_skipped.isna().all()
    assert path.read_bytes() == before

    with Store(path) as db:  # a sweep opening it adds the column and resumes
        assert db.units(("pending",)) == units[1:]
        db.record_done(units[1], rows_of(units[1]), seconds=0.1, worker="w", batch_size=16)
        assert db.get_meta("schema") == {"version": store.SCHEMA_VERSION, "columns": list(COLUMNS)}
        table = db.results()
    by_layer = table.set_index("layer").n_skipped
    assert by_layer[["original", *units[0].layers]].isna().all()  # rows of the old version: NULL
    assert by_layer[list(units[1].layers)].tolist() == [0]

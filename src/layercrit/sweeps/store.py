"""The sweep store: one SQLite file holding a sweep's config, its models, its work units and their result rows.

A finished unit is committed in one transaction together with its rows, so a process killed at any moment (or a
disk that fills up) leaves either the whole unit or none of it, and a rerun computes only the units that are not
done. The unmodified model's row (``layer == "original"``) is the same in every unit of a (model, reset) and is
stored once. WAL journaling lets ``layercrit status`` and ``layercrit export`` read while a sweep writes; they open
the file read-only, so they work on read-only media and never change a file that is not a store.

A store made before a result column was added gets the column on its next sweep (NULL in the older rows), and the
schema it records says so: ``{"version": SCHEMA_VERSION, "columns": [...]}`` in the ``meta`` table.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..columns import COLUMNS, METRIC_COLUMNS
from ..errors import LayercritError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: result columns added by later versions are added to older stores on open
UNIT_STATES = ("pending", "done", "failed")
_ROW_KEY = ("model_id", "reset", "layer", "trial")
_NO_SPACE = ("database or disk is full", "disk I/O error")  # SQLite's words for ENOSPC, and for EFBIG / EDQUOT


@dataclass(frozen=True)
class Unit:
    """One piece of work: ``layers`` of ``model_id`` reset with ``reset`` in trial ``trial`` (chunk ``chunk``)."""

    model_id: str
    reset: str
    trial: int
    chunk: int
    layers: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.model_id} {self.reset} trial {self.trial} chunk {self.chunk} ({len(self.layers)} layers)"


class Store:
    """An open sweep store. Use as a context manager; one connection, used from one thread.

    Args:
        path: the SQLite file.
        create: make the file (and its folder) when it does not exist; otherwise a missing store is an error.
        readonly: open without write access (status, export, a dry run): the file is never changed, and a store
            on read-only media can be read.

    A file that is not a layercrit store (another program's database, an empty file) is refused, and left as it
    was; a new store is made whole (tables and schema) before it appears under its name. A store on read-only
    media is refused for writing, saying so. Leaving the ``with`` block on a full disk raises a one-line error saying that the units
    finished so far are kept.
    """

    def __init__(self, path: str | Path, *, create: bool = False, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if self.path.is_dir():
            raise LayercritError(f"{self.path} is a folder, not a sweep store: give a file, e.g. {self.path / 'sweep.sqlite'}")
        if not self.path.is_file():
            if not create or readonly:
                raise LayercritError(f"no sweep store at {self.path}: create it with 'layercrit sweep CONFIG --store {self.path}'")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._create_file()
            except (OSError, sqlite3.Error) as error:
                why = error.strerror if isinstance(error, OSError) else error
                raise LayercritError(f"cannot create the sweep store {self.path}: {why}") from None
        self.conn = None
        try:
            if readonly:
                self.conn = _connect_readonly(self.path)
                self._schema()
            else:
                self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=60.0)
                self._open_for_writing()
        except (sqlite3.DatabaseError, LayercritError) as error:
            if self.conn is not None:
                self.conn.close()
            if isinstance(error, LayercritError):
                raise
            if self._write_error(error):
                raise self._write_error(error) from None
            raise LayercritError(f"{self.path} is not a layercrit sweep store ({error})") from None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except sqlite3.OperationalError as error:
            if exc is None:  # otherwise the error that ended the block is the one to report
                raise self._write_error(error) or error from None
        if isinstance(exc, sqlite3.OperationalError) and self._write_error(exc):
            raise self._write_error(exc) from None

    def close(self) -> None:
        """Fold the WAL into the main file (so the .sqlite alone is complete) and close. If that fails (a full
        disk) nothing is lost: the WAL stays beside the file and the next open reads it."""
        try:
            if not self.readonly:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self.conn.close()

    def _write_error(self, error: sqlite3.Error) -> LayercritError | None:
        """The one-line error for a store that cannot be written (a full disk, read-only media), or None."""
        if _no_space(error):
            hint = "" if "full" in str(error) else " (is the disk full?)"
            return LayercritError(f"cannot write the sweep store {self.path}: {error}{hint}; the units finished so "
                                  "far are kept: free some space and run the same command again to resume")
        # SQLite's words for a read-only file, and for a WAL index it cannot create beside it
        if not self.readonly and ("readonly" in str(error) or ("unable to open" in str(error)
                                                              and not _writable(self.path))):
            return LayercritError(f"cannot write the sweep store {self.path}: it is read-only (or its folder is, "
                                  "which SQLite needs for its journal); a sweep records its units there: copy it "
                                  "somewhere writable to go on, or read it with layercrit status / export / analyze")
        return None

    def _create_file(self) -> None:
        """Make the store's file whole, with its tables, under a temporary name, then link it into place: a kill
        never leaves an empty file, and a store another sweep made at the same moment is kept."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                self.conn = conn
                with self._transaction():
                    self._create_tables()
                    self.set_meta("schema", {"version": SCHEMA_VERSION, "columns": list(COLUMNS)})
            finally:
                conn.close()
                self.conn = None
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)

    def _schema(self) -> dict:
        """The schema the file records. Refuses a file that is not a layercrit store (an empty one included), or
        one of a schema this version cannot read."""
        tables = [name for (name,) in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        if "meta" not in tables:  # another program's database, or an empty file (a store is made whole)
            why = f"it holds tables {', '.join(sorted(tables)[:5])}" if tables else "an empty database"
            raise LayercritError(f"{self.path} is not a layercrit sweep store ({why}): give a store that "
                                 "'layercrit sweep' made, or a new path")
        found = self.get_meta("schema")
        version = found.get("version") if isinstance(found, dict) else None
        columns = found.get("columns") if isinstance(found, dict) else None
        if not (isinstance(version, int) and 1 <= version <= SCHEMA_VERSION and isinstance(columns, list)
                and set(columns) <= set(COLUMNS)):
            raise LayercritError(
                f"{self.path} was written by another layercrit version (schema {version}): "
                "export it with that version, or start a new store"
            )
        return found

    def _open_for_writing(self) -> None:
        """Check the file before changing anything; then add the result columns the store lacks, and switch to
        WAL."""
        schema = {"version": SCHEMA_VERSION, "columns": list(COLUMNS)}
        if self._schema() != schema:
            with self._transaction():  # the write lock: another sweep may be doing the same
                found = self._schema()
                for column in COLUMNS:
                    if column not in found["columns"]:
                        self.conn.execute(f'ALTER TABLE rows ADD COLUMN "{column}"')
                self.set_meta("schema", schema)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")  # a committed unit survives a power cut, not just kill -9

    def _create_tables(self) -> None:
        columns = ", ".join(f'"{c}"' for c in COLUMNS)
        key = ", ".join(f'"{c}"' for c in _ROW_KEY)
        for statement in (
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE models (model_id TEXT PRIMARY KEY, position INTEGER NOT NULL, record TEXT NOT NULL, "
            "layers TEXT, error TEXT)",
            "CREATE TABLE units (model_id TEXT NOT NULL, reset TEXT NOT NULL, trial INTEGER NOT NULL, "
            "chunk INTEGER NOT NULL, layers TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'pending', error TEXT, "
            "detail TEXT, attempts INTEGER NOT NULL DEFAULT 0, seconds REAL, worker TEXT, batch_size INTEGER, "
            "finished_at TEXT, PRIMARY KEY (model_id, reset, trial, chunk))",
            f"CREATE TABLE rows ({columns}, PRIMARY KEY ({key}))",
        ):
            self.conn.execute(statement)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on error): takes the write lock before reading, so a
        check-then-write cannot race another process."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.conn.in_transaction:  # SQLite rolls back by itself after some errors (a full disk)
                self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------ meta

    def get_meta(self, key: str):
        """The JSON value stored under ``key``, or None."""
        found = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(found[0]) if found else None

    def set_meta(self, key: str, value) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # ------------------------------------------------------------ models and units

    def rename_reset(self, old: str, new: str) -> None:
        """Units of reset ``old`` become units of ``new`` (a config's reset spelled anew, same measurement)."""
        self.conn.execute("UPDATE units SET reset = ? WHERE reset = ?", (new, old))

    def model_layers(self) -> dict[str, list[str] | None]:
        """Each stored model's planned layer names (None when planning it failed)."""
        found = self.conn.execute("SELECT model_id, layers FROM models").fetchall()
        return {model_id: json.loads(layers) if layers else None for model_id, layers in found}

    def set_model(self, model_id: str, position: int, record: dict, layers: Sequence[str] | None,
                  error: str | None = None) -> None:
        """Record a model's place in the sweep, its config record, and its layers (or why they are unknown)."""
        self.conn.execute(
            "INSERT OR REPLACE INTO models (model_id, position, record, layers, error) VALUES (?, ?, ?, ?, ?)",
            (model_id, position, json.dumps(record), json.dumps(list(layers)) if layers is not None else None, error),
        )

    def add_units(self, units: Iterable[Unit]) -> None:
        """Add units as pending; units already in the store keep their state."""
        with self._transaction():
            self.conn.executemany(
                "INSERT OR IGNORE INTO units (model_id, reset, trial, chunk, layers) VALUES (?, ?, ?, ?, ?)",
                [(u.model_id, u.reset, u.trial, u.chunk, json.dumps(list(u.layers))) for u in units],
            )

    def units(self, states: Sequence[str] = UNIT_STATES, models: Sequence[str] | None = None) -> list[Unit]:
        """Units in the given states, in sweep order (model position, then as planned)."""
        found = self.conn.execute(
            "SELECT u.model_id, u.reset, u.trial, u.chunk, u.layers FROM units u JOIN models m USING (model_id) "
            f"WHERE u.status IN ({', '.join('?' * len(states))}) ORDER BY m.position, u.rowid",
            tuple(states),
        ).fetchall()
        wanted = None if models is None else set(models)
        return [Unit(m, r, t, c, tuple(json.loads(layers))) for m, r, t, c, layers in found
                if wanted is None or m in wanted]

    def record_done(self, unit: Unit, rows: pd.DataFrame, *, seconds: float, worker: str, batch_size: int) -> bool:
        """Commit a finished unit and its rows in one transaction; False when the unit was already done."""
        original = rows[rows.layer == "original"]
        reset_rows = rows[rows.layer != "original"]
        columns = ", ".join(f'"{c}"' for c in COLUMNS)
        marks = ", ".join("?" * len(COLUMNS))
        with self._transaction():
            if self._status(unit) == "done":  # another sweep on the same store got there first
                return False
            self.conn.executemany(f"INSERT OR IGNORE INTO rows ({columns}) VALUES ({marks})", _records(original))
            self.conn.executemany(f"INSERT INTO rows ({columns}) VALUES ({marks})", _records(reset_rows))
            self._finish(unit, "done", None, None, seconds, worker, batch_size)
        return True

    def record_failed(self, unit: Unit, error: str, *, detail: str | None = None, seconds: float | None = None,
                      worker: str | None = None) -> None:
        """Mark a unit failed with its one-line error (and the traceback in ``detail``); a rerun retries it."""
        with self._transaction():
            if self._status(unit) != "done":
                self._finish(unit, "failed", error, detail, seconds, worker, None)

    def _status(self, unit: Unit) -> str | None:
        found = self.conn.execute(
            "SELECT status FROM units WHERE model_id = ? AND reset = ? AND trial = ? AND chunk = ?",
            (unit.model_id, unit.reset, unit.trial, unit.chunk),
        ).fetchone()
        return found[0] if found else None

    def _finish(self, unit: Unit, status: str, error, detail, seconds, worker, batch_size) -> None:
        self.conn.execute(
            "UPDATE units SET status = ?, error = ?, detail = ?, seconds = ?, worker = ?, batch_size = ?, "
            "attempts = attempts + 1, finished_at = ? "
            "WHERE model_id = ? AND reset = ? AND trial = ? AND chunk = ?",
            (status, error, detail, seconds, worker, batch_size, time.strftime("%Y-%m-%dT%H:%M:%S"),
             unit.model_id, unit.reset, unit.trial, unit.chunk),
        )

    # ------------------------------------------------------------ reading

    def results(self) -> pd.DataFrame:
        """Every stored row (columns :data:`layercrit.columns.COLUMNS`, then each model's metadata), in sweep
        order: model, reset, layer in network order (the original row first), trial."""
        stored = {name for _, name, *_ in self.conn.execute("PRAGMA table_info(rows)")}
        present = ", ".join(f'"{c}"' for c in COLUMNS if c in stored)
        # a column added after the store was made is NULL in rows of a store no sweep has opened since
        rows = pd.read_sql_query(f"SELECT {present} FROM rows", self.conn).reindex(columns=list(COLUMNS))
        # SQLite stores NaN as NULL: metrics, and columns with no value at all (as a CSV reads them), are floats
        for column in [*METRIC_COLUMNS, *(c for c in COLUMNS if rows[c].isna().all())]:
            rows[column] = pd.to_numeric(rows[column])
        models = self.conn.execute("SELECT model_id, position, record, layers FROM models").fetchall()
        resets = pd.read_sql_query("SELECT model_id, reset, MIN(rowid) AS reset_rank FROM units "
                                   "GROUP BY model_id, reset", self.conn)
        position = {m: p for m, p, _, _ in models}
        metadata = {m: json.loads(record).get("metadata", {}) for m, _, record, _ in models}
        layer_rank = {(m, name): i for m, _, _, layers in models for i, name in enumerate(json.loads(layers or "[]"))}
        rows["_model"] = rows.model_id.map(position)
        rows["_layer"] = [-1 if layer == "original" else layer_rank.get((m, layer), len(layer_rank))
                          for m, layer in zip(rows.model_id, rows.layer, strict=True)]
        rows = rows.merge(resets, on=["model_id", "reset"], how="left")
        rows = rows.sort_values(["_model", "reset_rank", "_layer", "trial"], kind="stable")
        rows = rows.drop(columns=["_model", "_layer", "reset_rank"]).reset_index(drop=True)
        for key in dict.fromkeys(k for values in metadata.values() for k in values):
            if key not in rows.columns:
                rows[key] = rows.model_id.map(lambda m, key=key: metadata.get(m, {}).get(key))
        return rows

    def status(self) -> pd.DataFrame:
        """One row per model: units planned, done, failed, pending, and the latest error (planning or unit)."""
        counts = pd.read_sql_query(
            "SELECT m.model_id, m.error AS plan_error, COUNT(u.model_id) AS units, "
            "COALESCE(SUM(u.status = 'done'), 0) AS done, COALESCE(SUM(u.status = 'failed'), 0) AS failed, "
            "COALESCE(SUM(u.status = 'pending'), 0) AS pending, "
            "(SELECT error FROM units f WHERE f.model_id = m.model_id AND f.status = 'failed' "
            " ORDER BY f.finished_at DESC, f.rowid DESC LIMIT 1) AS unit_error "
            "FROM models m LEFT JOIN units u USING (model_id) GROUP BY m.model_id ORDER BY m.position",
            self.conn,
        )
        counts["error"] = counts.plan_error.where(counts.plan_error.notna(), counts.unit_error).fillna("")
        return counts[["model_id", "units", "done", "failed", "pending", "error"]]


def _records(rows: pd.DataFrame) -> list[tuple]:
    """Rows as tuples of plain Python values (sqlite3 cannot bind numpy integers)."""
    return [tuple(record[c] for c in COLUMNS) for record in rows[list(COLUMNS)].to_dict("records")]


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """Open ``path`` without write access: ``mode=ro`` (it sees a running sweep's commits), or, when that cannot
    open the file, ``immutable=1``: a WAL store on read-only media, where SQLite cannot make its -shm index."""
    uri = path.absolute().as_uri()
    conn = None
    try:
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None, timeout=60.0)
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # SQLite opens the file on first use
        return conn
    except sqlite3.OperationalError as error:
        if conn is not None:
            conn.close()
        if "unable to open" not in str(error):
            raise
    wal = Path(f"{path}-wal")
    if wal.is_file() and wal.stat().st_size:
        log.warning("%s is read-only and its WAL (%s) was not folded in: units finished since the store was last "
                    "closed are not read", path, wal)
    return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None)


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _no_space(error: sqlite3.Error) -> bool:
    return isinstance(error, sqlite3.OperationalError) and any(words in str(error) for words in _NO_SPACE)


def export_frame(path: str | Path) -> pd.DataFrame:
    """The results table of the sweep store at ``path``: the rows of :func:`layercrit.measure` for every finished
    unit plus each model's metadata columns (category, display, ...), in sweep order. Opens it read-only."""
    with Store(path, readonly=True) as store:
        return store.results()


def status_frame(path: str | Path) -> pd.DataFrame:
    """Per model of the sweep store at ``path``: units, done, failed, pending, and the latest error (read-only)."""
    with Store(path, readonly=True) as store:
        return store.status()

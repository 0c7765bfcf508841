"""The sweep store: one SQLite file holding a sweep's config, its models, its work units and their result rows.

A finished unit is committed in one transaction together with its rows, so a process killed at any moment leaves
either the whole unit or none of it, and a rerun computes only the units that are not done. The unmodified
model's row (``layer == "original"``) is the same in every unit of a (model, reset) and is stored once. WAL
journaling lets ``layercrit status`` and ``layercrit export`` read while a sweep writes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import LayercritError
from .measure import COLUMNS
from .metrics import METRIC_COLUMNS

SCHEMA_VERSION = 1
UNIT_STATES = ("pending", "done", "failed")
_ROW_KEY = ("model_id", "reset", "layer", "trial")


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
    """

    def __init__(self, path: str | Path, *, create: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            if not create:
                raise LayercritError(f"no sweep store at {self.path}: create it with 'layercrit sweep CONFIG --store {self.path}'")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=60.0)
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")  # a committed unit survives a power cut, not just kill -9
            self._create_schema()
        except sqlite3.DatabaseError as error:
            self.conn.close()
            raise LayercritError(f"{self.path} is not a layercrit sweep store ({error})") from None
        except LayercritError:
            self.conn.close()
            raise

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Fold the WAL into the main file (so the .sqlite alone is complete) and close."""
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self.conn.close()

    def _create_schema(self) -> None:
        schema = {"version": SCHEMA_VERSION, "columns": list(COLUMNS)}
        exists = self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        if exists:  # readers (status, export) must not take the write lock a running sweep needs
            found = self.get_meta("schema")
            if found != schema:
                version = found.get("version") if isinstance(found, dict) else None
                raise LayercritError(
                    f"{self.path} was written by another layercrit version (schema {version}): "
                    "export it with that version, or start a new store"
                )
            return
        columns = ", ".join(f'"{c}"' for c in COLUMNS)
        key = ", ".join(f'"{c}"' for c in _ROW_KEY)
        with self._transaction():
            for statement in (
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
                "CREATE TABLE IF NOT EXISTS models (model_id TEXT PRIMARY KEY, position INTEGER NOT NULL, record TEXT NOT NULL, "
                "layers TEXT, error TEXT)",
                "CREATE TABLE IF NOT EXISTS units (model_id TEXT NOT NULL, reset TEXT NOT NULL, trial INTEGER NOT NULL, "
                "chunk INTEGER NOT NULL, layers TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'pending', error TEXT, "
                "detail TEXT, attempts INTEGER NOT NULL DEFAULT 0, seconds REAL, worker TEXT, batch_size INTEGER, "
                "finished_at TEXT, PRIMARY KEY (model_id, reset, trial, chunk))",
                f"CREATE TABLE IF NOT EXISTS rows ({columns}, PRIMARY KEY ({key}))",
            ):
                self.conn.execute(statement)
            self.set_meta("schema", schema)

    def _transaction(self):
        return _Transaction(self.conn)

    # ------------------------------------------------------------ meta

    def get_meta(self, key: str):
        """The JSON value stored under ``key``, or None."""
        found = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(found[0]) if found else None

    def set_meta(self, key: str, value) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # ------------------------------------------------------------ models and units

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
        """Every stored row (columns :data:`layercrit.measure.COLUMNS`, then each model's metadata), in sweep
        order: model, reset, layer in network order (the original row first), trial."""
        rows = pd.read_sql_query("SELECT * FROM rows", self.conn)
        for column in METRIC_COLUMNS:  # SQLite stores NaN as NULL: bring it back as a float NaN
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


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on error): takes the write lock before reading, so a
    check-then-write cannot race another process."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _records(rows: pd.DataFrame) -> list[tuple]:
    """Rows as tuples of plain Python values (sqlite3 cannot bind numpy integers)."""
    return [tuple(record[c] for c in COLUMNS) for record in rows[list(COLUMNS)].to_dict("records")]


def export_frame(path: str | Path) -> pd.DataFrame:
    """The results table of the sweep store at ``path``: the rows of :func:`layercrit.measure` for every finished
    unit plus each model's metadata columns (category, display, ...), in sweep order."""
    with Store(path) as store:
        return store.results()


def status_frame(path: str | Path) -> pd.DataFrame:
    """Per model of the sweep store at ``path``: units, done, failed, pending, and the latest error."""
    with Store(path) as store:
        return store.status()

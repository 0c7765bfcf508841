"""Reading and writing results tables (CSV / Parquet), atomically: a killed run never leaves a truncated file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

from .errors import LayercritError


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as CSV or Parquet (by suffix) via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; results are meant to be shared
    try:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif path.suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            raise LayercritError(f"unknown table format {path.suffix!r}: use .csv or .parquet")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_results(df: pd.DataFrame, out_dir: str | Path) -> tuple[Path, Path]:
    """``OUT/results.csv`` and ``OUT/results.parquet``."""
    out_dir = Path(out_dir)
    return write_table(df, out_dir / "results.csv"), write_table(df, out_dir / "results.parquet")


def read_table(path: str | Path) -> pd.DataFrame:
    """A results table from CSV, Parquet, a SQLite store (``.sqlite``/``.db``), or a folder with results.csv/parquet."""
    path = Path(path)
    if path.is_dir():
        for name in ("results.parquet", "results.csv"):
            if (path / name).is_file():
                return read_table(path / name)
        raise LayercritError(f"{path} holds no results.csv or results.parquet")
    if not path.is_file():
        raise LayercritError(f"results not found: {path}")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path)
    if path.suffix in (".sqlite", ".db"):
        from .store import export_frame  # only SQLite users pay for importing the store

        return export_frame(path)
    raise LayercritError(f"cannot read {path}: expected .csv, .parquet, .sqlite or a run folder")

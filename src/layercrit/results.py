"""Reading and writing results tables (CSV / Parquet / JSON records), atomically: a killed run never leaves a truncated file.

An output folder has one writer at a time (:func:`claim_output_folder`), and a run's ``run.json`` says whether the
results beside it are complete: readers warn about a folder that a kill (or a failure) interrupted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pandas as pd

from .errors import LayercritError
from .measurement.estimate import layer_table

log = logging.getLogger(__name__)

LOCK_FILE = ".layercrit.lock"


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as CSV, Parquet or JSON records (by suffix) via a temporary file and an atomic rename."""
    path = Path(path)
    if path.suffix not in (".csv", ".parquet", ".json"):
        raise LayercritError(f"unknown table format {path.suffix!r}: use .csv, .parquet or .json")
    _write_together({path: df})
    return path


def write_results(df: pd.DataFrame, out_dir: str | Path, run: Mapping | None = None) -> tuple[Path, Path]:
    """``OUT/results.csv``, ``OUT/results.parquet`` and ``OUT/results.json`` (a list of records), ``OUT/layers.csv`` (each layer's estimate with its 95%
    interval, :func:`layercrit.measurement.estimate.layer_table`) and ``OUT/run.json`` (``run``: the options that made them).

    All files are written in full beside their targets and only then renamed into place: a failed write (a full
    disk) leaves the previous files as they were, a killed one leaves every file whole (at worst, killed between
    the renames, results.csv one write ahead of the others), and run.json describes the results next to it.
    """
    out_dir = Path(out_dir)
    files: dict[Path, pd.DataFrame | Mapping] = {out_dir / "results.csv": df, out_dir / "results.parquet": df,
                                                  out_dir / "results.json": df, out_dir / "layers.csv": layer_table(df)}
    if run is not None:
        files[out_dir / "run.json"] = run
    _write_together(files)
    return out_dir / "results.csv", out_dir / "results.parquet"


def check_output_folder(folder: str | Path) -> Path:
    """Create ``folder`` and prove that it takes files, so a file in the way or a read-only disk fails before any
    work rather than after it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LayercritError(f"output folder {folder} is an existing file: give a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.unlink(_temporary_file(folder, ".layercrit-probe"))
    except OSError as error:
        raise _write_error(folder, error) from error
    return folder


@contextlib.contextmanager
def claim_output_folder(folder: str | Path) -> Iterator[Path]:
    """:func:`check_output_folder`, then hold the folder for the ``with`` block: one writer per output folder.

    Two runs into one folder would otherwise both succeed, each replacing the other's files, so that the folder
    ends up holding one run's results and the other's logits. The claim is an ``flock`` on ``FOLDER/.layercrit.lock``:
    the OS drops it when its process ends, however it ends, so a ``kill -9`` never leaves a folder locked. The
    file names its holder (pid, host, start, command line) for the error that a second writer gets, and is removed
    when the block ends. On a file system without locks (some network and FUSE mounts) a warning says so and
    the block runs unguarded.
    """
    folder = check_output_folder(folder)
    path = folder / LOCK_FILE
    fd = _lock(path)
    try:
        yield folder
    finally:
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # while still holding it: a writer waiting on this file then sees it gone
            os.close(fd)


def _lock(path: Path) -> int | None:
    """Lock ``path`` (created if missing) for this process and write who holds it; the open descriptor, or None
    where the file system has no locks."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise _write_error(path, error) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LayercritError(f"output folder {path.parent} is in use by {holder}: wait for it to end, or write "
                                 "to another folder") from None
        except OSError as error:
            os.close(fd)
            log.warning("cannot lock the output folder %s (%s): another process writing there at the same time "
                        "would mix its files with this one's", path.parent, error.strerror or error)
            return None
        try:
            current = os.stat(path)
            locked = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file between our open and our lock: lock the one there now
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": shlex.join(sys.argv)}
    with contextlib.suppress(OSError):  # a courtesy to the next writer: a full disk fails the run at its results
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
    return fd


def _holder(fd: int) -> str:
    """Who holds a lock, as its holder wrote it into the lock file."""
    try:
        holder = json.loads(os.pread(fd, 65536, 0))
        command = str(holder["command"])
        command = command if len(command) <= 200 else command[:199] + "…"
        return f"another process (pid {holder['pid']} on {holder['host']}, since {holder['started']}: {command})"
    except (OSError, ValueError, TypeError, KeyError):  # it has just taken the lock and not yet said who it is
        return "another process"


def running_writer(folder: str | Path) -> str | None:
    """The process that holds ``folder`` now (see :func:`claim_output_folder`), described; None when none does."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it (a file left by a killed holder)
    except BlockingIOError:
        return _holder(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def _warn_if_partial(folder: Path, what: str) -> None:
    """Warn when ``folder``'s ``run.json`` says that the run that wrote it has not finished (still running, or
    interrupted); ``what`` names what is being read. A folder without ``run.json``, or whose ``run.json`` has no
    ``complete`` (written by hand, by another tool, by an older layercrit), is read silently."""
    try:
        run = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(run, dict) or run.get("complete") is not False:
        return
    writer = running_writer(folder)
    if writer is not None:
        log.warning("%s in %s are from a run that is still going (%s): they hold what it has finished so far",
                    what, folder, writer)
    else:
        log.warning("%s in %s are from a run that did not finish (killed, or stopped by an error): they hold what it "
                    "finished; run it again to measure the rest", what, folder)


def _write_together(files: Mapping[Path, pd.DataFrame | Mapping]) -> None:
    """Write every file beside its target, then rename them all into place; any OSError is a one-line error."""
    staged: dict[Path, str] = {}
    try:
        for path, content in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            staged[path] = _temporary_file(path.parent, f".{path.name}")
            _WRITERS[path.suffix](content, staged[path])
        for path, tmp in staged.items():
            os.replace(tmp, path)
    except OSError as error:
        raise _write_error(path, error) from error
    finally:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def _temporary_file(folder: Path, prefix: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{prefix}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; results are meant to be shared
    return tmp


def _write_json(content: Mapping | pd.DataFrame, path: str) -> None:
    if isinstance(content, pd.DataFrame):  # one object per row; NaN becomes null
        content.to_json(path, orient="records", indent=1)
    else:
        Path(path).write_text(json.dumps(content, indent=2))


_WRITERS = {
    ".csv": lambda df, path: df.to_csv(path, index=False),
    ".parquet": lambda df, path: df.to_parquet(path, index=False),
    ".json": _write_json,
}


def _write_error(path: Path, error: OSError) -> LayercritError:
    reason = error.strerror or type(error).__name__
    fix = "free some space" if error.errno == errno.ENOSPC else "choose a folder you can write to"
    return LayercritError(f"cannot write {path}: {reason}; {fix} (files written there before are intact)")


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
    if path.stem == "results":
        _warn_if_partial(path.parent, "the results")
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
    elif path.suffix == ".csv":
        try:
            table = pd.read_csv(path)
        except pd.errors.EmptyDataError:  # 0 bytes: not even a header
            table = pd.DataFrame()
    elif path.suffix == ".json":
        table = pd.read_json(path, orient="records")
    elif path.suffix in (".sqlite", ".db"):
        from .sweeps.store import export_frame, status_frame

        table = export_frame(path)
        status = status_frame(path)
        if status.pending.sum() or status.failed.sum():
            log.warning("the sweep store %s holds %d of its %d units (%d pending, %d failed): its results are "
                        "partial; run the sweep again with --store %s to finish it", path, status.done.sum(),
                        status.units.sum(), status.pending.sum(), status.failed.sum(), path)
    else:
        raise LayercritError(f"cannot read {path}: expected .csv, .parquet, .json, .sqlite or a run folder")
    if table.empty:
        raise LayercritError(f"{path} holds no results rows: give the results of a run that finished at least one "
                             "chunk of layers")
    return table

"""The paper's ``--save-logits``: every evaluation's logits, kept compactly on disk and read back with one call.

A logits folder holds ``index.json`` and, per (layer, trial), files that batches are appended to as they are
computed (the fast engine interleaves every unit's batches, so nothing is held in memory): image positions
(int32), logits (float16), and with ``top_k`` only the k largest logits and their classes (int32). The unmodified
model is layer ``"original"``, trial 0. When the measurement ends, the index records each unit's image count and
``"complete": true``: :func:`load_logits` then refuses files that hold other counts (cut short, or changed since),
and warns about a folder whose run did not finish.

    logits = layercrit.load_logits("runs/x/logits")      # {(layer, trial): tensor N×C (float32), ...}
    logits["model.fc", 0].argmax(1)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import LayercritError

log = logging.getLogger(__name__)

FORMAT = "layercrit-logits-v1"


class TopK(NamedTuple):
    """The ``k`` largest logits of each image (float32) and their classes, largest first."""

    values: torch.Tensor
    indices: torch.Tensor


class LogitsWriter:
    """Appends each batch of a unit's logits; call it as ``writer(layer, trial, positions, logits)``, then
    :meth:`finish` it.

    A write that fails (a full disk) is a one-line error; the index is replaced whole or not at all.
    """

    def __init__(self, folder: str | Path, *, top_k: int | None = None):
        if top_k is not None and top_k < 1:
            raise LayercritError(f"save_logits_top_k={top_k}: give at least 1 (or None for all classes)")
        self.folder = Path(folder)
        self.top_k = top_k
        self.units: dict[str, dict] = {}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob("u*.*"):  # a rerun into the same folder starts over
                stale.unlink()
        except OSError as error:
            raise _write_error(self.folder, error) from error
        self._write_index(complete=False)  # before any unit: an earlier run's index never names the new files

    def __call__(self, layer: str | None, trial: int, positions: slice | torch.Tensor, logits: torch.Tensor) -> None:
        layer = "original" if layer is None else layer
        key = f"{layer}\t{trial}"
        if key not in self.units:
            self.units[key] = {"layer": layer, "trial": trial, "file": f"u{len(self.units):05d}",
                               "classes": int(logits.shape[1]), "images": 0}
            self._write_index(complete=False)
        unit = self.units[key]
        stem = self.folder / unit["file"]
        if isinstance(positions, slice):
            positions = torch.arange(positions.start, positions.stop)
        logits = logits.detach().float().cpu()
        if self.top_k is not None:
            logits, classes = logits.topk(min(self.top_k, logits.shape[1]), dim=1)
            _append(stem.with_suffix(".cls"), classes.to(torch.int32).numpy())
        _append(stem.with_suffix(".pos"), positions.to(torch.int32).numpy())
        _append(stem.with_suffix(".val"), logits.to(torch.float16).numpy())
        unit["images"] += len(positions)

    def finish(self) -> None:
        """Record every unit's image count and mark the folder complete (the measurement ended)."""
        self._write_index(complete=True)

    def _write_index(self, *, complete: bool) -> None:
        index = {"format": FORMAT, "top_k": self.top_k, "dtype": "float16", "complete": complete,
                 "units": [unit if complete else {k: v for k, v in unit.items() if k != "images"}
                           for unit in self.units.values()]}
        staged = self.folder / ".index.json.tmp"
        try:
            staged.write_text(json.dumps(index, indent=1))
            os.replace(staged, self.folder / "index.json")
        except OSError as error:
            staged.unlink(missing_ok=True)
            raise _write_error(self.folder / "index.json", error) from error


def _append(path: Path, array: np.ndarray) -> None:
    try:
        with open(path, "ab") as f:
            f.write(np.ascontiguousarray(array).tobytes())
    except OSError as error:
        raise _write_error(path, error) from error


def _write_error(path: Path, error: OSError) -> LayercritError:
    reason = error.strerror or type(error).__name__
    return LayercritError(f"cannot write the logits to {path}: {reason}; free some space, or keep only the top k "
                          "logits (save_logits_top_k) or none")


def load_logits(folder: str | Path) -> dict[tuple[str, int], torch.Tensor | TopK]:
    """Every saved evaluation of a logits folder, keyed by ``(layer, trial)`` (``("original", 0)``: the
    unmodified model), images in the evaluation set's order: a float32 tensor N×C, or :class:`TopK` when the run
    kept only the top k. An image evaluated twice (the sequential design's blocks never overlap; a rerun does
    not append) keeps its last value.

    A folder whose run finished is checked against the image counts its index records: files cut short (all at
    the same image, too) or changed since are an error, never fewer rows. A folder whose run did not finish is
    read as far as it goes, with a warning.
    """
    folder = Path(folder)
    index = _read_index(folder)
    if index.get("complete") is False:
        log.warning("the logits in %s are from a run that did not finish (killed, stopped by an error, or still "
                    "going): each (layer, trial) holds the images evaluated so far", folder)
    top_k = index["top_k"]
    result: dict[tuple[str, int], torch.Tensor | TopK] = {}
    for unit in index["units"]:
        stem = folder / unit["file"]
        width = min(top_k, unit["classes"]) if top_k else unit["classes"]
        positions = _read(stem.with_suffix(".pos"), np.int32, unit, 1)
        values = _read(stem.with_suffix(".val"), np.float16, unit, width)
        if values.size != len(positions) * width:
            raise LayercritError(f"{stem}.val holds {values.size / width:g} images where {stem}.pos has "
                                 f"{len(positions)}: the run was killed while writing; rerun it")
        values = values.reshape(-1, width)
        order = _last_of_each(positions)
        tensor = torch.from_numpy(values[order].astype(np.float32))
        if top_k:
            classes = _read(stem.with_suffix(".cls"), np.int32, unit, width)
            if classes.size != values.size:
                raise LayercritError(f"{stem}.cls holds {classes.size / width:g} images where {stem}.pos has "
                                     f"{len(positions)}: the run was killed while writing; rerun it")
            result[unit["layer"], unit["trial"]] = TopK(tensor, torch.from_numpy(classes.reshape(-1, width)[order]
                                                                                .astype(np.int64)))
        else:
            result[unit["layer"], unit["trial"]] = tensor
    return result


def _read_index(folder: Path) -> dict:
    """``folder/index.json``, checked to be an index this module wrote (any other shape is a one-line error)."""
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError) as error:
        raise LayercritError(f"{folder} is not a logits folder of layercrit (no readable index.json: {error})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise LayercritError(f"{folder}/index.json is not a logits index of layercrit (format {FORMAT})")
    units = index.get("units")
    fields = {"layer": str, "trial": int, "file": str, "classes": int}
    top_k = index.get("top_k")
    well_formed = (
        (top_k is None or _is_count(top_k)) and isinstance(units, list)
        and all(isinstance(unit, dict) and all(isinstance(unit.get(k), t) for k, t in fields.items())
                and _is_count(unit["classes"]) and "/" not in unit["file"] and unit["file"].startswith("u")
                and (not index.get("complete") or _is_count(unit.get("images"), least=0))
                for unit in units)
    )
    if not well_formed:
        raise LayercritError(f"{folder}/index.json is not a logits index of layercrit: it must hold top_k (a count "
                             "or null) and units, each with layer, trial, file and classes; was it edited? rerun "
                             "the measurement")
    return index


def _is_count(value: object, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _read(path: Path, dtype: type, unit: dict, width: int) -> np.ndarray:
    """A unit's file, checked against the image count the index records for a finished run."""
    try:
        array = np.fromfile(path, dtype=dtype)
    except FileNotFoundError:
        raise LayercritError(f"{path} is missing: the logits folder is incomplete; rerun the measurement") from None
    except OSError as error:
        raise LayercritError(f"cannot read {path}: {error.strerror or error}") from None
    expected = unit.get("images")
    if expected is not None and array.size != expected * width:
        raise LayercritError(f"{path} holds {array.size / width:g} images where index.json says {expected}: the "
                             "folder was cut short or changed after the run; rerun it")
    return array


def _last_of_each(positions: np.ndarray) -> np.ndarray:
    """Indices that sort ``positions`` ascending, keeping the last record of a repeated position."""
    reversed_unique = np.unique(positions[::-1], return_index=True)[1]
    return len(positions) - 1 - reversed_unique

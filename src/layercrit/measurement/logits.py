"""The paper's ``--save-logits``: every evaluation's logits, kept compactly on disk and read back with one call.

A logits folder holds ``index.json`` and, per (layer, trial), files that batches are appended to as they are
computed (the fast engine interleaves every unit's batches, so nothing is held in memory): image positions
(int32), logits (float16), and with ``top_k`` only the k largest logits and their classes (int32). The unmodified
model is layer ``"original"``, trial 0.

    logits = layercrit.load_logits("runs/x/logits")      # {(layer, trial): tensor N×C (float32), ...}
    logits["model.fc", 0].argmax(1)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import LayercritError

FORMAT = "layercrit-logits-v1"


class TopK(NamedTuple):
    """The ``k`` largest logits of each image (float32) and their classes, largest first."""

    values: torch.Tensor
    indices: torch.Tensor


class LogitsWriter:
    """Appends each batch of a unit's logits; call it as ``writer(layer, trial, positions, logits)``."""

    def __init__(self, folder: str | Path, *, top_k: int | None = None):
        if top_k is not None and top_k < 1:
            raise LayercritError(f"save_logits_top_k={top_k}: give at least 1 (or None for all classes)")
        self.folder = Path(folder)
        self.top_k = top_k
        self.units: dict[str, dict] = {}
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob("u*.*"):  # a rerun into the same folder starts over
            stale.unlink()

    def __call__(self, layer: str | None, trial: int, positions: slice | torch.Tensor, logits: torch.Tensor) -> None:
        layer = "original" if layer is None else layer
        key = f"{layer}\t{trial}"
        if key not in self.units:
            self.units[key] = {"layer": layer, "trial": trial, "file": f"u{len(self.units):05d}",
                               "classes": int(logits.shape[1])}
            self._write_index()
        stem = self.folder / self.units[key]["file"]
        if isinstance(positions, slice):
            positions = torch.arange(positions.start, positions.stop)
        logits = logits.detach().float().cpu()
        if self.top_k is not None:
            logits, classes = logits.topk(min(self.top_k, logits.shape[1]), dim=1)
            _append(stem.with_suffix(".cls"), classes.to(torch.int32).numpy())
        _append(stem.with_suffix(".pos"), positions.to(torch.int32).numpy())
        _append(stem.with_suffix(".val"), logits.to(torch.float16).numpy())

    def _write_index(self) -> None:
        index = {"format": FORMAT, "top_k": self.top_k, "dtype": "float16", "units": list(self.units.values())}
        staged = self.folder / ".index.json.tmp"
        staged.write_text(json.dumps(index, indent=1))
        os.replace(staged, self.folder / "index.json")


def _append(path: Path, array: np.ndarray) -> None:
    with open(path, "ab") as f:
        f.write(np.ascontiguousarray(array).tobytes())


def load_logits(folder: str | Path) -> dict[tuple[str, int], torch.Tensor | TopK]:
    """Every saved evaluation of a logits folder, keyed by ``(layer, trial)`` (``("original", 0)``: the
    unmodified model), images in the evaluation set's order: a float32 tensor N×C, or :class:`TopK` when the run
    kept only the top k. An image evaluated twice (the sequential design's blocks never overlap; a rerun does
    not append) keeps its last value."""
    folder = Path(folder)
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError) as error:
        raise LayercritError(f"{folder} is not a logits folder of layercrit (no readable index.json: {error})") from None
    if index.get("format") != FORMAT:
        raise LayercritError(f"{folder}/index.json is not in the format {FORMAT}")
    result: dict[tuple[str, int], torch.Tensor | TopK] = {}
    for unit in index["units"]:
        stem = folder / unit["file"]
        positions = np.fromfile(stem.with_suffix(".pos"), dtype=np.int32)
        width = min(index["top_k"], unit["classes"]) if index["top_k"] else unit["classes"]
        values = np.fromfile(stem.with_suffix(".val"), dtype=np.float16)
        if values.size != len(positions) * width:
            raise LayercritError(f"{stem}.val holds {values.size / width:g} images where {stem}.pos has "
                                 f"{len(positions)}: the run was killed while writing; rerun it")
        values = values.reshape(-1, width)
        order = _last_of_each(positions)
        tensor = torch.from_numpy(values[order].astype(np.float32))
        if index["top_k"]:
            classes = np.fromfile(stem.with_suffix(".cls"), dtype=np.int32).reshape(-1, width)
            result[unit["layer"], unit["trial"]] = TopK(tensor, torch.from_numpy(classes[order].astype(np.int64)))
        else:
            result[unit["layer"], unit["trial"]] = tensor
    return result


def _last_of_each(positions: np.ndarray) -> np.ndarray:
    """Indices that sort ``positions`` ascending, keeping the last record of a repeated position."""
    reversed_unique = np.unique(positions[::-1], return_index=True)[1]
    return len(positions) - 1 - reversed_unique

"""Sweep workers: compute one unit at a time, keeping the current model prepared (:class:`SweepWorker`), in a
local process or a Ray actor."""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass, replace

import pandas as pd
import torch

from ..errors import LayercritError
from ..measurement.engine import default_batch_size, keep_freed_memory, out_of_memory
from ..measurement.prepare import Prepared, execute, prepare
from ..models import ResolvedModel
from ..resolve import resolve_model
from .config import ModelEntry, SweepConfig
from .store import Unit

log = logging.getLogger(__name__)


def resolve_entry(entry: ModelEntry, seed: int) -> ResolvedModel:
    """Resolve a model entry with the torch RNG seeded by (seed, id), so a randomly initialised model (or head)
    is the same in every process, and as ``layercrit run --seed SEED --model-id ID`` builds it."""
    return resolve_model(entry.spec, arch=entry.arch, pretrained=entry.pretrained, num_classes=entry.num_classes,
                         trust_checkpoint=entry.trust_checkpoint, seed=seed, model_id=entry.id, dtype=entry.dtype)




@dataclass
class Outcome:
    """What a worker returns for a unit: its rows, or the one-line error (and traceback) it failed with."""

    unit: Unit
    worker: str
    seconds: float
    rows: pd.DataFrame | None = None
    batch_size: int | None = None
    error: str | None = None
    detail: str | None = None


class SweepWorker:
    """Computes units; keeps the current model and evaluation set, so consecutive units of a model reuse them.

    The same class runs in a local process and as a Ray actor. ``run`` never raises: a failure becomes an
    :class:`Outcome` with its error. A model that cannot be loaded, or gives non-finite outputs unmodified,
    fails its later units at once. Out of memory, a unit is retried at half the batch size (down to 1), and the
    model keeps the smaller batch size.
    """

    def __init__(self, config: SweepConfig, name: str, *, device: str | None = None, threads: int | None = None):
        keep_freed_memory()  # a worker process is the sweep's own
        if threads:
            torch.set_num_threads(threads)
        self.config = config
        self.name = name
        self.device = device or config.device
        self._model_id: str | None = None
        self._resolved: ResolvedModel | None = None
        self._prepared: dict[str, Prepared] = {}  # the current model's, by reset
        self._last: Prepared | None = None  # its evaluation set serves the next model decoded the same way
        self._broken: dict[str, str] = {}

    def run(self, unit: Unit) -> Outcome:
        start = time.perf_counter()
        try:
            rows = self._measure(unit)
        except Exception as error:  # noqa: BLE001 - a failed unit is recorded and the sweep goes on
            return Outcome(unit, self.name, time.perf_counter() - start, error=_one_line(error),
                           detail=traceback.format_exc())
        prepared = self._prepared.get(unit.reset)
        size = prepared.memo.get("batch_size", prepared.options.batch_size) if prepared is not None else None
        return Outcome(unit, self.name, time.perf_counter() - start, rows=rows, batch_size=size)

    def _measure(self, unit: Unit) -> pd.DataFrame:
        try:  # out of memory, the engine halves the batch and remembers the size that fits in the model's memo
            prepared = self._prepare(unit)
            if not self.config.sequential:
                prepared = prepared.select(trials=[unit.trial])
            if self.config.chunked:
                prepared = prepared.select(layers=list(unit.layers))
            return execute(prepared, progress=False)
        except Exception as error:
            if isinstance(error, LayercritError):  # the model's own problem, e.g. non-finite outputs unmodified
                self._broken[unit.model_id] = str(error)
            if out_of_memory(error):
                raise LayercritError(f"out of memory even at batch size 1 ({_one_line(error)})") from error
            raise

    def _prepare(self, unit: Unit) -> Prepared:
        """The unit's model and reset prepared: once per model and reset, its evaluation set decoded once for every
        model that takes the same preprocessing."""
        model_id = unit.model_id
        if model_id in self._broken:
            raise LayercritError(self._broken[model_id])
        if model_id != self._model_id:
            self._model_id, self._resolved, self._prepared = None, None, {}  # free the previous model first
            try:
                self._resolved = resolve_entry(self.config.model(model_id), self.config.seed)
            except Exception as error:
                self._broken[model_id] = _one_line(error)
                raise
            self._model_id = model_id
        if unit.reset not in self._prepared:
            experiment = replace(self.config.experiment(unit.reset), device=self.device,
                                 batch_size=self.config.batch_size or default_batch_size(self.device))
            try:
                self._last = self._prepared[unit.reset] = prepare(self._resolved, spec=experiment, model_id=model_id,
                                                                  previous=self._last)
            except Exception as error:
                self._broken[model_id] = _one_line(error)
                raise
        return self._prepared[unit.reset]


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return text if isinstance(error, LayercritError) else f"{type(error).__name__}: {text}".rstrip(": ")


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


"""Sweeps: one YAML config, many models, resumable.

The work is cut into units, (model, reset, trial, chunk of layers); a worker computes a unit with
:func:`layercrit.measure` and the driver commits it, with its rows, to the SQLite store (:mod:`layercrit.sweeps.store`).
A rerun skips finished units, so a sweep killed at any moment loses only the units in flight. Workers are local
processes (``spawn``ed: torch and ``fork`` do not mix) or Ray actors, one per GPU or CPU slot; each keeps its
current model and evaluation set between units of that model. Every process builds the same numbers: random
initialisations are seeded by (seed, model id) and resets by (seed, trial), so the results do not depend on the
backend or the number of workers.

Config (YAML): the keys of :class:`layercrit.spec.Experiment`, which are ``layercrit run``'s options (dashes as
underscores: ``target_ci``, ``bn``, ``groups``, ``exact``, ...), plus ``models`` and ``layers_per_unit``::

    data: fashion-mnist            # or an image folder (ImageNet-val layout); --data overrides
    images: 10000
    seed: 0
    layers: conv,linear            # kinds and/or name globs, as --layers
    reset: [rerandomize, zero, "noise(scale=0.1)"]  # one or a list; NAME(OPTION=VALUE,...) sets a reset's options
    trials: 3
    layers_per_unit: 16            # layers measured together in one unit
    engine: fast                   # and every other option of `layercrit run`
    models:
      - {id: a1, spec: timm:resnet50.a1_in1k, category: supervised, display: A1}
      - {id: mine, spec: ckpt.pth, arch: timm:resnet50, pretrained: true, num_classes: 10}

This module plans the units and drives them (:func:`run_sweep`); the config is read and checked in
:mod:`~layercrit.sweeps.config`, a unit is computed in :mod:`~layercrit.sweeps.worker`, workers run in
:mod:`~layercrit.sweeps.pools`, progress is shown by :mod:`~layercrit.sweeps.progress`, results are kept in
:mod:`~layercrit.sweeps.store`.

A unit is one trial of a chunk of ``layers_per_unit`` layers. Layer groups (``groups``, ``cumulative``) are one chunk;
the sequential design (``target_ci``) decides its trials as it goes, so a model and reset is one unit there: it
gives the rows ``layercrit run`` gives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from ..data import load_data
from ..errors import LayercritError
from ..measurement.layers import select_targets
from ..resolve import runs_code
from ..spec import RESET_SHORTHANDS
from .config import BACKENDS, ModelEntry, SweepConfig, _names, conflict, load_config
from .pools import _LocalPool, _RayPool
from .progress import _Progress
from .store import Store, Unit, export_frame
from .worker import SweepWorker, _one_line, resolve_entry

log = logging.getLogger(__name__)

# The sweep's public names, wherever they are defined in the package.
__all__ = ["ModelEntry", "SweepConfig", "SweepWorker", "check_code", "check_data", "conflict", "export_frame", "load_config",
           "plan_sweep", "plan_units", "resolve_entry", "run_sweep"]


def plan_units(model_id: str, layers: Sequence[str], config: SweepConfig) -> list[Unit]:
    """The units of one model: every reset × trial × chunk of ``layers_per_unit`` consecutive layers (one chunk of
    every target for groups and cumulative targets; one unit per reset for the sequential design, trial 0)."""
    size = config.layers_per_unit if config.chunked else max(len(layers), 1)
    chunks = [tuple(layers[i:i + size]) for i in range(0, len(layers), size)]
    trials = range(1) if config.sequential else range(config.trials)
    return [Unit(model_id, reset, trial, c, chunk)
            for reset in config.reset for trial in trials for c, chunk in enumerate(chunks)]


def check_code(config: SweepConfig, allow_code: bool = False) -> None:
    """Refuse a config that names Python code to run (a ``MODULE:FACTORY`` or ``FILE.py:FACTORY`` spec or arch,
    ``trust_checkpoint: true``) unless ``allow_code``: a config is a file people share, and running its code is
    a choice its user makes, never a side effect of measuring."""
    found = [f"model {m.id!r}: {', '.join(parts)}" for m in config.models if (parts := _code_of(m))]
    if found and not allow_code:
        raise LayercritError(f"the sweep config names code to run ({'; '.join(found)}); a sweep runs code from "
                             "its config only with --allow-code (allow_code=True): give it if you trust that code")


def _code_of(entry: ModelEntry) -> list[str]:
    return runs_code(entry.spec, arch=entry.arch, trust_checkpoint=entry.trust_checkpoint)


# ---------------------------------------------------------------- planning and the driver


def plan_sweep(config: SweepConfig, store: str | Path | None = None, *, allow_code: bool = False) -> pd.DataFrame:
    """A dry run: resolve every model (weights are fetched into their caches if missing) and count its units.

    A dry run imports and unpickles nothing from the config: a model that would run code (see :func:`check_code`,
    which refuses it unless ``allow_code``) is listed without its layers and units (``<NA>``).

    Returns one row per model: ``model_id, spec, layers, units, done, to_run, problem``; ``problem`` says why a
    model cannot be measured (e.g. its weights cannot be downloaded). Writes nothing.
    """
    check_code(config, allow_code)
    check_data(config)
    stored = {}
    if store is not None and Path(store).exists():
        with Store(store, readonly=True) as db:
            if db.get_meta("config"):
                _refuse_conflict(db, config)
            done_units = db.units(("done",))
        for unit in done_units:
            stored[unit.model_id] = stored.get(unit.model_id, 0) + 1
    rows = []
    for entry in config.models:
        done = stored.get(entry.id, 0)
        if _code_of(entry):
            rows.append({"model_id": entry.id, "spec": entry.spec, "layers": pd.NA, "units": pd.NA, "done": done,
                         "to_run": pd.NA, "problem": ""})
            continue
        layers, problem = _layer_names(entry, config)
        units = len(plan_units(entry.id, layers, config)) if layers else 0
        rows.append({"model_id": entry.id, "spec": entry.spec, "layers": len(layers or []), "units": units,
                     "done": done, "to_run": units - done, "problem": problem or ""})
    return pd.DataFrame(rows).astype({"layers": "Int64", "units": "Int64", "to_run": "Int64"})


def run_sweep(
    config: SweepConfig | str | Path,
    store: str | Path,
    *,
    workers: int | None = None,
    backend: str = "local",
    address: str | None = None,
    new_store: bool = False,
    progress: bool = True,
    allow_code: bool = False,
) -> pd.DataFrame:
    """Measure every unit of ``config`` that ``store`` does not hold yet, and return the store's results table.

    Args:
        config: a :class:`SweepConfig` or the path of its YAML file.
        store: the SQLite file; created if missing, resumed if it holds this sweep.
        workers: worker processes / Ray actors (default: one per GPU; else one local process, or one Ray actor
            per CPU).
        backend: ``local`` (processes on this machine) or ``ray``.
        address: a Ray cluster to join (default: start a local Ray).
        new_store: move an existing ``store`` aside (to ``NAME.old-TIME.sqlite``) and start a new one.
        progress: show the overall bar and the per-worker status.
        allow_code: run the Python code the config names (factory specs, trusted pickles): see :func:`check_code`.

    Returns:
        :func:`layercrit.sweeps.store.export_frame` of the store. Failed units are recorded there (``layercrit status``)
        and retried by the next run.
    """
    if not isinstance(config, SweepConfig):
        config = load_config(config)
    check_code(config, allow_code)
    if backend not in BACKENDS:
        raise LayercritError(f"unknown backend {backend!r}: one of {', '.join(BACKENDS)}")
    if address and backend != "ray":
        raise LayercritError("--address is the Ray cluster to join: use it with --backend ray")
    if workers is not None and workers < 1:
        raise LayercritError("--workers must be at least 1")
    check_data(config)
    if new_store:
        _move_aside(Path(store))
    with Store(store, create=True) as db:  # a full disk ends the sweep with a one-line error; finished units stay
        _claim(db, config)
        _plan(config, db)
        units = db.units(("pending", "failed"), models=[m.id for m in config.models])
        if units:
            pool = (_RayPool(config, workers, len(units), address) if backend == "ray"
                    else _LocalPool(config, workers, len(units)))
            try:
                _execute(pool, db, units, progress)
            finally:
                pool.close()
    return export_frame(store)


def check_data(config: SweepConfig) -> None:
    """Fail at once, with the data's own one-line error, when the evaluation data cannot be read."""
    load_data(config.data, images=1, root=config.data_root, use_cache=False)


def _move_aside(path: Path) -> None:
    if path.is_file():
        with Store(path):  # closing folds the WAL in, so the moved file is complete
            pass
        aside = path.with_name(f"{path.stem}.old-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
        path.rename(aside)
        log.warning("moved the old store %s to %s", path, aside)


def _claim(db: Store, config: SweepConfig) -> None:
    """Make ``db`` the store of ``config``, unless it holds results that ``config`` would not be comparable with."""
    if db.get_meta("config"):
        _fold_stored_shorthands(db)
        _refuse_conflict(db, config)
    db.set_meta("config", config.to_dict())


def _fold_stored_shorthands(db: Store) -> None:
    """A store made before resets carried their options (``reset: noise`` with ``scale: 0.1``) names its units
    by the bare reset: name them as the config now does (``noise(scale=0.1)``), so they count as done."""
    raw = db.get_meta("config")
    if not any(raw.get(key) is not None for key in RESET_SHORTHANDS):
        return
    stored = SweepConfig.from_dict(raw, source=str(db.path))
    bare = _names(raw.get("reset", list(SweepConfig.reset)), "reset")
    for old, new in zip(bare, stored.reset, strict=True):
        if old != new:
            db.rename_reset(old, new)
    db.set_meta("config", stored.to_dict())


def _refuse_conflict(db: Store, config: SweepConfig) -> None:
    problem = conflict(SweepConfig.from_dict(db.get_meta("config"), source=str(db.path)), config)
    if problem:
        raise LayercritError(f"{db.path} holds another sweep: {problem}; use another --store, or --new-store to "
                             "move this one aside and start anew")


def _plan(config: SweepConfig, db: Store) -> None:
    """Find each new model's layers (failed models are tried again) and add its units to the store."""
    known = db.model_layers()
    for position, entry in enumerate(config.models):
        layers, problem = known.get(entry.id), None
        if layers is None:
            layers, problem = _layer_names(entry, config)
        record = {k: v for k, v in asdict(entry).items() if k != "id"}
        db.set_model(entry.id, position, record, layers, problem)
        if layers is not None:
            db.add_units(plan_units(entry.id, layers, config))
        else:
            log.warning("model %s cannot be measured: %s", entry.id, problem)


def _layer_names(entry: ModelEntry, config: SweepConfig) -> tuple[list[str] | None, str | None]:
    try:
        resolved = resolve_entry(entry, config.seed)
        targets = select_targets(resolved.model, config.layers, groups=config.groups, cumulative=config.cumulative)
        return [target.name for target in targets], None
    except Exception as error:  # noqa: BLE001 - any model that cannot be built is reported, and the sweep goes on
        return None, _one_line(error)


def _execute(pool, db: Store, units: list[Unit], show: bool) -> None:
    """Hand out units, preferring the model a worker already holds, and commit each outcome as it arrives."""
    pending = list(units)
    holding: list[str | None] = [None] * pool.size
    busy: dict[int, Unit] = {}
    bars = _Progress(show, len(units), pool.size)

    def assign(i: int) -> None:
        if pending:
            j = next((k for k, u in enumerate(pending) if u.model_id == holding[i]), 0)
            unit = busy[i] = pending.pop(j)
            holding[i] = unit.model_id
            pool.submit(i, unit)
            bars.started(i, unit)

    try:
        for i in range(pool.size):
            assign(i)
        while busy:
            i, outcome = pool.next_result()
            del busy[i]
            if outcome.error is None:
                db.record_done(outcome.unit, outcome.rows, seconds=outcome.seconds, worker=outcome.worker,
                               batch_size=outcome.batch_size)
            else:
                db.record_failed(outcome.unit, outcome.error, detail=outcome.detail, seconds=outcome.seconds,
                                 worker=outcome.worker)
            bars.finished(i, outcome)
            assign(i)
    finally:
        bars.close()


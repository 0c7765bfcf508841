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

A unit is one trial of a chunk of ``layers_per_unit`` layers. Layer groups (``groups``, ``cumulative``) are one chunk;
the sequential design (``target_ci``) decides its trials as it goes, so a model and reset is one unit there: it
gives the rows ``layercrit run`` gives.
"""

from __future__ import annotations

import difflib
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import sys
import threading
import time
import traceback
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import pandas as pd
import torch

from ..columns import COLUMNS
from ..data import load_data
from ..errors import LayercritError
from ..measurement.engine import default_batch_size, keep_freed_memory, out_of_memory
from ..measurement.layers import select_targets
from ..measurement.prepare import Prepared, execute, prepare
from ..measurement.resets import RESETS, declared_options, get_reset
from ..measurement.sequential import SequentialDesign
from ..models import ResolvedModel, resolve_model
from ..spec import FIELDS, MEASURED, RESET_SHORTHANDS, Experiment, parse_bn, split_reset, with_shorthands
from .store import Store, Unit, export_frame

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")
# what changes the numbers; resets and (fixed design) trials may grow, checked on their own
MEASURED_SETTINGS = (*(name for name in MEASURED if name not in ("reset", "trials")), "layers_per_unit")
MEASURED_MODEL_KEYS = ("spec", "arch", "pretrained", "num_classes")
# Sizes as JSON, YAML aliases expanded (as the store writes them): a config is a page of YAML, a metadata value a
# name, a number or a note. The bounds stop a few lines of nested aliases from expanding to gigabytes.
MAX_CONFIG_BYTES = 1_000_000
MAX_METADATA_BYTES = 64_000


# ---------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelEntry:
    """A model of the sweep: ``spec``/``arch``/``pretrained``/``num_classes`` as for ``layercrit run``, and free
    metadata (category, display name, reported accuracy, ...) that goes into the exported table."""

    id: str
    spec: str
    arch: str | None = None
    pretrained: bool = True
    num_classes: int | None = None
    trust_checkpoint: bool = False
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SweepConfig(Experiment):
    """A parsed, validated sweep config (see the module docstring): an :class:`Experiment` whose ``reset`` may list
    several methods, the models, and how many layers one unit measures."""

    data: str = ""  # required in a sweep
    reset: tuple[str, ...] = ("rerandomize",)
    models: tuple[ModelEntry, ...] = ()
    layers_per_unit: int = 16

    def experiment(self, reset: str) -> Experiment:
        """The experiment of one of the sweep's resets."""
        return Experiment(**{**{name: getattr(self, name) for name in FIELDS}, "reset": reset})

    @property
    def chunked(self) -> bool:
        """Units split the layers into chunks and trials (not for groups, cumulative targets or target_ci)."""
        return not (self.groups or self.cumulative or self.sequential)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "the sweep config") -> SweepConfig:
        """Validate a config mapping; every mistake is a one-line :class:`LayercritError` naming ``source``."""
        if not isinstance(raw, dict):
            raise LayercritError(f"{source} must be a YAML mapping with data, models, ... at the top level")
        if _json_size(raw, MAX_CONFIG_BYTES, source) > MAX_CONFIG_BYTES:
            raise LayercritError(f"{source} is over {MAX_CONFIG_BYTES // 1_000_000} MB once its YAML aliases are "
                                 "expanded: a sweep config lists settings and models, keep it small")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(known) - set(RESET_SHORTHANDS))
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise LayercritError(f"{source}: unknown key(s) {', '.join(unknown)}{hint}; the keys are layercrit run's "
                                 "options (dashes as underscores), models and layers_per_unit")
        if raw.get("data") is None or raw.get("data") == "":
            raise LayercritError(f"{source} has no data: add 'data: /path/to/imagenet/val' (or fashion-mnist), or pass --data")
        values = {key: raw[key] for key in known if key in raw}
        values["models"] = _model_entries(raw.get("models"), source)
        values["reset"] = _resets(raw, _names(raw.get("reset", list(cls.reset)), f"{source}: reset"), source)
        values["layers"] = ",".join(_names(raw.get("layers", cls.layers), f"{source}: layers"))
        if isinstance(values.get("bn"), list):  # run's --bn recalibrate 8 as a list
            values["bn"] = " ".join(str(v) for v in values["bn"])
        for name, hint in _CONFIG_TYPES.items():
            if name in values:
                _check_type(values[name], hint, f"{source}: {name}")
        try:
            config = cls(**values)  # an Experiment checks its own fields
        except LayercritError as error:
            raise LayercritError(f"{source}: {error}") from None
        config._validate(source)
        return config

    def _validate(self, source: str) -> None:
        if self.layers_per_unit < 1:
            raise LayercritError(f"{source}: layers_per_unit={self.layers_per_unit}: give at least 1")
        bad = [r for r in self.reset if split_reset(r)[0] not in RESETS]
        if bad or not self.reset:
            raise LayercritError(f"{source}: unknown reset {', '.join(map(repr, bad)) or '(none)'}; use one or a list of {', '.join(RESETS)}")
        bn, bn_batches = parse_bn(self.bn)
        for name in self.reset:
            try:
                get_reset(name, bn=bn, bn_batches=bn_batches)
            except LayercritError as error:  # a reset missing its options (reinit without checkpoint, ...)
                raise LayercritError(f"{source}: {error}") from None
        if self.save_logits:
            raise LayercritError(f"{source}: save_logits: a sweep does not keep logits yet; measure the models whose "
                                 "logits you need with 'layercrit run --save-logits'")
        for name in ("log_batches", "per_class"):  # the store keeps the rows' fixed columns only
            if getattr(self, name):
                raise LayercritError(f"{source}: {name}: a sweep does not keep it yet; use 'layercrit run "
                                     f"--{name.replace('_', '-')}'")
        if self.sequential:
            SequentialDesign(self.target_ci, min_trials=self.trials, max_trials=self.max_trials,
                             images_per_trial=self.images_per_trial)

    def to_dict(self) -> dict:
        """Plain data (for the store), readable back with :meth:`from_dict`."""
        values = asdict(self)
        values["reset"] = list(self.reset)
        values["models"] = [{**{k: v for k, v in asdict(m).items() if k != "metadata"}, **m.metadata} for m in self.models]
        return values

    def model(self, model_id: str) -> ModelEntry:
        return next(m for m in self.models if m.id == model_id)


def _model_entries(raw, source: str) -> tuple[ModelEntry, ...]:
    if not isinstance(raw, list) or not raw:
        raise LayercritError(f"{source} has no models: add 'models:' with a list of {{id: NAME, spec: MODEL_SPEC}}")
    entries, seen = [], set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or "id" not in item or "spec" not in item:
            raise LayercritError(f"{source}: model #{i + 1} needs an id and a spec, e.g. {{id: r50, spec: torchvision:resnet50}}")
        _check_type(item["id"], str, f"{source}: model #{i + 1}: id")
        model_id = item["id"]
        if model_id in seen:
            raise LayercritError(f"{source}: model id {model_id!r} appears twice; ids must be unique")
        seen.add(model_id)
        where = f"{source}: model {model_id!r}"
        for key, hint in _MODEL_TYPES.items():
            if key in item:
                _check_type(item[key], hint, f"{where}: {key}")
        if item.get("num_classes") is not None and item["num_classes"] < 1:
            raise LayercritError(f"{where}: num_classes must be at least 1")
        metadata = {k: v for k, v in item.items() if k not in _MODEL_TYPES}
        clash = sorted(set(metadata) & set(COLUMNS))
        if clash:
            raise LayercritError(f"{where} uses result column name(s) {', '.join(clash)} as metadata; rename them")
        for key, value in metadata.items():
            if _json_size(value, MAX_METADATA_BYTES, f"{where}: {key}") > MAX_METADATA_BYTES:
                raise LayercritError(f"{where}: metadata {key!r} is over {MAX_METADATA_BYTES // 1000} kB once its "
                                     "YAML aliases are expanded: keep metadata to names, numbers and short notes")
        entries.append(ModelEntry(metadata=metadata, **{k: item[k] for k in _MODEL_TYPES if k in item}))
    return tuple(entries)


_TYPE_NAMES = {bool: "true or false", int: "int", float: "a number", str: "a string", type(None): "null"}
_MODEL_TYPES = {name: hint for name, hint in typing.get_type_hints(ModelEntry).items() if name != "metadata"}
_CONFIG_TYPES = {name: hint for name, hint in typing.get_type_hints(SweepConfig).items()
                 if name not in ("models", "reset", "save_logits", "per_class")}  # checked on their own


def _check_type(value, hint, where: str) -> None:
    """Refuse ``value`` unless it has a type of ``hint`` (``int``, ``str | None``, ...) as YAML gives it: a bool
    is not an int, and ``"false"`` (quoted) is not a bool."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if any(_is_kind(value, kind) for kind in kinds):
        return
    quoted = "; write it without quotes" if bool in kinds and isinstance(value, str) else ""
    names = [_TYPE_NAMES.get(k, "a list of numbers") for k in kinds]
    raise LayercritError(f"{where} must be {' or '.join(names)}, not {_short(value)}{quoted}")


def _is_kind(value, kind: type) -> bool:
    if typing.get_origin(kind) is tuple:  # tuple[float, ...]: a YAML list of them
        return isinstance(value, list | tuple) and all(_is_kind(v, typing.get_args(kind)[0]) for v in value)
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def _resets(raw: dict, names: list[str], source: str) -> tuple[str, ...]:
    """The config's resets with the shorthand keys (``scale: 0.1``, ...) folded into those that take them."""
    given = {key: raw[key] for key in RESET_SHORTHANDS if raw.get(key) is not None}
    for key, value in given.items():
        if key == "alpha" and isinstance(value, list):
            for item in value:
                _check_type(item, float, f"{source}: alpha")
        else:
            _check_type(value, {"scale": float, "alpha": float | str}.get(key, str), f"{source}: {key}")
    try:
        kinds = [split_reset(text)[0] for text in names]
    except LayercritError as error:
        raise LayercritError(f"{source}: {error}") from None
    takes = [tuple(declared_options(kind)) if kind in RESETS else () for kind in kinds]
    unused = [key for key in given if not any(key in options for options in takes)]
    if unused and all(kind in RESETS for kind in kinds):  # an unknown reset is reported on its own, later
        raise LayercritError(f"{source}: {unused[0]}: none of the resets ({', '.join(names)}) takes it")
    return tuple(with_shorthands(text, given, options) for text, options in zip(names, takes, strict=True))


def _names(value, where: str) -> list[str]:
    """A name or a non-empty list of names (``reset``, ``layers``)."""
    names = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(name, str) for name in names):
        raise LayercritError(f"{where} must be a name or a list of names, not {_short(value)}")
    return names


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _json_size(value, budget: int, where: str) -> int:
    """About the length of ``value`` as JSON, counted while walking it and given up once over ``budget``.

    A YAML alias is counted each time it is used, as the store will write it, yet the walk takes at most about
    ``budget`` steps however far the aliases would expand (the "billion laughs"), and never builds the text.
    Values JSON cannot hold (dates, sets, binary, keys that are not strings) are refused, naming where they are.
    """
    size, stack = 0, [(value, "")]
    while stack and size <= budget:
        item, at = stack.pop()
        if isinstance(item, dict):
            size += 2 + 4 * len(item)
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise LayercritError(f"{where}: key {_short(key)}{' in ' + at if at else ''} is not a string; "
                                         "quote it")
                size += len(key)
                stack.append((sub, f"{at}.{key}" if at else key))
        elif isinstance(item, list):
            size += 2 + 2 * len(item)
            stack.extend((sub, f"{at}[{i}]") for i, sub in enumerate(item))
        elif isinstance(item, str):
            size += len(item) + 2
        elif item is None or isinstance(item, (bool, int, float)):
            size += len(str(item))
        else:
            raise LayercritError(f"{where}: {at or 'the value'} is a {type(item).__name__}, which a sweep store "
                                 "cannot hold; quote it to keep it as text")
    return size


def load_config(path: str | Path, **overrides) -> SweepConfig:
    """Read a sweep config from YAML; ``overrides`` that are not None replace its keys (e.g. ``data=``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LayercritError(f"sweep config not found: {path}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise LayercritError(f"{path} is over {MAX_CONFIG_BYTES // 1_000_000} MB: a sweep config lists settings "
                             "and models, keep it small")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise LayercritError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                             f"{error.start}): save it as UTF-8") from None
    except OSError as error:
        raise LayercritError(f"cannot read {path}: {error.strerror}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as error:  # ValueError: an int of >4300 digits
        raise LayercritError(f"cannot parse {path}: {' '.join(str(error).split()) or 'nested too deeply'}") from None
    if isinstance(raw, dict):
        raw = {**raw, **{key: value for key, value in overrides.items() if value is not None}}
    return SweepConfig.from_dict(raw, source=str(path))


def conflict(stored: SweepConfig, config: SweepConfig) -> str | None:
    """Why results made with ``stored`` cannot share a store with ``config`` (None when they can).

    Models, resets and trials may be added; the measured settings and every stored model's spec must match.
    """
    for name in MEASURED_SETTINGS:
        if getattr(stored, name) != getattr(config, name):
            return f"the store was made with {name}={getattr(stored, name)!r}, the config has {getattr(config, name)!r}"
    ids = {m.id: m for m in config.models}
    for old in stored.models:
        new = ids.get(old.id)
        if new is None:
            return f"the store has model {old.id!r}, which the config lacks (models may be added, not removed)"
        for name in MEASURED_MODEL_KEYS:
            if getattr(old, name) != getattr(new, name):
                return f"model {old.id!r} had {name}={getattr(old, name)!r}, the config has {getattr(new, name)!r}"
    missing = [r for r in stored.reset if r not in config.reset]
    if missing:
        return f"the store has reset {missing[0]!r}, which the config lacks (resets may be added, not removed)"
    if config.trials < stored.trials or (config.sequential and config.trials != stored.trials):
        grow = "the sequential design's pilot must stay" if config.sequential else "trials may grow, not shrink"
        return f"the store has {stored.trials} trials, the config {config.trials} ({grow})"
    return None


def plan_units(model_id: str, layers: Sequence[str], config: SweepConfig) -> list[Unit]:
    """The units of one model: every reset × trial × chunk of ``layers_per_unit`` consecutive layers (one chunk of
    every target for groups and cumulative targets; one unit per reset for the sequential design, trial 0)."""
    size = config.layers_per_unit if config.chunked else max(len(layers), 1)
    chunks = [tuple(layers[i:i + size]) for i in range(0, len(layers), size)]
    trials = range(1) if config.sequential else range(config.trials)
    return [Unit(model_id, reset, trial, c, chunk)
            for reset in config.reset for trial in trials for c, chunk in enumerate(chunks)]


def resolve_entry(entry: ModelEntry, seed: int) -> ResolvedModel:
    """Resolve a model entry with the torch RNG seeded by (seed, id), so a randomly initialised model (or head)
    is the same in every process, and as ``layercrit run --seed SEED --model-id ID`` builds it."""
    return resolve_model(entry.spec, arch=entry.arch, pretrained=entry.pretrained, num_classes=entry.num_classes,
                         trust_checkpoint=entry.trust_checkpoint, seed=seed, model_id=entry.id)


# ---------------------------------------------------------------- planning and the driver


def plan_sweep(config: SweepConfig, store: str | Path | None = None) -> pd.DataFrame:
    """A dry run: resolve every model (weights are fetched into their caches if missing) and count its units.

    Returns one row per model: ``model_id, spec, layers, units, done, to_run, problem``; ``problem`` says why a
    model cannot be measured (e.g. its weights cannot be downloaded). Writes nothing.
    """
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
        layers, problem = _layer_names(entry, config)
        units = len(plan_units(entry.id, layers, config)) if layers else 0
        done = stored.get(entry.id, 0)
        rows.append({"model_id": entry.id, "spec": entry.spec, "layers": len(layers or []), "units": units,
                     "done": done, "to_run": units - done, "problem": problem or ""})
    return pd.DataFrame(rows)


def run_sweep(
    config: SweepConfig | str | Path,
    store: str | Path,
    *,
    workers: int | None = None,
    backend: str = "local",
    address: str | None = None,
    new_store: bool = False,
    progress: bool = True,
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

    Returns:
        :func:`layercrit.sweeps.store.export_frame` of the store. Failed units are recorded there (``layercrit status``)
        and retried by the next run.
    """
    if not isinstance(config, SweepConfig):
        config = load_config(config)
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


# ---------------------------------------------------------------- workers


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
        prepared = self._prepare(unit)
        if not self.config.sequential:
            prepared = prepared.select(trials=[unit.trial])
        if self.config.chunked:
            prepared = prepared.select(layers=list(unit.layers))
        try:  # out of memory, the engine halves the batch and remembers the size that fits in the model's memo
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


# ---------------------------------------------------------------- local processes


class _LocalPool:
    """``workers`` spawned processes (default: one per GPU, else one), each with its own task queue."""

    def __init__(self, config: SweepConfig, workers: int | None, units: int):
        gpus = torch.cuda.device_count() if config.device is None else 0
        self.size = min(workers or max(gpus, 1), units)
        self._devices = [f"cuda:{i % gpus}" if gpus else None for i in range(self.size)]
        self._threads = max(1, _cpu_count() // self.size)  # the cores split among the workers
        self._config = config
        self._context = multiprocessing.get_context("spawn")
        self._results = self._context.Queue()
        self._tasks: list = [None] * self.size
        self._processes: list = [None] * self.size
        self._inflight: dict[int, Unit] = {}
        for i in range(self.size):
            self._start(i)

    def _start(self, i: int) -> None:
        self._tasks[i] = self._context.Queue()
        self._processes[i] = self._context.Process(
            target=_local_worker, name=f"layercrit-worker-{i}", daemon=True,
            args=(i, self._config, self._devices[i], self._threads, self._tasks[i], self._results),
        )
        self._processes[i].start()

    def submit(self, i: int, unit: Unit) -> None:
        self._inflight[i] = unit
        self._tasks[i].put(unit)

    def next_result(self) -> tuple[int, Outcome]:
        while True:
            try:
                i, outcome = self._results.get(timeout=1.0)
                del self._inflight[i]
                return i, outcome
            except queue.Empty:
                for i, unit in list(self._inflight.items()):
                    process = self._processes[i]
                    if not process.is_alive():
                        del self._inflight[i]
                        self._start(i)
                        return i, Outcome(unit, f"local-{i}", 0.0,
                                          error=f"worker process died (exit code {process.exitcode})")

    def close(self) -> None:
        for i, process in enumerate(self._processes):
            if process.is_alive() and i not in self._inflight:
                self._tasks[i].put(None)
        for process in self._processes:
            process.join(timeout=10 if not self._inflight else 0)
            if process.is_alive():
                process.kill()  # interrupted mid-unit: the unit is not committed and the next run redoes it


def _local_worker(index: int, config: SweepConfig, device: str | None, threads: int, tasks, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the driver, which stops the workers
    parent = multiprocessing.parent_process()

    def exit_with_parent() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)  # the driver was killed: its unit is lost anyway, stop computing

    threading.Thread(target=exit_with_parent, daemon=True).start()
    worker = SweepWorker(config, f"local-{index}", device=device, threads=threads)
    while (unit := tasks.get()) is not None:
        results.put((index, worker.run(unit)))


# ---------------------------------------------------------------- Ray


class _RayPool:
    """Ray actors running :class:`SweepWorker`: one per GPU of the cluster, else one per CPU (or ``workers``).

    A dead actor (node lost) is restarted by Ray and its unit retried; past that, the unit is recorded as failed
    and a new actor takes the slot.
    """

    def __init__(self, config: SweepConfig, workers: int | None, units: int, address: str | None):
        try:
            import ray
        except ImportError:
            raise LayercritError("--backend ray needs Ray: pip install 'layercrit[ray]'") from None
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            try:
                ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
            except ConnectionError as error:
                raise LayercritError(f"cannot join the Ray cluster at {address}: {_one_line(error)}") from None
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
        self.size = min(workers or gpus or max(int(cpus), 1), units)
        if gpus and config.device in (None, "cuda"):
            self._options = {"num_gpus": 1, "num_cpus": min(1.0, cpus / self.size)}
            self._threads = None
        else:
            self._options = {"num_cpus": cpus / self.size}
            self._threads = max(1, int(cpus // self.size))
        self._config = config
        self._actor_class = ray.remote(SweepWorker)
        self._actors = [self._new_actor(i) for i in range(self.size)]
        self._futures: dict = {}

    def _new_actor(self, i: int):
        return self._actor_class.options(max_restarts=2, max_task_retries=2, **self._options).remote(
            self._config, f"ray-{i}", threads=self._threads)

    def submit(self, i: int, unit: Unit) -> None:
        self._futures[self._actors[i].run.remote(unit)] = (i, unit)

    def next_result(self) -> tuple[int, Outcome]:
        ray = self._ray
        (ref,), _ = ray.wait(list(self._futures), num_returns=1)
        i, unit = self._futures.pop(ref)
        try:
            return i, ray.get(ref)
        except ray.exceptions.RayError as error:
            self._actors[i] = self._new_actor(i)
            return i, Outcome(unit, f"ray-{i}", 0.0, error=f"Ray worker lost: {_one_line(error)}")

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        if self._owns_ray:
            self._ray.shutdown()


# ---------------------------------------------------------------- progress


class _Progress:
    """An overall bar over units (with ETA) and, on a terminal, one status line per worker."""

    def __init__(self, enabled: bool, total: int, workers: int):
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.failed = 0
        self.bar = tqdm(total=total, desc="sweep", unit="unit", disable=not enabled, dynamic_ncols=True)
        lines = enabled and sys.stderr.isatty()
        self.lines = [tqdm(total=0, position=i + 1, bar_format="{desc}", disable=not lines, leave=False)
                      for i in range(workers)]

    def started(self, i: int, unit: Unit) -> None:
        self.lines[i].set_description_str(f"  worker {i}: {unit.describe()}")

    def finished(self, i: int, outcome: Outcome) -> None:
        self.bar.update(1)
        self.lines[i].set_description_str(f"  worker {i}: idle")
        if outcome.error is not None:
            self.failed += 1
            self.bar.set_postfix(failed=self.failed)
            if self.enabled:
                self.bar.write(f"failed: {outcome.unit.describe()}: {outcome.error}")

    def close(self) -> None:
        for line in self.lines:
            line.close()
        self.bar.close()


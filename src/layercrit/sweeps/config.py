"""Sweep configs: the YAML file read and checked (every mistake a one-line error naming where it is), its models,
and whether a store made with one config may hold another's results (:func:`conflict`)."""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..columns import COLUMNS
from ..config_files import error_text, load_yaml
from ..errors import LayercritError
from ..measurement.resets import RESETS, declared_options, get_reset
from ..measurement.sequential import SequentialDesign
from ..spec import (
    FIELDS,
    MEASURED,
    RESET_SHORTHANDS,
    Experiment,
    check_needs,
    parse_bn,
    split_reset,
    with_shorthands,
)

BACKENDS = ("local", "ray")
# what changes the numbers; resets and (fixed design) trials may grow, checked on their own
MEASURED_SETTINGS = (*(name for name in MEASURED if name not in ("reset", "trials")), "layers_per_unit")
MEASURED_MODEL_KEYS = ("spec", "arch", "pretrained", "num_classes")
# Sizes as JSON, YAML aliases expanded (as the store writes them): a config is a page of YAML, a metadata value a
# name, a number or a note. The bounds stop a few lines of nested aliases from expanding to gigabytes.
MAX_CONFIG_BYTES = 1_000_000
MAX_METADATA_BYTES = 64_000




@dataclass(frozen=True)
class ModelEntry:
    """A model of the sweep: ``spec``/``arch``/``pretrained``/``num_classes``/``dtype`` as for ``layercrit run``, and free
    metadata (category, display name, reported accuracy, ...) that goes into the exported table."""

    id: str
    spec: str
    arch: str | None = None
    pretrained: bool = True
    num_classes: int | None = None
    trust_checkpoint: bool = False
    dtype: str = "float32"  # an hf: model's weights
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
            design = SequentialDesign(self.target_ci, min_trials=self.trials, max_trials=self.max_trials,
                                      images_per_trial=self.images_per_trial)
            if self.images is not None:
                try:
                    design.check_pool(self.images)
                except LayercritError as error:
                    raise LayercritError(f"{source}: {error}") from None

    def to_dict(self) -> dict:
        """Plain data (for the store), readable back with :meth:`from_dict`."""
        values = super().to_dict()
        values["reset"] = list(self.reset)
        values["layers_per_unit"] = self.layers_per_unit
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
        if not model_id.strip():
            raise LayercritError(f"{source}: model #{i + 1} has an empty id: give it a name (its rows' model_id)")
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
    try:
        return tuple(with_shorthands(text, given, options) for text, options in zip(names, takes, strict=True))
    except LayercritError as error:
        raise LayercritError(f"{source}: {error}") from None


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
        raw = load_yaml(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise LayercritError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                             f"{error.start}): save it as UTF-8") from None
    except OSError as error:
        raise LayercritError(f"cannot read {path}: {error.strerror}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as error:  # ValueError: an int of >4300 digits
        where = error_text(error)
        raise LayercritError(f"cannot parse {path}: {where or 'nested too deeply'}") from None
    if isinstance(raw, dict):
        raw = {**raw, **{key: value for key, value in overrides.items() if value is not None}}
        try:
            check_needs(raw)  # on the keys written (a stored config has every key, defaults included)
        except LayercritError as error:
            raise LayercritError(f"{path}: {error}") from None
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

"""The experiment: everything about a measurement except the model, as one plain, serializable value.

``layercrit run`` builds an :class:`Experiment` from its flags, a sweep config holds the same fields as YAML keys
(every ``run`` option is a sweep key of the same name, dashes as underscores; a test checks both ways),
:func:`layercrit.measure`'s keywords build one, and :func:`layercrit.measurement.prepare.prepare` reads it (a test
checks that every field changes what it prepares). Stores and run folders keep it with the rows it produced
(``run.json``, the sweep store's config), and :data:`MEASURED` names the fields that change the numbers, which a
store refuses to mix; :meth:`Experiment.spec_id` fingerprints them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields

from .errors import LayercritError

ENGINES = ("fast", "naive")
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_LAYERS = "conv,linear"  # the kinds of these the model has (an MLP: its linear layers)


@dataclass(frozen=True)
class Experiment:
    """A measurement's options; the defaults are the paper's design (see the README's option table).

    The one carrier of a measurement's options: ``layercrit run``'s flags, a sweep config's keys and
    :func:`layercrit.measure`'s keywords all build one, and :func:`layercrit.measurement.prepare.prepare` reads
    every field. It validates itself when built (a one-line :class:`LayercritError` naming the field). In a
    notebook, ``layers`` may also be a list of module names and targets, ``reset`` a Reset object, ``trials`` the
    trial numbers to run and ``task`` a Task object.
    """

    # data
    data: str | None = None
    data_root: str | None = None
    images: int | None = 10_000  # images, or windows of text
    seq_len: int | None = None  # text: tokens per window (None: the model's context, at most 128)
    text_field: str = "text"  # text: the JSON key / dataset column holding the text
    cache_dir: str | None = None
    use_cache: bool = True
    skip_bad_images: bool = False
    resize: int | None = None
    crop: int | None = None
    interpolation: str | None = None
    # the model's input: normalised with the model's own mean/std, these, or not at all (images already normalised)
    normalize: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # what is measured: the task says what a batch is and which outputs are compared (layercrit.measurement.tasks)
    task: str = "image-classification"
    # what is reset, how, how often
    layers: str = DEFAULT_LAYERS
    groups: str | None = None
    cumulative: str | None = None
    reset: str = "rerandomize"  # NAME or NAME(OPTION=VALUE,...), e.g. "noise(scale=0.1)": see split_reset
    bn: str = "keep"  # keep | reset | recalibrate K
    trials: int = 3
    seed: int = 0
    data_seed: int = -1  # the image subset's own seed; -1: seed, as the paper
    target_ci: float | None = None  # the sequential design
    max_trials: int = 100
    images_per_trial: int | None = None
    mirror: bool = True  # the sequential design: mirrored pairs of draws where the pilot shows they pay
    # engine
    engine: str = "fast"
    precision: str = "fp32"
    batch_size: int | None = None
    device: str | None = None
    max_cache_mb: float = 4096.0
    compile: bool = False
    exact: bool = False  # channels_last and fold_bn off: the fast engine equals the naive one bit for bit
    channels_last: bool | None = None  # None: on for the fast engine, off for the naive one
    fold_bn: bool | None = None  # None: on for the fast engine without compile, off for the naive one
    image_target_ci: float | None = None
    # outputs
    save_logits: str | None = None  # a folder for every evaluation's logits (layercrit.load_logits)
    save_logits_top_k: int | None = None
    log_to: str | None = None  # wandb | mlflow | tensorboard[:DIR] (layercrit.trackers); a sweep logs when it ends
    log_batches: bool = False  # a batch_acc column: each batch's top-1 (the paper's CSV); run only
    per_class: str | None = None  # a CSV of each class's accuracy and agreement per (layer, trial); run only

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        for name in ("layers", "trials"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Refuse options that would silently mean something else or fail deep inside a run."""
        if self.images is not None and self.images < 1:
            raise LayercritError(f"images={self.images}: give a number of images of at least 1 (None for all of them)")
        if self.batch_size is not None and self.batch_size < 1:
            raise LayercritError(f"batch_size={self.batch_size}: give at least 1 image per forward")
        if self.max_cache_mb < 0:
            raise LayercritError(f"max_cache_mb={self.max_cache_mb}: give a memory budget of 0 MB or more")
        for name in ("max_trials", "images_per_trial", "save_logits_top_k"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise LayercritError(f"{name}={getattr(self, name)}: give at least 1")
        check_seeds(seed=self.seed, data_seed=self.data_seed)
        check_needs({"images_per_trial": self.images_per_trial, "target_ci": self.target_ci,  # max_trials: a default
                     "save_logits_top_k": self.save_logits_top_k, "save_logits": self.save_logits})
        trials = self.trial_ids
        if not trials or min(trials) < 0:
            raise LayercritError(f"trials={self.trials!r}: give at least 1 (or trial numbers >= 0)")
        if self.engine not in ENGINES:
            raise LayercritError(f"unknown engine {self.engine!r}: one of {', '.join(ENGINES)}")
        if self.precision not in PRECISIONS:
            raise LayercritError(f"unknown precision {self.precision!r}: one of {', '.join(PRECISIONS)}")
        if self.image_target_ci is not None and not 0 < self.image_target_ci < 1:
            raise LayercritError(f"image_target_ci={self.image_target_ci}: a half-width as a fraction, e.g. 0.01 "
                                 "(one point of top-1)")
        parse_bn(self.bn)
        if isinstance(self.reset, str):
            split_reset(self.reset)
        if (self.mean is None) != (self.std is None):
            raise LayercritError("give mean and std together (one value per input channel each)")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise LayercritError(f"mean has {len(self.mean)} values and std {len(self.std)}: give one per input "
                                 "channel each")
        if self.mean is not None and not all(value > 0 for value in self.std):
            raise LayercritError(f"std={self.std}: every value must be above 0")
        if not self.normalize and self.mean is not None:
            raise LayercritError("normalize=False feeds the images as they are: give it without mean and std")
        if self.exact and (self.channels_last or self.fold_bn):
            raise LayercritError("exact turns channels_last and fold_bn off: give exact or them")
        if self.sequential:
            if self.log_batches or self.per_class:
                raise LayercritError(f"target_ci={self.target_ci}: log_batches and per_class follow the paper's "
                                     "fixed design: leave out target_ci (or them)")
            if not isinstance(self.trials, int):
                raise LayercritError("target_ci runs trials 0, 1, 2, ... itself: give trials as a number")

    @property
    def trial_ids(self) -> list[int]:
        """The trials to run: 0 .. trials-1, or the trial numbers given."""
        return list(range(self.trials)) if isinstance(self.trials, int) else list(self.trials)

    @property
    def subset_seed(self) -> int:
        """The seed of the image subset: ``data_seed``, or ``seed`` when it is -1 (or None), as the paper."""
        return self.seed if self.data_seed is None or self.data_seed == -1 else self.data_seed

    def engine_layout(self) -> tuple[bool | None, bool | None]:
        """(channels_last, fold_bn) as the engine takes them (None: the engine's default)."""
        return (False, False) if self.exact else (self.channels_last, self.fold_bn)

    def to_dict(self) -> dict:
        """Plain data (JSON and YAML hold it): tuples as lists, notebook objects as their text."""
        values = {}
        for name in FIELDS:  # not asdict: it would deep-copy a notebook's Reset object, bound to its model
            value = getattr(self, name)
            if name in ("layers", "reset", "task", "trials") and not isinstance(value, str | int):
                value = _as_text(value)  # objects given in a notebook, as their text
            values[name] = list(value) if isinstance(value, tuple) else value
        return values

    def measured(self) -> dict:
        """The fields that change the numbers (:data:`MEASURED`)."""
        values = self.to_dict()
        return {name: values[name] for name in MEASURED}

    def spec_id(self) -> str:
        """A short fingerprint of :meth:`measured`: rows made with the same id are comparable. In the fixed design
        the number of trials says how many rows there are, not what each is, so it is left out (a sweep grown by a
        trial keeps its id)."""
        measured = self.measured()
        if not self.sequential:
            del measured["trials"]
        text = json.dumps(measured, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def sequential(self) -> bool:
        return self.target_ci is not None


def _as_text(value) -> str | list:
    if hasattr(value, "describe"):  # a Reset
        return value.describe()
    if hasattr(value, "name") and not isinstance(value, list | tuple):  # a Task
        return value.name
    if isinstance(value, list | tuple):
        return [item if isinstance(item, str | int) else getattr(item, "name", str(item)) for item in value]
    return str(value)


FIELDS = tuple(f.name for f in fields(Experiment))
# Shorthands for a reset's options, as run's --init/--to, --scale, --alpha, --base and the sweep keys of the same
# names: folded into ``reset`` ("noise" with scale 0.1 is "noise(scale=0.1)"). A reset's options are declared by
# the reset itself (layercrit.measurement.resets); these are only spellings kept for the common ones.
RESET_SHORTHANDS = ("checkpoint", "scale", "alpha", "base")
# Where the data is kept, how it is cached, and how the work is cut up or placed do not change the numbers.
UNMEASURED = ("data_root", "cache_dir", "use_cache", "batch_size", "device", "max_cache_mb", "save_logits",
              "save_logits_top_k", "log_to", "log_batches", "per_class")
MEASURED = tuple(name for name in FIELDS if name not in UNMEASURED)


SEED_RANGE = (-2**63, 2**63 - 1)  # a 64-bit integer: what torch's generators and the sweep store's SQLite hold


def check_seeds(**seeds: int | None) -> None:
    """Refuse a seed outside :data:`SEED_RANGE` (``seed=99999999999999999999`` overflows torch's generator)."""
    for name, value in seeds.items():
        if value is not None and not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
            raise LayercritError(f"{name}={value}: give a seed from -2**63 to 2**63-1 (a 64-bit integer)")


# Options that act only together with another one: given alone they would be silently ignored.
NEEDS = {"max_trials": "target_ci", "images_per_trial": "target_ci", "save_logits_top_k": "save_logits"}


def check_needs(given: dict) -> None:
    """Refuse an option of :data:`NEEDS` set in ``given`` (the options set explicitly, by name; None: not set)
    without the option it acts with."""
    for name, needs in NEEDS.items():
        if given.get(name) is not None and not given.get(needs):
            raise LayercritError(f"{name}={given[name]} does nothing without {needs}=...: give both, or leave it out")


def split_reset(text: str) -> tuple[str, dict[str, str]]:
    """``"noise(scale=0.1, base=zero)"`` -> ``("noise", {"scale": "0.1", "base": "zero"})``; values stay text
    (the reset converts them to the types it declares) and may nest: ``interpolate(base=noise(scale=0.1),alpha=1)``.
    A list of α is written ``alpha=0.25|0.5``."""
    text = str(text).strip()
    depth = _nesting(text)
    if depth > MAX_RESET_NESTING:
        raise LayercritError(f"reset={_short(text)}: parentheses nested {depth} deep; a reset nests at most "
                             f"{MAX_RESET_NESTING} deep (interpolate(base=noise(scale=0.1)) is 2)")
    name, paren, rest = text.partition("(")
    name = name.strip()
    if not paren:
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise LayercritError(f"reset={text!r}: give a reset name, or NAME(OPTION=VALUE,...)")
        return name, {}
    if not rest.endswith(")") or not name:
        raise LayercritError(f"reset={text!r}: write NAME(OPTION=VALUE,...), e.g. noise(scale=0.1)")
    options: dict[str, str] = {}
    for part in _top_level_parts(rest[:-1], text):
        key, equals, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not equals or not key.isidentifier() or not value:
            raise LayercritError(f"reset={text!r}: {part.strip()!r} is not OPTION=VALUE")
        if key in options:
            raise LayercritError(f"reset={text!r}: option {key!r} given twice")
        options[key] = value
    return name, options


def join_reset(name: str, options: dict) -> str:
    """The inverse of :func:`split_reset`: ``("noise", {"scale": 0.1})`` -> ``"noise(scale=0.1)"`` (lists of
    numbers joined with ``|``)."""
    if not options:
        return name
    text = ",".join(f"{key}={'|'.join(map(str, value)) if isinstance(value, list | tuple) else value}"
                    for key, value in options.items())
    return f"{name}({text})"


def with_shorthands(reset: str, shorthands: dict, takes: tuple[str, ...] | None = None) -> str:
    """``reset`` with the shorthand options (:data:`RESET_SHORTHANDS`, None: not given) folded in; with ``takes``
    only those the reset takes (a sweep's ``scale`` goes to its noise reset, not to zero). An option written in
    ``reset`` and given as a shorthand too is refused: one of the two would be silently ignored."""
    name, options = split_reset(reset)
    given = {key: value for key, value in shorthands.items() if value is not None and (takes is None or key in takes)}
    twice = [key for key in given if key in options]
    if twice:
        raise LayercritError(f"reset={reset!r} sets {twice[0]} itself and the {twice[0]} shorthand "
                             f"({given[twice[0]]}) sets it again: give it once")
    if isinstance(given.get("alpha"), str):  # run's --alpha 0.25,0.5
        given["alpha"] = given["alpha"].replace(",", "|")
    if not given:
        return reset
    return join_reset(name, {**given, **options})


MAX_RESET_NESTING = 16  # a base reset of a base reset ...: a few levels are useful, hundreds overflow the stack


def _nesting(text: str) -> int:
    """How deep the parentheses of ``text`` nest."""
    depth = deepest = 0
    for char in text:
        if char in "()":
            depth += 1 if char == "(" else -1
            deepest = max(deepest, depth)
    return deepest


def _short(text: str) -> str:
    return repr(text) if len(text) <= 60 else f"{text[:57]!r}..."


def _top_level_parts(text: str, whole: str) -> list[str]:
    """``text`` split at the commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            break
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise LayercritError(f"reset={whole!r}: unbalanced parentheses")
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def parse_bn(value: str | list[str]) -> tuple[str, int | None]:
    """``keep`` / ``recalibrate 8`` (or ``["recalibrate", "8"]``) -> (mode, batches)."""
    parts = value.split() if isinstance(value, str) else [str(v) for v in value]
    if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise LayercritError(f"bn={' '.join(parts)!r}: use keep, reset or recalibrate K (K a number of batches)")
    return parts[0], int(parts[1]) if len(parts) == 2 else None

"""The experiment: everything about a measurement except the model, as one plain, serializable value.

``layercrit run`` builds an :class:`Experiment` from its flags, a sweep config holds the same fields as YAML keys
(every ``run`` option is a sweep key of the same name, dashes as underscores; a test checks both ways), and
:meth:`Experiment.measure_options` turns it into :func:`layercrit.measure`'s keywords. Stores and run folders keep
it with the rows it produced (``run.json``, the sweep store's config), and :data:`MEASURED` names the fields that
change the numbers, which a store refuses to mix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

from .errors import LayercritError


@dataclass(frozen=True)
class Experiment:
    """A measurement's options; the defaults are the paper's design (see the README's option table)."""

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
    # what is measured: the task says what a batch is and which outputs are compared (layercrit.measurement.tasks)
    task: str = "image-classification"
    # what is reset, how, how often
    layers: str = "conv,linear"
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
    exact: bool = False
    image_target_ci: float | None = None
    # outputs
    save_logits: bool = False  # every evaluation's logits, in OUT/logits (layercrit.load_logits)
    save_logits_top_k: int | None = None
    log_to: str | None = None  # wandb | mlflow | tensorboard[:DIR] (layercrit.trackers); a sweep logs when it ends
    log_batches: bool = False  # a batch_acc column: each batch's top-1 (the paper's CSV); run only
    per_class: bool = False  # OUT/per_class.csv: each class's accuracy and agreement per (layer, trial); run only

    def measure_options(self, *, trust_checkpoint: bool = False) -> dict:
        """Keywords for :func:`layercrit.measure` (all but ``model`` and ``data``); ``trust_checkpoint`` lets the
        reset's checkpoint hold pickled objects."""
        bn, bn_batches = parse_bn(self.bn)
        trust = trust_checkpoint and "checkpoint" in split_reset(self.reset)[1]
        return {
            "layers": self.layers, "groups": self.groups, "cumulative": self.cumulative, "reset": self.reset,
            "reset_options": {"trust_checkpoint": True} if trust else {}, "bn": bn,
            "bn_batches": bn_batches, "trials": self.trials, "seed": self.seed, "data_seed": self.data_seed,
            "images": self.images, "seq_len": self.seq_len, "text_field": self.text_field,
            "data_root": self.data_root, "cache_dir": self.cache_dir, "use_cache": self.use_cache,
            "skip_bad_images": self.skip_bad_images, "resize": self.resize, "crop": self.crop,
            "interpolation": self.interpolation, "batch_size": self.batch_size, "device": self.device,
            "engine": self.engine, "precision": self.precision, "max_cache_mb": self.max_cache_mb,
            "compile": self.compile, "channels_last": False if self.exact else None,
            "fold_bn": False if self.exact else None, "target_ci": self.target_ci, "max_trials": self.max_trials,
            "images_per_trial": self.images_per_trial, "mirror": self.mirror, "image_target_ci": self.image_target_ci,
            "save_logits_top_k": self.save_logits_top_k, "log_batches": self.log_batches, "task": self.task,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    def measured(self) -> dict:
        """The fields that change the numbers (:data:`MEASURED`)."""
        return {name: getattr(self, name) for name in MEASURED}

    def spec_id(self) -> str:
        """A short fingerprint of :meth:`measured`: rows made with the same id are comparable."""
        text = json.dumps(self.measured(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def sequential(self) -> bool:
        return self.target_ci is not None


FIELDS = tuple(f.name for f in fields(Experiment))
# Shorthands for a reset's options, as run's --init/--to, --scale, --alpha, --base and the sweep keys of the same
# names: folded into ``reset`` ("noise" with scale 0.1 is "noise(scale=0.1)"). A reset's options are declared by
# the reset itself (layercrit.measurement.resets); these are only spellings kept for the common ones.
RESET_SHORTHANDS = ("checkpoint", "scale", "alpha", "base")
# Where the data is kept, how it is cached, and how the work is cut up or placed do not change the numbers.
UNMEASURED = ("data_root", "cache_dir", "use_cache", "batch_size", "device", "max_cache_mb", "save_logits",
              "save_logits_top_k", "log_to", "log_batches", "per_class")
MEASURED = tuple(name for name in FIELDS if name not in UNMEASURED)


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

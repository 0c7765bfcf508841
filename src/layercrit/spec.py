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
    images: int | None = 10_000
    cache_dir: str | None = None
    use_cache: bool = True
    skip_bad_images: bool = False
    resize: int | None = None
    crop: int | None = None
    interpolation: str | None = None
    # what is reset, how, how often
    layers: str = "conv,linear"
    groups: str | None = None
    cumulative: str | None = None
    reset: str = "rerandomize"
    checkpoint: str | None = None  # reinit --init / rewind --to
    scale: float | None = None  # noise
    alpha: str | None = None  # interpolate: "a1,a2,..."
    base: str | None = None  # interpolate / noise
    bn: str = "keep"  # keep | reset | recalibrate K
    trials: int = 3
    seed: int = 0
    data_seed: int = -1  # the image subset's own seed; -1: seed, as the paper
    target_ci: float | None = None  # the sequential design
    max_trials: int = 100
    images_per_trial: int | None = None
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
        reset_options = {"checkpoint": self.checkpoint, "scale": self.scale, "base": self.base,
                         "alpha": numbers(self.alpha, "alpha")}
        if self.checkpoint and trust_checkpoint:
            reset_options["trust_checkpoint"] = True
        return {
            "layers": self.layers, "groups": self.groups, "cumulative": self.cumulative, "reset": self.reset,
            "reset_options": {k: v for k, v in reset_options.items() if v is not None}, "bn": bn,
            "bn_batches": bn_batches, "trials": self.trials, "seed": self.seed, "data_seed": self.data_seed,
            "images": self.images,
            "data_root": self.data_root, "cache_dir": self.cache_dir, "use_cache": self.use_cache,
            "skip_bad_images": self.skip_bad_images, "resize": self.resize, "crop": self.crop,
            "interpolation": self.interpolation, "batch_size": self.batch_size, "device": self.device,
            "engine": self.engine, "precision": self.precision, "max_cache_mb": self.max_cache_mb,
            "compile": self.compile, "channels_last": False if self.exact else None,
            "fold_bn": False if self.exact else None, "target_ci": self.target_ci, "max_trials": self.max_trials,
            "images_per_trial": self.images_per_trial, "image_target_ci": self.image_target_ci,
            "save_logits_top_k": self.save_logits_top_k, "log_batches": self.log_batches,
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
RESET_OPTIONS = ("checkpoint", "scale", "alpha", "base")  # fields a reset strategy takes as its own options
# Where the data is kept, how it is cached, and how the work is cut up or placed do not change the numbers.
UNMEASURED = ("data_root", "cache_dir", "use_cache", "batch_size", "device", "max_cache_mb", "save_logits",
              "save_logits_top_k", "log_to", "log_batches", "per_class")
MEASURED = tuple(name for name in FIELDS if name not in UNMEASURED)


def parse_bn(value: str | list[str]) -> tuple[str, int | None]:
    """``keep`` / ``recalibrate 8`` (or ``["recalibrate", "8"]``) -> (mode, batches)."""
    parts = value.split() if isinstance(value, str) else [str(v) for v in value]
    if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise LayercritError(f"bn={' '.join(parts)!r}: use keep, reset or recalibrate K (K a number of batches)")
    return parts[0], int(parts[1]) if len(parts) == 2 else None


def numbers(text: str | None, name: str) -> list[float] | None:
    """``"0.25,0.5"`` -> [0.25, 0.5]."""
    if text is None:
        return None
    try:
        return [float(v) for v in str(text).split(",")]
    except ValueError:
        raise LayercritError(f"{name}={text!r}: give numbers, comma separated") from None

"""Prepare, then execute: a measurement is resolved once into one value, then run.

:func:`prepare` turns a model, data and an :class:`~layercrit.spec.Experiment` into a :class:`Prepared`: the model
with the input normalisation it gets, the evaluation set, the task, the targets, the bound reset, the engine
options and the design, each checked before any work. :func:`execute` runs a prepared measurement and returns its
rows. ``layercrit run``, the sweep workers (which keep a model's prepared value across its units:
:meth:`Prepared.select`), module criticality and :func:`layercrit.measure` all go through these two.

    prepared = prepare("zoo:fmnist/baseline", "fashion-mnist", Experiment(images=1000, trials=3))
    print(prepared.describe())            # the model, its inputs exactly as fed, the data, the task
    rows = execute(prepared)
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .._version import __version__
from ..columns import DESIGN_COLUMNS, ID_COLUMNS, META_COLUMNS, METRIC_COLUMNS, PROXY_COLUMNS
from ..data import EvalSet, load_data
from ..errors import LayercritError
from ..models import Normalized, Preprocessing, ResolvedModel
from ..models.hf import window_length
from ..names import file_name
from ..resolve import resolve_model
from ..spec import Experiment, parse_bn, split_reset
from . import engine as engines
from . import sequential
from .breakdown import Breakdown
from .layers import Target, select_targets
from .logits import LogitsWriter
from .proxies import block_proxies, block_spans
from .resets import Reset, get_reset
from .sequential import SequentialDesign
from .tasks import DEFAULT_TASK, PROBE_EXAMPLES, TASKS, Task, get_task


@dataclass
class Prepared:
    """A measurement resolved and checked, ready for :func:`execute`.

    ``model`` carries the input normalisation it is fed with; ``reset`` is bound to it; ``labels`` are the rows'
    fixed columns (model id, seed, data id, ...); ``tied`` maps each target module that shares a parameter with
    other modules to those modules; ``memo`` is what the engine learns about the model (its structure, the batch
    size that fits), kept by every value :meth:`select` derives; ``proxies`` holds the Block Influence and angular
    distance of each target that is a run of transformer blocks (:mod:`layercrit.measurement.proxies`), measured
    on the unmodified model.
    """

    experiment: Experiment
    model: ResolvedModel
    evalset: EvalSet
    task: Task
    targets: list[Target]
    reset: Reset
    trials: list[int]
    options: engines.EngineOptions
    design: SequentialDesign | None
    labels: dict
    classes: int = 0  # classes the task compares (chance is 1 / classes)
    tied: dict[str, list[str]] = field(default_factory=dict)
    memo: dict = field(default_factory=dict)
    proxies: dict[str, dict[str, float]] = field(default_factory=dict)

    def select(self, *, layers: Sequence[str | Target] | None = None, trials: Sequence[int] | None = None,
               reset: Reset | None = None) -> Prepared:
        """The same measurement on some of its targets (by name, or new targets) or trials, or with another reset
        (bound here); the model, data and what the engine learned are shared."""
        targets = self.targets
        if layers is not None:
            by_name = {target.name: target for target in self.targets}
            unknown = [t for t in layers if not isinstance(t, Target) and t not in by_name]
            if unknown:
                raise LayercritError(f"{unknown[0]!r} is not one of the prepared targets ({', '.join(by_name)})")
            targets = [t if isinstance(t, Target) else by_name[t] for t in layers]
        if reset is not None:
            reset.bind(self.model.model, self.evalset.images, self.options.batch_size, self.task)
        return replace(self, targets=targets, trials=self.trials if trials is None else list(trials),
                       reset=self.reset if reset is None else reset)

    def inputs(self) -> str:
        """The preprocessing applied, exactly: how the data was decoded and how the model normalises it."""
        return f"{self.evalset.transform}; {normalisation_text(self.model)}"

    def describe(self) -> str:
        """What is measured, in a few lines (``layercrit run`` prints it)."""
        tied = "".join(f"\n  {name} shares parameters with {', '.join(others)}: resetting it resets them too"
                       for name, others in self.tied.items())
        return (f"model: {self.model.spec}; task: {self.task.name}\n"
                f"data: {self.evalset.description}\n"
                f"inputs: {self.inputs()}\n"
                f"{len(self.targets)} target(s), reset {self.reset.describe()}, "
                f"{'trials ' + str(self.experiment.trials) if self.design is None else 'the sequential design'}"
                f"{tied}")


def prepare(
    model: str | nn.Module | ResolvedModel,
    data: str | EvalSet | tuple | torch.utils.data.Dataset | torch.utils.data.DataLoader | None = None,
    spec: Experiment | None = None,
    *,
    model_id: str | None = None,
    fresh_model: Callable[[], nn.Module] | None = None,
    arch: str | None = None,
    pretrained: bool = True,
    trust_checkpoint: bool = False,
    previous: Prepared | None = None,
) -> Prepared:
    """Resolve and check everything a measurement needs, once.

    Args:
        model: a spec (``timm:resnet50.a1_in1k``, ``zoo:fmnist/baseline``, ``MODULE:FACTORY``, a checkpoint with
            ``arch=``), an ``nn.Module``, or a :class:`~layercrit.models.ResolvedModel` (its preprocessing as
            resolved; the spec's resize/crop and normalisation options are applied here, once).
        data: as :func:`layercrit.measure` takes it; default ``spec.data``.
        spec: the options (default: the paper's design).
        model_id: the model's name in the rows (default: its spec). fresh_model: a factory of fresh instances
            (``rerandomize``) for an ``nn.Module``. arch, pretrained: as :func:`layercrit.resolve_model`.
        trust_checkpoint: let a reset's checkpoint (reinit, rewind) hold pickled objects.
        previous: an earlier prepared value whose evaluation set is reused when it was decoded the same way, and
            whose engine memo is kept when the model is the same (a sweep worker's next unit).

    Returns:
        The :class:`Prepared` measurement.
    """
    spec = spec or Experiment()
    data = spec.data if data is None else data
    if isinstance(data, str) and data != spec.data:
        spec = replace(spec, data=data)  # the experiment records the data it was measured on
    if data is None:
        raise LayercritError("data=None: give the evaluation data (a spec, tensors, a Dataset) or spec= with its data")
    device = engines.check_device(spec.device)
    resolved = model_inputs(as_resolved(model, fresh_model, arch=arch, pretrained=pretrained, seed=spec.seed,
                                        model_id=model_id), spec)
    evalset = _evaluation_set(data, spec, resolved, previous)
    kind = resolved.metadata.get("kind")
    # a language model is never measured as an image classifier: its kind is the default task
    task = get_task(kind if kind in TASKS and spec.task in (None, DEFAULT_TASK) else spec.task)
    task.check(evalset, resolved)
    targets = select_targets(resolved.model, spec.layers, groups=spec.groups, cumulative=spec.cumulative)
    strategy = _reset(spec, resolved, trust_checkpoint)
    batch_size = spec.batch_size or engines.default_batch_size(device)
    design = None if not spec.sequential else SequentialDesign(
        spec.target_ci, min_trials=spec.trials, max_trials=spec.max_trials, images_per_trial=spec.images_per_trial,
        mirror=spec.mirror)
    if design is not None:
        design.check_pool(len(evalset))
    classes = _probe(task, resolved.model, evalset, device)  # the user's options are all checked first
    strategy.bind(resolved.model, evalset.images, batch_size, task)
    # Block Influence and angular distance of block targets: one clean pass, before any reset
    proxies = block_proxies(resolved.model, evalset, block_spans(resolved.model, targets), task,
                            batch_size=batch_size, device=device)
    tied = tied_parameters(resolved.model, targets)
    for name, others in tied.items():
        warnings.warn(f"{name} shares parameters with {', '.join(others)}: resetting it resets them too (rows say "
                      "so in tied_with)", UserWarning, stacklevel=2)
    channels_last, fold_bn = spec.engine_layout()
    options = engines.EngineOptions(engine=spec.engine, batch_size=batch_size, device=device,
                                    precision=spec.precision, max_cache_mb=spec.max_cache_mb, compile=spec.compile,
                                    channels_last=channels_last, fold_bn=fold_bn,
                                    image_target_ci=spec.image_target_ci)
    labels = {"model_id": model_id or resolved.spec, "seed": spec.seed, "data_id": evalset.data_id,
              "n_skipped": evalset.n_skipped, "model_spec": resolved.spec, "engine": spec.engine,
              "precision": _precision_label(spec.precision, device), "layercrit_version": __version__,
              "spec_id": spec.spec_id()}
    same_model = previous is not None and previous.model.model is resolved.model
    return Prepared(experiment=spec, model=resolved, evalset=evalset, task=task, targets=targets, reset=strategy,
                    trials=spec.trial_ids, options=options, design=design, labels=labels, classes=classes, tied=tied,
                    memo=previous.memo if same_model else {}, proxies=proxies)


def execute(prepared: Prepared, *, on_rows: Callable[[pd.DataFrame], None] | None = None,
            progress: bool | None = None) -> pd.DataFrame:
    """Run a prepared measurement: one row for the unmodified model (``layer == "original"``) and one per
    (target, trial), columns :data:`layercrit.columns.COLUMNS` (plus ``alpha`` after ``reset`` for an
    interpolation, ``batch_acc`` with ``log_batches``).

    Args:
        prepared: from :func:`prepare`.
        on_rows: called with the rows finished so far after each chunk of layers (to persist them).
        progress: a progress bar; default: when someone is watching (:func:`interactive`).
    """
    spec, model, evalset = prepared.experiment, prepared.model.model, prepared.evalset
    options = replace(prepared.options, progress=interactive() if progress is None else progress)
    kernels = {t.name: _kernel(model, t) for t in prepared.targets}  # for display names like conv1:3x3
    tied = {t.name: ";".join(sorted({o for m in t.modules for o in prepared.tied.get(m, [])} - set(t.modules)))
            or None for t in prepared.targets}  # what else a reset of the target changes (tied weights)
    no_proxies = dict.fromkeys(PROXY_COLUMNS, float("nan"))  # a target that is not a run of blocks
    finished: list[pd.DataFrame] = []  # earlier variants' rows (interpolate: one variant per alpha)
    variants = prepared.reset.variants()
    per_class_tables: list[pd.DataFrame] = []
    for columns, variant in variants:
        labels = {**prepared.labels, "reset": variant.describe(), **columns}
        hooks: list[Callable] = []
        logits = None
        if spec.save_logits is not None:
            folder = Path(spec.save_logits) / (file_name(variant.describe()) if len(variants) > 1 else "")
            logits = LogitsWriter(folder, top_k=spec.save_logits_top_k)
            hooks.append(logits)
        breakdown = Breakdown(evalset.labels) if spec.log_batches or spec.per_class is not None else None
        if breakdown is not None:
            hooks.append(breakdown)
        options = replace(options, on_logits=_each(hooks))
        order = [*ID_COLUMNS, *columns, *METRIC_COLUMNS, *PROXY_COLUMNS, *(["batch_acc"] if spec.log_batches else []),
                 *META_COLUMNS, *DESIGN_COLUMNS]

        def frame(rows: list[dict], labels=labels, order=order, breakdown=breakdown) -> pd.DataFrame:
            fixed = {"image_offset": 0, "mirror_of": float("nan"), "pilot": False, "target_ci": float("nan"),
                     "first_stage": float("nan"), "ci_looks": 1, "capped": False}
            table = pd.DataFrame([{**labels, **fixed, **row, **prepared.proxies.get(row["layer"], no_proxies),
                                   "kernel": kernels.get(row["layer"]),
                                   "tied_with": tied.get(row["layer"]),
                                   **({"batch_acc": breakdown.batch_acc(row["layer"], row["computed_in_trial"])}
                                      if spec.log_batches else {})}
                                  for row in rows])[order]
            for column in ("kernel", "tied_with"):  # a column with no value at all, as a CSV reads it back
                if table[column].isna().all():
                    table[column] = table[column].astype(float)
            return table

        def persist(rows: list[dict], frame=frame) -> None:
            on_rows(pd.concat([*finished, frame(rows)], ignore_index=True))

        on_chunk = persist if on_rows else None
        if prepared.design is None:
            rows = engines.run(model, evalset, prepared.targets, variant, prepared.trials, options,
                               on_chunk=on_chunk, memo=prepared.memo, task=prepared.task)
        else:
            rows = sequential.run(model, evalset, prepared.targets, variant, prepared.design, options,
                                  on_chunk=on_chunk, memo=prepared.memo, task=prepared.task)
        if logits is not None:
            logits.finish()
        finished.append(frame(rows))
        if breakdown is not None and spec.per_class is not None:
            per_class_tables.append(breakdown.per_class(finished[-1]))
    if spec.per_class is not None:
        _write_csv(pd.concat(per_class_tables, ignore_index=True), Path(spec.per_class))
    results = pd.concat(finished, ignore_index=True)
    _warn_at_chance(results, prepared.classes)
    return results


# ---------------------------------------------------------------- the model and its inputs


def as_resolved(
    model: str | nn.Module | ResolvedModel,
    fresh_model: Callable[[], nn.Module] | None = None,
    *,
    arch: str | None = None,
    pretrained: bool = True,
    seed: int | None = None,
    model_id: str | None = None,
) -> ResolvedModel:
    """A :class:`ResolvedModel` from any ``model`` that :func:`prepare` takes (a spec, an ``nn.Module``, ...); a
    spec is built under the seed of (seed, model_id), as :func:`~layercrit.resolve.resolve_model` does. An
    ``nn.Module`` gets its inputs as they are (no normalisation unless asked for with mean/std)."""
    if isinstance(model, ResolvedModel):
        return model
    if isinstance(model, nn.Module):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        pre = Preprocessing(in_chans=convs[0].in_channels if convs else 0, source="the caller's model")
        return ResolvedModel(model=model.eval(), fresh=fresh_model, preprocessing=pre,
                             spec=f"python:{type(model).__name__}", num_classes=0)
    if isinstance(model, str):
        return resolve_model(model, arch=arch, pretrained=pretrained, seed=seed, model_id=model_id)
    raise LayercritError(f"model must be a spec string or an nn.Module, not {type(model).__name__}")


def model_inputs(resolved: ResolvedModel, spec: Experiment) -> ResolvedModel:
    """``resolved`` with the spec's input options applied once: the image transform (``resize``, ``crop``,
    ``interpolation``) and the normalisation (``mean``/``std``, or ``normalize=False``)."""
    pre = resolved.preprocessing
    if spec.resize is not None or spec.crop is not None or spec.interpolation is not None:
        pre = replace(pre, resize=spec.resize or pre.resize, crop=spec.crop or pre.crop,
                      interpolation=spec.interpolation or "bilinear",
                      source=f"{pre.source}; transform set by the user")
    return normalization(replace(resolved, preprocessing=pre), normalize=spec.normalize, mean=spec.mean,
                         std=spec.std)


def normalization(resolved: ResolvedModel, *, normalize: bool = True, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> ResolvedModel:
    """``resolved`` with its input normalisation set: as it is; by ``mean``/``std`` (a bare module gets wrapped);
    or none (``normalize=False``: the images are already normalised). The trained layers are shared, not copied."""
    wrapped = isinstance(resolved.model, Normalized)
    if mean is None and (normalize or not wrapped):
        return resolved
    in_chans = resolved.model.in_chans if wrapped else resolved.preprocessing.in_chans
    if mean is None:
        mean, std = (0.0,) * resolved.model.mean.numel(), (1.0,) * resolved.model.mean.numel()
    how = f"mean {tuple(mean)}, std {tuple(std)} given by the user" if normalize else "images already normalised"
    pre = replace(resolved.preprocessing, mean=tuple(mean), std=tuple(std), in_chans=in_chans,
                  source=f"{resolved.preprocessing.source}; {how}")

    def rewrap(module: nn.Module) -> nn.Module:
        return Normalized(module.model if wrapped else module, pre.mean, pre.std, pre.in_chans).eval()

    fresh = resolved.fresh
    return replace(resolved, model=rewrap(resolved.model), preprocessing=pre,
                   fresh=None if fresh is None else lambda: rewrap(fresh()))


def normalisation_text(resolved: ResolvedModel) -> str:
    """How the model normalises its inputs, exactly (none at all for a model that is not wrapped)."""
    model = resolved.model
    if not isinstance(model, Normalized):
        return "not normalised: the model takes the inputs as they are"
    mean, std = tuple(model.mean.flatten().tolist()), tuple(model.std.flatten().tolist())
    if all(m == 0 for m in mean) and all(s == 1 for s in std):
        return f"not normalised: the model takes images in [0, 1] ({resolved.preprocessing.source})"
    rounded = lambda values: tuple(round(v, 4) for v in values)  # noqa: E731
    return f"normalised: mean {rounded(mean)}, std {rounded(std)} ({resolved.preprocessing.source})"


def tied_parameters(model: nn.Module, targets: Sequence[Target]) -> dict[str, list[str]]:
    """Each module of ``targets`` that holds a parameter also held by other modules (tied weights, as GPT-2's
    ``lm_head`` and ``wte``), with those modules."""
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(name)
    tied = {}
    for name in dict.fromkeys(m for t in targets for m in t.modules):
        others = {o for p in model.get_submodule(name).parameters(recurse=False) for o in owners[id(p)]} - {name}
        if others:
            tied[name] = sorted(others)
    return tied


def _evaluation_set(data, spec: Experiment, resolved: ResolvedModel, previous: Prepared | None) -> EvalSet:
    """The evaluation set: images decoded for the model, or text cut into windows of ``seq_len`` tokens by its
    tokenizer (default: the model's context, at most 128)."""
    pre = resolved.preprocessing
    text_options = {name: getattr(spec, name) for name in ("seq_len", "text_field")
                    if getattr(spec, name) != getattr(Experiment, name)}
    if text_options and resolved.tokenizer is None:  # they would be silently ignored
        name, value = next(iter(text_options.items()))
        raise LayercritError(f"{name}={value!r} applies to text read through a language model's tokenizer, and "
                             f"{resolved.spec} has none: leave {name} out")
    if previous is not None and previous.experiment.data == spec.data and isinstance(data, str) and (
            previous.model.preprocessing == pre and previous.model.tokenizer is resolved.tokenizer
            and _same_subset(previous.experiment, spec)):
        return previous.evalset
    if isinstance(data, tuple):
        data = EvalSet.from_tensors(*data, check_range=False)
    seq_len = window_length(resolved.model, spec.seq_len)
    return load_data(data, preprocessing=pre, images=spec.images, seed=spec.subset_seed, root=spec.data_root,
                     cache_dir=spec.cache_dir, use_cache=spec.use_cache, skip_bad_images=spec.skip_bad_images,
                     tokenizer=resolved.tokenizer, seq_len=seq_len, text_field=spec.text_field)


def _same_subset(a: Experiment, b: Experiment) -> bool:
    keys = ("images", "data_root", "skip_bad_images", "seq_len", "text_field")
    return a.subset_seed == b.subset_seed and all(getattr(a, k) == getattr(b, k) for k in keys)


def _probe(task: Task, model: nn.Module, evalset: EvalSet, device: str) -> int:
    """The task's probe of the unmodified model, on fewer examples while out of memory (as the engine does)."""
    examples = PROBE_EXAMPLES
    while True:
        try:
            return task.probe(model, evalset, device, examples)
        except Exception as error:
            if not engines.out_of_memory(error) or examples == 1:
                raise
            examples //= 2


def _reset(spec: Experiment, resolved: ResolvedModel, trust_checkpoint: bool) -> Reset:
    if isinstance(spec.reset, Reset):
        if spec.bn != "keep":
            raise LayercritError("reset is a Reset object: give its bn to the object, not to the experiment")
        return spec.reset
    bn, bn_batches = parse_bn(spec.bn)
    trust = {"trust_checkpoint": True} if trust_checkpoint and "checkpoint" in split_reset(spec.reset)[1] else {}
    return get_reset(spec.reset, seed=spec.seed, fresh=resolved.fresh, bn=bn, bn_batches=bn_batches, **trust)


# ---------------------------------------------------------------- rows


def _kernel(model: nn.Module, target: Target) -> str | None:
    """``"3x3"`` for a single convolution, None for anything else."""
    if len(target.modules) != 1:
        return None
    size = getattr(model.get_submodule(target.modules[0]), "kernel_size", None)
    return "x".join(map(str, size)) if isinstance(size, tuple) else None


def _each(hooks: list[Callable]) -> Callable | None:
    """One ``on_logits`` hook that calls each of ``hooks``."""
    if len(hooks) <= 1:
        return hooks[0] if hooks else None

    def call(*args) -> None:
        for hook in hooks:
            hook(*args)
    return call


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    """Write ``table`` whole or not at all (a killed run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    table.to_csv(partial, index=False)
    os.replace(partial, path)


def _warn_at_chance(results: pd.DataFrame, classes: int) -> None:
    """The unmodified model near chance: its layers' criticalities say little (wrong weights or inputs?)."""
    original = results[results.layer == "original"].iloc[0]
    n = int(original.n_images)
    if classes < 2 or not n:
        return
    chance = 100.0 / classes
    margin = 300.0 * math.sqrt((1 / classes) * (1 - 1 / classes) / n)  # three binomial standard errors, in points
    if original.top1_acc <= chance + margin:
        warnings.warn(f"the unmodified model's top-1 is {original.top1_acc:.1f}%, at chance for {classes} classes "
                      f"({chance:.1f}%): its criticalities will mean little; check the model's weights and its "
                      "input preprocessing", UserWarning, stacklevel=3)


def _precision_label(precision: str, device: str) -> str:
    if precision == "fp32" and device.startswith("cuda") and torch.backends.cudnn.allow_tf32:
        return "fp32(tf32-conv)"  # cuDNN convolutions use TF32 on Ampere and later unless disabled
    return precision


def interactive() -> bool:
    """Whether someone is watching: standard error is a terminal, or the code runs in a Jupyter kernel (where tqdm
    draws its notebook bar). Progress bars are on by default then, off in logs and CI."""
    if sys.stderr is not None and sys.stderr.isatty():
        return True
    shell = sys.modules.get("IPython")
    ipython = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return ipython is not None and type(ipython).__name__ == "ZMQInteractiveShell"

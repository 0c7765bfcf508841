"""``measure``: the library's front door. Model + data + options → a results DataFrame, one row per unit."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..columns import DESIGN_COLUMNS, ID_COLUMNS, META_COLUMNS, METRIC_COLUMNS, PROXY_COLUMNS
from ..data import EvalSet, load_data
from ..errors import LayercritError
from ..models import Normalized, Preprocessing, ResolvedModel, resolve_model
from ..models.hf import context_length
from ..results import file_name
from ..spec import Experiment, check_needs
from . import engine as engines
from . import sequential
from .breakdown import Breakdown
from .layers import DEFAULT_LAYERS, Target, select_targets
from .logits import LogitsWriter
from .proxies import block_proxies, block_spans
from .resets import Reset, get_reset
from .sequential import SequentialDesign
from .tasks import DEFAULT_TASK, PROBE_EXAMPLES, TASKS, Task, get_task


def measure(
    model: str | nn.Module | ResolvedModel,
    data: str | EvalSet | tuple[torch.Tensor, torch.Tensor] | torch.utils.data.Dataset | torch.utils.data.DataLoader
    | None = None,
    spec: Experiment | None = None,
    *,
    layers: str | Sequence[str | Target] = DEFAULT_LAYERS,
    reset: str | Reset = "rerandomize",
    reset_options: Mapping[str, object] | None = None,
    bn: str = "keep",
    bn_batches: int | None = None,
    groups: str | None = None,
    cumulative: str | None = None,
    trials: int | Sequence[int] = 3,
    seed: int = 0,
    data_seed: int | None = None,
    images: int | None = 10_000,
    model_id: str | None = None,
    fresh_model: Callable[[], nn.Module] | None = None,
    arch: str | None = None,
    pretrained: bool = True,
    data_root: str | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    skip_bad_images: bool = False,
    resize: int | None = None,
    crop: int | None = None,
    interpolation: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    engine: str = "fast",
    engine_name: str | None = None,
    normalize: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    precision: str = "fp32",
    max_cache_mb: float = 4096.0,
    compile: bool = False,
    channels_last: bool | None = None,
    fold_bn: bool | None = None,
    target_ci: float | None = None,
    max_trials: int = 100,
    images_per_trial: int | None = None,
    mirror: bool = True,
    image_target_ci: float | None = None,
    memo: dict | None = None,
    save_logits: str | Path | None = None,
    save_logits_top_k: int | None = None,
    log_batches: bool = False,
    per_class: str | Path | None = None,
    progress: bool | None = None,
    on_rows: Callable[[pd.DataFrame], None] | None = None,
    task: str | Task | None = None,
    seq_len: int | None = None,
    text_field: str = "text",
) -> pd.DataFrame:
    """Reset each selected layer in turn, ``trials`` times, and measure the model on the same images.

    Args:
        model: a spec (``timm:resnet50.a1_in1k``, ``torchvision:resnet50``, ``zoo:fmnist/baseline``, a checkpoint
            path with ``arch=``), an ``nn.Module`` taking images in [0, 1] (give ``fresh_model`` to rerandomize
            with the architecture's own init; otherwise each layer's ``reset_parameters()`` is used), or a
            :class:`~layercrit.models.ResolvedModel`.
        spec: the experiment (:class:`~layercrit.spec.Experiment`, as ``layercrit run`` and sweeps build it): its
            fields set the options they name (the keywords below then only add what a spec does not hold: the
            model's id and factory, progress, callbacks); ``data`` defaults to ``spec.data``.
        data: ``fashion-mnist``, an image folder, an :class:`EvalSet`, ``(images, labels)`` tensors, or a torch
            ``Dataset`` / ``DataLoader`` of (image, label), images C×H×W tensors or PIL images
            (:mod:`layercrit.data.torch_data`; a Dataset gives the seeded subset of ``images``, a DataLoader its first ones).
        normalize: False when the images are already normalised: the model then gets them as they are (float
            images in any range are accepted). Default: float images in [0, 1] (or uint8), normalised by the model
            wrapper with the model's mean/std.
        mean, std: normalise with these instead of the model's pretrained config (an ``nn.Module`` given without
            a wrapper is then wrapped, and its layers are named ``model.*``).
        layers: kinds (``conv``, ``linear``, ``bn``, ``ln``) and/or name globs, comma separated; or a list of
            module names and :class:`~layercrit.measurement.layers.Target` groups.
        reset: ``rerandomize`` (fresh init, seeded by (seed, trial)), ``zero``, ``reinit``, ``rewind``, ``noise``,
            ``interpolate`` (see :mod:`layercrit.measurement.resets`), or a :class:`Reset` object.
        reset_options: the named reset's options, e.g. ``{"checkpoint": "init.pth"}`` (reinit/rewind),
            ``{"scale": 0.1}`` (noise), ``{"alpha": [0.25, 0.5, 1.0], "base": "rerandomize"}`` (interpolate:
            one set of rows per α, with an ``alpha`` column).
        bn, bn_batches: BatchNorm running statistics around a reset layer: ``keep`` (the paper's method),
            ``reset``, or ``recalibrate`` on ``bn_batches`` batches (see :class:`~layercrit.measurement.resets.BatchNormStats`).
        groups: reset ``blocks``, ``stages`` or the groups of a YAML/JSON file together, one row per group.
        cumulative: ``prefix`` (row k resets targets 1..k) or ``suffix`` (targets k..L).
        trials: resets per layer (or the trial numbers to run, e.g. ``[2]``). images: subset size (seeded as the paper's loader). seed: data and reset seed.
        data_seed: seed of the image subset alone (the resets keep ``seed``); None or -1: ``seed``, as the paper.
        batch_size: images per forward (default 100 on CPU; 500 on CUDA, halved while out of memory).
        engine: ``fast`` (prefix replay, default) or ``naive`` (full forward per unit; the oracle).
            ``engine_name`` is its former name (deprecated).
        resize, crop, interpolation: override the image-folder transform instead of the model's pretrained
            config (``resize=256, crop=224`` is the paper's transform for every model; interpolation then defaults
            to bilinear, as in the paper).
        channels_last: run convolutions in NHWC layout (default: on for the fast engine, off for the naive one);
            it changes fp32 results in the last bits only (see BENCHMARKS.md).
        fold_bn: fold each eval-mode BatchNorm into the convolution before it (default: on for the fast engine
            without ``compile``, off for the naive one); last bits only, like ``channels_last``. With both off the
            fast engine's results equal the naive engine's bit for bit.
        target_ci: the sequential design (:mod:`layercrit.measurement.sequential`): estimate every layer's expected criticality
            over resets and images to ± this (fraction) at 95% (Stein's two-stage procedure), each trial a reset
            draw or its mirror on its own block of images: a pilot of ``trials`` draws (each with its mirror, or
            another draw), ``max_trials`` at most; ``images_per_trial`` sets the block size after the pilot
            (default: Cochran's rule on the pilot); ``mirror=False``: single draws only, no mirrored pairs.
            Default None: the paper's fixed design, every trial on all ``images``.
        image_target_ci: stop evaluating a (layer, trial) once the 95% confidence sequences of its criticality and
            top-1 over images (fractions) are narrower than ± this; rows then report their own ``n_images``,
            ``criticality_ci`` and ``top1_ci``. Images are always taken in the same order.
        save_logits: a folder where the logits of every evaluation are kept (float16; ``save_logits_top_k``: only
            the k largest with their classes), read back with :func:`layercrit.load_logits`; one sub-folder per
            reset variant when an interpolation gives several.
        log_batches: add a ``batch_acc`` column: each batch's top-1 in percent, as a JSON list (the paper's column).
        per_class: a CSV file to write each class's accuracy, its drop and agreement per (layer, trial) to, in long
            format (:meth:`layercrit.measurement.breakdown.Breakdown.per_class`). Both: the paper's fixed design only.
        progress: a progress bar over (layer, trial) × batches; default: when someone is watching (a terminal
            or a notebook, see :func:`interactive`).
        on_rows: called with the rows finished so far after each chunk of layers (to persist them).
        task: what a batch is, how the model is called and which output is compared
            (:mod:`layercrit.measurement.tasks`): ``image-classification`` (default), ``sequence-classification``,
            ``causal-lm`` (next-token distributions at every position; the default for a causal language model,
            as ``hf:`` and ``zoo:lm/`` give), or a :class:`~layercrit.measurement.tasks.Task` object.
        seq_len: text data: tokens per window (default: the model's context, at most 128); ``images`` is then the
            number of windows. text_field: the JSON key / dataset column holding the text.
        memo: a dict kept between calls on the same model (a sweep worker's units), where the engine keeps what it
            learned: the model's structure and the batch size that fits in memory (see :func:`layercrit.measurement.engine.run`).

    Returns:
        A DataFrame with one row for the unmodified model (``layer == "original"``) and one per (layer, trial),
        columns :data:`COLUMNS` (plus ``alpha`` after ``reset`` for an interpolation).
    """
    from .. import __version__

    if spec is not None:
        options = spec.measure_options()
        options["task"] = task or options["task"]
        return measure(model, spec.data if data is None else data, **options, model_id=model_id,
                       fresh_model=fresh_model, arch=arch, pretrained=pretrained, progress=progress, on_rows=on_rows,
                       memo=memo, save_logits=save_logits, normalize=normalize, mean=mean, std=std,
                       per_class=per_class)
    if data is None:
        raise LayercritError("data=None: give the evaluation data (a spec, tensors, a Dataset) or spec= with its data")

    check_sizes(images=images, batch_size=batch_size, max_cache_mb=max_cache_mb)
    check_seeds(seed=seed, data_seed=data_seed)
    check_needs({"images_per_trial": images_per_trial, "target_ci": target_ci,  # max_trials has a default
                 "save_logits_top_k": save_logits_top_k, "save_logits": save_logits})
    device = check_device(device)
    resolved = as_resolved(model, fresh_model, arch=arch, pretrained=pretrained, seed=seed, model_id=model_id)
    if engine_name is not None:
        warnings.warn("measure(engine_name=...) is now measure(engine=...)", DeprecationWarning, stacklevel=2)
        engine = engine_name
    if resize is not None or crop is not None or interpolation is not None:
        resolved.preprocessing = override_transform(resolved.preprocessing, resize, crop, interpolation)
    resolved = normalization(resolved, normalize=normalize, mean=mean, std=std)
    if isinstance(data, tuple):
        data = EvalSet.from_tensors(*data, check_range=False)
    data_seed = seed if data_seed is None or data_seed == -1 else data_seed
    if seq_len is None:
        seq_len = min(128, context_length(resolved.model) or 128)
    evalset = load_data(data, preprocessing=resolved.preprocessing, images=images, seed=data_seed, root=data_root,
                        cache_dir=cache_dir, use_cache=use_cache, skip_bad_images=skip_bad_images,
                        tokenizer=resolved.tokenizer, seq_len=seq_len, text_field=text_field)
    if resolved.metadata.get("kind") in TASKS and (task is None or task == DEFAULT_TASK):
        task = resolved.metadata["kind"]  # a language model is never measured as an image classifier
    task = get_task(task)
    task.check(evalset, resolved)
    trial_ids = list(range(trials)) if isinstance(trials, int) else list(trials)
    if not trial_ids or min(trial_ids) < 0:
        raise LayercritError(f"trials={trials!r}: give at least 1 (or trial numbers >= 0)")
    if batch_size is None:  # on a GPU, start at the paper's 500 and halve on out-of-memory
        batch_size = 500 if device.startswith("cuda") else 100
    task.probe(resolved.model, evalset, device, min(batch_size, PROBE_EXAMPLES))
    targets = select_targets(resolved.model, layers, groups=groups, cumulative=cumulative)
    if isinstance(reset, Reset) and (reset_options or bn != "keep" or bn_batches is not None):
        raise LayercritError("reset is a Reset object: give its options (and bn) to the object, not to measure()")
    strategy = get_reset(reset, seed=seed, fresh=resolved.fresh, bn=bn, bn_batches=bn_batches,
                         **dict(reset_options or {}))
    strategy.bind(resolved.model, evalset.images, batch_size, task)
    # Block Influence and angular distance of block targets: one clean pass, before any reset
    proxies = block_proxies(resolved.model, evalset, block_spans(resolved.model, targets), task,
                            batch_size=batch_size, device=device)
    options = engines.EngineOptions(engine=engine, batch_size=batch_size, device=device, precision=precision,
                                   max_cache_mb=max_cache_mb, compile=compile,
                                   progress=interactive() if progress is None else progress,
                                   channels_last=channels_last, fold_bn=fold_bn,
                                   image_target_ci=image_target_ci)
    design = None if target_ci is None else SequentialDesign(
        target_ci, min_trials=len(trial_ids), max_trials=max_trials, images_per_trial=images_per_trial,
        mirror=mirror)
    if design is not None and (log_batches or per_class is not None):
        raise LayercritError(f"target_ci={target_ci}: log_batches and per_class follow the paper's fixed design: "
                             "leave out target_ci (or them)")
    if design is not None and trial_ids != list(range(len(trial_ids))):
        raise LayercritError("target_ci runs trials 0, 1, 2, ... itself: give trials as a number")
    if design is not None:
        design.check_pool(len(evalset))
    meta = {
        "model_id": model_id or resolved.spec,
        "seed": seed,
        "data_id": evalset.data_id,
        "n_skipped": evalset.n_skipped,  # images --skip-bad-images left out
        "model_spec": resolved.spec,
        "engine": engine,
        "precision": _precision_label(precision, device),
        "layercrit_version": __version__,
    }

    kernels = {t.name: _kernel(resolved.model, t) for t in targets}  # for display names like conv1:3x3
    finished: list[pd.DataFrame] = []  # earlier variants' rows (interpolate: one variant per alpha)
    variants = strategy.variants()
    per_class_tables: list[pd.DataFrame] = []
    for columns, variant in variants:
        labels = {**meta, "reset": variant.describe(), **columns}
        hooks: list[Callable] = []
        logits = None
        if save_logits is not None:
            folder = Path(save_logits) / (file_name(variant.describe()) if len(variants) > 1 else "")
            logits = LogitsWriter(folder, top_k=save_logits_top_k)
            hooks.append(logits)
        breakdown = Breakdown(evalset.labels) if log_batches or per_class is not None else None
        if breakdown is not None:
            hooks.append(breakdown)
        options = replace(options, on_logits=_each(hooks))
        order = [*ID_COLUMNS, *columns, *METRIC_COLUMNS, *PROXY_COLUMNS, *(["batch_acc"] if log_batches else []),
                 *META_COLUMNS, *DESIGN_COLUMNS]

        def frame(rows: list[dict], labels=labels, order=order, breakdown=breakdown) -> pd.DataFrame:
            fixed = {"image_offset": 0, "mirror_of": float("nan"), "pilot": False, "target_ci": float("nan"),
                     "first_stage": float("nan"), "ci_looks": 1, "capped": False}
            nan = dict.fromkeys(PROXY_COLUMNS, float("nan"))
            return pd.DataFrame([{**labels, **fixed, **row, **proxies.get(row["layer"], nan),
                                  "kernel": kernels.get(row["layer"]),
                                  **({"batch_acc": breakdown.batch_acc(row["layer"], row["computed_in_trial"])}
                                     if log_batches else {})}
                                 for row in rows])[order]

        def persist(rows: list[dict], frame=frame) -> None:
            on_rows(pd.concat([*finished, frame(rows)], ignore_index=True))

        if design is None:
            rows = engines.run(resolved.model, evalset, targets, variant, trial_ids, options,
                               on_chunk=persist if on_rows else None, memo=memo, task=task)
        else:
            rows = sequential.run(resolved.model, evalset, targets, variant, design, options,
                                  on_chunk=persist if on_rows else None, memo=memo, task=task)
        if logits is not None:
            logits.finish()
        finished.append(frame(rows))
        if per_class is not None:
            per_class_tables.append(breakdown.per_class(finished[-1]))
    if per_class is not None:
        from ..results import write_table

        write_table(pd.concat(per_class_tables, ignore_index=True), per_class)
    return pd.concat(finished, ignore_index=True)


def _each(hooks: list[Callable]) -> Callable | None:
    """One ``on_logits`` hook that calls each of ``hooks``."""
    if len(hooks) <= 1:
        return hooks[0] if hooks else None

    def call(*args) -> None:
        for hook in hooks:
            hook(*args)
    return call


def interactive() -> bool:
    """Whether someone is watching: standard error is a terminal, or the code runs in a Jupyter kernel (where tqdm
    draws its notebook bar). Progress bars are on by default then, off in logs and CI."""
    if sys.stderr is not None and sys.stderr.isatty():
        return True
    shell = sys.modules.get("IPython")
    ipython = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return ipython is not None and type(ipython).__name__ == "ZMQInteractiveShell"


def override_transform(pre: Preprocessing, resize: int | None, crop: int | None,
                       interpolation: str | None) -> Preprocessing:
    """The model's preprocessing with the image size (and interpolation, bilinear by default) set by the user."""
    return replace(pre, resize=resize or pre.resize, crop=crop or pre.crop,
                   interpolation=interpolation or "bilinear", source=f"{pre.source}; transform set by the user")


def as_resolved(
    model: str | nn.Module | ResolvedModel,
    fresh_model: Callable[[], nn.Module] | None = None,
    *,
    arch: str | None = None,
    pretrained: bool = True,
    seed: int | None = None,
    model_id: str | None = None,
) -> ResolvedModel:
    """A :class:`ResolvedModel` from any ``model`` that :func:`measure` takes (a spec, an ``nn.Module``, ...); a
    spec is built under the seed of (seed, model_id), as :func:`~layercrit.models.resolve_model` does."""
    if isinstance(model, ResolvedModel):
        return model
    if isinstance(model, nn.Module):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        pre = Preprocessing(in_chans=convs[0].in_channels if convs else 3, source="caller's model")
        return ResolvedModel(model=model.eval(), fresh=fresh_model, preprocessing=pre,
                             spec=f"python:{type(model).__name__}", num_classes=0)
    if isinstance(model, str):
        return resolve_model(model, arch=arch, pretrained=pretrained, seed=seed, model_id=model_id)
    raise LayercritError(f"model must be a spec string or an nn.Module, not {type(model).__name__}")


def normalization(resolved: ResolvedModel, *, normalize: bool = True, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> ResolvedModel:
    """``resolved`` with its input normalisation set: as it is; by ``mean``/``std`` (a bare module gets wrapped);
    or none (``normalize=False``: the images are already normalised). The trained layers are shared, not copied."""
    if (mean is None) != (std is None):
        raise LayercritError("give mean and std together (one value per input channel each)")
    if not normalize and mean is not None:
        raise LayercritError("normalize=False feeds the images as they are: give it without mean and std")
    wrapped = isinstance(resolved.model, Normalized)
    if mean is None and (normalize or not wrapped):
        return resolved
    in_chans = resolved.model.in_chans if wrapped else resolved.preprocessing.in_chans
    if mean is None:
        mean, std = (0.0,) * resolved.model.mean.numel(), (1.0,) * resolved.model.mean.numel()
    if len(mean) != len(std):
        raise LayercritError(f"mean has {len(mean)} values and std {len(std)}: give one per input channel each")
    how = f"mean {tuple(mean)}, std {tuple(std)} given by the user" if normalize else "images already normalised"
    pre = replace(resolved.preprocessing, mean=tuple(mean), std=tuple(std), in_chans=in_chans,
                  source=f"{resolved.preprocessing.source}; {how}")

    def rewrap(module: nn.Module) -> nn.Module:
        return Normalized(module.model if wrapped else module, pre.mean, pre.std, pre.in_chans).eval()

    fresh = resolved.fresh
    return replace(resolved, model=rewrap(resolved.model), preprocessing=pre,
                   fresh=None if fresh is None else lambda: rewrap(fresh()))


def _kernel(model: nn.Module, target: Target) -> str | None:
    """``"3x3"`` for a single convolution, None for anything else."""
    if len(target.modules) != 1:
        return None
    size = getattr(model.get_submodule(target.modules[0]), "kernel_size", None)
    return "x".join(map(str, size)) if isinstance(size, tuple) else None


def check_sizes(*, images: int | None = None, batch_size: int | None = None, max_cache_mb: float = 0.0) -> None:
    """Refuse counts that would silently mean something else (``images=-5``: all but five) or fail deep inside."""
    if images is not None and images < 1:
        raise LayercritError(f"images={images}: give a number of images of at least 1 (None for all of them)")
    if batch_size is not None and batch_size < 1:
        raise LayercritError(f"batch_size={batch_size}: give at least 1 image per forward")
    if max_cache_mb < 0:
        raise LayercritError(f"max_cache_mb={max_cache_mb}: give a memory budget of 0 MB or more")


SEED_RANGE = (-2**63, 2**63 - 1)  # a 64-bit integer: what torch's generators and the sweep store's SQLite hold


def check_seeds(**seeds: int | None) -> None:
    """Refuse a seed outside :data:`SEED_RANGE` (``seed=99999999999999999999`` overflows torch's generator)."""
    for name, value in seeds.items():
        if value is not None and not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
            raise LayercritError(f"{name}={value}: give a seed from -2**63 to 2**63-1 (a 64-bit integer)")


def check_device(device: str | None, name: str = "device") -> str:
    """``device``, or cuda when available and else cpu; a device this machine lacks is refused, naming those it has."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:  # not a device string at all, e.g. "tpu7"
        parsed = None
    if parsed is None or not _present(parsed):
        gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        mps = ["mps"] if torch.backends.mps.is_available() else []
        raise LayercritError(f"{name} {device!r} is not available on this machine: use one of "
                             f"{', '.join(['cpu', *gpus, *mps])}")
    return device


def _present(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if backend is None or not hasattr(backend, "device_count") or not backend.device_count():
        return False
    return device.index is None or device.index < backend.device_count()


def _precision_label(precision: str, device: str) -> str:
    if precision == "fp32" and device.startswith("cuda") and torch.backends.cudnn.allow_tf32:
        return "fp32(tf32-conv)"  # cuDNN convolutions use TF32 on Ampere and later unless disabled
    return precision

"""``measure``: the library's front door for notebooks. Model + data + options → a results DataFrame, one row per
unit. Its options are the fields of :class:`~layercrit.spec.Experiment`; it builds one and runs
:func:`~layercrit.measurement.prepare.prepare` then :func:`~layercrit.measurement.prepare.execute`."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import PurePath

import pandas as pd
from torch import nn

from ..errors import LayercritError
from ..models import ResolvedModel
from ..spec import FIELDS, Experiment, join_reset, split_reset
from .prepare import execute, prepare
from .resets import Reset


def measure(
    model: str | nn.Module | ResolvedModel,
    data=None,
    spec: Experiment | None = None,
    *,
    model_id: str | None = None,
    fresh_model: Callable[[], nn.Module] | None = None,
    arch: str | None = None,
    pretrained: bool = True,
    reset_options: Mapping[str, object] | None = None,
    bn_batches: int | None = None,
    progress: bool | None = None,
    on_rows: Callable[[pd.DataFrame], None] | None = None,
    **options,
) -> pd.DataFrame:
    """Reset each selected layer in turn, ``trials`` times, and measure the model on the same images.

    Args:
        model: a spec (``timm:resnet50.a1_in1k``, ``torchvision:resnet50``, ``zoo:fmnist/baseline``,
            ``MODULE:FACTORY``, a checkpoint path with ``arch=``), an ``nn.Module`` (it gets the inputs as they are
            unless ``mean``/``std`` are given; give ``fresh_model`` to rerandomize with the architecture's own init,
            otherwise each layer's ``reset_parameters()`` is used), or a :class:`~layercrit.models.ResolvedModel`.
        data: ``fashion-mnist``, an image folder, an :class:`~layercrit.data.EvalSet`, ``(inputs, labels)``
            tensors (inputs: images N×C×H×W, or token ids / a dict of tensors for other tasks), or a torch
            ``Dataset`` / ``DataLoader`` of (image, label) (:mod:`layercrit.data.torch_data`). Default:
            ``spec.data``.
        spec: an :class:`~layercrit.spec.Experiment`; the keyword options below replace its fields.
        model_id: the model's name in the rows (default: its spec). arch, pretrained: as
            :func:`layercrit.resolve_model`.
        reset_options: the named reset's options, e.g. ``{"checkpoint": "init.pth"}`` (reinit/rewind),
            ``{"scale": 0.1}`` (noise), ``{"alpha": [0.25, 0.5, 1.0], "base": "rerandomize"}`` (interpolate: one
            set of rows per α, with an ``alpha`` column); folded into ``reset``'s text
            (``noise(scale=0.1)``); ``trust_checkpoint: True`` lets the checkpoint hold pickled objects.
        bn_batches: K of ``bn="recalibrate"`` (or write ``bn="recalibrate K"``).
        progress: a progress bar over (layer, trial) × batches; default: when someone is watching.
        on_rows: called with the rows finished so far after each chunk of layers (to persist them).
        **options: any field of :class:`~layercrit.spec.Experiment` (the README's option table), e.g.
            ``layers="conv,linear"`` (kinds ``conv``, ``linear``, ``bn``, ``ln`` and/or name globs; the default
            takes the kinds the model has; or a list of module names and
            :class:`~layercrit.measurement.layers.Target` groups), ``reset="rerandomize"`` (or ``zero``,
            ``reinit``, ``rewind``, ``noise``, ``interpolate``, or a :class:`Reset` object), ``trials=3`` (or the
            trial numbers, e.g. ``[2]``), ``images=10_000``, ``seed=0``, ``data_seed``, ``bn="keep"``,
            ``groups``, ``cumulative``, ``task`` (``image-classification``, ``sequence-classification``, or a
            :class:`~layercrit.measurement.tasks.Task`), ``normalize``/``mean``/``std``, ``resize``/``crop``/
            ``interpolation``, ``engine="fast"`` (or ``naive``, the oracle), ``precision``, ``batch_size``,
            ``device``, ``exact``/``channels_last``/``fold_bn``, ``target_ci`` (the sequential design),
            ``image_target_ci``, ``save_logits`` (a folder), ``log_batches``, ``per_class`` (a CSV file).

    Returns:
        A DataFrame with one row for the unmodified model (``layer == "original"``) and one per (layer, trial),
        columns :data:`~layercrit.columns.COLUMNS` (plus ``alpha`` after ``reset`` for an interpolation).

    Example:
        >>> rows = measure("zoo:fmnist/baseline", "fashion-mnist", images=200, trials=1)  # doctest: +SKIP
    """
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*FIELDS, "reset_options", "bn_batches", "model_id"], n=1)
        raise LayercritError(f"measure() has no option {unknown[0]!r}" + (f" (did you mean {close[0]}?)" if close
                                                                         else f"; the options: {', '.join(FIELDS)}"))
    experiment, trust = experiment_from_keywords(spec or Experiment(), options, reset_options, bn_batches)
    prepared = prepare(model, data, experiment, model_id=model_id, fresh_model=fresh_model, arch=arch,
                       pretrained=pretrained, trust_checkpoint=trust)
    return execute(prepared, on_rows=on_rows, progress=progress)


def experiment_from_keywords(spec: Experiment, options: dict, reset_options: Mapping[str, object] | None,
                             bn_batches: int | None) -> tuple[Experiment, bool]:
    """``spec`` with ``options`` (Experiment fields) replaced, ``reset_options`` folded into the reset's text and
    ``bn_batches`` into ``bn``; and whether the reset's checkpoint may hold pickled objects."""
    values = {name: str(value) if isinstance(value, PurePath) else value for name, value in options.items()}
    reset = values.get("reset", spec.reset)
    given = dict(reset_options or {})
    trust = bool(given.pop("trust_checkpoint", False))
    bn = values.get("bn", spec.bn)
    if isinstance(reset, Reset) and (given or bn != "keep" or bn_batches is not None):
        raise LayercritError("reset is a Reset object: give its options (and bn) to the object, not to measure()")
    if given:
        name, written = split_reset(reset)
        values["reset"] = join_reset(name, {**given, **written})
    if bn_batches is not None:
        values["bn"] = f"{bn} {bn_batches}"
    return replace(spec, **values), trust
